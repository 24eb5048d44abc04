"""What the grid runner costs per job, and how a study scales from one Ray worker to two.

**Overhead.** A study of many tiny real stages (small_cnn width 2 on 400 bundled images, one
epoch: each stage takes a fraction of a second) is run three ways in one process, after an untimed
warm-up that loads the data and imports everything:

* **direct**: each stage's runner (``antidoor.experiment.stages.RUNNERS``) called in plan order
  in this process: the same training, evaluation and checkpoints, with no store, no scheduler.
* **grid, inline**: ``run_grid(..., backend="local", workers=1)``: planning, the SQLite records
  (start, finish with metrics and artifact hashes), scheduling, in this process.
* **grid, ray**: ``run_grid(..., backend="ray", workers=1)`` on a local Ray (started before, its
  start-up reported apart): the same plus moving each job to a Ray worker process and back.

Overhead per job = (grid wall time - direct wall time) / number of stages (median rounds), and,
less exposed to the shared machine's noise, (grid wall time - the stages' own compute seconds as
the store records them) / number of stages: everything the runner does outside the stage itself
(planning, SQLite records, artifact hashes, scheduling, moving jobs to Ray workers and back).

**Speed-up.** A study of CPU-bound stages (small_cnn width 16 on 1,000 images, 2 epochs; 4 seeds:
4 clean, 4 backdoored, 4 purified models) runs on a local Ray with 2 CPUs, first with one job at a
time (``workers=1``), then with two (``workers=2``), alternating, ``--repeats`` times each; every
job uses one thread (``threads: 1``, OMP_NUM_THREADS=1). Ray's worker processes are warmed up
(torch and antidoor imported) before any timing. The JSON also holds the 1-minute load average
before and after each run, the sum of the stages' own compute seconds (it grows when other
processes take the cores) and, before and after the runs, the machine's capacity for 2 processes
at that moment: the throughput ratio of 2 plain CPU loops in 2 processes of this session against
1 loop in 1 process. On an idle 2-core machine it is about 2; on a busy one with Linux's autogroup
scheduling (processes of one session share one fair share of the CPUs) it falls towards 1, and no
2-worker speed-up can exceed it.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/grid_overhead.py --out benchmarks/results/grid_overhead_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch

from antidoor.experiment import STORE_NAME, Store, load_study, plan, run_grid
from antidoor.experiment.stages import RUNNERS, StageContext
from antidoor.utils import atomic_write_json, set_quiet

TINY = {
    "name": "overhead",
    "datasets": [{"name": "cifar10-mini", "n_train": 400, "n_test": 100}],
    "models": [{"name": "small_cnn", "width": 2}],
    "attacks": [{"name": "badnets", "pratio": 0.1}],
    "defenses": [{"name": "ft", "epochs": 1, "batch_size": 8}, {"name": "ft", "epochs": 1, "batch_size": 4}],
    "train": {"epochs": 1, "batch_size": 32},
    "device": "cpu",
    "curves": False,
}
CPU_BOUND = {
    "name": "speedup",
    "datasets": [{"name": "cifar10-mini", "n_train": 1000, "n_test": 500}],
    "models": [{"name": "small_cnn", "width": 16}],
    "attacks": [{"name": "badnets", "pratio": 0.1}],
    "defenses": [{"name": "ft", "epochs": 4, "batch_size": 8}],
    "seeds": [0, 1, 2, 3],
    "train": {"epochs": 2, "batch_size": 32, "lr": 0.05},
    "device": "cpu",
}


def load() -> float:
    return os.getloadavg()[0]


def _spin(n: int) -> float:
    t0 = time.perf_counter()
    x = 0
    for i in range(n):
        x += i
    return time.perf_counter() - t0


def capacity(n: int = 10_000_000) -> float:
    """How much faster 2 processes of this session finish 2 fixed CPU loops than 1 process finishes 1
    (throughput ratio): the most any 2-worker speed-up can reach at this moment on this machine."""
    import concurrent.futures as cf
    import multiprocessing

    with cf.ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        list(pool.map(_spin, [1000, 1000]))  # start both workers
        t0 = time.perf_counter()
        pool.submit(_spin, n).result()
        one = time.perf_counter() - t0
        t0 = time.perf_counter()
        list(pool.map(_spin, [n, n]))
        two = time.perf_counter() - t0
    return round(2 * one / two, 3)


def direct(study: Any, folder: Path) -> float:
    """Every stage's runner, in plan order, in this process: no store, no scheduler."""
    t0 = time.perf_counter()
    for s in plan(study):
        ctx = StageContext(folder, study.device, {k: folder / f"artifacts/{k}/{v[:20]}.safetensors" for k, v in s.deps.items()})
        RUNNERS[s.kind](s, ctx)
    return time.perf_counter() - t0


def timed_grid(study: Any, folder: Path, **kw: Any) -> dict[str, Any]:
    before = load()
    t0 = time.perf_counter()
    summary = run_grid(study, folder, **kw)
    wall = time.perf_counter() - t0
    with Store(folder / STORE_NAME) as store:
        stage_seconds = sum(r["seconds"] or 0 for r in store.runs())
    assert summary.failed == 0, summary.failures
    return {"wall_s": round(wall, 3), "stage_seconds_sum": round(stage_seconds, 3), "stages": summary.stages,
            "outside_stages_s_per_job": round((wall - stage_seconds) / summary.stages, 4),
            "load_before": before, "load_after": load()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    p.add_argument("--seeds", type=int, default=8, help="seeds of the overhead study (4 stages each)")
    p.add_argument("--repeats", type=int, default=3, help="rounds of each timing (medians are reported)")
    p.add_argument("--skip-speedup", action="store_true")
    args = p.parse_args()
    set_quiet(True)
    torch.set_num_threads(1)
    import ray

    tmp = Path(tempfile.mkdtemp(prefix="grid-bench-"))
    result: dict[str, Any] = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
                                          "ray": ray.__version__, "processor": platform.processor() or platform.machine()},
                              "load_at_start": os.getloadavg()}
    try:
        tiny = load_study(base={**TINY, "seeds": list(range(args.seeds))})
        n = len(plan(tiny))
        direct(load_study(base={**TINY, "seeds": [99]}), tmp / "warmup")  # data cached, imports done
        t0 = time.perf_counter()
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
                 runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
        ray_start = time.perf_counter() - t0
        warm = ray.remote(num_cpus=1)(lambda: __import__("antidoor.experiment.stages") and __import__("torch").get_num_threads())
        ray.get([warm.remote() for _ in range(4)])
        rounds: dict[str, list[Any]] = {"direct": [], "inline": [], "ray": []}
        for i in range(args.repeats):  # alternated, so slow spells of the shared machine hit all three
            rounds["direct"].append(round(direct(tiny, tmp / f"direct{i}"), 3))
            rounds["inline"].append(timed_grid(tiny, tmp / f"inline{i}"))
            rounds["ray"].append(timed_grid(tiny, tmp / f"ray{i}", backend="ray", workers=1))
        med = {"direct": statistics.median(rounds["direct"]),
               **{k: statistics.median(r["wall_s"] for r in rounds[k]) for k in ("inline", "ray")}}
        result["overhead"] = {
            "stages": n, "study": TINY, "seeds": args.seeds, "rounds": rounds, "median_wall_s": med,
            "ray_init_s": round(ray_start, 2),
            "per_job_s_inline": round((med["inline"] - med["direct"]) / n, 4),
            "per_job_s_ray": round((med["ray"] - med["direct"]) / n, 4),
        }
        print(json.dumps({k: v for k, v in result["overhead"].items() if k not in ("study", "rounds")}), flush=True)
        if not args.skip_speedup:
            study = load_study(base=CPU_BOUND)
            runs: dict[str, list[dict[str, Any]]] = {"1": [], "2": []}
            caps = [capacity()]
            for i in range(args.repeats):
                for w in ("1", "2"):
                    folder = tmp / f"speed-{w}-{i}"
                    runs[w].append(timed_grid(study, folder, backend="ray", workers=int(w)))
                    shutil.rmtree(folder)
                    print(w, runs[w][-1], flush=True)
            caps.append(capacity())
            med = {w: statistics.median(r["wall_s"] for r in rs) for w, rs in runs.items()}
            result["speedup"] = {"study": CPU_BOUND, "stages": len(plan(study)), "runs": runs,
                                 "median_wall_s": med, "speedup": round(med["1"] / med["2"], 3),
                                 "machine_capacity_2_processes_before_after": caps}
            print(json.dumps({"median_wall_s": med, "speedup": result["speedup"]["speedup"], "capacity": caps}))
        ray.shutdown()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result["load_at_end"] = os.getloadavg()
    if args.out:
        atomic_write_json(args.out, result)


if __name__ == "__main__":
    main()
