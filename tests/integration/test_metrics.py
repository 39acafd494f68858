"""Prometheus metrics of the real processes: `retracer serve` (embedded, and PostgreSQL + RabbitMQ with two
apply workers) and `retracer worker` retracing a real core with gdb, each scraped on its metrics_port, and
the web app's /metrics on the same database."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
from pathlib import Path

import httpx
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from retracer import config as cfg
from retracer import store
from retracer.testing.factories import crash_data, event
from retracer.testing.instance import RETRACER, Instance
from retracer.web.app import create_app

from .test_bus import _send_raw
from .test_worker import build_crash, submit

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def parse(text: str) -> Samples:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def scrape(port: int) -> Samples:
    response = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version=")
    return parse(response.text)


def events_counted(port: int) -> dict[str, float]:
    samples = scrape(port)
    return {s: value(samples, "retracer_events_total", status=s) for s in ("applied", "duplicate", "rejected")}


def web_metrics(inst: Instance) -> Samples:
    """The web app's /metrics on the instance's database, the app as `retracer web` builds it."""
    config = cfg.load(environ=inst.env)
    engine = store.make_engine(config.database_url)
    try:
        response = TestClient(create_app(config, store.session_factory(engine))).get("/metrics")
    finally:
        engine.dispose()
    assert response.status_code == 200, response.text
    return parse(response.text)


def test_serve_counts_each_event_once(instance: Instance) -> None:
    """Both modes (with RabbitMQ: two apply workers on PostgreSQL): 12 submissions, 4 of them published
    again, a malformed body and an event for a job that does not exist. serve's exporter counts 12 applied,
    4 duplicate and 2 rejected, summed over its apply workers; the web app's /metrics on the same database
    shows the 12 jobs waiting and the 2 rejected events."""
    inst = instance
    port = free_port()
    inst.set(SERVICE__METRICS_PORT=str(port), SERVICE__APPLY_WORKERS="2")
    serve = inst.serve()
    assert events_counted(port) == {"applied": 0, "duplicate": 0, "rejected": 0}
    submissions = [event("crash.submitted", event_id=f"metrics-{n}", **crash_data()) for n in range(12)]
    inst.publish(*submissions[:8])
    _send_raw(inst, b'{"id": "half an event", "type": ', "crash.submitted")
    inst.publish(*submissions[8:], *submissions[2:6], event("retrace.started", 4242, worker="w"))
    expected = {"applied": 12, "duplicate": 4, "rejected": 2}
    inst.wait_for("every event counted", lambda: sum(events_counted(port).values()) >= sum(expected.values()))
    samples = scrape(port)
    assert {s: value(samples, "retracer_events_total", status=s) for s in expected} == expected
    assert value(samples, "retracer_transitions_total", trigger="submit") == 12
    assert value(samples, "retracer_batches_total") == value(samples, "retracer_batch_apply_seconds_count") >= 1
    assert inst.scalar("SELECT count(*) FROM job") == 12
    assert inst.stop(serve) == 0
    if "RETRACER__BROKER__URL" in inst.env:
        log = (inst.data_dir / "serve-0.log").read_text()
        assert '"msg": "apply workers started"' in log, "the events went through the apply workers"
    web = web_metrics(inst)
    assert value(web, "retracer_jobs", state="PENDING") == 12
    assert value(web, "retracer_jobs", state="FULLYBUILT") == 0
    assert value(web, "retracer_transitions", trigger="submit") == 12
    assert value(web, "retracer_rejected_events") == 2
    assert value(web, "retracer_oldest_pending_age_seconds") > 0


def test_a_metrics_port_in_use_stops_serve_with_one_line(embedded: Instance) -> None:
    inst = embedded
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        inst.set(SERVICE__METRICS_PORT=str(port))
        proc = inst.run("serve", "--until-idle", check=False)
    assert proc.returncode == 1
    assert f"[service] metrics_host '127.0.0.1' metrics_port {port} cannot be listened on" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout


def test_worker_and_serve_time_a_real_retrace(embedded: Instance, tmp_path: Path) -> None:
    """`retracer worker` with its metrics_port retraces a real core with gdb: its exporter counts the attempt
    as retraced with its duration and nothing left busy, and serve's counts the upload's transition with the
    retrace's duration, from the worker's retrace.started to its upload, as applied."""
    exe, core, debug_dir, build_id = build_crash(tmp_path)
    inst = embedded
    serve_port, worker_port = free_port(), free_port()
    inst.set(WORKER__DEBUG_DIRS=json.dumps([str(debug_dir)]), WORKER__NAME="metrics-worker",
             SERVICE__START_REQUIRES_OFFER="true", SERVICE__METRICS_PORT=str(serve_port),
             WORKER__METRICS_PORT=str(worker_port))
    serve = inst.serve()
    worker_log = inst.data_dir / "worker.log"
    with open(worker_log, "wb") as out:  # a file, not a pipe nobody reads while waiting: it could fill
        worker = subprocess.Popen([*RETRACER, "worker"], env=inst.env, stdout=out, stderr=out)
    try:
        job = submit(inst, exe, core, build_id)

        def worker_samples() -> Samples:
            assert worker.poll() is None, worker_log.read_text()
            try:
                return scrape(worker_port)
            except httpx.TransportError:  # not listening yet
                return {}

        inst.wait_for("the attempt counted", lambda: value(
            worker_samples(), "retracer_worker_attempts_total", outcome="retraced") >= 1, timeout=120)
        inst.wait_for("FULLYBUILT", lambda: inst.scalar("SELECT state FROM job WHERE id = :id", id=job)
                      in ("FULLYBUILT", "FAILEDTOUPLOAD", "ON_HOLD"))
        samples = worker_samples()
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=60)
    assert worker.returncode == 0, worker_log.read_text()
    assert inst.scalar("SELECT state FROM job WHERE id = :id", id=job) == "FULLYBUILT"
    attempts = {o: value(samples, "retracer_worker_attempts_total", outcome=o)
                for o in ("retraced", "failed_transient", "failed_permanent", "unfinished")}
    assert attempts == {"retraced": 1, "failed_transient": 0, "failed_permanent": 0, "unfinished": 0}
    assert value(samples, "retracer_worker_attempt_seconds_count", outcome="retraced") == 1
    assert value(samples, "retracer_worker_attempt_seconds_sum", outcome="retraced") > 0
    assert value(samples, "retracer_worker_busy") == 0
    served = scrape(serve_port)
    assert value(served, "retracer_transitions_total", trigger="upload_accepted") == 1
    assert value(served, "retracer_retrace_duration_seconds_count", trigger="upload_accepted") == 1
    assert value(served, "retracer_retrace_duration_seconds_sum", trigger="upload_accepted") > 0
    assert inst.stop(serve) == 0
    web = web_metrics(inst)
    assert value(web, "retracer_jobs", state="FULLYBUILT") == 1
    assert value(web, "retracer_transitions", trigger="upload_accepted") == 1
