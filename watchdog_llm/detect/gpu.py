"""GPUs and the compute processes on them, through NVML (nvidia-ml-py) or a JSON stand-in.

Every query runs on ONE dedicated daemon thread per view and the caller waits at most `timeout`:
a driver in trouble can block an NVML call for minutes (a GPU falling off the bus, a wedged
`nvidia-persistenced`), and the daemon's yield path must never wait on it. A call that does not
return marks the view stuck; later calls fail at once until it returns. No second thread is ever
started for a call, so a hung driver costs one thread, not one per poll.

The stand-in view (a JSON file, see `StandinView`) runs through the same bounded thread, so its
simulated hangs exercise the real timeout path on machines without GPUs.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol, TypeVar

T = TypeVar("T")

# NVML_VALUE_NOT_AVAILABLE for an unsigned long long: what usedGpuMemory holds when NVML cannot say
# (pynvml turns it into None itself; a raw value is handled too).
VALUE_NOT_AVAILABLE = 2**64 - 1


@dataclass(frozen=True, slots=True)
class Gpu:
    index: int  # NVML index (== CUDA index under CUDA_DEVICE_ORDER=PCI_BUS_ID)
    minor: int  # /dev/nvidia<minor>: the physical id Slurm's GRES IDX refers to
    uuid: str
    name: str
    memory_total: int  # bytes
    pci_bus_id: str


@dataclass(frozen=True, slots=True)
class GpuProcess:
    minor: int  # which GPU (by minor)
    pid: int
    used_memory: int | None  # bytes; None when NVML does not say (NVML_VALUE_NOT_AVAILABLE)


class GpuError(Exception):
    """One line: what failed (e.g. 'NVML call nvmlDeviceGetComputeRunningProcesses timed out after 5 s').

    `reason` is the short cause alone (e.g. 'NVML Shared Library Not Found'), for log lines that say
    the rest themselves.
    """

    def __init__(self, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason or message


class GpuView(Protocol):
    name: str  # "nvml" or "standin:<path>"

    def gpus(self) -> list[Gpu]: ...  # raises GpuError
    def processes(self) -> list[GpuProcess]: ...  # compute processes on every GPU; raises GpuError
    def close(self) -> None: ...


# --- one bounded worker thread -------------------------------------------------------------------


@dataclass
class _Job:
    fn: Callable[[_Job], Any]
    done: threading.Event = field(default_factory=threading.Event)
    result: Any = None
    error: BaseException | None = None
    current: str = ""  # the NVML function running now: names the culprit when the job hangs
    started: float = 0.0


class _Worker:
    """Runs jobs one at a time on one daemon thread; callers wait at most `timeout` each."""

    def __init__(self, name: str, timeout: float) -> None:
        self.timeout = timeout
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        # Callers take turns, so a job never waits in the queue behind another caller's job and its
        # whole `timeout` is spent on its own NVML calls.
        self._turn = threading.Lock()
        self._stuck: _Job | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while (job := self._jobs.get()) is not None:
            job.started = time.monotonic()
            try:
                job.result = job.fn(job)
            except BaseException as e:  # handed to the caller, who decides
                job.error = e
            with self._lock:
                if self._stuck is job:
                    self._stuck = None  # the stuck call came back: the view works again
            job.done.set()

    def mark(self, job: _Job, fn_name: str) -> None:
        job.current = fn_name

    def run(self, what: str, fn: Callable[[_Job], T]) -> T:
        if not self._turn.acquire(timeout=self.timeout):
            raise GpuError(f"{what}: another NVML query is still running after {self.timeout:g} s", "busy")
        try:
            with self._lock:
                if self._closed:
                    raise GpuError(f"{what}: the GPU view is closed", "closed")
                stuck = self._stuck
                if stuck is not None:
                    age = time.monotonic() - stuck.started
                    raise GpuError(
                        f"NVML call {stuck.current or what} has not returned for {age:.0f} s: not queried",
                        f"{stuck.current or what} stuck",
                    )
                job = _Job(fn)
                self._jobs.put(job)
            if not job.done.wait(self.timeout):
                with self._lock:
                    if not job.done.is_set():
                        self._stuck = job
                        name = job.current or what
                        raise GpuError(f"NVML call {name} timed out after {self.timeout:g} s", f"{name} timed out")
            if job.error is not None:
                raise job.error
            return job.result  # type: ignore[no-any-return]
        finally:
            self._turn.release()

    def stop(self) -> None:
        with self._lock:
            self._closed = True
        self._jobs.put(None)  # a stuck thread ends when its call returns; it is a daemon either way


# --- NVML ----------------------------------------------------------------------------------------


def _text(value: object) -> str:
    """pynvml returns bytes (nvidia-ml-py >= 12.535 returns str for some calls; older, bytes)."""
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return str(value)


class NvmlView:
    """NVML through nvidia-ml-py. `nvml` is the pynvml module (a seam for tests: any object with its names)."""

    name = "nvml"

    def __init__(self, timeout: float, log: logging.Logger, nvml: ModuleType | Any | None = None) -> None:
        if nvml is None:
            try:
                import pynvml as nvml_module
            except ImportError as e:
                raise GpuError(f"nvidia-ml-py is not installed: {e}", "nvidia-ml-py not installed") from e
            nvml = nvml_module
        self._nvml = nvml
        self._log = log
        self._worker = _Worker("gpu-nvml", timeout)
        self._handles: list[Any] | None = None  # per NVML index; valid for the whole NVML session
        self._minors: list[int] = []
        self._warned: set[str] = set()  # "not supported" is said once per call name, not every poll
        try:
            self._worker.run("nvmlInit", lambda job: self._call(job, "nvmlInit"))
        except GpuError:
            self._worker.stop()
            raise

    def _call(self, job: _Job, fn_name: str, *args: Any) -> Any:
        """One pynvml call on the worker thread; NVMLError becomes GpuError naming the call."""
        self._worker.mark(job, fn_name)
        try:
            return getattr(self._nvml, fn_name)(*args)
        except self._nvml.NVMLError as e:
            raise GpuError(f"NVML call {fn_name} failed: {e}", str(e)) from e

    def _optional(self, job: _Job, fn_name: str, default: T, *args: Any) -> Any:
        """A call whose NotSupported degrades one field instead of failing the whole query."""
        try:
            return self._call(job, fn_name, *args)
        except GpuError as e:
            if not isinstance(e.__cause__, self._nvml.NVMLError_NotSupported):
                raise
            if fn_name not in self._warned:
                self._warned.add(fn_name)
                self._log.warning("GPU: %s is not supported here; using %r instead", fn_name, default)
            return default

    def _devices(self, job: _Job) -> list[Any]:
        if self._handles is None:
            count = int(self._call(job, "nvmlDeviceGetCount"))
            handles = [self._call(job, "nvmlDeviceGetHandleByIndex", i) for i in range(count)]
            # Without minor numbers (some platforms), the NVML index is the best guess at the device
            # minor: both follow PCI bus order on ordinary nodes.
            self._minors = [int(self._optional(job, "nvmlDeviceGetMinorNumber", i, h)) for i, h in enumerate(handles)]
            self._handles = handles
        return self._handles

    def _gpus(self, job: _Job) -> list[Gpu]:
        out = []
        for i, h in enumerate(self._devices(job)):
            mem = self._optional(job, "nvmlDeviceGetMemoryInfo", None, h)
            pci = self._optional(job, "nvmlDeviceGetPciInfo", None, h)
            out.append(
                Gpu(
                    index=i,
                    minor=self._minors[i],
                    uuid=_text(self._optional(job, "nvmlDeviceGetUUID", "", h)),
                    name=_text(self._optional(job, "nvmlDeviceGetName", "", h)),
                    memory_total=int(mem.total) if mem is not None else 0,
                    pci_bus_id=_text(pci.busId) if pci is not None else "",
                )
            )
        return out

    def _processes(self, job: _Job) -> list[GpuProcess]:
        out = []
        for i, h in enumerate(self._devices(job)):
            # pynvml's nvmlDeviceGetComputeRunningProcesses picks the _v3/_v2 variant the driver has.
            for p in self._optional(job, "nvmlDeviceGetComputeRunningProcesses", [], h):
                used = getattr(p, "usedGpuMemory", None)
                used = None if used is None or int(used) == VALUE_NOT_AVAILABLE else int(used)
                out.append(GpuProcess(self._minors[i], int(p.pid), used))
        return out

    def gpus(self) -> list[Gpu]:
        return self._worker.run("gpus", self._gpus)

    def processes(self) -> list[GpuProcess]:
        return self._worker.run("processes", self._processes)

    def close(self) -> None:
        with contextlib.suppress(GpuError):  # stuck or already closed: nothing more to do
            self._worker.run("nvmlShutdown", lambda job: self._call(job, "nvmlShutdown"))
        self._worker.stop()


# --- the stand-in --------------------------------------------------------------------------------


def standin_dir(path: Path) -> Path:
    """Where stand-in model workers write `<pid>.json`: `<file>.d/`."""
    return path.with_name(path.name + ".d")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: alive
    return True


class StandinView:
    """A GPU view read from a JSON file, for tests and demos without GPUs.

    The file (re-read on every call, so tests can edit it live)::

        {"driver_version": "550.54.15",
         "gpus": [{"index": 0, "minor": 0, "uuid": "GPU-...", "name": "...", "memory_total": N,
                   "pci_bus_id": "00000000:18:00.0"}, ...],
         "processes": [{"minor": 3, "pid": 1234, "used_memory": 1048576}],
         "fault": null}

    plus `<file>.d/<pid>.json` = {"pid": N, "minors": [...], "used_memory": N} written by stand-in
    model workers. A process whose pid no longer exists is dropped, as the driver drops a dead
    process's context (its per-process file is removed). `fault` simulates driver trouble:
    {"hang_s": S} blocks each call S seconds; {"error": "Driver Not Loaded"} fails it like NVML.
    """

    def __init__(self, path: Path, timeout: float, log: logging.Logger) -> None:
        self.path = path
        self.name = f"standin:{path}"
        self._log = log
        self._worker = _Worker("gpu-standin", timeout)

    def _read(self, job: _Job, fn_name: str) -> dict[str, Any]:
        self._worker.mark(job, fn_name)
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError) as e:
            raise GpuError(f"GPU stand-in {self.path}: cannot read: {e}", f"stand-in {self.path} unreadable") from e
        if not isinstance(data, dict):
            raise GpuError(f"GPU stand-in {self.path}: not a JSON object", f"stand-in {self.path} invalid")
        fault = data.get("fault") or {}
        if fault.get("hang_s"):
            time.sleep(float(fault["hang_s"]))
        if fault.get("error"):
            raise GpuError(f"NVML call {fn_name} failed: {fault['error']}", str(fault["error"]))
        return data

    def _gpus(self, job: _Job) -> list[Gpu]:
        data = self._read(job, "nvmlDeviceGetHandleByIndex")
        try:
            return [
                Gpu(
                    int(g["index"]),
                    int(g["minor"]),
                    str(g["uuid"]),
                    str(g["name"]),
                    int(g["memory_total"]),
                    str(g["pci_bus_id"]),
                )
                for g in data.get("gpus", [])
            ]
        except (KeyError, TypeError, ValueError) as e:
            raise GpuError(f"GPU stand-in {self.path}: bad gpus entry: {e!r}", "stand-in invalid") from e

    def _processes(self, job: _Job) -> list[GpuProcess]:
        data = self._read(job, "nvmlDeviceGetComputeRunningProcesses")
        try:
            procs = [
                GpuProcess(int(p["minor"]), int(p["pid"]), _opt_int(p.get("used_memory")))
                for p in data.get("processes", [])
            ]
        except (KeyError, TypeError, ValueError) as e:
            raise GpuError(f"GPU stand-in {self.path}: bad processes entry: {e!r}", "stand-in invalid") from e
        procs.extend(self._worker_files())
        return [p for p in procs if _pid_alive(p.pid)]

    def _worker_files(self) -> list[GpuProcess]:
        out: list[GpuProcess] = []
        try:
            files = sorted(standin_dir(self.path).glob("*.json"))
        except OSError:
            return out
        for f in files:
            try:
                d = json.loads(f.read_text())
                pid = int(d["pid"])
                entries = [GpuProcess(int(m), pid, _opt_int(d.get("used_memory"))) for m in d["minors"]]
            except (OSError, ValueError, KeyError, TypeError):
                continue  # being written (workers write atomically, but be lenient) or gone
            if _pid_alive(pid):
                out.extend(entries)
            else:
                with contextlib.suppress(OSError):
                    f.unlink()
        return out

    def gpus(self) -> list[Gpu]:
        return self._worker.run("gpus", self._gpus)

    def processes(self) -> list[GpuProcess]:
        return self._worker.run("processes", self._processes)

    def close(self) -> None:
        self._worker.stop()


def _opt_int(value: object) -> int | None:
    if value is None:
        return None
    n = int(value)  # type: ignore[call-overload]
    return None if n == VALUE_NOT_AVAILABLE else n


# --- opening -------------------------------------------------------------------------------------


def open_gpu_view(standin: Path | None, timeout: float, log: logging.Logger) -> GpuView | None:
    """The stand-in view when `standin` is given, else NVML; None (after one log line) if NVML is unusable.

    Never raises: a node without a driver is normal (GPU features are then off).
    """
    if standin is not None:
        log.info("GPU: using the stand-in view %s", standin)
        return StandinView(standin, timeout, log)
    try:
        return NvmlView(timeout, log)
    except GpuError as e:
        log.warning("GPU: NVML unavailable (%s): GPU features off", e.reason)
    except Exception as e:  # a broken binding must not stop the daemon: GPU features are optional
        log.warning("GPU: NVML unavailable (%s: %s): GPU features off", type(e).__name__, e)
    return None


# --- foreign processes ---------------------------------------------------------------------------


def foreign_processes(
    procs: list[GpuProcess], ours_before: set[int], ours_after: set[int], minors: set[int]
) -> list[GpuProcess]:
    """Compute processes on the given GPUs that are not ours.

    Our tree is read before AND after the NVML query: a worker forked in between is in NVML's
    answer but not in the first read, and must not be taken for foreign.
    """
    ours = ours_before | ours_after
    return [p for p in procs if p.minor in minors and p.pid not in ours]


class GpuWatch:
    """Polls view.processes() every `interval` s on its own daemon thread.

    Calls sink(minors_with_foreign_processes, those_processes) whenever that set changes, and once
    after the first successful query. `ours()` gives the pids of our model tree (read before and
    after each query); `minors()` the GPUs to watch (none: no query, empty set). A GpuError is
    logged once per streak and does not change the reported set. stop() waits at most ~1 s.
    """

    def __init__(
        self,
        view: GpuView,
        interval: float,
        ours: Callable[[], set[int]],
        minors: Callable[[], frozenset[int]],
        sink: Callable[[frozenset[int], list[GpuProcess]], None],
        log: logging.Logger,
    ) -> None:
        self._view = view
        self._interval = interval
        self._ours = ours
        self._minors = minors
        self._sink = sink
        self._log = log
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("GpuWatch.start() called twice")
        self._thread = threading.Thread(target=self._run, name="gpu-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            # A query in flight can take up to the view's timeout; the thread is a daemon and never
            # calls the sink after stop, so it is not waited for beyond ~1 s.
            thread.join(1.0)

    def poll(self) -> tuple[frozenset[int], list[GpuProcess]]:
        """One query: (minors with foreign processes, those processes). Raises GpuError."""
        minors = self._minors()
        if not minors:
            return frozenset(), []
        before = self._ours()
        procs = self._view.processes()
        foreign = foreign_processes(procs, before, self._ours(), set(minors))
        return frozenset(p.minor for p in foreign), foreign

    def _run(self) -> None:
        reported: frozenset[int] | None = None
        failing = False
        while not self._stop.is_set():
            try:
                busy, foreign = self.poll()
            except GpuError as e:
                if not failing:
                    self._log.warning("GPU: %s (keeping the last known GPU use until NVML answers)", e)
                failing = True
            except Exception:  # a bug in a callback must not end the watch silently
                self._log.exception("GPU: watch poll failed")
            else:
                if failing:
                    self._log.info("GPU: NVML answers again")
                failing = False
                if busy != reported and not self._stop.is_set():
                    reported = busy
                    self._deliver(busy, foreign)
            self._stop.wait(self._interval)

    def _deliver(self, busy: frozenset[int], foreign: list[GpuProcess]) -> None:
        try:
            self._sink(busy, foreign)
        except Exception:
            self._log.exception("GPU: sink failed on %s", sorted(busy))


def wait_released(
    view: GpuView,
    pids: set[int],
    minors: frozenset[int],
    timeout: float,
    interval: float = 0.05,
    cancel: threading.Event | None = None,
) -> tuple[float, list[GpuProcess]]:
    """Block until none of `pids` holds a context on `minors` per NVML, or `timeout` passes.

    Returns (seconds waited, processes of ours still there). Used after a yield to confirm that our
    GPU memory is freed. A failing query is retried until the timeout; if none succeeded at all,
    raises GpuError (nothing was confirmed). One query can overrun the timeout by the view's own.
    `cancel` set (the daemon is exiting) ends the wait at the next query, as a timeout would.
    """
    start = time.monotonic()
    deadline = start + timeout
    last: list[GpuProcess] | None = None
    error: GpuError | None = None
    cancel = cancel or threading.Event()
    for attempt in itertools.count():
        if attempt and cancel.wait(max(0.0, min(interval, deadline - time.monotonic()))):
            break
        try:
            last = [p for p in view.processes() if p.pid in pids and p.minor in minors]
            error = None
        except GpuError as e:
            error = e
        if last == [] or time.monotonic() >= deadline:
            break
    if last is None:
        assert error is not None
        raise error
    return time.monotonic() - start, last
