"""A crash of `serve`, `retracer worker` or a batch run: its traceback on stderr and a mail to the maintainers.

A crash is a bug escaping the command (not a RetracerError, whose message already says what to do, and not a
database that went away, which the command reports as such). The mail is a row of the mail outbox, written
in its own transaction, so it is delivered by the mail chore or `retracer mail flush` even when SMTP is down
as the process dies. The same crash (exception type and the innermost frame's file:line) is queued at most
once an hour per maintainer: a cron run crashing every five minutes makes one mail an hour, not twelve.
"""

from __future__ import annotations

import os
import socket
import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

from sqlalchemy import select
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from retracer.config import Config
from retracer.errors import RetracerError
from retracer.mail.render import Notice, message_id
from retracer.mail.rows import command
from retracer.store.models import Mail, utcnow

if TYPE_CHECKING:
    from retracer.cli.context import AppContext

#: The state name of a crash mail row (its template is templates/email/CRASH.txt); it is no job's state.
CRASH = "CRASH"
RATIONALE = "Maintainer"
#: The same crash is mailed at most once within this long.
DEDUPE_WINDOW = timedelta(hours=1)
#: The traceback kept in the mail: its end, where the crash is, when it is longer.
MAX_TRACEBACK_CHARS = 16_000
#: What leaves a command as it is: handled by the command group, or not a crash at all.
NOT_A_CRASH = (RetracerError, OperationalError, InterfaceError)


def crash_key(exc: BaseException) -> str:
    """``Type at file:line`` of the innermost frame: what makes two crashes the same one."""
    frames = traceback.extract_tb(exc.__traceback__)
    where = f"{frames[-1].filename}:{frames[-1].lineno}" if frames else "unknown"
    return f"{type(exc).__module__}.{type(exc).__qualname__} at {where}"


def context_of(config: Config, what: str, exc: BaseException) -> dict[str, Any]:
    text = "".join(traceback.format_exception(exc))
    if len(text) > MAX_TRACEBACK_CHARS:
        text = "...\n" + text[-MAX_TRACEBACK_CHARS:]
    try:
        release = version("retracer")
    except PackageNotFoundError:
        release = "unknown"
    return {"crash_key": crash_key(exc), "command": what, "error_type": type(exc).__qualname__,
            "error": str(exc)[:2000], "traceback": text, "host": socket.gethostname(), "pid": os.getpid(),
            "at": utcnow().isoformat(timespec="seconds"), "version": release, "retracer": command(config)}


def renderer_ready(config: Config) -> bool:
    """Whether the mail renderer gives each crash mail a Message-ID of its own. The column is unique and a
    crash mail has no job nor transition to derive one from: two crash mails with the same id would make
    every later claim of the outbox fail, so none is queued until the renderer derives it from the mail id."""
    sender = config["mail"]["sender"]
    first, second = (message_id(Notice(None, None, CRASH, "m@example.com", RATIONALE, {}, i), sender) for i in (1, 2))
    return first != second


def queue(factory: sessionmaker[Session], config: Config, what: str, exc: BaseException) -> tuple[int, int]:
    """Queue the crash mail to each maintainer not already mailed this crash within the hour; returns
    (mails queued, maintainers skipped as already told)."""
    maintainers = [a.strip() for a in config["mail"]["maintainers"] if a.strip()]
    if not maintainers:
        return 0, 0
    if not renderer_ready(config):
        raise RetracerError("this retracer's mail renderer cannot send crash mails yet (retracer.mail.render "
                            "has no CRASH case, so they would share one Message-ID); the crash is in this log only")
    context = context_of(config, what, exc)
    now = utcnow()
    queued = skipped = 0
    with factory() as session, session.begin():
        recent = session.execute(select(Mail.recipient, Mail.context).where(
            Mail.state == CRASH, Mail.created_at >= now - DEDUPE_WINDOW))
        told = {r.strip().lower() for r, c in recent if (c or {}).get("crash_key") == context["crash_key"]}
        for address in dict.fromkeys(maintainers):
            if address.lower() in told:
                skipped += 1
                continue
            session.add(Mail(job_id=None, history_id=None, state=CRASH, recipient=address, rationale=RATIONALE,
                             context=context, status="pending", attempts=0, created_at=now))
            queued += 1
    return queued, skipped


def report(app: AppContext, what: str, exc: BaseException) -> None:
    """The traceback on stderr, then the mail queued (or why it could not be)."""
    traceback.print_exception(exc, file=sys.stderr)
    try:
        queued, skipped = queue(app.factory, app.config, what, exc)
    except Exception as failure:  # the crash is what matters: say why it is not mailed, and go on dying
        print(f"retracer {what} crashed ({crash_key(exc)}); the crash mail could not be queued: "
              f"{str(failure).strip().splitlines()[0] if str(failure).strip() else type(failure).__name__}",
              file=sys.stderr)
        return
    if not queued and not skipped:
        print(f"retracer {what} crashed ({crash_key(exc)}); no mail: [mail] maintainers is empty", file=sys.stderr)
    elif queued:
        print(f"retracer {what} crashed ({crash_key(exc)}); a mail to {queued} maintainer(s) is queued "
              f"(sent by `retracer mail flush` or serve's mail chore)", file=sys.stderr)
    else:
        print(f"retracer {what} crashed ({crash_key(exc)}); the maintainers were mailed this crash within the "
              f"hour: not mailed again", file=sys.stderr)


@contextmanager
def reported(app: AppContext, what: str) -> Iterator[None]:
    """Run a command's body; a crash escaping it is reported (see :func:`report`) and exits 1."""
    try:
        yield
    except NOT_A_CRASH:
        raise
    except Exception as exc:
        report(app, what, exc)
        raise SystemExit(1) from None
