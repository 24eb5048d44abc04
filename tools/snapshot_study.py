"""Copy a running study's record (a grid folder) into a committed folder: the store and its stress results.

The store is copied with SQLite's backup API, so a grid writing to it at the same time cannot leave a
torn copy. The stress JSONs copied are those of stress stages recorded as done, plus those of stages
superseded by a rerun (their error starts with "superseded"; kept for the record, the write-up cites
them). Any other stress JSON in the destination (of a stage now stale or failed) is removed: the
committed folder never holds a result its store does not vouch for. A stage in flight for the first time
(recorded as running, nothing measured yet) is left out of the copy: it is not a result, and the committed
store reads as if it had not started. A stage rerunning (recorded as running, its earlier results still
there: the store replaces them only when the rerun ends) reads as its earlier record: done, with the committed
store's time and versions for it where that store records it done, else with its time unknown. Checkpoints are never copied.
A working store that is behind the committed one (a stage the committed store records is missing from it, or
recorded there by an older run: another machine's rows landed after it was copied) is refused, exit code 2,
unless ``--force``: the copy would drop those rows.

    python tools/snapshot_study.py runs/regime benchmarks/regime
    antidoor report runs/regime --out benchmarks/regime     # then the tables and figures
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import sqlite3
from pathlib import Path

from antidoor.experiment.stages import STORE_NAME, artifact_path

# what a rerun's start overwrites in its row (Store.start); its metrics and artifacts stay until it ends
RECORD = ("status", "attempts", "started", "finished", "seconds", "error", "worker", "versions", "git_commit")


def _committed_done(store: Path, keys: list[str]) -> dict[str, tuple]:
    """The committed store's done record (``RECORD``) of each of ``keys`` it has, read in one connection."""
    if not keys or not store.is_file():
        return {}
    with contextlib.closing(sqlite3.connect(store)) as c:
        rows = c.execute(f"SELECT key, {', '.join(RECORD)} FROM runs WHERE status = 'done' AND key IN "
                         f"({', '.join('?' * len(keys))})", keys).fetchall()
    return {key: tuple(record) for key, *record in rows}


def _labels(what: list) -> str:
    return " ".join(str(w) for w in what if w is not None)


def behind(src: Path, dst: Path) -> list[str]:
    """The stages the committed store ``dst`` records that the working store ``src`` lacks, or holds an older run
    of (started before the committed one): a working store copied before another machine committed its rows.
    Snapshotting it would take those rows out of the committed store."""
    if not (dst / STORE_NAME).is_file():
        return []
    with contextlib.closing(sqlite3.connect(src / STORE_NAME)) as c:
        here = dict(c.execute("SELECT key, started FROM runs").fetchall())
    with contextlib.closing(sqlite3.connect(dst / STORE_NAME)) as c:
        there = c.execute("SELECT key, started, stage, attack, defense, seed FROM runs").fetchall()
    return [f"{_labels(what)} ({'missing' if key not in here else 'an older run'} in the working store)"
            for key, started, *what in there
            if key not in here or (started is not None and (here[key] is None or here[key] < started))]


def snapshot(src: Path, dst: Path) -> dict[str, int]:
    (dst / "artifacts" / "stress").mkdir(parents=True, exist_ok=True)
    tmp = dst / f"{STORE_NAME}.tmp"
    tmp.unlink(missing_ok=True)
    with contextlib.closing(sqlite3.connect(src / STORE_NAME)) as a, contextlib.closing(sqlite3.connect(tmp)) as b:
        a.backup(b)
        in_flight = b.execute("SELECT id, stage, attack, defense, seed FROM runs WHERE status = 'running' AND "
                              "NOT EXISTS (SELECT 1 FROM metrics WHERE metrics.run_id = runs.id)").fetchall()
        for run_id, *what in in_flight:
            print(f"left out (in flight, nothing recorded yet): {_labels(what)}")
            b.execute("DELETE FROM artifacts WHERE run_id = ?", (run_id,))
            b.execute("DELETE FROM runs WHERE id = ?", (run_id,))
        # a rerun in flight: the store keeps the earlier results until the rerun ends, but has already written
        # 'running' over the earlier record's status and times, so they come back from the committed copy
        rerunning = b.execute("SELECT id, key, stage, attack, defense, seed FROM runs WHERE status = 'running'").fetchall()
        committed = _committed_done(dst / STORE_NAME, [key for _, key, *_ in rerunning])
        for run_id, key, *what in rerunning:
            print(f"rerun in flight, its earlier record kept: {_labels(what)}")
            earlier = committed.get(key)
            if earlier is None:
                b.execute("UPDATE runs SET status = 'done' WHERE id = ?", (run_id,))
            else:
                b.execute(f"UPDATE runs SET {', '.join(f'{c} = ?' for c in RECORD)} WHERE id = ?", (*earlier, run_id))
        b.commit()
    tmp.replace(dst / STORE_NAME)
    with contextlib.closing(sqlite3.connect(dst / STORE_NAME)) as c:
        keys = [k for (k,) in c.execute("SELECT key FROM runs WHERE stage = 'stress' AND "
                                        "(status = 'done' OR (status = 'failed' AND error LIKE 'superseded%'))")]
    want = {Path(artifact_path("stress", k)).name for k in keys}
    out = dst / "artifacts" / "stress"
    counts = {"copied": 0, "kept": 0, "removed": 0, "missing": 0, "in_flight": len(in_flight),
              "rerunning": len(rerunning)}
    for f in out.glob("*.json"):
        if f.name not in want:
            print(f"removed (no done or superseded stress stage): {f.name}")
            f.unlink()
            counts["removed"] += 1
    for name in sorted(want):
        if (src / "artifacts" / "stress" / name).is_file():
            shutil.copy2(src / "artifacts" / "stress" / name, out / name)
            counts["copied"] += 1
        elif (out / name).is_file():
            counts["kept"] += 1  # committed earlier; this checkout never had it
        else:
            print(f"missing: {name}")
            counts["missing"] += 1
    return counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src", type=Path, help="the grid's --out folder (holds study.sqlite)")
    ap.add_argument("dst", type=Path, help="the committed folder")
    ap.add_argument("--force", action="store_true",
                    help="overwrite the committed store even where it records stages the working store lacks")
    args = ap.parse_args()
    if not (args.src / STORE_NAME).is_file():
        ap.error(f"{args.src / STORE_NAME} does not exist; give the grid's --out folder")
    lost = [] if args.force else behind(args.src, args.dst)
    if lost:
        ap.error(f"{args.dst / STORE_NAME} records {len(lost)} stage run(s) that {args.src / STORE_NAME} lacks or "
                 f"holds an older run of, e.g. {'; '.join(lost[:3])}: the working store is behind the committed one "
                 "(copied before another machine's rows landed), and the snapshot would drop them. Copy the committed "
                 f"store over the working one (cp {args.dst / STORE_NAME} {args.src}/; its checkpoints stay, and "
                 "`antidoor grid --resume` reruns any that is not the one recorded), resume, then snapshot; or "
                 "--force to overwrite")
    print(snapshot(args.src, args.dst))


if __name__ == "__main__":
    main()
