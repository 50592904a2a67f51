"""Detection faults, end to end through the real daemon: a real inotify queue overflow, and a detector
thread that dies. What a user would notice: the daemon still yields after lost events, and a blind
daemon stops its model, says so on the phone and exits non-zero instead of holding GPUs it cannot
give back."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest
from daemon_harness import env_with, gone, start
from helpers import wait_for
from test_detect import small_inotify_queue

pytestmark = pytest.mark.timeout(90)

# Fault injection for the daemon's own process only: a sitecustomize that makes watchdog's dispatch
# raise on one event, as 7.1.1 did when it called a handler method we lacked. Production code has no
# test hook; the subprocess imports this because PYTHONPATH points at it.
BREAK_DISPATCH = """
import os
if os.environ.get("WDTEST_BREAK_ON"):
    from watchdog.observers import inotify_c
    _real = inotify_c.InotifyFD.handle_event
    _name = os.environ["WDTEST_BREAK_ON"].encode()

    def handle_event(self, event):
        if event.name == _name:
            raise AttributeError("'_Callback' object has no attribute 'on_events_lost'")
        _real(self, event)

    inotify_c.InotifyFD.handle_event = handle_event
"""


def test_real_overflow_then_a_job_is_still_yielded_to(daemons, daemon_env) -> None:
    """The daemon's inotify instance gets a 4-event queue; bursts overflow it for real; a job after
    that is yielded to, and one made during the burst is found by the rescan."""
    with small_inotify_queue(4):
        d = start(daemons, daemon_env)
        pids = d.wait_state("serving")["model_pids"]
    scope = d.job_dir("x").parent
    for _ in range(50):
        for _ in range(100):
            (scope / "x").mkdir()
            (scope / "x").rmdir()
        if "inotify queue overflowed" in d.log():
            break
        time.sleep(0.05)
    assert "inotify queue overflowed" in d.log(), "100-event bursts never overflowed a 4-event queue"
    assert d.status()["state"] == "serving"
    d.start_job("job_31")
    gone(pids, timeout=5)
    st = d.wait_state("yielded")
    assert st["jobs"] == ["job_31"] and st["last_yield"]["job"] == "job_31"
    d.end_job("job_31")
    d.wait_state("serving")
    assert "job detection has STOPPED" not in d.log()
    assert d.terminate() == 0


def test_detector_thread_dying_stops_the_model_and_exits_1(daemons, daemon_env, ntfy, tmp_path: Path) -> None:
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(BREAK_DISPATCH)
    path = os.pathsep.join(p for p in (str(hooks), daemon_env.get("PYTHONPATH", "")) if p)
    d = start(daemons, env_with(daemon_env, PYTHONPATH=path, WDTEST_BREAK_ON="job_boom"))
    pids = d.wait_state("serving")["model_pids"]
    t0 = time.monotonic()
    d.job_dir("job_boom").mkdir()
    assert d.proc.wait(20) == 1
    gone(pids, timeout=1)
    took = time.monotonic() - t0
    log = d.log()
    assert "job detection has STOPPED" in log and "on_events_lost" in log
    st = d.status()
    assert st["state"] == "stopped" and "job detection failed" in st["reason"], st
    msg = wait_for(lambda: [m for m in ntfy.received if "detection failed" in str(m.get("title"))], 10)[0]
    assert msg["_priority"] == "high", msg
    assert "exiting 1" in msg["message"]
    print(f"detector thread died -> model tree gone and daemon exited 1 in {took:.2f} s", file=sys.stderr)
