"""Hook points of the serve loop: chores and subscribers added without editing it, run over the stub bus."""

from __future__ import annotations

import json
from collections.abc import Sequence

from sqlalchemy.orm import Session, sessionmaker

from retracer import config as cfg
from retracer.apply.applier import Outcome
from retracer.bus.stub import StubBus
from retracer.mail.sender import DeliveryReport
from retracer.service import Hooks, Service
from retracer.service.chores import ChoreContext, register, registered, unregister
from retracer.testing.factories import crash_data, event


class Metrics(Hooks):
    """What a metrics exporter would count."""

    def __init__(self) -> None:
        self.batches: list[int] = []
        self.statuses: dict[str, int] = {}
        self.chores: set[str] = set()
        self.mail_rounds = 0
        self.stopped = 0

    def after_batch(self, outcomes: Sequence[Outcome], seconds: float) -> None:
        assert seconds >= 0
        self.batches.append(len(outcomes))
        for o in outcomes:
            self.statuses[o.status] = self.statuses.get(o.status, 0) + 1

    def after_chore(self, name: str, count: int, seconds: float) -> None:
        self.chores.add(name)

    def after_mail(self, report: DeliveryReport) -> None:
        self.mail_rounds += 1

    def after_stop(self) -> None:
        self.stopped += 1


class Counter:
    """A chore from outside the service: counts its rounds, says when it is closed."""

    instances: list[Counter] = []

    def __init__(self, ctx: ChoreContext) -> None:
        self.ctx = ctx
        self.rounds = 0
        self.closed = False
        Counter.instances.append(self)

    def __call__(self) -> int:
        self.rounds += 1
        return 0

    def close(self) -> None:
        self.closed = True


def submitted(n: int) -> list[str]:
    return [json.dumps(event("crash.submitted", **crash_data())) for _ in range(n)]


class TestChoreRegistry:
    def test_a_registered_chore_runs_every_round_after_the_built_in_ones(
            self, config: cfg.Config, factory: sessionmaker[Session]) -> None:
        """register() adds a chore to every service started afterwards, last, with the service's context; it is
        closed when the service stops, and unregister() takes it out again."""
        built_in = [name for name, _ in registered()]
        assert built_in == ["uploads", "watchdog", "dispatch", "relay", "mail", "gc"]
        register("counter", Counter)
        try:
            service = Service(config, factory, bus=StubBus())
            assert [name for name, _ in service.chores] == [*built_in, "counter"]
            service.run(until_idle=True)
        finally:
            unregister("counter")
        (chore,) = Counter.instances[-1:]
        assert chore.ctx.config is config and chore.ctx.bus is service.bus
        assert chore.rounds >= 1 and chore.closed
        assert [name for name, _ in Service(config, factory, bus=StubBus()).chores] == built_in


class TestSubscribers:
    def test_a_metrics_subscriber_sees_batches_chores_mail_and_the_stop(
            self, config: cfg.Config, factory: sessionmaker[Session]) -> None:
        """A Hooks subscriber given to the service counts each batch's outcomes, every chore, every mail round
        and the stop, with nothing in the loop written for it."""
        bus = StubBus(batch_size=2)
        bus.queue(*submitted(3), "not json")
        metrics = Metrics()
        service = Service(config, factory, bus=bus, hooks=[metrics])
        service.run(until_idle=True)
        assert metrics.batches == [2, 2]
        assert metrics.statuses == {"applied": 3, "rejected": 1}
        assert metrics.chores == {"uploads", "watchdog", "dispatch", "relay", "mail", "gc"}
        assert metrics.mail_rounds >= 1 and metrics.stopped == 1
        assert (service.stats.applied, service.stats.rejected, service.stats.batches) == (3, 1, 2)
        assert (bus.acked, bus.rejected) == (3, 1)
        requests = [m for m in bus.published if m.routing_key == "retrace.requested"]
        assert sorted(json.loads(m.body)["job"] for m in requests) == [1, 2, 3], "dispatched and relayed"

    def test_a_failing_subscriber_does_not_stop_the_service(
            self, config: cfg.Config, factory: sessionmaker[Session]) -> None:
        """A subscriber that raises is logged; the batch is still applied and the other subscribers still called."""

        class Broken(Hooks):
            def after_batch(self, outcomes: Sequence[Outcome], seconds: float) -> None:
                raise RuntimeError("metrics bug")

        bus = StubBus()
        bus.queue(*submitted(2))
        metrics = Metrics()
        Service(config, factory, bus=bus, hooks=[Broken(), metrics]).run(until_idle=True)
        assert metrics.statuses == {"applied": 2}
        assert bus.acked == 2
