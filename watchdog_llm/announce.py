"""What the daemon tells the world after a decision: the phase line in the log, status.json,
systemd's STATUS, notifications and webhooks, swap progress, and the metrics.

Never on the kill path: the daemon calls these with `call_soon`, after the children's owners have
been woken, so a slow log sink, a full disk or a slow webhook never delays a yield.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import sdnotify

from watchdog_llm.base.failures import FailureNote
from watchdog_llm.base.vocab import SWAP_ENDED, NotifyKind
from watchdog_llm.coordination.core import Coordinator
from watchdog_llm.metrics import Metrics
from watchdog_llm.notify import Message, Notifier
from watchdog_llm.policy import Decision, Notify, Phase, StartModel, State, SwapUpdate
from watchdog_llm.status import write_atomic

# Daemon notices that are webhook events too (the coordination events are sent where they happen).
WEBHOOK_EVENTS = {
    NotifyKind.YIELDED: "yielded",
    NotifyKind.RESUMED: "resumed",
    NotifyKind.CRASHED: "crashed",
    NotifyKind.FAILED: "crashed",
}
# Notices that tell people where to reach the model: they carry the model, its GPUs and the URL.
_WHERE = (NotifyKind.ONLINE, NotifyKind.RESUMED, NotifyKind.SWAPPED)
START_TIMES_KEPT = 5  # start-to-serving durations remembered for Retry-After


class Announcer:
    """Reports only: it reads the state it is given and never feeds the policy. The notifier and
    the coordinator are attached once they exist (both are started after this object)."""

    def __init__(
        self,
        status_file: Path,
        status: Callable[[], dict[str, Any]],
        state: Callable[[], State],
        public_url: Callable[[], str],
        default_gpus: int,
        metrics: Metrics,
        sd: sdnotify.SystemdNotifier,
        log: logging.Logger,
    ) -> None:
        self.status_file = status_file
        self.status = status
        self.state = state
        self.public_url = public_url
        self.default_gpus = default_gpus
        self.metrics = metrics
        self.sd = sd
        self.log = log
        self.notifier: Notifier | None = None
        self.coord: Coordinator | None = None
        self.start_times: list[float] = []  # seconds from start to serving, the last few runs
        self._status_failures = FailureNote(log, f"cannot write {status_file}")

    def decided(self, before: State, d: Decision, notices: list[Notify]) -> None:
        """One decision's reports: metrics, the phase line, status and the notices, in that order."""
        self.count(before, d)
        st = self.state()  # now: later decisions may be queued behind this one
        if d.state.phase is not before.phase:
            self.log.info("%s -> %s: %s", before.phase, st.phase, st.reason)
        self.publish_status()
        self.sd.notify(f"STATUS={st.phase}: {st.reason}")
        for n in notices:
            self.submit(n)

    def count(self, before: State, d: Decision) -> None:
        """Metrics, and start times for Retry-After."""
        after, m = d.state, self.metrics
        m.state.state(after.phase.value)
        for action in d.actions:
            if isinstance(action, StartModel):
                m.starts.inc()
                if before.phase is Phase.BACKOFF:
                    m.restarts.inc()
        if after.phase is Phase.YIELDING and before.phase is not Phase.YIELDING:
            m.yields.inc()
            if after.last_yield is not None and after.last_yield.detect_ms is not None:
                m.detection.observe(after.last_yield.detect_ms / 1000)
        rec = after.last_yield
        if (
            rec is not None
            and rec.stop_ms is not None
            and (before.last_yield is None or before.last_yield.stop_ms is None)
        ):
            m.yield_time.observe(rec.stop_ms / 1000)
        if after.phase is Phase.SERVING and before.phase is Phase.STARTING:
            took = time.monotonic() - before.started_at
            self.start_times = [*self.start_times[-(START_TIMES_KEPT - 1) :], took]

    def swap_updates(self, updates: list[SwapUpdate]) -> None:
        if self.coord is None:
            return
        for u in updates:
            self.coord.swap_update(u.id, u.stage, u.detail)
            if u.stage in SWAP_ENDED:
                self.metrics.swaps.labels(u.stage).inc()
        self.publish_status()

    def submit(self, n: Notify) -> None:
        """A notice to the webhooks (where it is an event), the live stream and the notifier."""
        self._webhook(n)
        if self.coord is not None and self.coord.bus is not None:
            self.coord.bus.publish("notice", {"kind": n.kind.value, "title": n.title, "body": n.body})
        if self.notifier is None:
            return
        body = n.body
        if n.kind in _WHERE:
            model = self.state().model
            gpus = model.gpus if model.gpus is not None else self.default_gpus
            body += f"\nmodel: {model.name}\nGPUs: {gpus}\nURL: {self.public_url()}"
        self.notifier.submit(Message(n.kind, n.title, body, n.priority))

    def _webhook(self, n: Notify) -> None:
        event = WEBHOOK_EVENTS.get(n.kind)
        if event is None or self.coord is None:
            return
        st = self.state()
        data: dict[str, Any] = {"detail": n.body, "state": st.phase.value}
        rec = st.last_yield
        if event in ("yielded", "resumed") and rec is not None:
            data.update(
                job=rec.job or None,
                cause=rec.cause,
                detect_ms=rec.detect_ms,
                stop_ms=rec.stop_ms,
                lookup_ms=rec.lookup_ms,
                gpu_release_ms=rec.gpu_release_ms,
                gpus=list(rec.gpus),
            )
        self.coord.event(event, data)

    def publish_status(self) -> None:
        doc = self.status()
        if self.coord is not None and self.coord.bus is not None:
            self.coord.bus.publish("status", doc)
        try:
            write_atomic(self.status_file, doc)
        except OSError as e:
            self._status_failures.failed(e)
        else:
            self._status_failures.ok()
