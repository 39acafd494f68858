"""What a publisher cannot do with an event: claim the ids the service mints, reuse an id for other content
without a trace, fill the disk with rejected bodies, nest past what every reader can read, mail a domain the
site does not serve, or store a value its database column cannot hold. On SQLite and PostgreSQL."""

from __future__ import annotations

import hashlib
import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from retracer import config as cfg
from retracer import events as ev
from retracer import store
from retracer.apply.applier import Applier, Outcome
from retracer.cli import cli
from retracer.errors import InvalidEvent
from retracer.service import Service
from retracer.store.models import MAX_REJECTED_BODY, History, Job, ProcessedEvent, Rejected, utcnow
from retracer.testing.factories import crash_data, event
from retracer.testing.logcapture import captured_logs
from tests.conftest import make_config


def apply(config: cfg.Config, factory: sessionmaker[Session], *bodies: Any, minted: bool = False) -> list[Outcome]:
    with store.transaction(factory) as session:
        return Applier(config).apply_batch(session, list(bodies), minted=minted)


def submit(config: cfg.Config, factory: sessionmaker[Session], **data: Any) -> int:
    (outcome,) = apply(config, factory, event("crash.submitted", **crash_data(**data)))
    assert outcome.status == "applied" and outcome.job_id is not None, outcome
    return outcome.job_id


def rejected(factory: sessionmaker[Session]) -> list[Rejected]:
    with factory() as session:
        return list(session.scalars(select(Rejected).order_by(Rejected.id)))


class TestReservedIds:
    @pytest.mark.parametrize("field", ["id", "source"])
    def test_a_publisher_cannot_use_the_reserved_prefix(self, field: str) -> None:
        """An event whose id or source begins with retracer: is refused, saying what to use instead."""
        body = event("retrace.heartbeat", 1, worker="w")
        body[field] = f"{ev.RESERVED}watchdog:1:3"
        with pytest.raises(InvalidEvent, match=f"{field} 'retracer:watchdog:1:3' begins with 'retracer:'"):
            ev.parse(body)
        assert ev.parse(body, minted=True).to_dict()[field] == f"{ev.RESERVED}watchdog:1:3"

    def test_the_watchdog_cannot_be_pre_empted(self, config: cfg.Config, factory: sessionmaker[Session]) -> None:
        """A publisher who sends the id the watchdog will mint for a job is rejected; the watchdog still fires."""
        job = submit(config, factory)
        apply(config, factory, event("retrace.started", job, worker="w"))
        with factory() as session:
            version = session.get(Job, job).version_id  # type: ignore[union-attr]
        (outcome,) = apply(config, factory, event("retrace.failed", job, error="x")
                           | {"id": f"retracer:watchdog:{job}:{version}"})
        assert outcome.status == "rejected" and "begins with 'retracer:'" in (outcome.reason or "")
        stale(factory, job)
        assert run_chore(config, factory, "watchdog") == 1
        with factory() as session:
            (last,) = session.scalars(select(History).where(History.job_id == job).order_by(History.id.desc())
                                      .limit(1))
            assert last.actor == "service:watchdog" and last.event_id == f"retracer:watchdog:{job}:{version}"


def stale(factory: sessionmaker[Session], *jobs: int) -> None:
    with store.transaction(factory) as session:
        session.execute(update(Job).where(Job.id.in_(jobs)).values(last_heartbeat=utcnow() - timedelta(days=1)))


def run_chore(config: cfg.Config, factory: sessionmaker[Session], name: str) -> int:
    service = Service(config, factory)
    try:
        (chore,) = [c for n, c in service.chores if n == name]
        return chore()
    finally:
        for _, chore in service.chores:
            chore.close()


class TestChoreIsolation:
    def test_one_job_that_fails_does_not_stop_the_watchdog(self, config: cfg.Config,
                                                           factory: sessionmaker[Session]) -> None:
        """A job the watchdog cannot fire for (here: its id already taken by a marker an older version let a
        publisher write) is logged and skipped; every other stale job is handled in the same round."""
        jobs = [submit(config, factory) for _ in range(3)]
        for job in jobs:
            apply(config, factory, event("retrace.started", job, worker="w"))
        with store.transaction(factory) as session:
            version = session.get(Job, jobs[0]).version_id  # type: ignore[union-attr]
            session.add(ProcessedEvent(event_id=f"retracer:watchdog:{jobs[0]}:{version}", outcome="applied"))
        stale(factory, *jobs)
        with captured_logs() as records:
            assert run_chore(config, factory, "watchdog") == 2
        (failed,) = [r for r in records if getattr(r, "job", None) == jobs[0]]
        assert failed.getMessage().startswith("chore failed for one job")
        with factory() as session:
            states = {j: session.get(Job, j).state for j in jobs}  # type: ignore[union-attr]
        assert states[jobs[0]] == "RETRACING"
        assert states[jobs[1]] == states[jobs[2]] == "PENDING"


class TestReusedIds:
    def test_same_content_is_a_duplicate(self, config: cfg.Config, factory: sessionmaker[Session]) -> None:
        """A redelivery (same id, same content, even serialized otherwise) is a duplicate, as before."""
        body = event("crash.submitted", **crash_data())
        apply(config, factory, body)
        again = json.dumps(body, indent=1, sort_keys=False)
        assert [o.status for o in apply(config, factory, again)] == ["duplicate"]
        assert rejected(factory) == []

    def test_other_content_is_rejected_with_the_reason(self, config: cfg.Config,
                                                        factory: sessionmaker[Session]) -> None:
        """The id reused for other content is rejected (in another batch and in the same one), saying so;
        the first event's effects and marker stay."""
        first = event("crash.submitted", event_id="evt-1", **crash_data(crash_id="first"))
        apply(config, factory, first)
        other = event("crash.submitted", event_id="evt-1", **crash_data(crash_id="second"))
        (outcome,) = apply(config, factory, other)
        assert outcome.status == "rejected"
        assert outcome.reason == ("event id 'evt-1' was already used for an event with other content; this one was "
                                  "not applied: publish it under a new id")
        pair = [event("crash.submitted", event_id="evt-2", **crash_data()),
                event("crash.submitted", event_id="evt-2", **crash_data())]
        assert [o.status for o in apply(config, factory, *pair)] == ["applied", "rejected"]
        assert [r.event_id for r in rejected(factory)] == ["evt-1", "evt-2"]
        with factory() as session:
            assert session.scalars(select(Job.crash_id).order_by(Job.id)).all()[0] == "first"

    def test_a_rejected_events_id_reused(self, config: cfg.Config, factory: sessionmaker[Session]) -> None:
        """An id whose first event was rejected (for its transition) is also taken: a copy is a duplicate, other
        content a rejection for the reuse."""
        body = event("retrace.started", 999, event_id="evt-3", worker="w")
        assert [o.status for o in apply(config, factory, body)] == ["rejected"]
        assert [o.status for o in apply(config, factory, body)] == ["duplicate"]
        (outcome,) = apply(config, factory, event("retrace.started", 999, event_id="evt-3", worker="other"))
        assert "already used for an event with other content" in (outcome.reason or "")


class TestRejectedBodies:
    @pytest.mark.parametrize("size", [MAX_REJECTED_BODY - 10, MAX_REJECTED_BODY + 1, ev.MAX_BODY_BYTES + 10])
    def test_bounded_with_size_and_digest(self, config: cfg.Config, factory: sessionmaker[Session],
                                          size: int) -> None:
        """A rejected body is kept whole up to the bound; past it, its start, its size and its SHA-256."""
        body = json.dumps({"id": "big", "type": "nope", "data": {"x": "y" * size}})
        apply(config, factory, body)
        (row,) = rejected(factory)
        assert row.body == body[:MAX_REJECTED_BODY] and row.body_bytes == len(body)
        assert row.truncated == (len(body) > MAX_REJECTED_BODY)
        assert row.body_sha256 == hashlib.sha256(body.encode()).hexdigest()

    def test_a_truncated_event_cannot_be_replayed(self, config: cfg.Config, factory: sessionmaker[Session],
                                                   tmp_path: Path) -> None:
        """Replaying a body kept only in part is refused, saying why and what to do."""
        apply(config, factory, "x" * (MAX_REJECTED_BODY + 1))
        (row,) = rejected(factory)
        env = {"RETRACER__SERVICE__DATA_DIR": str(config.data_dir), "RETRACER__DATABASE__URL": config.database_url}
        result = CliRunner().invoke(cli, ["rejected", "replay", str(row.id)], env=env)
        assert result.exit_code == 1
        assert f"was {MAX_REJECTED_BODY + 1} bytes, past what an event may be" in result.output
        assert "ask its publisher to send a valid event" in result.output


class TestNesting:
    @pytest.mark.parametrize("depth", [ev.MAX_DEPTH - 2, ev.MAX_DEPTH - 1, 800, 5000])
    def test_one_verdict_whatever_the_stack(self, depth: int) -> None:
        """Whether an event is accepted does not depend on how deep the reader's stack already is (publish
        reads near the top of its stack, serve deep inside its loop): past MAX_DEPTH it is refused."""
        body = event("retrace.heartbeat", 1, worker="w")
        body["data"]["extra"] = "NESTED"
        text = json.dumps(body).replace('"NESTED"', "[" * depth + "]" * depth)  # the envelope and data add 2
        verdicts = {nested(lambda: _verdict(text), levels) for levels in (0, 300, 700)}
        assert verdicts == ({"ok"} if depth + 2 <= ev.MAX_DEPTH else {"refused"})
        if depth == ev.MAX_DEPTH - 1:
            with pytest.raises(InvalidEvent, match=f"nests objects and lists more than {ev.MAX_DEPTH} deep"):
                ev.parse(text)


def _verdict(text: str) -> str:
    try:
        ev.parse(text)
    except InvalidEvent:
        return "refused"
    return "ok"


def nested(work: Any, levels: int) -> Any:
    return work() if levels == 0 else nested(work, levels - 1)


class TestCreatorDomains:
    def test_only_the_sites_domains_are_mailed(self, tmp_path: Path, db_url: str) -> None:
        """With [mail] creator_domains set, a crash.submitted from elsewhere is rejected (kept, replayable),
        and one from a listed domain or below it is applied."""
        config = make_config(tmp_path / "data", db_url, RETRACER__MAIL__CREATOR_DOMAINS="example.org")
        engine = store.make_engine(config.database_url)
        factory = store.session_factory(engine)
        try:
            outcomes = apply(config, factory, event("crash.submitted", **crash_data(creator="a@evil.example")),
                             event("crash.submitted", **crash_data(creator="b@crash.example.org")))
            assert [o.status for o in outcomes] == ["rejected", "applied"]
            assert outcomes[0].reason == (
                "creator a@evil.example is not at a domain this site mails ([mail] creator_domains: example.org); "
                "fix the submitter, or add the domain and replay the event")
        finally:
            engine.dispose()


class TestColumnLimits:
    def test_every_field_at_its_limit_is_stored(self, config: cfg.Config, factory: sessionmaker[Session]) -> None:
        """Each value the contract allows fits the column it is stored in, on both databases: an event with
        every field at its limit is applied, and the history keeps its source as the actor."""
        source, event_id = "s" * 200, "i" * 200
        domain = ".".join(["d" * 63] * 3) + "." + "d" * 60
        data = crash_data(crash_id="c" * 200, creator="m@" + domain, package="p" * 200, version="v" * 200,
                          architecture="a" * 50, release="r" * 100, core="/" + "c" * 4095,
                          executable="/" + "e" * 4095, build_ids=["a" * 128] * 512, priority=1000)
        assert len(data["creator"]) == 254
        (outcome,) = apply(config, factory, event("crash.submitted", source=source, event_id=event_id, **data))
        assert outcome.status == "applied", outcome
        (started,) = apply(config, factory, event("retrace.started", outcome.job_id, source=source,
                                                  event_id="j" * 200, worker="w" * 200))
        assert started.status == "applied", started
        with factory() as session:
            actors = session.scalars(select(History.actor).where(History.job_id == outcome.job_id)).all()
        assert set(actors) == {f"event:{source}"}

    def test_admin_name_at_its_limit(self, config: cfg.Config) -> None:
        """--as takes a name as long as an event's source can hold after "admin:", and no longer, saying so."""
        env = {"RETRACER__SERVICE__DATA_DIR": str(config.data_dir), "RETRACER__DATABASE__URL": config.database_url}
        base = ["submit", "--crash-id", "c", "--creator", "m@example.org", "--package", "p", "--version", "1",
                "--architecture", "i386", "--release", "r", "--core", "/c", "--executable", "/e",
                "--reason", "why"]
        ok = CliRunner().invoke(cli, [*base, "--as", "n" * 194], env=env)
        assert ok.exit_code == 0, ok.output
        long = CliRunner().invoke(cli, [*base, "--as", "n" * 195], env=env)
        assert long.exit_code == 2 and "must be a name of 1 to 194 characters" in long.output


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                         lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                         max_leaves=30))
def test_any_json_is_applied_or_kept(config: cfg.Config, factory: sessionmaker[Session], body: Any) -> None:
    """Whatever JSON arrives, the batch is applied without raising and each body gets one outcome; a body
    that is not an event is kept in rejected with its size and digest."""
    before = len(rejected(factory))
    (outcome,) = apply(config, factory, json.dumps(body))
    assert outcome.status == "rejected"
    rows = rejected(factory)
    assert len(rows) == before + 1 and rows[-1].body_bytes == len(json.dumps(body).encode())


class TestPublishInput:
    def env(self, config: cfg.Config) -> dict[str, str]:
        return {"RETRACER__SERVICE__DATA_DIR": str(config.data_dir), "RETRACER__DATABASE__URL": config.database_url}

    def test_bytes_that_are_not_utf8(self, config: cfg.Config, tmp_path: Path) -> None:
        """A file with a line that is not UTF-8 is refused naming the line, with no traceback, and nothing
        is published."""
        good = json.dumps(event("crash.submitted", **crash_data())).encode()
        path = tmp_path / "events.jsonl"
        path.write_bytes(good + b"\n" + good[:-2] + b"\xff\xfe}\n")
        result = CliRunner().invoke(cli, ["publish", str(path)], env=self.env(config))
        assert result.exit_code == 1
        assert f"{path}:2: event is not UTF-8" in result.output and "Traceback" not in result.output
        assert "nothing was published" in result.output

    def test_a_line_longer_than_an_event(self, config: cfg.Config, tmp_path: Path) -> None:
        """A line past the size an event may have is refused by its number without being read whole."""
        path = tmp_path / "events.jsonl"
        with path.open("wb") as out:
            out.write(b"{" + b" " * (ev.MAX_BODY_BYTES * 3) + b"}\n")
            out.write(json.dumps(event("crash.submitted", **crash_data())).encode() + b"\n")
        result = CliRunner().invoke(cli, ["publish", str(path)], env=self.env(config))
        assert result.exit_code == 1
        assert f"{path}:1: line is longer than an event may be" in result.output
        assert f"{path}:2" not in result.output

    def test_publish_and_serve_agree_on_nesting(self, config: cfg.Config, tmp_path: Path) -> None:
        """An event nested past the bound is refused by publish, as serve would refuse it."""
        body = event("retrace.heartbeat", 1, worker="w")
        body["data"]["extra"] = "NESTED"
        path = tmp_path / "events.jsonl"
        path.write_text(json.dumps(body).replace('"NESTED"', "[" * 100 + "]" * 100) + "\n", encoding="utf-8")
        result = CliRunner().invoke(cli, ["publish", str(path)], env=self.env(config))
        assert result.exit_code == 1 and f"nests objects and lists more than {ev.MAX_DEPTH} deep" in result.output


@pytest.mark.parametrize(("field", "value"), [("build_ids", ["0123abcd\n"]), ("architecture", "amd64\n")])
def test_a_trailing_newline_is_not_a_name(field: str, value: Any) -> None:
    """A pattern-checked field refuses a value with a final newline (a regex's $ would match before it)."""
    with pytest.raises(InvalidEvent, match=f"data.{field} "):
        ev.parse(event("crash.submitted", **crash_data()) | {"data": crash_data(**{field: value})})
