"""detect/gpu.py: NVML through a fake pynvml module (no GPU here), the JSON stand-in, watch and release."""

from __future__ import annotations

import csv
import json
import logging
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pynvml
import pytest
from helpers import wait_for

from watchdog_llm.detect.gpu import (
    Gpu,
    GpuError,
    GpuProcess,
    GpuWatch,
    NvmlView,
    StandinView,
    foreign_processes,
    open_gpu_view,
    standin_dir,
    wait_released,
)

pytestmark = pytest.mark.timeout(60)

DATA = Path(__file__).parent / "data" / "gpu"
H100 = json.loads((DATA / "h100x4.json").read_text())
LOG = logging.getLogger("test.gpu")
MIB = 1024 * 1024


# --- a fake pynvml module built from recorded data -----------------------------------------------


class Obj:
    def __init__(self, **kw: Any) -> None:
        self.__dict__.update(kw)


class FakeNvml:
    """The pynvml names NvmlView uses, answering from recorded values; real pynvml error classes."""

    NVMLError = pynvml.NVMLError
    NVMLError_NotSupported = pynvml.NVMLError_NotSupported

    def __init__(self, gpus: list[dict[str, Any]], procs: dict[int, list[Any]], as_bytes: bool = True) -> None:
        self.gpus = gpus
        self.procs = procs  # NVML index -> pynvml-style process objects
        self.enc = (lambda s: s.encode()) if as_bytes else (lambda s: s)
        self.fail: dict[str, BaseException] = {}  # function name -> error it raises
        self.hang: dict[str, threading.Event] = {}  # function name -> blocks until set
        self.calls: list[str] = []

    def _enter(self, name: str) -> None:
        self.calls.append(name)
        if name in self.hang:
            self.hang[name].wait()
        if name in self.fail:
            raise self.fail[name]

    def nvmlInit(self) -> None:
        self._enter("nvmlInit")

    def nvmlShutdown(self) -> None:
        self._enter("nvmlShutdown")

    def nvmlDeviceGetCount(self) -> int:
        self._enter("nvmlDeviceGetCount")
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:
        self._enter("nvmlDeviceGetHandleByIndex")
        return i

    def nvmlDeviceGetMinorNumber(self, h: int) -> int:
        self._enter("nvmlDeviceGetMinorNumber")
        return int(self.gpus[h]["minor"])

    def nvmlDeviceGetUUID(self, h: int) -> Any:
        self._enter("nvmlDeviceGetUUID")
        return self.enc(self.gpus[h]["uuid"])

    def nvmlDeviceGetName(self, h: int) -> Any:
        self._enter("nvmlDeviceGetName")
        return self.enc(self.gpus[h]["name"])

    def nvmlDeviceGetMemoryInfo(self, h: int) -> Obj:
        self._enter("nvmlDeviceGetMemoryInfo")
        return Obj(total=self.gpus[h]["memory_total"], free=0, used=0)

    def nvmlDeviceGetPciInfo(self, h: int) -> Obj:
        self._enter("nvmlDeviceGetPciInfo")
        return Obj(busId=self.enc(self.gpus[h]["pci_bus_id"]), bus=0, device=0, domain=0)

    def nvmlDeviceGetComputeRunningProcesses(self, h: int) -> list[Any]:
        self._enter("nvmlDeviceGetComputeRunningProcesses")
        return self.procs.get(h, [])


def nvml_proc(pid: int, used: int | None) -> Obj:
    # pynvml's friendly object for c_nvmlProcessInfo_v3_t; usedGpuMemory None = NVML_VALUE_NOT_AVAILABLE.
    return Obj(pid=pid, usedGpuMemory=used, gpuInstanceId=0xFFFFFFFF, computeInstanceId=0xFFFFFFFF)


@pytest.fixture
def live_pids() -> Iterator[list[int]]:
    """Four real processes to stand for the recorded pids (the stand-in drops pids that do not exist)."""
    ps = [subprocess.Popen(["sleep", "60"]) for _ in range(4)]
    yield [p.pid for p in ps]
    for p in ps:
        p.kill()
        p.wait()


def recorded_apps(pid_map: dict[int, int]) -> list[tuple[int, str, int | None]]:
    """compute-apps.csv rows as (pid, gpu uuid, bytes or None)."""
    rows = []
    with (DATA / "compute-apps.csv").open() as f:
        for row in csv.DictReader(f, skipinitialspace=True):
            mem = row["used_gpu_memory [MiB]"]
            used = None if mem == "[N/A]" else int(mem.removesuffix(" MiB")) * MIB
            rows.append((pid_map.get(int(row["pid"]), int(row["pid"])), row["gpu_uuid"], used))
    return rows


def write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)  # atomic: the view re-reads on every call


def standin(tmp_path: Path, **changes: Any) -> Path:
    path = tmp_path / "gpus.json"
    write_json(path, {**H100, **changes})
    return path


EXPECTED_GPUS = [
    Gpu(0, 0, "GPU-5d3a1c2e-8f47-b1a9-7c36-2e90d4f1a8b3", "NVIDIA H100 80GB HBM3", 85520809984, "00000000:18:00.0"),
    Gpu(1, 1, "GPU-a7e4f0b9-3c12-6d58-e0a1-94b7c3d25f6e", "NVIDIA H100 80GB HBM3", 85520809984, "00000000:2A:00.0"),
    Gpu(2, 2, "GPU-0c9b2d47-e6f1-3a85-b2d4-61f8a0e7c93d", "NVIDIA H100 80GB HBM3", 85520809984, "00000000:3A:00.0"),
    Gpu(3, 3, "GPU-e2f86a13-7b5d-c409-1e6f-3d8a92b0c571", "NVIDIA H100 80GB HBM3", 85520809984, "00000000:5D:00.0"),
]


# --- NVML view -----------------------------------------------------------------------------------


def test_real_pynvml_without_a_driver_gives_none_and_one_log_line(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="test.gpu")
    assert open_gpu_view(None, 5.0, LOG) is None
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["GPU: NVML unavailable (NVML Shared Library Not Found): GPU features off"]


@pytest.mark.parametrize("as_bytes", [True, False], ids=["bytes", "str"])
def test_nvml_view_reads_gpus_and_processes(as_bytes: bool) -> None:
    procs = {0: [nvml_proc(1841207, 30418 * MIB), nvml_proc(1841290, None)], 3: [nvml_proc(2203312, 2**64 - 1)]}
    view = NvmlView(1.0, LOG, nvml=FakeNvml(H100["gpus"], procs, as_bytes))
    try:
        assert view.gpus() == EXPECTED_GPUS
        assert view.processes() == [
            GpuProcess(0, 1841207, 30418 * MIB),
            GpuProcess(0, 1841290, None),
            GpuProcess(3, 2203312, None),  # a raw NVML_VALUE_NOT_AVAILABLE is "unknown" too
        ]
    finally:
        view.close()


def test_processes_are_reported_by_minor_not_by_nvml_index() -> None:
    # On real nodes the minor can differ from the NVML index (a GPU at bus 62 with "Device Minor: 5").
    gpus = [{**g, "minor": m} for g, m in zip(H100["gpus"], [4, 5, 6, 7], strict=True)]
    view = NvmlView(1.0, LOG, nvml=FakeNvml(gpus, {1: [nvml_proc(42, MIB)]}))
    try:
        assert [(g.index, g.minor) for g in view.gpus()] == [(0, 4), (1, 5), (2, 6), (3, 7)]
        assert view.processes() == [GpuProcess(5, 42, MIB)]
    finally:
        view.close()


def test_stand_in_and_nvml_views_agree_on_the_same_recorded_data(tmp_path: Path, live_pids: list[int]) -> None:
    recorded = [1841207, 2203311, 2203312, 1841290]
    apps = recorded_apps(dict(zip(recorded, live_pids, strict=True)))
    by_uuid = {g["uuid"]: g for g in H100["gpus"]}
    procs: dict[int, list[Any]] = {}
    for pid, uuid, used in apps:
        procs.setdefault(by_uuid[uuid]["index"], []).append(nvml_proc(pid, used))
    nvml = NvmlView(1.0, LOG, nvml=FakeNvml(H100["gpus"], procs))
    stand = StandinView(
        standin(tmp_path, processes=[{"minor": by_uuid[u]["minor"], "pid": p, "used_memory": m} for p, u, m in apps]),
        1.0,
        LOG,
    )
    try:
        assert stand.gpus() == nvml.gpus() == EXPECTED_GPUS
        key = lambda p: (p.minor, p.pid)  # noqa: E731
        assert sorted(stand.processes(), key=key) == sorted(nvml.processes(), key=key)
        assert GpuProcess(2, live_pids[1], 73148 * MIB) in stand.processes()
        assert GpuProcess(0, live_pids[3], None) in stand.processes()
    finally:
        nvml.close()
        stand.close()


def test_a_hung_call_times_out_then_fails_fast_until_it_returns() -> None:
    fake = FakeNvml(H100["gpus"], {2: [nvml_proc(7, MIB)]})
    view = NvmlView(0.3, LOG, nvml=fake)
    release = threading.Event()
    fake.hang["nvmlDeviceGetComputeRunningProcesses"] = release
    try:
        t0 = time.monotonic()
        with pytest.raises(GpuError, match=r"NVML call nvmlDeviceGetComputeRunningProcesses timed out after 0.3 s"):
            view.processes()
        assert time.monotonic() - t0 < 0.3 + 0.5
        threads = threading.active_count()

        t1 = time.monotonic()
        with pytest.raises(GpuError, match="nvmlDeviceGetComputeRunningProcesses has not returned"):
            view.gpus()
        assert time.monotonic() - t1 < 0.1  # fails fast while stuck
        assert threading.active_count() == threads  # no thread started per call

        release.set()  # the driver call returns: the view works again
        assert wait_for(lambda: _try(view.processes), 2) == [GpuProcess(2, 7, MIB)]
    finally:
        release.set()
        view.close()


def _try(fn: Any) -> Any:
    try:
        return fn()
    except GpuError:
        return None


def test_not_supported_degrades_one_field_and_is_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    fake = FakeNvml(H100["gpus"], {1: [nvml_proc(9, MIB)]})
    fake.fail["nvmlDeviceGetMinorNumber"] = pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
    fake.fail["nvmlDeviceGetMemoryInfo"] = pynvml.NVMLError_NotSupported()
    view = NvmlView(1.0, LOG, nvml=fake)
    try:
        caplog.set_level(logging.WARNING, logger="test.gpu")
        gpus = view.gpus()
        view.gpus()
        assert [(g.index, g.minor, g.memory_total) for g in gpus] == [(i, i, 0) for i in range(4)]
        assert gpus[3].uuid == EXPECTED_GPUS[3].uuid and gpus[3].pci_bus_id == "00000000:5D:00.0"
        assert view.processes() == [GpuProcess(1, 9, MIB)]
        warned = [r.getMessage() for r in caplog.records]
        assert len(warned) == 2 and all("not supported" in w for w in warned)
    finally:
        view.close()


def test_other_nvml_errors_fail_the_query_with_the_call_and_reason() -> None:
    fake = FakeNvml(H100["gpus"], {})
    view = NvmlView(1.0, LOG, nvml=fake)
    try:
        fake.fail["nvmlDeviceGetComputeRunningProcesses"] = pynvml.NVMLError(pynvml.NVML_ERROR_GPU_IS_LOST)
        with pytest.raises(GpuError, match=r"^NVML call nvmlDeviceGetComputeRunningProcesses failed: GPU is lost$"):
            view.processes()
        del fake.fail["nvmlDeviceGetComputeRunningProcesses"]
        assert view.processes() == []
    finally:
        view.close()


def test_init_failure_and_init_hang_are_bounded_errors() -> None:
    fake = FakeNvml(H100["gpus"], {})
    fake.fail["nvmlInit"] = pynvml.NVMLError(pynvml.NVML_ERROR_DRIVER_NOT_LOADED)
    with pytest.raises(GpuError) as e:
        NvmlView(1.0, LOG, nvml=fake)
    assert e.value.reason == "Driver Not Loaded"

    fake = FakeNvml(H100["gpus"], {})
    release = fake.hang["nvmlInit"] = threading.Event()
    t0 = time.monotonic()
    with pytest.raises(GpuError, match="nvmlInit timed out"):
        NvmlView(0.2, LOG, nvml=fake)
    assert time.monotonic() - t0 < 0.2 + 0.5
    release.set()


def test_close_shuts_nvml_down_and_later_calls_fail() -> None:
    fake = FakeNvml(H100["gpus"], {})
    view = NvmlView(1.0, LOG, nvml=fake)
    view.close()
    assert fake.calls[0] == "nvmlInit" and fake.calls[-1] == "nvmlShutdown"
    with pytest.raises(GpuError, match="closed"):
        view.gpus()


# --- stand-in view -------------------------------------------------------------------------------


def test_standin_faults_hang_and_error(tmp_path: Path) -> None:
    path = standin(tmp_path, fault={"hang_s": 1.0})
    view = StandinView(path, 0.2, LOG)
    try:
        t0 = time.monotonic()
        with pytest.raises(GpuError, match=r"timed out after 0\.2 s"):
            view.gpus()
        assert time.monotonic() - t0 < 0.7
        write_json(path, {**H100, "fault": {"error": "Driver Not Loaded"}})
        with pytest.raises(GpuError, match="has not returned"):
            view.processes()  # still stuck in the hang
        with pytest.raises(GpuError, match="failed: Driver Not Loaded"):
            wait_for(lambda: _try_not_stuck(view), 3)
        write_json(path, H100)
        assert view.gpus() == EXPECTED_GPUS
    finally:
        view.close()


def _try_not_stuck(view: StandinView) -> bool:
    try:
        view.processes()
    except GpuError as e:
        if "has not returned" in str(e):
            return False
        raise
    return True


def test_standin_missing_or_corrupt_file_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "nope.json"
    view = StandinView(path, 1.0, LOG)
    try:
        with pytest.raises(GpuError, match=str(path)):
            view.gpus()
        path.write_text("{not json")
        with pytest.raises(GpuError, match=str(path)):
            view.processes()
    finally:
        view.close()


def test_standin_drops_dead_processes_and_their_files(tmp_path: Path) -> None:
    sleeper = subprocess.Popen(["sleep", "60"])
    dead = subprocess.Popen(["true"])
    dead.wait()
    path = standin(tmp_path, processes=[{"minor": 0, "pid": dead.pid, "used_memory": MIB}])
    d = standin_dir(path)
    d.mkdir()
    (d / f"{sleeper.pid}.json").write_text(json.dumps({"pid": sleeper.pid, "minors": [2, 3], "used_memory": 5}))
    (d / f"{dead.pid}.json").write_text(json.dumps({"pid": dead.pid, "minors": [1], "used_memory": 5}))
    view = StandinView(path, 1.0, LOG)
    try:
        assert view.processes() == [GpuProcess(2, sleeper.pid, 5), GpuProcess(3, sleeper.pid, 5)]
        assert not (d / f"{dead.pid}.json").exists()
        sleeper.kill()
        sleeper.wait()
        assert view.processes() == []
    finally:
        sleeper.kill()
        sleeper.wait()
        view.close()


# --- foreign processes, watch, release -----------------------------------------------------------


def test_a_worker_forked_between_reads_is_not_foreign() -> None:
    procs = [GpuProcess(2, 100, None), GpuProcess(2, 101, None), GpuProcess(3, 500, 1), GpuProcess(0, 600, 1)]
    # 101 appeared after the first read of our tree, in NVML's answer, and in the second read.
    assert foreign_processes(procs, {100}, {100, 101}, {2, 3}) == [GpuProcess(3, 500, 1)]
    assert foreign_processes(procs, {100}, {100, 101}, set()) == []


def test_watch_reports_changes_once_and_rides_out_errors(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    ours = subprocess.Popen(["sleep", "60"])
    theirs = subprocess.Popen(["sleep", "60"])
    path = standin(tmp_path, processes=[{"minor": 2, "pid": ours.pid, "used_memory": MIB}])
    view = StandinView(path, 0.3, LOG)
    seen: list[tuple[frozenset[int], list[GpuProcess]]] = []
    watch = GpuWatch(view, 0.02, lambda: {ours.pid}, lambda: frozenset({2, 3}), lambda s, p: seen.append((s, p)), LOG)
    caplog.set_level(logging.WARNING, logger="test.gpu")
    try:
        watch.start()
        wait_for(lambda: seen, 2)
        assert seen == [(frozenset(), [])]  # once at start; our own process is not foreign

        write_json(path, {**H100, "processes": [{"minor": 3, "pid": theirs.pid, "used_memory": 7}]})
        wait_for(lambda: len(seen) == 2, 2)
        assert seen[1] == (frozenset({3}), [GpuProcess(3, theirs.pid, 7)])

        write_json(path, {**H100, "fault": {"error": "GPU is lost"}})
        time.sleep(0.3)  # many polls fail: one log line, no change reported
        assert len(seen) == 2
        assert [r.getMessage() for r in caplog.records] == [
            "GPU: NVML call nvmlDeviceGetComputeRunningProcesses failed: GPU is lost "
            "(keeping the last known GPU use until NVML answers)"
        ]

        theirs.kill()
        theirs.wait()  # gone: the driver drops its context
        write_json(path, {**H100, "processes": [{"minor": 3, "pid": theirs.pid, "used_memory": 7}]})
        wait_for(lambda: len(seen) == 3, 2)
        assert seen[2] == (frozenset(), [])

        write_json(path, {**H100, "fault": {"hang_s": 2}})
        time.sleep(0.1)
        t0 = time.monotonic()
        watch.stop()
        assert time.monotonic() - t0 < 1.2
        assert len(seen) == 3
    finally:
        watch.stop()
        for p in (ours, theirs):
            p.kill()
            p.wait()
        view.close()


def test_wait_released_returns_when_our_contexts_are_gone(tmp_path: Path) -> None:
    worker = subprocess.Popen(["sleep", "60"])
    other = subprocess.Popen(["sleep", "60"])
    path = standin(
        tmp_path,
        processes=[
            {"minor": 2, "pid": worker.pid, "used_memory": MIB},
            {"minor": 3, "pid": other.pid, "used_memory": 1},
        ],
    )
    view = StandinView(path, 1.0, LOG)
    try:
        waited, left = wait_released(view, {worker.pid}, frozenset({2, 3}), 0.3)
        assert left == [GpuProcess(2, worker.pid, MIB)] and 0.3 <= waited < 0.8

        threading.Timer(0.2, lambda: (worker.kill(), worker.wait())).start()
        waited, left = wait_released(view, {worker.pid}, frozenset({2, 3}), 5.0)
        assert left == [] and 0.15 < waited < 1.5  # the other user's process on GPU 3 is not ours

        write_json(path, {**H100, "fault": {"error": "Driver Not Loaded"}})
        with pytest.raises(GpuError, match="Driver Not Loaded"):
            wait_released(view, {other.pid}, frozenset({3}), 0.2)
    finally:
        for p in (worker, other):
            p.kill()
            p.wait()
        view.close()


def test_open_gpu_view_with_a_stand_in(tmp_path: Path) -> None:
    path = standin(tmp_path)
    view = open_gpu_view(path, 1.0, LOG)
    assert view is not None and view.name == f"standin:{path}"
    try:
        assert view.gpus() == EXPECTED_GPUS
    finally:
        view.close()
