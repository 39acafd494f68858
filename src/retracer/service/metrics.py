"""`serve`'s own Prometheus metrics: a hook subscriber (service.hooks) counting what this process did, and the
HTTP exporter that `serve` and `retracer worker` start on their [service] / [worker] metrics_port.

The counters live in this process and start at 0 with it (Prometheus' rate() takes restarts in its stride);
what the database holds (jobs per state, mail outbox, oldest waiting job) is the web app's /metrics. Apply
workers (apply.pool) are processes, but every batch's outcomes come back to `serve`, whose hooks see each
event once: the apply workers need no registry of their own and no multiprocess mode. A batch whose part
failed is not counted (the hooks are not called for it); the broker delivers it again, and the events its
other parts had committed come back then as duplicates.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from sqlalchemy import or_, select
from sqlalchemy.orm import Session, sessionmaker

from retracer.errors import RetracerError
from retracer.service.hooks import Hooks
from retracer.store.models import History
from retracer.workflow import load_spec

if TYPE_CHECKING:
    from retracer.apply.applier import Outcome
    from retracer.mail.sender import DeliveryReport
    from retracer.service.loop import Service

log = logging.getLogger("retracer.serve")

#: What an event can become (apply.applier.Outcome.status).
EVENT_STATUSES = ("applied", "duplicate", "rejected", "stale")

#: What a round of mail delivery reports (mail.sender.DeliveryReport): each is a label of
#: retracer_mail_delivered_total.
MAIL_RESULTS = ("sent", "failed", "digested", "digests", "deferred", "stale")

#: A batch commits in milliseconds; a slow one (a lock wait, a busy disk) in seconds.
BATCH_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

#: A retrace is gdb over a core: seconds for a small one, minutes with symbols to fetch, bounded by the
#: worker's deadline.
RETRACE_BUCKETS = (1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0)


class ServiceMetrics(Hooks):
    """Counters and histograms of one `serve`, fed by its hooks, on a registry of their own.

    ``factory``: the database, to time the retraces whose outcome is applied (None: no retrace durations).
    """

    def __init__(self, factory: sessionmaker[Session] | None = None,
                 registry: CollectorRegistry | None = None) -> None:
        self.factory = factory
        self.registry = registry or CollectorRegistry(auto_describe=True)
        spec = load_spec()
        self.working = spec.roles.working
        # The triggers that begin an attempt: a job entering the working state from another.
        self.starts = tuple(sorted({t.trigger for t in spec.transitions
                                    if t.dest == self.working and self.working not in t.source}))
        r = self.registry
        self.events = Counter("retracer_events", "Events from the bus (or the embedded inbox) by what became of "
                              "them: applied, duplicate (applied before: a redelivery), rejected (kept with a "
                              "reason), stale (from an attempt no longer current).", ["status"], registry=r)
        self.batches = Counter("retracer_batches", "Batches of events applied and committed.", registry=r)
        self.batch_seconds = Histogram("retracer_batch_apply_seconds", "Seconds from a batch handed to the apply "
                                       "path to its commit (all its apply workers' parts).", buckets=BATCH_BUCKETS,
                                       registry=r)
        self.transitions = Counter("retracer_transitions", "Transitions this serve applied, by trigger: from "
                                   "events on the bus and uploads from the spool (admin commands and the "
                                   "watchdog fire theirs elsewhere: the web app's retracer_transitions counts "
                                   "every one in the history).", ["trigger"], registry=r)
        self.retrace_seconds = Histogram(
            "retracer_retrace_duration_seconds", "Seconds from a worker's retrace.started to the outcome that ends "
            f"the attempt ({self.working} left), as applied by the service, by the trigger of that outcome.",
            ["trigger"], buckets=RETRACE_BUCKETS, registry=r)
        self.chore_items = Counter("retracer_chore_items", "Things each chore did (offers made, mails sent, "
                                   "uploads processed, ...).", ["chore"], registry=r)
        self.chore_seconds = Histogram("retracer_chore_seconds", "Seconds a round of each chore took.",
                                       ["chore"], buckets=BATCH_BUCKETS, registry=r)
        self.mail = Counter("retracer_mail_delivered", "Mail delivery by result: sent, failed, digested (folded "
                            "into a digest), digests (made), deferred (recipient's window full), stale (its job "
                            "moved on).", ["result"], registry=r)
        for status in EVENT_STATUSES:
            self.events.labels(status)
        for result in MAIL_RESULTS:
            self.mail.labels(result)
        self._lock = threading.Lock()

    # -- hooks -----------------------------------------------------------------------------------------------

    def after_batch(self, outcomes: Sequence[Outcome], seconds: float) -> None:
        if not outcomes:
            return
        self.batches.inc()
        self.batch_seconds.observe(seconds)
        counts: dict[str, int] = {}
        for o in outcomes:
            counts[o.status] = counts.get(o.status, 0) + 1
        for status, n in counts.items():
            self.events.labels(status).inc(n)
        self._transitions(outcomes)

    def after_uploads(self, outcomes: Sequence[Outcome]) -> None:
        self._transitions(outcomes)

    def after_chore(self, name: str, count: int, seconds: float) -> None:
        self.chore_seconds.labels(name).observe(seconds)
        self.chore_items.labels(name).inc(count)

    def after_mail(self, report: DeliveryReport) -> None:
        for result in MAIL_RESULTS:
            n = int(getattr(report, result, 0) or 0)
            if n:
                self.mail.labels(result).inc(n)

    # -- transitions and retrace durations ---------------------------------------------------------------------

    def _transitions(self, outcomes: Sequence[Outcome]) -> None:
        applied = [o for o in outcomes if o.status == "applied" and o.trigger]
        for o in applied:
            self.transitions.labels(o.trigger).inc()
        ended = [o for o in applied if o.source == self.working and o.dest != self.working
                 and o.job_id is not None and o.event_id is not None]
        if ended and self.factory is not None:
            for trigger, seconds in self.durations(ended):
                self.retrace_seconds.labels(trigger).observe(seconds)

    def durations(self, ended: Sequence[Outcome]) -> list[tuple[str, float]]:
        """Per attempt that ``ended``: its outcome's trigger and the seconds from the attempt's start.

        Both ends are in the history (its ``at`` is when the service applied each): the outcome's row by its
        event id, the start as the job's last start before it. One query on the history's job index per batch;
        an outcome has no time of its own, and the job's started_at is its first attempt's.
        """
        assert self.factory is not None  # noqa: S101  (the caller checks)
        ids = {o.event_id for o in ended}
        with self.factory() as session:
            rows = session.execute(
                select(History.job_id, History.trigger, History.event_id, History.at)
                .where(History.job_id.in_({o.job_id for o in ended}),
                       or_(History.trigger.in_(self.starts), History.event_id.in_(ids)))
                .order_by(History.job_id, History.id)).all()
            session.rollback()
        found: list[tuple[str, float]] = []
        started: dict[int, datetime] = {}
        for job_id, trigger, event_id, at in rows:
            if trigger in self.starts:
                started[job_id] = at
            elif event_id in ids and job_id in started:
                found.append((trigger, max(0.0, (at - started.pop(job_id)).total_seconds())))
        return found


# -- the exporter --------------------------------------------------------------------------------------------


@dataclass
class Exporter:
    """A running /metrics HTTP server; ``close()`` stops it."""

    server: WSGIServer
    thread: threading.Thread
    url: str

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def expose(registry: CollectorRegistry, host: str, port: int, section: str) -> Exporter | None:
    """Serve ``registry`` on http://host:port/metrics (None when ``port`` is 0: no exporter); a port or host
    that cannot be used is a RetracerError naming the [section] keys to change."""
    if not port:
        return None
    try:
        server, thread = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        why = exc.strerror or str(exc)
        raise RetracerError(f"[{section}] metrics_host {host!r} metrics_port {port} cannot be listened on "
                            f"({why}); choose a free port (or 0 for no metrics) and start again") from None
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{port}/metrics"
    log.info("metrics exposed", extra={"url": url})
    return Exporter(server, thread, url)


def expose_service(service: Service) -> Exporter | None:
    """When [service] metrics_port is set: subscribe a ServiceMetrics to ``service``'s hooks and expose it."""
    section = service.config["service"]
    if not section["metrics_port"]:
        return None
    metrics = ServiceMetrics(service.factory)
    exporter = expose(metrics.registry, str(section["metrics_host"]), int(section["metrics_port"]), "service")
    service.hooks.add(metrics)
    return exporter
