"""The commands a page offers an admin for a job: taken from the very mail the admins get for the job's
state, so that a page and a mail never tell an admin two different things.

The mail for the job's current state is rendered (never sent) for an admin, exactly as retracer.mail.rows
and retracer.mail.render would make it now, and its command paragraphs (the indented lines that start with
the instance's `retracer` invocation) are taken with the sentence that introduces each. A state whose
mail carries no command (or that mails nobody) offers none.
"""

from __future__ import annotations

from dataclasses import dataclass

from retracer.config import Config
from retracer.errors import RetracerError
from retracer.mail.render import Notice, content
from retracer.mail.rows import command, mail_rows
from retracer.store.models import History, Job, utcnow
from retracer.workflow import Change, load

#: The rationale whose mail carries the commands (the creator's mail has none).
ADMIN = "Admin"
INDENT = "    "


@dataclass(frozen=True)
class Action:
    """One command to paste and the mail's sentence that says when to run it."""

    command: str
    why: str


def prefix(config: Config) -> str:
    """How `retracer` is run on this instance (with its --config or locating settings), as mails print it."""
    return command(config)


def for_job(config: Config, job: Job, last: History | None) -> list[Action]:
    """The commands the admins' mail for ``job``'s state gives, or none; ``last`` is its latest history row
    (the transition that brought it there)."""
    workflow = load()
    change = Change(trigger=last.trigger if last else "", source=last.from_state if last else None,
                    dest=job.state, record=True, effect="")
    at = last.at if last else utcnow()
    rows = mail_rows(workflow, job, change, at, last.actor if last else "", last.reason if last else None, config)
    if not rows:
        return []
    notice = Notice(job_id=job.id, history_id=last.id if last else None, state=job.state,
                    recipient=config["mail"]["sender"], rationale=ADMIN, context=rows[0]["context"])
    try:
        # The mail's texts as render() puts them in the message, without building the message itself (the
        # email package's header objects cost ten times the templates, and a page may list fifty jobs).
        _, bodies = content(notice, config, None)
    except RetracerError:
        # A mail that cannot be made says so in `retracer mail`; the page just offers no command.
        return []
    plain = [text for subtype, text in bodies if subtype == "plain"]
    return commands_in(plain[0], prefix(config)) if plain else []


def commands_in(text: str, invocation: str) -> list[Action]:
    """The command paragraphs of a mail's text, each with the paragraph before it."""
    actions: list[Action] = []
    why = ""
    for paragraph in text.replace("\r\n", "\n").split("\n\n"):
        lines = [line for line in paragraph.split("\n") if line.strip()]
        if not lines:
            continue
        if all(line.startswith(INDENT) and line.strip().startswith(invocation + " ") for line in lines):
            actions.extend(Action(line.strip(), why) for line in lines)
        else:
            why = " ".join(" ".join(lines).split())
    return actions
