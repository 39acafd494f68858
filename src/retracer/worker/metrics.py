"""A worker's own Prometheus metrics: its attempts, how they ended, how long each took, how many run now.

Measured here, on the worker's clock, from its retrace.started to its outcome being durable: the service
sees the same attempts only through their events (retracer_retrace_duration_seconds, service.metrics).
Exposed on [worker] metrics_host:metrics_port while `retracer worker` runs.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from retracer.config import Config
from retracer.service.metrics import RETRACE_BUCKETS, Exporter, expose
from retracer.worker.loop_attempt import Result

#: How an attempt ended: retraced (its upload is in the spool), failed_transient (retried later),
#: failed_permanent (held for a human), unfinished (the worker could not report an outcome; the request goes
#: back to the queue).
OUTCOMES = ("retraced", "failed_transient", "failed_permanent", "unfinished")


def outcome_of(result: Result) -> str:
    if not result.durable:
        return "unfinished"
    if result.outcome == "retraced":
        return "retraced"
    return "failed_transient" if result.transient else "failed_permanent"


class WorkerMetrics:
    """The counters of one worker process, on a registry of their own."""

    def __init__(self, concurrency: int = 1, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        self.attempts = Counter("retracer_worker_attempts", "Attempts this worker finished, by outcome: retraced, "
                                "failed_transient, failed_permanent, unfinished (no outcome could be reported).",
                                ["outcome"], registry=r)
        self.seconds = Histogram("retracer_worker_attempt_seconds", "Seconds from an attempt's start to its "
                                 "outcome being durable (upload in the spool, or retrace.failed published), by "
                                 "outcome.", ["outcome"], buckets=RETRACE_BUCKETS, registry=r)
        self.busy = Gauge("retracer_worker_busy", "Attempts running now.", registry=r)
        self.slots = Gauge("retracer_worker_slots", "Attempts this worker runs side by side at most "
                           "(its concurrency).", registry=r)
        self.malformed = Counter("retracer_worker_malformed_requests", "Work requests dropped as malformed.",
                                 registry=r)
        self.slots.set(concurrency)
        for outcome in OUTCOMES:
            self.attempts.labels(outcome)

    def started(self) -> None:
        self.busy.inc()

    def finished(self, result: Result) -> None:
        outcome = outcome_of(result)
        self.busy.dec()
        self.attempts.labels(outcome).inc()
        self.seconds.labels(outcome).observe(result.seconds)

    def dropped(self) -> None:
        self.malformed.inc()


def expose_worker(config: Config, concurrency: int) -> tuple[WorkerMetrics | None, Exporter | None]:
    """When [worker] metrics_port is set: a worker's metrics and their exporter; else (None, None)."""
    section = config["worker"]
    if not section["metrics_port"]:
        return None, None
    metrics = WorkerMetrics(concurrency)
    return metrics, expose(metrics.registry, str(section["metrics_host"]), int(section["metrics_port"]), "worker")
