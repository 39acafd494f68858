"""Each spec runs in a fresh embedded instance: its own data directory, a migrated SQLite database.

The specs show only what an admin types and reads, so everything else is here, in the namespace every spec
can use without importing:

``retracer``
    Run a command line and print its output (and ``[exit N]`` when it fails).
``data_dir``, ``spool``
    The instance's data directory and its upload spool.
``env``
    The environment the commands see: ``RETRACER_CONFIG`` names the instance's configuration file (its data
    directory and admins); a spec changes a setting by setting a ``RETRACER__SECTION__KEY`` variable in it.
``event(type, job, **data)``
    A valid event, as a worker or an uploader would publish it.
``publish(*events)``
    Write the events to a file of JSON lines and run ``retracer publish FILE``.
``deliver(*events)``
    ``publish`` them, then run ``retracer serve --until-idle --log-level ERROR``, which applies them,
    dispatches work, processes the spool and sends mail.
``worker_upload(leaf, manifest, backtrace, worker_log)``
    Put an upload in the spool's ``incoming/`` the way a worker does; returns its directory.
``spool_contents()``
    Print which uploads are in the spool's ``incoming/``, ``failed/`` and ``accepted/``.
``delivered(job=None)``
    The mails in the instance's mailbox file (about ``job`` only, if given), by state and recipient.
``body(mail)``
    The plain-text body of a mail, from the mailbox file or from the SMTP server.
``smtp``
    A real SMTP server running in this process (``smtp.url``; ``smtp.pop()`` takes what it received).
``retry_delay(attempt)``
    How long the instance's failure policy waits after failed attempt ``attempt``.
``render_notification_without_upload_log(mail_id)``
    Render an outbox mail as if its job had no upload log (which the event bus never lets happen).
``time``
    The standard module, for the specs that wait for a deadline to pass.
``crashy``
    A small C program that crashes, built for real on first use: ``crashy.executable`` (stripped of every
    symbol, as a worker sees it), ``crashy.core`` (a core of its crash, written by gdb), its packages
    ``crashy.deb`` and ``crashy.ddeb`` (made by dpkg-deb, the debug information in the .ddeb only),
    ``crashy.build_id``, ``crashy.name``, ``crashy.version`` and ``crashy.architecture``. Where gcc, gdb,
    objcopy or dpkg-deb are missing (outside CI, which installs them), or gdb may not write a core here, the
    spec using it is skipped with the reason.

Whatever a spec starts (the SMTP server, the logs of ``serve``) is stopped here, after the spec.
"""

from __future__ import annotations

import json
import logging
import mailbox
import os
import shutil
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from email.message import Message
from pathlib import Path
from typing import Any

import pytest

from retracer.config import load
from retracer.mail.render import Notice, render
from retracer.store import make_engine, session_factory, transaction
from retracer.store.models import Mail
from retracer.testing import crashes, packages
from retracer.testing.factories import event
from retracer.testing.shell import Shell
from retracer.testing.smtp import CaptureServer
from retracer.uploads.spool import write_upload
from retracer.workflow.policy import FailurePolicy

ADMINS = "celso.providelo@example.com,foo.bar@example.com"
#: As tests/conftest.py's: in CI a tool the specs need is a failure, not a skip (.ci/run installs them all).
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _publisher(retracer: Shell, data_dir: Path) -> Callable[..., None]:
    def publish(*events: dict[str, Any]) -> None:
        path = data_dir / "events.jsonl"
        path.write_text("".join(json.dumps(e) + "\n" for e in events), encoding="utf-8")
        retracer(f"publish {path}")

    return publish


def _deliverer(retracer: Shell, publish: Callable[..., None]) -> Callable[..., None]:
    def deliver(*events: dict[str, Any]) -> None:
        publish(*events)
        retracer("serve --until-idle --log-level ERROR")

    return deliver


def _worker_upload(spool: Path) -> Callable[[str, dict[str, Any], str, str], Path]:
    def worker_upload(leaf: str, manifest: dict[str, Any], backtrace: str, worker_log: str) -> Path:
        return write_upload(spool, leaf, manifest, backtrace, worker_log)

    return worker_upload


def _spool_contents(spool: Path) -> Callable[[], None]:
    def spool_contents() -> None:
        for sub in ("incoming", "failed", "accepted"):
            directory = spool / sub
            leaves = sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []
            print(f"{sub + '/':<10}", ", ".join(leaves) or "-")

    return spool_contents


def _delivered(data_dir: Path) -> Callable[..., list[mailbox.mboxMessage]]:
    def delivered(job: int | None = None) -> list[mailbox.mboxMessage]:
        box = mailbox.mbox(str(data_dir / "mail" / "outbox.mbox"), create=False)
        try:
            mails = [m for m in box if job is None or m["X-Retracer-Job"] == str(job)]
        finally:
            box.close()
        return sorted(mails, key=lambda m: (str(m["X-Retracer-Job-State"]), str(m["To"])))

    return delivered


def body(mail: Message) -> str:
    """The plain-text part of ``mail``, decoded."""
    plain = next(p for p in mail.walk() if p.get_content_type() == "text/plain")
    payload = plain.get_payload(decode=True)
    assert isinstance(payload, bytes)
    return payload.decode(plain.get_content_charset() or "utf-8")


def _retry_delay(env: dict[str, str]) -> Callable[[int], timedelta]:
    def retry_delay(attempt: int) -> timedelta:
        return FailurePolicy.from_config(load(environ=env)["policy"]).backoff(attempt)

    return retry_delay


def _render_without_upload_log(env: dict[str, str]) -> Callable[[int], None]:
    def render_notification_without_upload_log(mail_id: int) -> None:
        config = load(environ=env)
        engine = make_engine(config.database_url)
        try:
            with transaction(session_factory(engine)) as session:
                mail = session.get(Mail, mail_id)
                if mail is None:
                    raise LookupError(f"no mail {mail_id} in the outbox")
                notice = Notice.from_mail(mail)
        finally:
            engine.dispose()
        render(notice.with_context(upload_log=None), config)

    return render_notification_without_upload_log


class Crashy:
    """The crashing program, its core and its packages, made on first use (most specs never touch them)."""

    def __init__(self, where: Path) -> None:
        self._where = where
        self._made: tuple[packages.Packages, Path] | None = None

    def _make(self) -> tuple[packages.Packages, Path]:
        if self._made is None:
            missing = sorted(set(crashes.missing_tools()) | set(packages.missing_tools()))
            if missing:
                (pytest.fail if IN_CI else pytest.skip)(f"{', '.join(missing)} not installed (.ci/run installs "
                                                        f"them)")
            self._where.mkdir(parents=True, exist_ok=True)
            try:
                pkgs = packages.make_packages(self._where)
                core = crashes.make_core([pkgs.program.executable], self._where / "core")
            except crashes.CrashNotMade as exc:  # e.g. ptrace refused in a container: nothing the spec can fix
                pytest.skip(str(exc))
            self._made = (pkgs, core)
        return self._made

    @property
    def packages(self) -> packages.Packages:
        return self._make()[0]

    @property
    def core(self) -> Path:
        return self._make()[1]

    @property
    def executable(self) -> Path:
        return self.packages.program.executable

    @property
    def deb(self) -> Path:
        return self.packages.deb

    @property
    def ddeb(self) -> Path:
        return self.packages.ddeb

    @property
    def build_id(self) -> str:
        return self.packages.build_id

    @property
    def name(self) -> str:
        return self.packages.name

    @property
    def version(self) -> str:
        return self.packages.version

    @property
    def architecture(self) -> str:
        return self.packages.architecture


@pytest.fixture
def smtp() -> Iterator[CaptureServer]:
    """A real SMTP server in this process; a spec points ``RETRACER__MAIL__URL`` at ``smtp.url`` to use it."""
    with CaptureServer() as server:
        yield server


@pytest.fixture(autouse=True)
def _embedded_instance(doctest_namespace: dict[str, Any], tmp_path: Path, sqlite_template: Path,
                       monkeypatch: pytest.MonkeyPatch, smtp: CaptureServer) -> Iterator[None]:
    data_dir = tmp_path / "retracer"
    data_dir.mkdir()
    shutil.copy(sqlite_template, data_dir / "retracer.db")
    # The instance has a configuration file, as a real one would: the commands its mails print name it.
    settings = data_dir / "retracer.toml"
    admins = ", ".join(json.dumps(a) for a in ADMINS.split(","))
    settings.write_text(f"[service]\ndata_dir = {json.dumps(str(data_dir))}\n\n[mail]\nadmins = [{admins}]\n",
                        encoding="utf-8")
    env = {"RETRACER_CONFIG": str(settings)}
    for name in [n for n in os.environ if n.startswith("RETRACER__")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("RETRACER_CONFIG", str(settings))
    retracer = Shell(env)
    retracer.env = env  # one dict: what a spec sets in ``env``, the next command sees
    spool = data_dir / "spool"
    publish = _publisher(retracer, data_dir)
    doctest_namespace.update(
        retracer=retracer, data_dir=data_dir, env=env, spool=spool, event=event, publish=publish,
        deliver=_deliverer(retracer, publish), worker_upload=_worker_upload(spool),
        spool_contents=_spool_contents(spool), delivered=_delivered(data_dir), body=body, smtp=smtp,
        retry_delay=_retry_delay(env),
        render_notification_without_upload_log=_render_without_upload_log(env), time=time,
        crashy=Crashy(tmp_path / "crashy"))
    yield
    # `serve` sends its logs to the stream it was given; the next spec must not inherit that handler.
    logging.getLogger("retracer").handlers.clear()
