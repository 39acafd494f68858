"""``GET /metrics``: what the database says now, in Prometheus' text format.

Every value is read from the database at scrape time by a collector on a registry of the app's own (never
prometheus_client's global one, which would mix in whatever else the process registered): any number of
`retracer web` processes on one database expose the same figures, and a restart loses nothing. The
service's and the workers' own counters (events applied, batch latency, attempts) live in those processes
and are exposed by them on their [service] / [worker] metrics_port (retracer.service.metrics,
retracer.worker.metrics).

Each query is one GROUP BY or aggregate on an indexed column, or on a table that stays small (rejected
events until replayed, mail until gc), so a scrape stays cheap with a million jobs; the history's
transitions are the exception (no index on the trigger) and are counted at most every HISTORY_TTL_S
seconds (see :class:`DatabaseCollector`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from sqlalchemy import distinct, func, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import InstrumentedAttribute, Session, sessionmaker

from retracer.store.models import History, Job, Mail, MissingSymbol, Rejected, utcnow
from retracer.workflow import load_spec

router = APIRouter()

#: Every status a mail row can have (store.models.Mail): each is exposed, 0 included, so that an alert on
#: one never sees a series vanish.
MAIL_STATUSES = ("pending", "sending", "sent", "failing", "failed", "digested")

#: How long one count of the history's transitions is shown before it is counted again: the only query here
#: that reads a whole table (~0.3 s for 4 million history rows), so a scrape every few seconds, or several
#: Prometheus servers, cost one such count a minute at most.
HISTORY_TTL_S = 60.0


class DatabaseCollector(Collector):
    """The gauges of one database, read at each scrape.

    Transitions are a gauge, not a counter: they are counted in the history table, and `retracer gc` deletes
    the history of the jobs it removes, so the figure falls then; a counter that falls would read as a reset
    to Prometheus, and rate() would show a burst of every transition still kept. Rates of transitions come
    from `serve`'s own counter (retracer_transitions_total, retracer.service.metrics).
    """

    def __init__(self, factory: sessionmaker[Session], clock: Callable[[], float] = time.monotonic) -> None:
        self.factory = factory
        self.clock = clock
        spec = load_spec()
        self.states = list(spec.states)
        self.triggers = [t for t in spec.triggers() if any(x.record for x in spec.transitions if x.trigger == t)]
        self.queue = spec.roles.queue
        self._history: tuple[float, dict[str, int]] | None = None
        self._lock = threading.Lock()

    def describe(self) -> Iterable[Metric]:
        # Nothing is read when the collector is registered: the database may not be there yet.
        return []

    def collect(self) -> Iterator[Metric]:
        with self.factory() as session:
            try:
                yield from self._collect(session)
            finally:
                session.rollback()

    def _collect(self, session: Session) -> Iterator[Metric]:
        now = utcnow()
        by_state = _counts(session, Job.state)
        jobs = GaugeMetricFamily("retracer_jobs", "Jobs in each state of the workflow, now.", labels=["state"])
        for state in [*self.states, *sorted(set(by_state) - set(self.states))]:
            jobs.add_metric([state], by_state.get(state, 0))
        yield jobs

        # The oldest waiting job by id (ids are drawn in submission order): a walk of the state index.
        oldest_id = session.scalar(select(func.min(Job.id)).where(Job.state == self.queue))
        created: datetime | None = None
        if oldest_id is not None:
            created = session.scalar(select(Job.created_at).where(Job.id == oldest_id))
        yield GaugeMetricFamily(
            "retracer_oldest_pending_age_seconds",
            f"Seconds since the oldest job now {self.queue} was submitted (0: none is waiting).",
            value=max(0.0, (now - created).total_seconds()) if created is not None else 0.0)

        transitions = GaugeMetricFamily(
            "retracer_transitions",
            "Transitions recorded in the history of the jobs still kept, by trigger (a gauge: gc deletes old "
            "jobs' history; serve's retracer_transitions_total gives rates). Counted at most every "
            f"{int(HISTORY_TTL_S)} s.", labels=["trigger"])
        counted = self._transitions(session)
        for trigger in [*self.triggers, *sorted(set(counted) - set(self.triggers))]:
            transitions.add_metric([trigger], counted.get(trigger, 0))
        yield transitions

        by_status = _counts(session, Mail.status)
        mail = GaugeMetricFamily("retracer_mail", "Mail rows in the outbox by status, now.", labels=["status"])
        for status in [*MAIL_STATUSES, *sorted(set(by_status) - set(MAIL_STATUSES))]:
            mail.add_metric([status], by_status.get(status, 0))
        yield mail

        rejected = session.scalar(select(func.count()).select_from(Rejected).where(Rejected.replayed_at.is_(None)))
        yield GaugeMetricFamily("retracer_rejected_events",
                                "Rejected events not replayed yet (`retracer rejected` lists them).",
                                value=rejected or 0)

        missing = session.scalar(select(func.count(distinct(MissingSymbol.build_id))))
        yield GaugeMetricFamily("retracer_missing_symbols",
                                "Build-ids some job lacks symbols for (`retracer symbols missing` lists them).",
                                value=missing or 0)

    def _transitions(self, session: Session) -> dict[str, int]:
        with self._lock:
            if self._history is None or self.clock() - self._history[0] >= HISTORY_TTL_S:
                counts = _counts(session, History.trigger)
                self._history = (self.clock(), counts)
            return self._history[1]


def _counts(session: Session, column: InstrumentedAttribute[str]) -> dict[str, int]:
    """Rows per value of ``column``: one GROUP BY."""
    return {key: int(n) for key, n in session.execute(select(column, func.count()).group_by(column))}


def registry_for(factory: sessionmaker[Session]) -> CollectorRegistry:
    """A registry holding the database collector of ``factory`` alone."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DatabaseCollector(factory))
    return registry


def _registry(request: Request) -> CollectorRegistry:
    state = request.app.state
    registry: CollectorRegistry | None = getattr(state, "metrics_registry", None)
    if registry is None:
        # One per app: two apps in one process (tests, several databases) never share figures.
        registry = state.metrics_registry = registry_for(state.factory)
    return registry


@router.get("/metrics", response_class=Response, tags=["metrics"],
            responses={200: {"content": {CONTENT_TYPE_LATEST: {}},
                             "description": "Prometheus text exposition format"},
                       503: {"description": "the database cannot be read"}})
def metrics(request: Request) -> Response:
    """Jobs per state, transitions per trigger, mail per status, rejected events, missing symbols and the
    oldest waiting job's age, read from the database now (Prometheus text format)."""
    try:
        body = generate_latest(_registry(request))
    except SQLAlchemyError as exc:
        orig = getattr(exc, "orig", None) or exc
        first = str(orig).strip().splitlines()[0][:300] if str(orig).strip() else type(orig).__name__
        raise HTTPException(503, f"the database cannot be read ({first}); metrics are not available until it "
                                 f"can: check [database] url and the database server") from None
    return Response(body, media_type=CONTENT_TYPE_LATEST)
