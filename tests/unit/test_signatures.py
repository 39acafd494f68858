"""A retraced crash's signatures reach its job, a later job with the same signature is recorded as a duplicate,
and a submitted crash's core is read where it is visible."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from retracer import config as cfg
from retracer import store
from retracer.apply.applier import Applier, Outcome
from retracer.mail.render import Notice, render
from retracer.store.models import History, Job, Mail
from retracer.testing.factories import crash_data, event
from tests.unit.clirun import Retracer

SIGNATURE = "/usr/bin/crashy:11:crash_here:middle:main"


def apply(config: cfg.Config, factory: sessionmaker[Session], *bodies: Any) -> list[Outcome]:
    with store.transaction(factory) as session:
        return Applier(config).apply_batch(session, list(bodies))


def retraced(config: cfg.Config, factory: sessionmaker[Session], signature: str | None, **crash: Any) -> int:
    (made,) = apply(config, factory, event("crash.submitted", **crash_data(**crash)))
    job = made.job_id
    assert job is not None
    extra = {"signature": signature, "address_signature": "ab12cd34+0x1139:ab12cd34+0x1150"} if signature else {}
    outcomes = apply(config, factory, event("retrace.started", job, worker="w", attempt=1),
                     event("upload.accepted", job, leaf=f"up-{job}", attempt=1, **extra))
    assert [o.status for o in outcomes] == ["applied", "applied"], outcomes
    return job


def test_signatures_reach_the_job(config: cfg.Config, factory: sessionmaker[Session]) -> None:
    """upload.accepted's signatures are kept on the job."""
    job = retraced(config, factory, SIGNATURE)
    with factory() as session:
        found = session.get(Job, job)
        assert found is not None
        assert (found.signature, found.address_signature, found.duplicate_of) == (
            SIGNATURE, "ab12cd34+0x1139:ab12cd34+0x1150", None)


def test_the_same_signature_is_a_duplicate(config: cfg.Config, factory: sessionmaker[Session]) -> None:
    """A later job with an earlier job's signature is its duplicate, said in its history; a third points at the
    first (not at the second), and a job without a signature or with another is no duplicate."""
    first = retraced(config, factory, SIGNATURE)
    second = retraced(config, factory, SIGNATURE)
    third = retraced(config, factory, SIGNATURE)
    other = retraced(config, factory, SIGNATURE.replace("middle", "elsewhere"))
    unsigned = retraced(config, factory, None)
    with factory() as session:
        dup = {j.id: j.duplicate_of for j in session.scalars(select(Job))}
        reason = session.scalars(select(History.reason).where(History.job_id == second)
                                 .order_by(History.id.desc())).first()
    assert dup == {first: None, second: first, third: first, other: None, unsigned: None}
    assert reason == f"duplicate of job {first} (the same crash signature)"


def test_duplicates_in_one_batch(config: cfg.Config, factory: sessionmaker[Session]) -> None:
    """Two results with one signature in the same batch: the second is the first's duplicate."""
    jobs = []
    for _ in range(2):
        (made,) = apply(config, factory, event("crash.submitted", **crash_data()))
        assert made.job_id is not None
        jobs.append(made.job_id)
        apply(config, factory, event("retrace.started", made.job_id, worker="w"))
    apply(config, factory, *[event("upload.accepted", j, leaf=f"up-{j}", signature=SIGNATURE) for j in jobs])
    with factory() as session:
        assert [session.get(Job, j).duplicate_of for j in jobs] == [None, jobs[0]]  # type: ignore[union-attr]


def test_commands_show_them(rt: Retracer) -> None:
    """show --json gives signature, address_signature and duplicate_of; show says it; jobs --duplicates-of
    lists the duplicates."""
    first, second = (retraced(rt.config, rt.factory, SIGNATURE) for _ in range(2))
    shown = rt.json(f"show {second}")
    assert (shown["signature"], shown["duplicate_of"]) == (SIGNATURE, first)
    assert shown["address_signature"].startswith("ab12cd34+0x1139")
    text = rt.ok(f"show {second}")
    assert f"  Signature:  {SIGNATURE}\n" in text
    assert f"  Duplicate:  of job {first} (the same crash signature)\n" in text
    assert [j["id"] for j in rt.json(f"jobs --duplicates-of {first}")] == [second]
    assert rt.ok(f"jobs --duplicates-of {second}") == f"no jobs recorded as duplicates of job {second}\n"


class TestSubmittedCore:
    def test_a_path_not_visible_here_is_accepted(self, rt: Retracer) -> None:
        """A core serve cannot see is kept as given, with the submitter's build-ids, and show says so."""
        job = rt.submit("c1", " --build-id 0123abcd")
        shown = rt.json(f"show {job}")
        assert (shown["core_check"], shown["build_ids"]) == ("unreadable", ["0123abcd"])
        assert "(not readable where it was submitted: build-ids as submitted)" in rt.ok(f"show {job}")

    def test_a_file_that_is_not_a_core_is_refused(self, rt: Retracer, tmp_path: Path) -> None:
        """A readable file that is not a core dump, or a directory, is refused, naming it; no job is made."""
        text = tmp_path / "notes.txt"
        text.write_text("not a core\n")
        for path in (text, tmp_path):
            line = f"submit --crash-id c --creator m@example.org --package p --version 1 --architecture i386 " \
                   f"--release r --core {path} --executable /bin/true"
            result = rt.run(line)
            assert result.exit_code == 1, result.output
            assert f"cannot submit: core {path} is" in result.output
        assert rt.ok("jobs") == "no jobs\n"

    def test_a_published_crash_with_a_bad_core_is_rejected(self, config: cfg.Config,
                                                           factory: sessionmaker[Session], tmp_path: Path) -> None:
        """The same check for a crash.submitted applied by serve: kept in rejected with the reason."""
        bad = tmp_path / "core"
        bad.write_bytes(b"\x7fELF" + b"\x00" * 60)
        (outcome,) = apply(config, factory, json.dumps(event("crash.submitted", **crash_data(core=str(bad)))))
        assert outcome.status == "rejected"
        assert (outcome.reason or "").startswith(f"core {bad} is not a usable core dump: ")


def test_the_creators_mail_names_the_original(config: cfg.Config, factory: sessionmaker[Session]) -> None:
    """The FULLYBUILT mail of a duplicate tells the creator which job it duplicates, with the signature."""
    first = retraced(config, factory, SIGNATURE)
    second = retraced(config, factory, SIGNATURE)
    with factory() as session:
        rows = {m.job_id: m for m in session.scalars(select(Mail).where(Mail.state == "FULLYBUILT"))}
        bodies = {job: _text(render(Notice.from_mail(rows[job]), config)) for job in (first, second)}
    assert f"It is the same crash as job {first}" in bodies[second] and SIGNATURE in bodies[second]
    assert "the same crash as job" not in bodies[first]


def _text(message: Any) -> str:
    part = message.get_body(preferencelist=("plain",))
    return str(part.get_content()) if part is not None else ""
