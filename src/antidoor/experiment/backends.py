"""Where jobs run: in this process, in N local worker processes, or on a Ray cluster.

Every backend runs the same function, :func:`antidoor.experiment.stages.execute`, which records
the stage in the study's store itself; the backend only moves the job there and says when it is
over. On a Ray cluster of several machines the study folder must be on a file system every node
sees (the checkpoints and the SQLite file live there).
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing
import os
import socket
import threading
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Protocol

from antidoor.errors import AntidoorError
from antidoor.experiment.stages import Job, execute

BACKENDS = ("local", "ray")


class Backend(Protocol):
    slots: int  # jobs in flight at once

    def submit(self, job: Job) -> Any: ...

    def wait(self, handles: list[Any]) -> list[tuple[Any, dict[str, Any]]]:
        """Block until at least one handle is finished; return (handle, result) for each finished one."""
        ...

    def close(self) -> None: ...


def _lost(job: Job, e: BaseException) -> dict[str, Any]:
    """A worker that died (killed, out of memory) never recorded its failure: the driver does."""
    return {"key": job.stage.key, "status": "lost", "error": f"worker lost: {type(e).__name__}: {e}", "seconds": None}


class InlineBackend:
    """Runs each job in this process as it is submitted (``--workers 1``)."""

    slots = 1

    def __init__(self) -> None:
        self._results: dict[int, dict[str, Any]] = {}

    def submit(self, job: Job) -> Any:
        handle = len(self._results)
        self._results[handle] = execute(job)
        return handle

    def wait(self, handles: list[Any]) -> list[tuple[Any, dict[str, Any]]]:
        return [(h, self._results.pop(h)) for h in handles]

    def close(self) -> None:
        pass


def _init_worker() -> None:
    """Worker processes end when the driver dies (killed, even with SIGKILL), so a killed grid leaves
    no orphan running on: a daemon thread checks once a second that the parent is still the driver.
    (PR_SET_PDEATHSIG proved unreliable here for pool workers, so it is not used.)"""
    import os
    import threading
    import time

    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)  # the stage in flight stays 'running' in the store; --resume runs it again

    threading.Thread(target=watch, name="antidoor-parent-watch", daemon=True).start()


class ProcessBackend:
    """N local worker processes (spawned: no forked torch state)."""

    def __init__(self, workers: int) -> None:
        self.slots = workers
        self.pool = self._new_pool()
        self._jobs: dict[cf.Future, Job] = {}

    def _new_pool(self) -> cf.ProcessPoolExecutor:
        return cf.ProcessPoolExecutor(self.slots, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker)

    def submit(self, job: Job) -> Any:
        try:
            fut = self.pool.submit(execute, job)
        except BrokenProcessPool:  # a worker died (its jobs are reported lost): go on with a fresh pool
            self.pool.shutdown(wait=False, cancel_futures=True)
            self.pool = self._new_pool()
            fut = self.pool.submit(execute, job)
        self._jobs[fut] = job
        return fut

    def wait(self, handles: list[Any]) -> list[tuple[Any, dict[str, Any]]]:
        done, _ = cf.wait(handles, return_when=cf.FIRST_COMPLETED)
        out = []
        for fut in done:
            job = self._jobs.pop(fut)
            try:
                out.append((fut, fut.result()))
            except Exception as e:  # BrokenProcessPool and the like
                out.append((fut, _lost(job, e)))
        return out

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


class RayBackend:
    """Jobs as Ray tasks: on the cluster at ``address`` (started with ``ray start``), on one already
    initialised in this process (``ray.init(...)``), or on a local one started here."""

    def __init__(self, workers: int | None, address: str | None, threads: int) -> None:
        try:
            import ray
        except ImportError:
            raise AntidoorError("--backend ray needs Ray: pip install 'antidoor[ray]'") from None
        self.ray = ray
        self.started = False
        if not ray.is_initialized():
            probe_address(address)
            _init_within(ray, address, _connect_timeout() if address is not None else None)  # ray.init alone waits minutes
            self.started = True
        elif address is not None:
            raise AntidoorError("Ray is already initialised in this process; drop --address")
        cpus = int(ray.cluster_resources().get("CPU", 1))
        self.slots = workers or max(1, cpus // threads)
        self.remote = ray.remote(num_cpus=threads, max_retries=0)(execute)
        self._jobs: dict[Any, Job] = {}

    def submit(self, job: Job) -> Any:
        ref = self.remote.remote(job)
        self._jobs[ref] = job
        return ref

    def wait(self, handles: list[Any]) -> list[tuple[Any, dict[str, Any]]]:
        ready, _ = self.ray.wait(handles, num_returns=1)
        out = []
        for ref in ready:
            job = self._jobs.pop(ref)
            try:
                out.append((ref, self.ray.get(ref)))
            except Exception as e:  # the worker died (execute itself catches the stage's own errors)
                out.append((ref, _lost(job, e)))
        return out

    def close(self) -> None:
        if self.started:
            self.ray.shutdown()


def _connect_timeout() -> float:
    try:
        return float(os.environ.get("ANTIDOOR_RAY_CONNECT_TIMEOUT", "30"))
    except ValueError:
        raise AntidoorError("ANTIDOOR_RAY_CONNECT_TIMEOUT must be a number of seconds") from None


def probe_address(address: str | None, timeout: float = 5.0) -> None:
    """A TCP connection to ``HOST:PORT`` first: an address where nothing listens fails in seconds."""
    if address in (None, "auto", "local"):
        return
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise AntidoorError(f"--address {address!r}: expected HOST:PORT (e.g. 10.0.0.5:6379), ray://HOST:PORT or auto")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as e:
        raise AntidoorError(f"--address {address!r}: nothing answers there ({e.strerror or type(e).__name__}); "
                            "is the cluster started (`ray start --head`)?") from None


def _init_within(ray: Any, address: str | None, timeout: float | None) -> None:
    """``ray.init`` in a daemon thread, given up on after ``timeout`` seconds (it has no timeout of its own);
    ``timeout`` None: in this thread (starting a local cluster, which answers)."""
    outcome: dict[str, BaseException | None] = {}

    def connect() -> None:
        try:
            ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)
            outcome["error"] = None
        except BaseException as e:
            outcome["error"] = e

    if timeout is None:
        connect()
    else:
        thread = threading.Thread(target=connect, name="antidoor-ray-init", daemon=True)
        thread.start()
        thread.join(timeout)
    if "error" not in outcome:
        raise AntidoorError(f"--address {address!r}: no Ray cluster answered within {timeout:.0f} s")
    e = outcome["error"]
    if isinstance(e, (ConnectionError, RuntimeError, ValueError)):
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise AntidoorError(f"--address {address!r}: cannot connect to a Ray cluster ({first})") from None
    if e is not None:
        raise e


def check_backend(name: str, workers: int | None, address: str | None = None) -> None:
    if name not in BACKENDS:
        raise AntidoorError(f"--backend {name!r}: unknown; allowed: {', '.join(BACKENDS)}")
    if workers is not None and workers < 1:
        raise AntidoorError(f"--workers {workers}: must be at least 1")
    if name == "local" and address is not None:
        raise AntidoorError("--address is for --backend ray")


def make_backend(name: str, workers: int | None, address: str | None = None, threads: int = 1) -> Backend:
    check_backend(name, workers, address)
    if name == "ray":
        return RayBackend(workers, address, threads)
    return InlineBackend() if (workers or 1) == 1 else ProcessBackend(workers or 1)
