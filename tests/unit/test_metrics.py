"""Prometheus metrics: the web app's collector over the database (both databases), serve's hook subscriber,
the worker's counters and the exporter's refusal of a port in use."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from retracer import config as cfg
from retracer import store
from retracer.bus.stub import StubBus
from retracer.errors import RetracerError
from retracer.events import WORK_REQUEST
from retracer.service import Service
from retracer.service.chores.dispatch import dispatch
from retracer.service.metrics import ServiceMetrics, expose
from retracer.store.models import History, Job, Mail, MissingSymbol, Outbox, utcnow
from retracer.testing.factories import crash_data, event
from retracer.uploads import spool
from retracer.web import metrics as web_metrics
from retracer.web.metrics import HISTORY_TTL_S, MAIL_STATUSES, DatabaseCollector, registry_for
from retracer.worker.loop_attempt import Result
from retracer.worker.metrics import WorkerMetrics
from retracer.worker.request import Request, Retraced
from retracer.worker.upload import leaf_for, manifest_for, write_upload
from retracer.workflow import load_spec

STATES = list(load_spec().states)

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    """Every sample of an exposition, by name and sorted labels (what Prometheus would store)."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def body(etype: str, job: int | None = None, event_id: str | None = None, **data: Any) -> str:
    return json.dumps(event(etype, job, event_id=event_id, **data))


def submitted(service: Service, n: int) -> list[int]:
    outcomes = service.apply([body("crash.submitted", **crash_data()) for _ in range(n)])
    assert [o.status for o in outcomes] == ["applied"] * n
    return [o.job_id for o in outcomes if o.job_id is not None]


def started(service: Service, *jobs: int) -> None:
    outcomes = service.apply([body("retrace.started", job, worker="w1", attempt=1) for job in jobs])
    assert {o.status for o in outcomes} == {"applied"}


def backdate_starts(factory: sessionmaker[Session], seconds: float) -> None:
    """Make every recorded start ``seconds`` older, as if the retraces had taken that long."""
    with store.transaction(factory) as session:
        session.execute(update(History).where(History.trigger == "start")
                        .values(at=utcnow() - timedelta(seconds=seconds)))


# -- the web app's collector --------------------------------------------------------------------------------


@pytest.fixture
def service(config: cfg.Config, factory: sessionmaker[Session]) -> Service:
    return Service(config, factory, bus=StubBus())


def every_state(service: Service) -> dict[str, list[int]]:
    """Jobs in each state of the workflow: 2 PENDING, 1 RETRACING, 3 FULLYBUILT, 1 FAILEDTOUPLOAD, 2 ON_HOLD."""
    jobs = submitted(service, 9)
    started(service, *jobs[2:])
    outcomes = service.apply(
        [body("upload.accepted", j, leaf=f"leaf-{j}") for j in jobs[3:6]]
        + [body("upload.failed", jobs[6], leaf="leaf-x", upload_log="backtrace.txt is empty")]
        + [body("retrace.failed", j, error="core is truncated", transient=False) for j in jobs[7:]])
    assert {o.status for o in outcomes} == {"applied"}
    return {"PENDING": jobs[:2], "RETRACING": jobs[2:3], "FULLYBUILT": jobs[3:6], "FAILEDTOUPLOAD": jobs[6:7],
            "ON_HOLD": jobs[7:]}


class TestDatabaseCollector:
    def test_jobs_per_state_every_state_exposed_zero_included(self, service: Service) -> None:
        """Each state of the workflow is a series, an empty one at 0, so an alert on any never loses it."""
        empty = parse(generate_latest(registry_for(service.factory)).decode())
        assert {s: value(empty, "retracer_jobs", state=s) for s in STATES} == dict.fromkeys(STATES, 0)
        jobs = every_state(service)
        samples = parse(generate_latest(registry_for(service.factory)).decode())
        assert {s: value(samples, "retracer_jobs", state=s) for s in STATES} == \
               {s: len(jobs[s]) for s in STATES}

    def test_transitions_mail_rejected_and_missing_symbols(self, service: Service) -> None:
        jobs = every_state(service)
        service.apply(["not json", body("retrace.started", 99999, worker="w1")])  # both rejected
        with store.transaction(service.factory) as session:
            session.add_all([MissingSymbol(job_id=jobs["ON_HOLD"][0], build_id="ab" * 20),
                             MissingSymbol(job_id=jobs["ON_HOLD"][1], build_id="ab" * 20),
                             MissingSymbol(job_id=jobs["ON_HOLD"][1], build_id="cd" * 20)])
            mails = session.scalars(select(Mail.status)).all()
            history = session.scalars(select(History.trigger)).all()
        samples = parse(generate_latest(registry_for(service.factory)).decode())
        for trigger in ("submit", "start", "upload_accepted", "upload_failed", "retrace_failed"):
            assert value(samples, "retracer_transitions", trigger=trigger) == history.count(trigger)
        assert value(samples, "retracer_transitions", trigger="submit") == 9
        assert value(samples, "retracer_transitions", trigger="rescue") == 0, "every trigger exposed"
        assert ("retracer_transitions", (("trigger", "heartbeat"),)) not in samples, "not recorded: not exposed"
        assert mails, "FULLYBUILT, FAILEDTOUPLOAD and ON_HOLD mail their people"
        assert {s: value(samples, "retracer_mail", status=s) for s in MAIL_STATUSES} == \
               {s: mails.count(s) for s in MAIL_STATUSES}
        assert value(samples, "retracer_rejected_events") == 2
        assert value(samples, "retracer_missing_symbols") == 2

    def test_oldest_pending_age(self, service: Service) -> None:
        samples = parse(generate_latest(registry_for(service.factory)).decode())
        assert value(samples, "retracer_oldest_pending_age_seconds") == 0, "none waiting"
        jobs = every_state(service)
        with store.transaction(service.factory) as session:
            # The oldest job overall is finished: only the waiting ones count.
            session.execute(update(Job).where(Job.id == jobs["FULLYBUILT"][0])
                            .values(created_at=utcnow() - timedelta(days=3)))
            session.execute(update(Job).where(Job.id == jobs["PENDING"][0])
                            .values(created_at=utcnow() - timedelta(hours=2)))
        samples = parse(generate_latest(registry_for(service.factory)).decode())
        age = value(samples, "retracer_oldest_pending_age_seconds")
        assert 7200 <= age < 7200 + 600, age

    def test_history_counted_again_only_after_its_ttl(self, service: Service) -> None:
        """The history count (a whole-table read) is reused for HISTORY_TTL_S; everything else is read anew."""
        now = [0.0]
        collector = DatabaseCollector(service.factory, clock=lambda: now[0])

        def scrape() -> Samples:
            return parse("".join(generate_latest(_Single(collector)).decode()))

        submitted(service, 2)
        first = scrape()
        submitted(service, 3)
        second = scrape()
        assert value(second, "retracer_jobs", state="PENDING") == 5
        assert value(second, "retracer_transitions", trigger="submit") == \
               value(first, "retracer_transitions", trigger="submit") == 2
        now[0] += HISTORY_TTL_S
        assert value(scrape(), "retracer_transitions", trigger="submit") == 5


class _Single:
    """A registry of one collector, as generate_latest takes it."""

    def __init__(self, collector: DatabaseCollector) -> None:
        self.collector = collector

    def collect(self) -> Iterator[Any]:
        return iter(self.collector.collect())


class TestRoute:
    @staticmethod
    def app(factory: sessionmaker[Session]) -> TestClient:
        app = FastAPI()
        app.state.factory = factory
        app.include_router(web_metrics.router)
        return TestClient(app)

    def test_metrics_route_serves_the_text_format(self, service: Service) -> None:
        submitted(service, 4)
        response = self.app(service.factory).get("/metrics")
        assert response.status_code == 200
        assert response.headers["content-type"] == CONTENT_TYPE_LATEST
        assert value(parse(response.text), "retracer_jobs", state="PENDING") == 4

    def test_apps_on_two_databases_do_not_share_figures(self, service: Service, tmp_path: Path,
                                                       sqlite_template: Path) -> None:
        submitted(service, 3)
        other = tmp_path / "other.db"
        other.write_bytes(sqlite_template.read_bytes())
        engine = store.make_engine(f"sqlite:///{other}")
        try:
            first, second = self.app(service.factory), self.app(store.session_factory(engine))
            assert value(parse(first.get("/metrics").text), "retracer_jobs", state="PENDING") == 3
            assert value(parse(second.get("/metrics").text), "retracer_jobs", state="PENDING") == 0
        finally:
            engine.dispose()

    def test_a_database_that_cannot_be_read_is_a_503_saying_so(self, tmp_path: Path) -> None:
        engine = store.make_engine(f"sqlite:///{tmp_path}")  # a directory: no database can be opened there
        try:
            app = FastAPI()
            app.state.factory = store.session_factory(engine)
            app.include_router(web_metrics.router)
            response = TestClient(app, raise_server_exceptions=False).get("/metrics")
        finally:
            engine.dispose()
        assert response.status_code == 503
        assert "the database cannot be read" in response.text and "[database] url" in response.text
        assert "Traceback" not in response.text


# -- serve's hook subscriber -------------------------------------------------------------------------------


class TestServiceMetrics:
    def test_events_counted_by_status_and_batches_timed(self, config: cfg.Config,
                                                        factory: sessionmaker[Session]) -> None:
        """Applied, duplicate (a redelivered copy), rejected (malformed, impossible) and stale, each once."""
        metrics = ServiceMetrics(factory)
        bus = StubBus(batch_size=3)
        first = body("crash.submitted", event_id="sub-1", **crash_data())
        bus.queue(first, body("crash.submitted", **crash_data()), "{not json", first,
                  body("retrace.started", 4242, worker="w"))
        service = Service(config, factory, bus=bus, hooks=[metrics])
        service.run(until_idle=True)
        samples = parse(generate_latest(metrics.registry).decode())
        assert {s: value(samples, "retracer_events_total", status=s)
                for s in ("applied", "duplicate", "rejected", "stale")} == \
               {"applied": 2, "duplicate": 1, "rejected": 2, "stale": 0}
        assert value(samples, "retracer_batches_total") == 2 == service.stats.batches
        assert value(samples, "retracer_batch_apply_seconds_count") == 2
        assert value(samples, "retracer_batch_apply_seconds_sum") > 0
        assert value(samples, "retracer_transitions_total", trigger="submit") == 2
        assert value(samples, "retracer_chore_items_total", chore="dispatch") == 2, "both jobs offered"
        assert value(samples, "retracer_chore_seconds_count", chore="gc") >= 1

    def test_retrace_duration_from_start_to_outcome(self, service: Service) -> None:
        """A retrace.failed ending an attempt is timed from that attempt's start, by its trigger."""
        metrics = ServiceMetrics(service.factory)
        service.hooks.add(metrics)
        jobs = submitted(service, 2)
        started(service, *jobs)
        backdate_starts(service.factory, 90)
        service.apply([body("retrace.failed", jobs[0], error="gdb crashed", transient=True),
                       body("retrace.heartbeat", jobs[1], worker="w1")])
        samples = parse(generate_latest(metrics.registry).decode())
        assert value(samples, "retracer_retrace_duration_seconds_count", trigger="retrace_failed") == 1
        assert 90 <= value(samples, "retracer_retrace_duration_seconds_sum", trigger="retrace_failed") < 90 + 600
        assert ("retracer_retrace_duration_seconds_count", (("trigger", "heartbeat"),)) not in samples

    def test_an_upload_from_the_spool_is_a_transition_with_its_duration(self, service: Service) -> None:
        """The uploads chore's events are the service's own (not a bus batch): the after_uploads hook counts
        their transitions and times the retrace they end; events_total keeps to the bus's events."""
        metrics = ServiceMetrics(service.factory)
        service.hooks.add(metrics)
        (job,) = submitted(service, 1)
        config = service.config
        with store.transaction(service.factory) as session:
            dispatch(session, config)
            request = Request.from_body(json.loads(session.scalars(
                select(Outbox.body).where(Outbox.routing_key == WORK_REQUEST)).one()))
        service.apply([body("retrace.started", job, worker="w1", attempt=request.attempt)])
        backdate_starts(service.factory, 300)
        spool.ensure_layout(config.spool_dir)
        trace = "#0  main () at c.c:3\n"
        write_upload(config.spool_dir, leaf_for(request), manifest_for(request, Retraced(trace, "log"), "w1"),
                     trace, "log")
        service.run_chores()
        samples = parse(generate_latest(metrics.registry).decode())
        assert value(samples, "retracer_transitions_total", trigger="upload_accepted") == 1
        assert value(samples, "retracer_retrace_duration_seconds_count", trigger="upload_accepted") == 1
        assert 300 <= value(samples, "retracer_retrace_duration_seconds_sum", trigger="upload_accepted") < 900
        assert value(samples, "retracer_chore_items_total", chore="uploads") == 1
        assert value(samples, "retracer_events_total", status="applied") == 2, "submit and start only"

    def test_mail_rounds_counted_by_result(self, service: Service) -> None:
        metrics = ServiceMetrics(service.factory)
        service.hooks.add(metrics)
        every_state(service)  # 6 mails due (FULLYBUILT x3 creator, FAILEDTOUPLOAD and ON_HOLD x2 ...)
        with service.factory() as session:
            due = len(session.scalars(select(Mail.id)).all())
        service.run_chores()
        samples = parse(generate_latest(metrics.registry).decode())
        delivered = {r: value(samples, "retracer_mail_delivered_total", result=r)
                     for r in ("sent", "failed", "deferred", "digested")}
        assert sum(delivered.values()) == due and delivered["sent"] > 0, delivered


# -- the worker's counters and the exporter -----------------------------------------------------------------


def _request(job: int) -> Request:
    return Request.from_body({"id": f"request:{job}:0:1", "type": WORK_REQUEST, "job": job,
                              "occurred_at": utcnow().isoformat(), "source": "retracer",
                              "data": {"crash_id": "c", "package": "p", "version": "1", "architecture": "amd64",
                                       "release": "r", "core": "/c", "executable": "/x", "build_ids": [],
                                       "attempt": 1}})


def test_worker_metrics_count_attempts_by_outcome() -> None:
    metrics = WorkerMetrics(concurrency=2)
    for _ in range(3):
        metrics.started()
    metrics.finished(Result(_request(1), "retraced", 12.5, durable=True))
    metrics.finished(Result(_request(2), "failed", 2.0, transient=False, durable=True))
    samples = parse(generate_latest(metrics.registry).decode())
    assert value(samples, "retracer_worker_busy") == 1
    assert value(samples, "retracer_worker_slots") == 2
    assert {o: value(samples, "retracer_worker_attempts_total", outcome=o)
            for o in ("retraced", "failed_transient", "failed_permanent", "unfinished")} == \
           {"retraced": 1, "failed_transient": 0, "failed_permanent": 1, "unfinished": 0}
    assert value(samples, "retracer_worker_attempt_seconds_sum", outcome="retraced") == 12.5


def test_a_port_in_use_is_a_one_line_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(RetracerError) as caught:
            expose(ServiceMetrics().registry, "127.0.0.1", port, "service")
    message = str(caught.value)
    assert f"[service] metrics_host '127.0.0.1' metrics_port {port} cannot be listened on" in message
    assert "\n" not in message


def test_port_zero_exposes_nothing() -> None:
    assert expose(ServiceMetrics().registry, "127.0.0.1", 0, "worker") is None
