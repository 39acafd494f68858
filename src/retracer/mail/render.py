"""A mail row becomes an ``email.message.EmailMessage``: the state's templates, subject, headers, Message-ID.

Templates are read only from the package (``retracer.email_templates``, shipped from templates/email/),
never from the working directory, with StrictUndefined so a template naming a value the snapshot lacks
fails loudly instead of mailing a blank. ``.html`` templates are autoescaped; values from events reach a
header only through :func:`retracer.mail.headers.clean`.

:func:`render` builds the message with the email package; :func:`wire` writes the very same bytes that
aiosmtplib would put on the wire for it without building it (the sender's path; see retracer.mail.mime).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from email.message import EmailMessage
from email.utils import format_datetime
from functools import cache, lru_cache
from pathlib import Path
from typing import Any

from jinja2 import (
    Environment,
    PackageLoader,
    StrictUndefined,
    Template,
    TemplateError,
    TemplateNotFound,
    UndefinedError,
    select_autoescape,
)

from retracer.config import Config
from retracer.errors import MailError
from retracer.mail.headers import address, clean
from retracer.mail.mime import POLICY, assemble
from retracer.store.models import Mail, utcnow
from retracer.workflow import load_spec

#: The state of a flood-control digest row (it has no job and no transition of its own).
DIGEST = "DIGEST"
#: The state of a crash mail to the maintainers (retracer.ops.crashmail): no job, no transition of its own.
CRASH = "CRASH"
TEMPLATE_PACKAGE = "retracer.email_templates"
_STATE_NAME = re.compile(r"^[A-Z][A-Z_]{0,19}$")


@dataclass(frozen=True)
class Notice:
    """What one mail is about: the row's fields that rendering needs, detached from any session."""

    job_id: int | None
    history_id: int | None
    state: str
    recipient: str
    rationale: str
    context: Mapping[str, Any] = field(default_factory=dict)
    mail_id: int | None = None

    @classmethod
    def from_mail(cls, mail: Mail) -> Notice:
        return cls(job_id=mail.job_id, history_id=mail.history_id, state=mail.state, recipient=mail.recipient,
                   rationale=mail.rationale, context=dict(mail.context or {}), mail_id=mail.id)

    def with_context(self, **changes: Any) -> Notice:
        """A copy whose context has ``changes`` applied (for specs and tests)."""
        return Notice(self.job_id, self.history_id, self.state, self.recipient, self.rationale,
                      {**self.context, **changes}, self.mail_id)


def duration(seconds: object) -> str:
    """A human duration, coarse like Launchpad's ("1 minute", "2 hours 5 minutes")."""
    if seconds is None or isinstance(seconds, bool) or not isinstance(seconds, int | float):
        return "unknown"
    s = max(0, int(seconds))
    if s < 60:
        return f"{s} second{'' if s == 1 else 's'}"
    if s < 3600:
        m = s // 60
        return f"{m} minute{'' if m == 1 else 's'}"
    h, m = s // 3600, s % 3600 // 60
    hours = f"{h} hour{'' if h == 1 else 's'}"
    return hours if m == 0 else f"{hours} {m} minute{'' if m == 1 else 's'}"


@cache
def environment() -> Environment:
    """The one Jinja environment: package templates, strict undefined, autoescape for .html only."""
    env = Environment(
        loader=PackageLoader(TEMPLATE_PACKAGE, "."),
        undefined=StrictUndefined,
        autoescape=select_autoescape(enabled_extensions=("html",), default_for_string=False, default=False),
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        # Package data does not change under a running process; checking costs a stat per template and
        # include on every mail.
        auto_reload=False,
    )
    env.filters["duration"] = duration
    return env


def crash_title(context: Mapping[str, Any]) -> str:
    """``i386 retrace of cdrkit 1.0 in breezy-autotest (crash crash-0001)``, Launchpad's build title shape."""
    def get(key: str) -> str:
        return str(context.get(key) or "?")

    return (f"{get('architecture')} retrace of {get('package')} {get('version')} in {get('release')} "
            f"(crash {get('crash_id')})")


def subject(notice: Notice) -> str:
    if notice.state == DIGEST:
        jobs = ", ".join(str(item.get("job")) for item in notice.context.get("items", []))
        return clean(f"[Retrace digest] {notice.context.get('count', '?')} notifications: jobs {jobs}")
    if notice.state == CRASH:
        return clean(f"[Retrace crash] retracer {notice.context.get('command', '?')} on "
                     f"{notice.context.get('host', '?')}: {notice.context.get('error_type', '?')}")
    return clean(f"[Retrace #{notice.job_id}] {crash_title(notice.context)}")


def message_id(notice: Notice, sender: str) -> str:
    """The same Message-ID every time a given mail is rendered, so a resend can be recognised as one."""
    domain = sender.rsplit("@", 1)[1]
    if notice.state in (DIGEST, CRASH):
        kind = notice.state.lower()
        key, local = f"{kind}\0{notice.mail_id}", f"retracer.{kind}.{notice.mail_id}"
    else:
        key, local = f"{notice.job_id}\0{notice.history_id}", f"retracer.{notice.job_id}.{notice.history_id}"
    digest = hashlib.sha256(f"{sender}\0{key}\0{notice.recipient.strip().lower()}".encode()).hexdigest()[:16]
    return f"<{local}.{digest}@{domain}>"


@cache
def _template(name: str) -> Template | None:
    """The compiled template, or None. Cached: the templates are package data and never change while the
    process runs, and Jinja's own lookup stats ten files a mail to see whether they did (measured: 7 µs and
    ten syscalls a lookup)."""
    try:
        return environment().get_template(name)
    except TemplateNotFound:
        return None


def _where(exc: BaseException, template: Template) -> str:
    """The template file and line an error came from (Jinja maps its frames back to template lines)."""
    where = str(template.name)
    tb = exc.__traceback__
    while tb is not None:
        filename = tb.tb_frame.f_code.co_filename
        if filename.endswith((".txt", ".html")):
            where = f"{Path(filename).name} line {tb.tb_lineno}"
        tb = tb.tb_next
    return where


def _render(template: Template, values: Mapping[str, Any], notice: Notice) -> str:
    try:
        text = template.render(values)
    except UndefinedError as exc:
        raise MailError(f"cannot make the {notice.state} mail for job {notice.job_id} to {notice.recipient}: "
                        f"template {_where(exc, template)} uses a value the mail's snapshot does not have "
                        f"({exc}); fix the template or add the value in retracer.mail.rows.snapshot") from None
    except TemplateError as exc:
        raise MailError(f"cannot make the {notice.state} mail for job {notice.job_id}: template "
                        f"{_where(exc, template)} failed: {exc}") from None
    # A lone surrogate (legal in JSON, illegal in UTF-8) must not make the whole mail unsendable.
    return text.encode("utf-8", "replace").decode("utf-8")


def _check(notice: Notice) -> None:
    """Refuse what Launchpad refuses: a mail that could not tell its reader what to do."""
    if notice.state == load_spec().roles.rescuable:
        log = notice.context.get("upload_log")
        if not isinstance(log, str) or not log.strip():
            raise MailError(f"An upload log is required for {notice.state} notifications: job {notice.job_id} "
                            f"has none, and without it nobody can tell why the upload failed or rescue it. "
                            f"The upload.failed event must carry upload_log.")


@lru_cache(maxsize=16)
def _date(now: datetime) -> str:
    """The Date header; a delivery run dates all its mails alike, so it is formatted once per run."""
    return format_datetime(now)


def content(notice: Notice, config: Config, now: datetime | None) -> tuple[list[tuple[str, str]],
                                                                       list[tuple[str, str]]]:
    """The mail's headers (name, value) in order and its bodies (subtype, text): what both forms are made of,
    and what the status pages take the admins' commands from (without the cost of building a message)."""
    if not _STATE_NAME.match(notice.state):
        raise MailError(f"mail {notice.mail_id}: {notice.state!r} is not a state name")
    _check(notice)
    name = "digest" if notice.state == DIGEST else notice.state
    text_template = _template(f"{name}.txt")
    if text_template is None:
        raise MailError(f"no mail template for state {notice.state}: add templates/email/{name}.txt, or "
                        f"remove {notice.state} from the notify lists in states/workflow.toml")
    sender = config["mail"]["sender"]
    values: dict[str, Any] = {**notice.context, "job": notice.job_id, "rationale": notice.rationale,
                              "recipient": notice.recipient, "title": crash_title(notice.context)}
    if notice.state == DIGEST:
        values["window"] = duration(notice.context.get("window_s"))

    headers = [("From", sender), ("To", address(notice.recipient)), ("Subject", subject(notice)),
               ("Date", _date(now or utcnow())), ("Message-ID", message_id(notice, sender)),
               # RFC 3834: keeps vacation responders from answering a notification.
               ("Auto-Submitted", "auto-generated"), ("X-Retracer-Rationale", clean(notice.rationale))]
    if notice.state == DIGEST:
        headers.append(("X-Retracer-Digest", clean(notice.context.get("count", ""))))
    elif notice.state == CRASH:
        headers.append(("X-Retracer-Crash", clean(notice.context.get("crash_key", ""))))
    else:
        headers += [("X-Retracer-Job", str(notice.job_id)), ("X-Retracer-Job-State", clean(notice.state)),
                    ("X-Creator-Recipient", clean(notice.context.get("creator", "")))]
    bodies = [("plain", _render(text_template, values, notice))]
    html_template = _template(f"{name}.html")
    if html_template is not None:
        bodies.append(("html", _render(html_template, values, notice)))
    return headers, bodies


def render(notice: Notice, config: Config, now: datetime | None = None) -> EmailMessage:
    """The complete message for ``notice``; raises MailError saying what is missing and where to fix it."""
    headers, bodies = content(notice, config, now)
    msg = EmailMessage(policy=POLICY)
    for name, value in headers:
        msg[name] = value
    msg.set_content(bodies[0][1])
    for subtype, text in bodies[1:]:
        msg.add_alternative(text, subtype=subtype)
    return msg


def wire(notice: Notice, config: Config, now: datetime | None = None) -> bytes:
    """``render(notice)`` as aiosmtplib sends it (``flatten_message``: policy SMTP, CRLF), built directly.

    Raises what :func:`render` raises. The multipart boundary is random, as the email package's is.
    """
    headers, bodies = content(notice, config, now)
    return assemble(headers, bodies)
