"""The service's batch handling: conflicts retried, a poisonous event isolated, an outage never a rejection."""

from __future__ import annotations

import json
from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from retracer import config as cfg
from retracer.apply.applier import Applier
from retracer.bus import embedded
from retracer.service import Service
from retracer.service.chores.registry import Simple
from retracer.store.models import Inbox, Job, Rejected
from retracer.testing.factories import crash_data, event
from retracer.testing.logcapture import captured_logs


def poison(service: Service, marker: str, error: Exception) -> None:
    """Make the applier raise ``error`` for any batch that contains the event whose crash id is ``marker``."""
    real = Applier.apply_batch

    def apply_batch(self: Applier, session: Session, bodies: Any, unseen: bool = False, job_ids: Any = None,
                    minted: bool = False) -> Any:
        if any(marker in (b if isinstance(b, str) else json.dumps(b)) for b in bodies):
            raise error
        return real(self, session, bodies, unseen, job_ids, minted)

    service.applier.apply_batch = apply_batch.__get__(service.applier)  # type: ignore[method-assign]


def count(factory: sessionmaker[Session], model: Any) -> int:
    with factory() as session:
        return int(session.scalar(select(func.count()).select_from(model)) or 0)


class TestIsolation:
    def test_a_poisonous_event_is_kept_and_the_rest_applied(self, config: cfg.Config,
                                                             factory: sessionmaker[Session]) -> None:
        """One event that breaks every batch it is in is rejected as an internal error; the others apply."""
        service = Service(config, factory)
        poison(service, "crash-poison", ValueError("boom"))
        bodies = [json.dumps(event("crash.submitted", **crash_data(crash_id=c))) for c in ("a", "crash-poison", "b")]
        outcomes = service.apply(bodies)
        assert [o.status for o in outcomes] == ["applied", "rejected", "applied"]
        assert "internal error: ValueError('boom')" in str(outcomes[1].reason)
        assert count(factory, Job) == 2 and count(factory, Rejected) == 1

    def test_the_inbox_row_behind_it_goes_with_its_rejection(self, config: cfg.Config,
                                                              factory: sessionmaker[Session]) -> None:
        """Embedded: the poisonous row is rejected and removed in one transaction; the others are applied."""
        service = Service(config, factory)
        poison(service, "crash-poison", ValueError("boom"))
        with factory() as session, session.begin():
            embedded.append(session, [json.dumps(event("crash.submitted", **crash_data(crash_id=c)))
                                      for c in ("a", "crash-poison", "b")])
        assert service.drain_inbox() == 3
        assert count(factory, Inbox) == 0 and count(factory, Job) == 2 and count(factory, Rejected) == 1

    @pytest.mark.parametrize("fresh", [False, True], ids=["redelivered", "fresh"])
    def test_an_unusable_database_is_not_a_rejection(self, config: cfg.Config, factory: sessionmaker[Session],
                                                     fresh: bool) -> None:
        """A database error raises out of the service (serve exits, the event comes back) and keeps nothing,
        also from the first, lookup-free try of a fresh batch."""
        service = Service(config, factory)
        poison(service, "crash-x", OperationalError("COMMIT", {}, ConnectionRefusedError("gone")))
        with pytest.raises(OperationalError):
            service.apply([json.dumps(event("crash.submitted", **crash_data(crash_id="crash-x")))], fresh)
        assert count(factory, Rejected) == 0 and count(factory, Job) == 0

    def test_a_poisonous_event_in_a_fresh_batch(self, config: cfg.Config, factory: sessionmaker[Session]) -> None:
        """The first try's failure hands the batch to the careful path, which isolates the event."""
        service = Service(config, factory)
        poison(service, "crash-bad", ValueError("boom"))
        bodies = [json.dumps(event("crash.submitted", **crash_data(crash_id=c))) for c in ("crash-1", "crash-bad")]
        assert [o.status for o in service.apply(bodies, fresh=True)] == ["applied", "rejected"]
        assert count(factory, Job) == 1 and count(factory, Rejected) == 1


class TestChores:
    def test_an_unusable_database_is_one_line(self, config: cfg.Config, factory: sessionmaker[Session]) -> None:
        """A chore that meets an unusable database logs what is wrong in one line (no traceback) and the
        other chores still run; a chore that fails for another reason logs its traceback."""
        service = Service(config, factory)
        ran: list[str] = []

        def gone() -> int:
            raise OperationalError("SELECT 1", {}, ConnectionRefusedError("the database system is shutting down"))

        def bug() -> int:
            raise KeyError("oops")

        def mail() -> int:
            ran.append("mail")
            return 0

        service.chores = [("watchdog", Simple(gone)), ("dispatch", Simple(bug)), ("mail", Simple(mail))]
        with captured_logs() as records:
            service.run_chores()
        assert ran == ["mail"]
        (outage,) = [r for r in records if getattr(r, "chore", None) == "watchdog"]
        assert outage.getMessage() == "chore failed: the database cannot be used; it runs again at the next round"
        assert outage.exc_info is None and "shutting down" in outage.error  # type: ignore[attr-defined]
        (failure,) = [r for r in records if getattr(r, "chore", None) == "dispatch"]
        assert failure.exc_info is not None
