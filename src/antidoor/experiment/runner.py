"""The grid runner: plan the study, skip what the store already holds, schedule the rest.

A stage is submitted as soon as its upstream stages are done, so the purifications of one
(dataset, model, attack, seed) run while other backdoored models still train. A stage whose
upstream failed is recorded as failed with the reason and is not run; every other job goes on.
With ``resume`` nothing that finished (status ``done`` and its checkpoint on disk) runs again;
stages left ``running`` by a killed grid, and failed ones, are run again. A finished stage whose
checkpoint is gone runs again only when a stage still to run needs that checkpoint, so a study's
store and stress results committed without their checkpoints resume where they stopped; where that
rerun does not reproduce its results (another CPU), the finished stages of its incomplete
(attack, seed) blocks run again too, so no block mixes two models, while complete blocks stay. A checkpoint on
disk that a stage left to run reads must be the one the store recorded (its sha256): another run's (a store copied
from another machine over an older folder) counts as missing. One driver per study
folder at a time (the workers may be many): :func:`driver_lock`. ``touch FOLDER/STOP`` during a run ends it
gracefully: the stages in flight finish and are recorded, no new one starts, and ``--resume`` goes on.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from rich.markup import escape

from antidoor.errors import AntidoorError
from antidoor.experiment.backends import Backend, check_backend, make_backend
from antidoor.experiment.stages import MEASURES_UPSTREAM, STORE_NAME, Job, Stage, plan
from antidoor.experiment.store import Store, config_key
from antidoor.experiment.study import StudyConfig
from antidoor.utils import file_sha256, info, warn


@dataclass
class GridSummary:
    stages: int
    reused: int
    done: int = 0
    failed: int = 0
    left: int = 0  # stages not run because a stop was asked for (STOP_NAME); --resume runs them
    seconds: float = 0.0
    failures: list[str] = field(default_factory=list)


def git_commit() -> str | None:
    """The commit of the antidoor sources, when they are a git checkout (None otherwise)."""
    if "site-packages" in Path(__file__).parts:  # an installed copy: a repository around it is someone else's
        return None
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True,
                             timeout=5, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


LOCK_NAME = ".grid.lock"
STOP_NAME = "STOP"  # touch it in a study folder to end the running grid after the stages in flight


@contextlib.contextmanager
def driver_lock(folder: Path) -> Iterator[None]:
    """One driver per study folder: an exclusive ``flock`` on ``folder/.grid.lock`` for the whole run.

    The kernel releases it when the driver ends, however it ends (``kill -9`` included), so a killed
    grid never leaves a stale lock; a second driver is refused at once, before it touches anything.
    """
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            raise AntidoorError(f"study folder {str(folder)!r} is being run by another `antidoor grid` ({holder}); "
                                "wait for it to finish (then --resume), or choose another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def run_grid(study: StudyConfig, out: str | Path, backend: str = "local", workers: int | None = None,
             address: str | None = None, resume: bool = False) -> GridSummary:
    """Run every stage of ``study`` into the folder ``out`` (its store: ``out/study.sqlite``)."""
    from antidoor.checkpoint import versions
    from antidoor.validate import check_output_dir

    # every check before anything is written: backend, device, folder; then the backend connects (a Ray
    # address that does not answer fails here, with nothing created)
    check_backend(backend, workers, address)
    check_job_device(study.device, local=backend == "local")
    out = check_output_dir(out, (STORE_NAME,)).resolve()
    if (out / STORE_NAME).is_file() and (out / STORE_NAME).stat().st_size > 0:
        Store(out / STORE_NAME, readonly=True).close()  # someone else's file or a corrupt one: refused untouched
    stages = plan(study)
    runner = make_backend(backend, workers, address, study.threads)
    try:
        with driver_lock(out), Store(out / STORE_NAME) as store:
            return _run(study, out, stages, runner, store, resume, backend, versions)
    finally:
        runner.close()


def _run(study: StudyConfig, out: Path, stages: list[Stage], runner: Backend, store: Store, resume: bool, backend: str,
         versions: Callable[[], dict[str, str]]) -> GridSummary:
    status = store.status()
    if status and not resume:
        raise AntidoorError(f"{out} already holds a study ({len(status)} stage runs); continue it with --resume "
                            "or choose another --out")
    files = _check_trigger_files(study, store)
    store.set_meta("study", study.dump())  # with the entries' labels: `--resume` without the YAML names rows alike
    store.set_meta(TRIGGER_FILES, files)
    planned = {s.key for s in stages}
    orphans = [k for k, st in status.items() if st == "running" and k not in planned]
    if orphans:  # left 'running' by a grid that was killed, under settings the study no longer has: nothing will rerun them
        store.invalidate(orphans, "interrupted: the grid running it ended before it finished, and the study no longer "
                                  "has this stage's settings")
    (out / STOP_NAME).unlink(missing_ok=True)  # left by an earlier stop (we hold the lock): this run starts afresh
    for tmp in (out / "artifacts").glob("*/.*.tmp"):  # half-written checkpoints of a killed grid (we hold the lock)
        tmp.unlink(missing_ok=True)
    on_disk = {s.key for s in stages if status.get(s.key) == "done" and (out / s.artifact).is_file()}
    # a checkpoint on disk that a stage still to run will read must be the one the store recorded: a store
    # brought from another machine (or restored from a copy) over an older folder would otherwise build new
    # stages on another run's model, under the record of this one. Only the checkpoints to be read are hashed.
    distrusted: set[str] = set()
    checked: set[str] = set()
    while True:
        finished, needed, bare, missing = _finished_stages(stages, status, on_disk, distrusted)
        to_check = [s for s in stages if s.key in (finished & needed) - checked]
        checked.update(s.key for s in to_check)
        mismatched = _foreign_checkpoints(out, to_check, store)
        if not mismatched:
            break
        for s in mismatched:
            warn(f"{s.describe()}: {s.artifact} is not the checkpoint the store recorded for it (another run's, e.g. "
                 "a store copied from another machine over this folder); running it again")
        distrusted.update(s.key for s in mismatched)
    for s in missing:
        warn(f"{s.describe()}: recorded as done but {s.artifact} is missing; running it again")
    if bare:
        info(f"{len(bare)} finished stage(s) without their checkpoint are not rerun: no stage left to run needs them "
             f"({', '.join(s.describe() for s in bare[:2])}{', ...' if len(bare) > 2 else ''})")
    summary = GridSummary(len(stages), len(finished))
    pending = [s for s in stages if s.key not in finished]
    here = versions()
    _warn_other_cpu([s for s in pending if status.get(s.key) in ("done", "running")], store, here,
                    on_cpu=_runs_on_cpu(study.device))
    info(f"study {study.name!r}: {len(stages)} stages, {len(finished)} already done, {len(pending)} to run "
         f"({backend} backend)")
    if not pending:
        return summary
    t0 = time.perf_counter()
    common = {"study_dir": str(out), "device": study.device, "threads": study.threads, "versions": here,
              "git_commit": git_commit()}
    _schedule(pending, finished, runner, common, store, summary, stop_file=out / STOP_NAME,
              order={st.key: i for i, st in enumerate(stages)},
              # a stage left 'running' by a killed grid may have finished before: its results are still recorded
              stale=_stale_checker(stages, {s.key for s in pending if status.get(s.key) in ("done", "running")}, finished,
                                   store))
    summary.seconds = time.perf_counter() - t0
    return summary


def _finished_stages(stages: list[Stage], status: dict[str, str], on_disk: set[str],
                     distrusted: set[str]) -> tuple[set[str], set[str], list[Stage], list[Stage]]:
    """Which stages count as finished, which finished checkpoints stages still to run need, the finished stages
    without a checkpoint that nothing needs, and the done stages that run again for want of theirs.

    A stage recorded as done whose checkpoint was deleted (to save disk, or a store copied without its
    checkpoints) runs again only if a stage still to run needs that checkpoint; plan() lists upstream
    first, so walking it backwards sees every consumer before its upstream stages. ``distrusted`` checkpoints
    count as missing."""
    finished = on_disk - distrusted
    needed: set[str] = set()
    bare: list[Stage] = []
    rerun: list[Stage] = []
    for s in reversed(stages):
        if s.key in finished:
            continue
        if status.get(s.key) == "done" and s.key not in needed:
            finished.add(s.key)
            bare.append(s)
            continue
        if status.get(s.key) == "done" and s.key not in distrusted:
            rerun.append(s)
        needed.update(s.deps.values())
    return finished, needed, bare, rerun


def _foreign_checkpoints(out: Path, stages: list[Stage], store: Store) -> list[Stage]:
    """The ``stages`` whose checkpoint on disk differs from the one the store recorded (bytes, then sha256).
    A stage whose record holds no digest (a store from before digests were kept) is trusted."""
    keys = {r["id"]: r["key"] for r in store.runs()}
    recorded = {(keys.get(a["run_id"]), a["path"]): a for a in store.artifacts()}
    foreign = []
    for s in stages:
        record = recorded.get((s.key, s.artifact))
        if record is None or not record["sha256"]:
            continue
        path = out / s.artifact
        if record["bytes"] is not None and path.stat().st_size != record["bytes"]:
            foreign.append(s)
            continue
        if file_sha256(path) != record["sha256"]:
            foreign.append(s)
    return foreign


TRIGGER_FILES = "trigger_files"  # the store's record of each attack file's sha256, path -> digest


def _check_trigger_files(study: StudyConfig, store: Store) -> dict[str, str]:
    """The sha256 of every file an attack entry names (a Blended ``pattern``, a patch ``image``), with those the store
    recorded before. A stage's key holds the file's path, not its content: an image edited in place would mix two
    triggers in one study, so a resumed study whose file changed is refused before anything is written."""
    known = store.get_meta(TRIGGER_FILES) or {}
    files = dict(known)
    for spec in study.attacks:
        for key, value in spec.items():
            if isinstance(value, str) and Path(value).is_file():
                digest = file_sha256(value)
                if known.get(value, digest) != digest:
                    raise AntidoorError(
                        f"attacks: {spec['name']}.{key} {value!r} changed since this study first used it (sha256 "
                        f"{known[value][:12]}... then, {digest[:12]}... now); its finished stages used the old image. "
                        "Restore the file, or save the new image under another name to study it as a new attack")
                files[value] = digest
    return files


def cpu_kind(recorded: dict[str, Any]) -> str:
    """A run's CPU (its ``versions`` record) as a resumed study compares it: the model name and, where recorded,
    its bf16 kernels."""
    cpu = recorded.get("cpu") or "unknown CPU"
    return f"{cpu}, bf16 kernels: {recorded['cpu_bf16']}" if recorded.get("cpu_bf16") else cpu


def cpu_difference(recorded: dict[str, Any], here: dict[str, Any]) -> Literal["same", "other", "unknown"]:
    """``"other"`` when the two records name different CPUs or different bf16 kernels (comparing what both hold),
    ``"unknown"`` when the recorded one predates the kernels' record (2026-12-07) and this CPU has none: that run
    trained in bf16 if its CPU had AMX or AVX512-BF16 (an AMD EPYC of one generation does, of another not), which
    its record cannot tell; else ``"same"``."""
    both = [k for k in ("cpu", "cpu_bf16") if recorded.get(k) and here.get(k)]
    if any(recorded[k] != here[k] for k in both):
        return "other"
    return "unknown" if not recorded.get("cpu_bf16") and here.get("cpu_bf16") == "none" else "same"


def _runs_on_cpu(device: str) -> bool:
    """Whether this machine would run the study's stages on its CPU (a remote worker may differ)."""
    from antidoor.utils import resolve_device

    try:
        return resolve_device(device).type == "cpu"
    except AntidoorError:  # a CUDA device only the Ray workers have (check_job_device let it through)
        return False


def _warn_other_cpu(reruns: list[Stage], store: Store, here: dict[str, Any], on_cpu: bool) -> None:
    """Say before the first stage when a stage to run again was recorded on another CPU: its retrained checkpoint
    will likely not reproduce (bf16 kernels differ, or this CPU has none and trains in float32), and its open block
    would then run again whole. Also when the record cannot tell and this CPU trains in float32 (``on_cpu``)."""
    keys = {s.key for s in reruns}
    others: dict[str, list[str]] = {}
    unknown: dict[str, list[str]] = {}
    for r in store.runs():
        if r["key"] in keys:
            recorded = json.loads(r["versions"] or "{}")
            difference = cpu_difference(recorded, here)
            if difference == "other":
                others.setdefault(cpu_kind(recorded), []).append(r["key"])
            elif difference == "unknown" and on_cpu:
                unknown.setdefault(recorded.get("cpu") or "unnamed CPU", []).append(r["key"])
    consequence = "the finished stages of their open blocks would then run again too"

    def names(ks: list[str]) -> str:
        return ", ".join(s.describe() for s in reruns if s.key in ks)

    for recorded_kind, ks in others.items():
        warn(f"{len(ks)} stage(s) to run again ({names(ks)}) were recorded on another CPU ({recorded_kind}; this one: "
             f"{cpu_kind(here)}): retrained here they will likely not reproduce their recorded results, and "
             f"{consequence}. Resume on that kind of CPU to keep them")
    for cpu, ks in unknown.items():
        warn(f"{len(ks)} stage(s) to run again ({names(ks)}) were recorded on a CPU named {cpu!r} before antidoor "
             "noted a CPU's bf16 kernels, and this one has none (it trains in float32): if that CPU had AMX or "
             f"AVX512-BF16, they were trained in bf16 and will likely not reproduce here, and {consequence}. Resume on a "
             "CPU with those kernels if that is where they were built")


RESULT_METRICS = ("clean_acc", "asr", "robust_acc")  # what a stage run again must reproduce for its consumers to stand


def _recorded(store: Store, keys: set[str]) -> dict[str, dict[str, float]]:
    """Each stage's recorded results (``RESULT_METRICS`` of every metric stage, final values only)."""
    ids = {r["id"]: r["key"] for r in store.runs() if r["key"] in keys}
    out: dict[str, dict[str, float]] = {k: {} for k in keys}
    for run_id, key in ids.items():
        for m in store.metrics(run_id):
            if m["step"] is None and m["name"] in RESULT_METRICS:
                out[key][f"{m['stage']}.{m['name']}"] = m["value"]
    return out


def _block(stage: Stage) -> tuple[object, ...]:
    """The rows a stage's results land in: one (dataset, model, attack, seed); the clean model's stage has no attack."""
    return tuple(stage.labels.get(k) for k in ("dataset", "model", "attack", "seed"))


def _nests(config: Any, key: str) -> bool:
    """Whether a stage config holds, below its top level, the config of the stage ``key`` (its upstream, at any depth)."""
    children = config.values() if isinstance(config, dict) else config if isinstance(config, list) else []
    return any((isinstance(c, dict) and config_key(c) == key) or _nests(c, key) for c in children)


def _stale_checker(stages: list[Stage], reruns: set[str], finished: set[str],
                   store: Store) -> Callable[[Stage, bool], list[Stage]]:
    """For a finished stage run again (its checkpoint was gone): when it does not reproduce its recorded
    results (another CPU's kernels, changed code), the finished stages built on the old checkpoint are
    stale where their (dataset, model, attack, seed) block still has stages to run, which would be built
    on the new one; they are returned, in plan order, to run again. A complete block keeps its results:
    its rows were all measured against the old checkpoint and nothing left to run joins them (the clean
    model, retrained for another attack's block, is the case). Nor is an open block judged on the store's
    row when its own stage runs again and measures that checkpoint (the attack stage's ``reference.*``): the
    row may hold another block's model, and that rerun's check decides for the block. Same machine and code:
    same numbers, nothing. ``finished`` is the scheduler's own set, read when a rerun finishes. Called with
    ``failed=True`` for a rerun that failed: the stages that waited on it are recorded as stale then, as its
    failure removed the results they would have been judged by."""
    recorded = _recorded(store, reruns)
    held_by: dict[str, list[str]] = {}  # a rerun's key -> the finished stages (store keys) that wait on its check
    planned = {s.key for s in stages}
    consumers: dict[str, list[Stage]] = {}
    for s in stages:
        for k in s.deps.values():
            consumers.setdefault(k, []).append(s)

    def stale(stage: Stage, failed: bool = False) -> list[Stage]:
        if failed:
            if held_by.get(stage.key):
                warn(f"{stage.describe()} failed: the {len(held_by[stage.key])} finished stage(s) of its block that "
                     "waited on its check are recorded as stale")
                store.invalidate(held_by.pop(stage.key), f"stale: {stage.describe()} failed before it could tell whether "
                                 "the checkpoint they were built on came back; runs again on --resume")
            return []
        held_by.pop(stage.key, None)  # it ran: its own check below judges what waited on it
        if stage.key not in recorded:
            return []
        old, now = recorded.pop(stage.key), _recorded(store, {stage.key})[stage.key]
        if not old or now == old:  # nothing recorded before (a first run), or reproduced
            return []
        seen: set[str] = set()
        todo = [stage.key]
        while todo:
            for c in consumers.get(todo.pop(), []):
                if c.key not in seen:
                    seen.add(c.key)
                    todo.append(c.key)
        built_on = [s for s in stages if s.key in seen and s.key in finished]
        open_blocks = {_block(s) for s in stages if s.key not in finished}
        # a block whose own stage runs again and measures this checkpoint once more (MEASURES_UPSTREAM) waits on that
        # rerun: the recorded row may be another block's model (retrained for another attack, on another CPU) while
        # the one this block was built on comes back the same; if it does not, that rerun's own check finds it
        checks = {_block(c): c.key for c in consumers.get(stage.key, []) if recorded.get(c.key)
                  and c.deps.get(MEASURES_UPSTREAM.get(c.kind, "")) == stage.key and _block(c) in open_blocks}
        waiting = set(checks)
        downstream = [s for s in built_on if _block(s) in open_blocks - waiting]
        held = [s for s in built_on if _block(s) in waiting]
        # a study narrowed by --set (one defense, one seed) plans only part of a block: the block's other finished
        # stages in the store were built on the old checkpoint too, and cannot stand beside the new one
        unplanned: list[dict[str, Any]] = []
        for r in store.runs():
            block = (r["dataset"], r["model"], r["attack"], r["seed"])
            if r["status"] == "done" and r["key"] not in planned and block in open_blocks \
                    and _nests(json.loads(r["config"]), stage.key):
                if block in waiting:
                    held_by.setdefault(checks[block], []).append(r["key"])
                else:
                    unplanned.append(r)
        for s in held:
            held_by.setdefault(checks[_block(s)], []).append(s.key)
        changed = [f"{n} {100 * old[n]:.2f}% -> {100 * now[n]:.2f}%" for n in sorted(old) if n in now and now[n] != old[n]]
        what = (f"{stage.describe()} ran again and did not reproduce its recorded results "
                f"({'; '.join(changed[:3]) or 'metrics differ'})")
        if held:
            info(f"{what}: {len(held)} finished stage(s) of {len(waiting)} open block(s) stand if their block's "
                 "own rerun measures the new checkpoint as it recorded the old one")
        if len(built_on) > len(downstream) + len(held):
            info(f"{what}: {len(built_on) - len(downstream) - len(held)} finished stage(s) built on the old checkpoint "
                 "keep their results, their (attack, seed) blocks being complete")
        if downstream:
            warn(f"{what}: {len(downstream)} finished stage(s) built on the old checkpoint run again too")
        if unplanned:
            warn(f"{what}: {len(unplanned)} finished stage(s) of its block that this study does not plan (a narrowed "
                 "--set) were built on the old checkpoint: recorded as stale, they run again on a --resume that plans them")
        if downstream or unplanned:
            # recorded at once, so a grid stopped before they rerun leaves no stale result standing
            store.invalidate([s.key for s in downstream] + [r["key"] for r in unplanned],
                             f"stale: built on the checkpoint of {stage.describe()} before it ran again and changed; "
                             "runs again on --resume")
        elif not built_on:
            info(f"{what}; no finished stage was built on it")
        return downstream

    return stale


def check_job_device(device: str, local: bool) -> None:
    """The study's device, checked before the grid starts (not once per failing job). On Ray the
    driver may lack the workers' GPUs, so only the spelling is checked there."""
    from antidoor.utils import resolve_device

    try:
        resolve_device(device)
    except AntidoorError as e:
        if local or "not available here" not in str(e):
            raise AntidoorError(f"study device: {e}") from None


def _schedule(pending: list[Stage], finished: set[str], runner: object, common: dict, store: Store,
              summary: GridSummary, stale: Callable[[Stage, bool], list[Stage]], stop_file: Path,
              order: dict[str, int]) -> None:
    failed: set[str] = set()
    in_flight: dict[object, Stage] = {}
    total = len(pending)
    stopping = False
    while pending or in_flight:
        if pending and (stopping or stop_file.exists()):
            if not stopping:
                info(f"{stop_file} found: no new stage starts; {len(in_flight)} in flight finish, the rest is left "
                     "for --resume")
            stopping = True
            summary.left += len(pending)
            pending.clear()
        for s in list(pending):
            bad = [k for k in s.deps.values() if k in failed]
            if bad:
                pending.remove(s)
                failed.add(s.key)
                reason = f"upstream stage failed: {', '.join(kind for kind, k in s.deps.items() if k in failed)}"
                store.record_failure(s.key, s.kind, s.config, s.labels, reason)
                summary.failed += 1
                summary.failures.append(f"{s.describe()}: {reason}")
                continue
            if len(in_flight) < runner.slots and all(k in finished for k in s.deps.values()):
                pending.remove(s)
                in_flight[runner.submit(Job(s, **common))] = s
        if not in_flight:
            if pending:  # cannot happen: plan() lists upstream stages first
                raise RuntimeError(f"{len(pending)} stages wait on stages that are not planned")
            break
        for handle, result in runner.wait(list(in_flight)):
            s = in_flight.pop(handle)
            if result["status"] == "done":
                finished.add(s.key)
                summary.done += 1
                again = stale(s)
                for a in again:
                    finished.discard(a.key)
                    summary.reused -= 1
                    total += 1
                if again:  # in plan order among the rest: a block's stages before the next seed's
                    pending[:] = sorted([*pending, *again], key=lambda st: order[st.key])
            else:
                if result["status"] == "lost":  # the worker died before it could record the failure itself
                    store.record_failure(s.key, s.kind, s.config, s.labels, result["error"])
                failed.add(s.key)
                summary.failed += 1
                summary.failures.append(f"{s.describe()}: {result['error']}")
                stale(s, True)
            n = summary.done + summary.failed
            secs = f"{result['seconds']:.1f} s" if result["seconds"] is not None else "-"
            info(escape(f"[{n}/{total}] {result['status']}: {s.describe()} ({secs})"))
