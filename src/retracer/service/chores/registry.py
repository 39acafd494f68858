"""The chores a service runs between batches, in registration order, and what each is given.

A chore is a callable returning how many things it did (0: nothing to do), with a ``close()`` for what it
holds between rounds (a broker connection, SMTP connections). ``register(name, make)`` adds one: ``make``
builds it for a service from its :class:`ChoreContext`. The service builds every registered chore when it
starts; adding one needs no edit of the serve loop.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from retracer.apply.runner import unavailable

if TYPE_CHECKING:
    from sqlalchemy.orm import Session, sessionmaker

    from retracer.apply.applier import Applier
    from retracer.apply.runner import Runner
    from retracer.bus.base import Bus
    from retracer.config import Config
    from retracer.service.hooks import Hooks


class Chore(Protocol):
    """One chore of a running service."""

    def __call__(self) -> int: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class ChoreContext:
    """What a chore may use: the service's configuration, database, apply path, bus and hooks."""

    config: Config
    factory: sessionmaker[Session]
    applier: Applier
    runner: Runner
    bus: Bus
    hooks: Hooks


MakeChore = Callable[[ChoreContext], Chore]

_REGISTERED: dict[str, MakeChore] = {}


def register(name: str, make: MakeChore) -> None:
    """Run the chore ``make`` builds, under ``name``, in every service started from now on (after those
    registered before it); a name registered again is replaced in its place."""
    _REGISTERED[name] = make


def unregister(name: str) -> None:
    """Stop adding the chore ``name`` to services started from now on."""
    _REGISTERED.pop(name, None)


def registered() -> list[tuple[str, MakeChore]]:
    """The registered chores, in the order they run."""
    return list(_REGISTERED.items())


log = logging.getLogger("retracer.serve")


@contextmanager
def isolated(session: Session, chore: str, job_id: int) -> Iterator[None]:
    """Run a chore's work on one job in a savepoint of ``session``: if it fails, that work is rolled back and
    logged with the job, and the chore goes on with the next job (one job cannot stop a chore for all).

    An unusable database still raises: no job is to blame for it, and the chore's round fails as a whole.
    """
    try:
        with session.begin_nested():
            yield
    except Exception as exc:
        if unavailable(exc):
            raise
        log.error("chore failed for one job; it is tried again next round", exc_info=exc,
                  extra={"chore": chore, "job": job_id, "error": str(exc)[:300]})


class Simple:
    """A chore that is a plain function of the context, holding nothing between rounds."""

    def __init__(self, run: Callable[[], int]) -> None:
        self.run = run

    def __call__(self) -> int:
        return self.run()

    def close(self) -> None:
        return None
