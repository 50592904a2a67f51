"""detect/scontrol.py: recorded `scontrol show job -d` outputs, and a fake scontrol executable."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from pathlib import Path

import pytest
from helpers import run_async

from watchdog_llm.base.ids import job_id_of
from watchdog_llm.detect.scontrol import Scontrol, expand_hostlist, parse_job_gpus

pytestmark = pytest.mark.timeout(30)

DATA = Path(__file__).parent / "data" / "scontrol"
LOG = logging.getLogger("test.scontrol")


def recorded(name: str) -> str:
    return (DATA / name).read_text()


@pytest.mark.parametrize(
    ("name", "node", "gpus"),
    [
        ("reference-22.05.txt", None, {0, 1}),
        ("reference-22.05.txt", "H", {0, 1}),
        ("reference-22.05.txt", "other", {0, 1}),  # its only detail line is ours, whatever Slurm names us
        ("cshuji-gres-idx-19.05.txt", "node-06", {0, 2, 3, 5}),  # GRES_IDX= (Slurm <= 19.05)
        ("cshuji-gres-idx-19.05.txt", "node-06.cluster.example.org", {0, 2, 3, 5}),  # our FQDN
        ("cshuji-multinode-nogpu-19.05.txt", "node-64", set()),  # GRES_IDX= empty
        ("cshuji-multinode-nogpu-19.05.txt", "node-99", None),  # several nodes, none named as we are
        ("cshuji-gres-idx-19.05.txt", "NODE-06", {0, 2, 3, 5}),  # names compare without case
        ("cshuji-untyped-20.02.txt", None, {5}),
        ("cshuji-cpuonly-21.08.txt", "node-12", set()),  # GRES= empty
        ("cshuji-two-gres-24.x.txt", "node-005", {3}),  # another GRES type first
        ("cshuji-typed-24.x.txt", "node-001", {1}),  # typed GPU, another GRES after
        ("multinode-typed.txt", "n2", {0, 1}),  # hostlist expression on the detail line
        ("multinode-typed.txt", "n3", {6}),
        ("multinode-typed.txt", None, {0, 1}),  # the first Nodes= line
        ("mixed-types.txt", "n5", {0, 1, 2}),  # two GPU types
        ("invalid-job.txt", None, None),  # the job is gone (or hidden): unknown, not "no GPUs"
        ("pending.txt", None, None),  # no detail lines yet
    ],
)
def test_parse_recorded_outputs(name: str, node: str | None, gpus: set[int] | None) -> None:
    got = parse_job_gpus(recorded(name), node)
    assert got == (frozenset(gpus) if gpus is not None else None)


def test_parse_edge_cases() -> None:
    line = "   Nodes=h CPU_IDs=0 Mem=0 GRES=gpu:1(IDX:3),shard:gpu:2(0/2,0/2,2/2,0/2)"
    assert parse_job_gpus(line, "h") == frozenset({3})  # shards are not whole GPUs
    assert parse_job_gpus("   Nodes=h CPU_IDs=0 Mem=0", "h") == frozenset()  # no GRES field at all
    assert parse_job_gpus("   Nodes=h CPU_IDs=0 Mem=0 GRES=gpu:1(IDX:N/A)", "h") == frozenset()
    assert parse_job_gpus("", None) is None
    # NodeList=/NumNodes= are not detail lines.
    assert parse_job_gpus("   NodeList=h\n   NumNodes=1 NumCPUs=1 GRES=gpu:1(IDX:0)", "h") is None


def test_malformed_ranges_raise_quickly() -> None:
    # Scontrol turns these into "unknown" (a conflict, to be safe), never a crash or a hang.
    for bad in ("GRES=gpu:1(IDX:0-)", "GRES=gpu:1(IDX:a-b)", "GRES=gpu:1(IDX:3-1)"):
        with pytest.raises(ValueError):
            parse_job_gpus(f"   Nodes=h CPU_IDs=0 Mem=0 {bad}", "h")
    two = "   Nodes=n[1-99999999] CPU_IDs=0 Mem=0 GRES=gpu:1(IDX:0)\n   Nodes=m CPU_IDs=0 Mem=0 GRES=\n"
    with pytest.raises(ValueError):
        parse_job_gpus(two, "h")


def test_expand_hostlist_and_job_ids() -> None:
    assert expand_hostlist("node[01-03,07],gpu5") == ["node01", "node02", "node03", "node07", "gpu5"]
    assert expand_hostlist("n[8-10]") == ["n8", "n9", "n10"]
    assert expand_hostlist("r[1-2]n[1-2]") == ["r1n1", "r1n2", "r2n1", "r2n2"]
    assert expand_hostlist("H") == ["H"]
    assert job_id_of("job_123") == "123"
    assert job_id_of("s5K1KKYAYG5D00") == "s5K1KKYAYG5D00"
    assert job_id_of("123") == "123"


# --- the Scontrol runner, against a fake executable ----------------------------------------------

FAKE = """#!{python}
import os, sys, time
job = sys.argv[-1]
with open({calls!r}, "a") as f:
    f.write(" ".join(sys.argv[1:]) + " pid=%d\\n" % os.getpid())
if job == "7":
    sys.stdout.write(open({data!r}).read())
elif job == "8":
    sys.stdout.write(open({pending!r}).read())
elif job == "slow":
    time.sleep(30)
elif job == "bad":
    sys.stdout.write("   Nodes=H CPU_IDs=0 Mem=0 GRES=gpu:1(IDX:0-)\\n")
elif job == "late":
    time.sleep(0.5)
    sys.stdout.write(open({data!r}).read())
else:
    sys.stderr.write("slurm_load_jobs error: Invalid job id specified\\n")
    sys.exit(1)
"""


@pytest.fixture
def fake(tmp_path: Path) -> tuple[Path, Path]:
    calls = tmp_path / "calls"
    path = tmp_path / "scontrol"
    path.write_text(
        FAKE.format(
            python=sys.executable,
            calls=str(calls),
            data=str(DATA / "reference-22.05.txt"),
            pending=str(DATA / "pending.txt"),
        )
    )
    path.chmod(0o755)
    return path, calls


def invocations(calls: Path) -> list[str]:
    return calls.read_text().splitlines() if calls.exists() else []


@run_async
async def test_job_gpus_queries_once_per_job_and_caches(fake: tuple[Path, Path]) -> None:
    path, calls = fake
    sc = Scontrol(str(path), 5.0, "H", LOG)
    results = await asyncio.gather(sc.job_gpus("job_7"), sc.job_gpus("job_7"), sc.job_gpus("7"))
    assert results == [frozenset({0, 1})] * 3
    assert await sc.job_gpus("job_7") == frozenset({0, 1})
    assert [c.split(" pid=")[0] for c in invocations(calls)] == ["show job -d 7"]  # argv, once
    sc.forget("job_7")
    assert await sc.job_gpus("job_7") == frozenset({0, 1})
    assert len(invocations(calls)) == 2


@run_async
async def test_malformed_output_is_unknown_not_a_crash(
    fake: tuple[Path, Path], caplog: pytest.LogCaptureFixture
) -> None:
    path, _ = fake
    caplog.set_level(logging.INFO, logger="test.scontrol")
    sc = Scontrol(str(path), 5.0, "H", LOG)
    assert await sc.job_gpus("bad") is None
    [line] = [r.getMessage() for r in caplog.records]
    assert "cannot read its GPUs" in line and "counting them as unknown" in line


@run_async
async def test_a_job_forgotten_during_its_query_is_not_cached(fake: tuple[Path, Path]) -> None:
    path, calls = fake
    sc = Scontrol(str(path), 5.0, "H", LOG)
    query = asyncio.ensure_future(sc.job_gpus("late"))
    await asyncio.sleep(0.2)
    sc.forget("late")  # the job ended; a requeue will reuse its id
    assert await query == frozenset({0, 1})
    await sc.job_gpus("late")
    assert len(invocations(calls)) == 2  # asked again, not answered from a stale cache


@run_async
async def test_unknown_results_are_cached_with_one_log_line(
    fake: tuple[Path, Path], caplog: pytest.LogCaptureFixture
) -> None:
    path, calls = fake
    caplog.set_level(logging.INFO, logger="test.scontrol")
    sc = Scontrol(str(path), 5.0, "H", LOG)
    assert await sc.job_gpus("job_99") is None
    assert await sc.job_gpus("job_99") is None
    assert await sc.job_gpus("job_8") is None  # pending: no detail lines
    assert len(invocations(calls)) == 2
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2
    assert "job 99" in lines[0] and "exited 1" in lines[0] and "Invalid job id specified" in lines[0]
    assert "job 8" in lines[1] and "not shown" in lines[1]


@run_async
async def test_timeout_kills_the_scontrol_process(fake: tuple[Path, Path], caplog: pytest.LogCaptureFixture) -> None:
    path, calls = fake
    caplog.set_level(logging.INFO, logger="test.scontrol")
    sc = Scontrol(str(path), 0.5, "H", LOG)
    t0 = time.monotonic()
    assert await sc.job_gpus("slow") is None
    assert time.monotonic() - t0 < 0.5 + 1.0
    pid = int(invocations(calls)[0].split("pid=")[1])
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # killed and reaped (the autouse fixture checks for leftovers too)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "job slow" in lines[0] and "did not answer within 0.5 s (killed)" in lines[0]


@run_async
async def test_missing_binary_is_none_and_one_line(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="test.scontrol")
    sc = Scontrol(str(tmp_path / "no-scontrol"), 1.0, None, LOG)
    assert await sc.job_gpus("job_1") is None
    assert await sc.job_gpus("job_1") is None
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "job 1" in lines[0] and "cannot run" in lines[0]


@run_async
async def test_cancelling_a_query_kills_scontrol_and_a_later_call_queries_again(fake: tuple[Path, Path]) -> None:
    path, calls = fake
    sc = Scontrol(str(path), 10.0, "H", LOG)
    task = asyncio.ensure_future(sc.job_gpus("slow"))
    while not invocations(calls):
        await asyncio.sleep(0.02)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    pid = int(invocations(calls)[0].split("pid=")[1])
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert await sc.job_gpus("job_7") == frozenset({0, 1})
