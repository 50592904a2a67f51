"""Words several layers share: one definition each, so a typo is a type error, not a silent miss."""

from __future__ import annotations

from enum import StrEnum


class NotifyKind(StrEnum):
    """What a phone alert (and its webhook, where there is one) is about."""

    ONLINE = "online"
    RESUMED = "resumed"
    YIELDED = "yielded"
    CRASHED = "crashed"
    FAILED = "failed"
    STOPPED = "stopped"
    PREEMPTED = "preempted"
    RELEASED = "released"
    SWAPPED = "swapped"
    SWAP_FAILED = "swap_failed"
    TUNNEL = "tunnel"
    HOST = "host"  # mode C: a model host went down or came back
    SERVICE = "service"  # mode C: an always-on service crashed or failed
    LOCK_FORCED = "lock_forced"
    PORT_TAKEN = "port_taken"  # SERVER_PORT held by another process: the model moved to another port
    TEST = "test"


# Never delayed by coalescing: the daemon is going away, or a person must act.
URGENT_KINDS = frozenset({NotifyKind.FAILED, NotifyKind.STOPPED})


class SwapStage(StrEnum):
    """Where a swap is. `queued` is the coordinator's (accepted, not yet seen by the daemon)."""

    QUEUED = "queued"
    STOPPING = "stopping"
    STARTING = "starting"
    DEFERRED = "deferred"
    READY = "ready"
    FAILED = "failed"


SWAP_ENDED = frozenset({SwapStage.READY, SwapStage.FAILED})


class YieldOn(StrEnum):
    """YIELD_ON: which Slurm jobs take the GPUs back."""

    AUTO = "auto"  # overlap when our GPUs are known (NVML or GPU_IDS), else any
    ANY = "any"  # every Slurm job on the node
    OVERLAP = "overlap"  # only jobs whose GPUs overlap ours (scontrol show job -d)


class Ending(StrEnum):
    """Why the daemon is stopping (policy State.ending); BLIND exits 1."""

    NONE = ""
    SIGNAL = "signal"
    IDLE = "idle"
    BLIND = "blind"  # job detection failed: it could not give GPUs back


class StopReason(StrEnum):
    YIELD = "yield"
    SHUTDOWN = "shutdown"
    STARTUP_TIMEOUT = "startup-timeout"
    HUNG = "hung"  # ready once, then stopped answering its liveness checks
    IDLE = "idle"
    SWAP = "swap"
