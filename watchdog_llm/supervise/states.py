"""Child process states (Supervisor-style): an enum, named groups, guarded transitions, exit wording."""

from __future__ import annotations

import signal
from enum import StrEnum


class ChildState(StrEnum):
    STOPPED = "stopped"  # never started, or stopped on request; no process of ours exists
    STARTING = "starting"  # spawned, not ready yet
    RUNNING = "running"  # ready (health check passed)
    STOPPING = "stopping"  # stop requested: SIGTERM sent, waiting for the tree to go
    EXITED = "exited"  # the leader exited on its own; its tree has been cleaned up


SIGNALLABLE = frozenset({ChildState.STARTING, ChildState.RUNNING, ChildState.STOPPING})
DOWN = frozenset({ChildState.STOPPED, ChildState.EXITED})


class ChildStateError(RuntimeError):
    """A transition from a state that does not allow it: a bug in the caller."""


def transition(current: ChildState, expected: frozenset[ChildState], new: ChildState) -> ChildState:
    """llama-swap's swapState(expected, new): refuse to move from a state we did not expect."""
    if current not in expected:
        raise ChildStateError(f"cannot go {current} -> {new} (expected one of {sorted(expected)})")
    return new


def describe_exit(code: int | None) -> str:
    """How a process ended, for people. The one place exit statuses are put into words."""
    if code is None:
        return "did not start"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    if code == 0:
        return "exited cleanly (code 0)"
    if code == 127:
        return "exited with code 127 (command not found)"
    if code == 126:
        return "exited with code 126 (not executable)"
    return f"exited with code {code}"
