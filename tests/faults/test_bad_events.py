"""Hostile input: hypothesis makes >= 10,000 malformed or impossible events (wrong types, huge fields, control
characters, unknown jobs, replays, out-of-order events, non-JSON, deeply nested JSON). They go around the
validating `retracer publish` straight onto the bus, interleaved with good job scripts, through a real
`serve`: it never crashes, each bad event is listed by `retracer rejected --json` with a reason an admin can
read, each replay changes nothing, and every good event is applied exactly once with its mails.
"""

from __future__ import annotations

import json
import os
import random
import re
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st

from retracer.events import storable
from retracer.store.models import MAX_REJECTED_BODY
from retracer.testing.instance import Instance
from retracer.testing.smtp import CaptureServer

from .scenario import (
    Delivered,
    Supervisor,
    Tally,
    Workload,
    check,
    configure,
    delivered_from,
    done_predicate,
    error_line,
    expected_mail_count,
    job_ids,
    progress_of,
    read_mbox,
    wait_until,
)

pytestmark = pytest.mark.slow

TYPES = ["crash.submitted", "retrace.started", "retrace.heartbeat", "retrace.failed", "upload.accepted",
         "upload.failed"]
#: RETRACER_HOSTILE_SEED=N replays a run; by default every run draws new events.
SEED = int(os.environ.get("RETRACER_HOSTILE_SEED") or random.SystemRandom().randrange(2**32))
MAX_REASON = 2000  # a reason longer than this is not something an admin reads
CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


@dataclass(frozen=True)
class Hostile:
    """One bad event: its kind, its body as sent, and whether it must be rejected (else: a replay, a no-op)."""

    kind: str
    body: str | bytes
    rejected: bool = True


# -- strategies -------------------------------------------------------------------------------------------

TEXT = st.text(st.characters(exclude_categories=["Cs"]), max_size=40)  # no lone surrogates: not storable
SMALL_JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | TEXT,
                          lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
                          max_leaves=8)
CONTROL_CHAR = st.sampled_from([chr(c) for c in [*range(32), 127]])
BIG_INT = st.sampled_from([0, -1, -(2**31), 2**31, 2**53 + 1, 2**62, 2**63 - 1, 2**63, 2**64, 10**30])


def valid_data(etype: str, n: int) -> dict[str, Any]:
    if etype == "crash.submitted":
        return {"crash_id": f"hostile-{n}", "creator": "eve@example.com", "package": "p", "version": "1",
                "architecture": "amd64", "release": "noble", "core": "/c", "executable": "/e"}
    return {"retrace.started": {"worker": "w"}, "retrace.heartbeat": {"worker": "w"},
            "retrace.failed": {"error": "boom"}, "upload.accepted": {"leaf": "l"},
            "upload.failed": {"leaf": "l", "upload_log": "bad"}}[etype]


def envelope(etype: str, job: Any, n: int) -> dict[str, Any]:
    return {"id": f"hostile:{n}", "type": etype, "job": None if etype == "crash.submitted" else job,
            "occurred_at": "2026-11-21T08:00:00Z", "source": "eve", "data": valid_data(etype, n)}


@st.composite
def mutated(  # noqa: C901  (one branch per way of breaking the contract)
        draw: st.DrawFn, n: int, unknown_job: int) -> Hostile:
    """A valid envelope with one thing made wrong; each mutation breaks the contract by construction."""
    etype = draw(st.sampled_from(TYPES))
    e = envelope(etype, unknown_job, n)
    how = draw(st.sampled_from(["type", "wrong_type", "missing", "extra_envelope", "huge", "control", "job",
                                "time", "data_shape", "bad_field", "deep_data", "surrogate"]))
    field = draw(st.sampled_from(sorted(k for k in e if k != "type")))
    if how == "type":
        e["type"] = draw(st.one_of(TEXT.filter(lambda t: t not in TYPES), SMALL_JSON.filter(lambda v: v not in TYPES)))
    elif how == "wrong_type":
        bad = draw(st.one_of(st.integers(), st.floats(allow_nan=False), st.booleans(), st.lists(TEXT, max_size=2),
                             st.dictionaries(TEXT, TEXT, max_size=2)))
        if field == "data":  # not an object, or an object without the required fields
            e["data"] = bad if not isinstance(bad, dict) else {k: v for k, v in bad.items()
                                                                if k not in valid_data(etype, n)}
        elif field == "job":
            e["job"] = draw(st.one_of(TEXT, st.floats(allow_nan=False), st.booleans(), st.lists(st.integers())))
            if etype == "crash.submitted" and e["job"] is None:
                e["job"] = "1"
        else:
            e[field] = bad
    elif how == "missing":
        del e[field if (field, etype) != ("job", "crash.submitted") else "source"]
    elif how == "extra_envelope":
        key = draw(TEXT.filter(lambda k: k not in e) | st.sampled_from(["priority", "__proto__", "jobs"]))
        e[key] = draw(SMALL_JSON)
    elif how == "huge":
        target = draw(st.sampled_from(["id", "source", "data"]))
        size = draw(st.sampled_from([201, 256, 4096, 70_000]))
        if target == "data":
            key, limit = {"crash.submitted": ("crash_id", 200), "retrace.failed": ("error", 65536),
                          "upload.accepted": ("leaf", 255),
                          "upload.failed": ("upload_log", 1024 * 1024)}.get(etype, ("worker", 200))
            rare_big = draw(st.integers(0, 199)) == 0  # now and then a field (and body) over the 2 MiB limit
            e["data"][key] = "x" * (limit + 1 if not rare_big else 2 * 1024 * 1024 + 10)
        else:
            e[target] = "y" * size
    elif how == "control":
        target = draw(st.sampled_from(["id", "source", "data"]))
        text = draw(TEXT) + draw(CONTROL_CHAR) + draw(TEXT)
        if target == "data":
            key = {"crash.submitted": "package", "upload.accepted": "leaf", "upload.failed": "leaf",
                   "retrace.failed": "worker"}.get(etype, "worker")
            e["data"][key] = text
        else:
            e[target] = text
    elif how == "job":
        if etype == "crash.submitted":
            e["job"] = draw(st.integers(1, 10))
        else:
            e["job"] = draw(st.sampled_from([0, -1, -(2**40), True, False, 1.0, "7", None, [7]]))
    elif how == "time":
        e["occurred_at"] = draw(st.sampled_from(["yesterday", "2026-13-40T00:00:00Z", "2026-11-21T08:00:00",
                                                 "", 1732176000, None, "0000-01-01T00:00:00Z",
                                                 "9999-12-31T23:59:59-14:00"]))
    elif how == "data_shape":
        e["data"] = draw(st.one_of(st.lists(SMALL_JSON, max_size=3), TEXT, st.integers(), st.none()))
    elif how == "bad_field":
        e["data"].update(draw(st.sampled_from(bad_fields(etype))))
    elif how == "deep_data":
        # Nested deeper than the JSON parser's recursion limit, inside an otherwise valid event.
        depth = draw(st.integers(1100, 50_000))
        body = json.dumps(e)[:-1] + ', "pad": ' + "[" * depth + "]" * depth + "}"
        return Hostile("deep_data", body)
    else:  # surrogate: a lone UTF-16 surrogate, escaped in the JSON text (no database can store it)
        e["source"] = "eve\\ud800"
        return Hostile("surrogate", json.dumps(e).replace("eve\\\\ud800", "eve\\ud800"))
    return Hostile(f"mutated:{how}", json.dumps(e))


def bad_fields(etype: str) -> list[dict[str, Any]]:
    """Known data fields with impossible values, per type."""
    fields: dict[str, list[dict[str, Any]]] = {
        "crash.submitted": [{"creator": "not-an-email"}, {"architecture": "x86 64"}, {"priority": "high"},
                            {"priority": 10**6}, {"priority": True}, {"build_ids": ["zz"]}, {"build_ids": "abc"},
                            {"build_ids": [1, 2]}, {"build_ids": ["ab" * 8] * 513}, {"crash_id": ""}],
        "retrace.started": [{"worker": ""}, {"worker": 5}, {"worker": "   "}],
        "retrace.heartbeat": [{"worker": None}, {"worker": ["w"]}],
        "retrace.failed": [{"error": ""}, {"error": 7}, {"transient": "yes"}, {"transient": 1},
                           {"error": "a\x00b"}, {"missing": "abcdef0123456789"}, {"missing": [{"build_id": "zz"}]},
                           {"missing": [{"build_id": "ab" * 8, "module": "a\nb"}]},
                           {"missing": [{"build_id": "ab" * 8}] * 513}],
        "upload.accepted": [{"leaf": "../../etc"}, {"leaf": "a/b"}, {"leaf": ".hidden"}, {"leaf": "x" * 300},
                            {"result": 5}],
        "upload.failed": [{"upload_log": ""}, {"upload_log": None}, {"leaf": "/abs"}],
    }
    return fields[etype]


@st.composite
def hostile(draw: st.DrawFn, n: int, unknown_job: int) -> Hostile:
    """Any kind of bad event: mutated envelopes, non-JSON, non-objects, deep nesting, unknown jobs."""
    kind = draw(st.integers(0, 99))
    if kind < 60:
        return draw(mutated(n, unknown_job))
    if kind < 70:  # not JSON at all: broken text, truncated events, binary-looking garbage
        text = draw(st.one_of(TEXT.map(lambda t: "{" + t), TEXT.map(lambda t: "not json " + t),
                              st.just(json.dumps(envelope("retrace.started", 1, n))[:-3]),
                              st.just('{"id": NaN, "type": Infinity}'), st.just("\x00\x01\x02"),
                              st.just('{"job": ' + "9" * 5000 + "}")))
        return Hostile("not_json", text)
    if kind < 77:  # JSON, but not an object
        value = draw(SMALL_JSON.filter(lambda v: not isinstance(v, dict)))
        return Hostile("not_object", json.dumps(value))
    if kind < 81:  # deeply nested JSON, at the top
        depth = draw(st.integers(1100, 100_000))
        opener, closer = draw(st.sampled_from([("[", "]"), ('{"a":', "}")]))
        return Hostile("deep", opener * depth + ("1" if opener != "[" else "") + closer * depth)
    # valid events for jobs that do not exist (huge ids included: past int32, int64, any database's range)
    etype = draw(st.sampled_from(TYPES[1:]))
    job = draw(st.one_of(st.integers(unknown_job, unknown_job + 10**6), BIG_INT.filter(lambda j: j > 0)))
    e = envelope(etype, job, n)
    return Hostile("unknown_job", json.dumps(e))


def generate(count: int, seed: int, unknown_job: int) -> list[Hostile]:
    """At least ``count`` hostile events, drawn by hypothesis (seeded: the tally prints the seed) in batches."""
    made: list[Hostile] = []
    counter = iter(range(10**9))

    @hypothesis_seed(seed)
    @settings(max_examples=count // 50 + 5, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(st.lists(st.builds(lambda: next(counter)).flatmap(lambda n: hostile(n, unknown_job)), min_size=50,
                    max_size=50))
    def draw(batch: list[Hostile]) -> None:
        made.extend(batch)

    draw()
    random.Random(seed).shuffle(made)
    return made


def out_of_order(workload: Workload, ids: dict[str, int], count: int, seed: int) -> list[Hostile]:
    """Valid events for jobs whose script has ended: every such job refuses every event type (FULLYBUILT is
    final, FAILEDTOUPLOAD and ON_HOLD take only admin commands), so each must be rejected."""
    rng = random.Random(seed)
    jobs = sorted(ids.values())
    out = []
    for n in range(count):
        etype = rng.choice(TYPES[1:])
        e = envelope(etype, rng.choice(jobs), n)
        e["id"] = f"{workload.tag}:late:{n}"
        out.append(Hostile("out_of_order", json.dumps(e)))
    return out


def replays(events: Sequence[dict[str, Any]], count: int, seed: int) -> list[Hostile]:
    rng = random.Random(seed)
    return [Hostile("replay", json.dumps(e), rejected=False) for e in rng.sample(list(events), count)]


# -- buses that do not validate -----------------------------------------------------------------------------


class RawInbox:
    """Appends bodies to the embedded inbox as they are: what a broken or hostile publisher does."""

    def __init__(self, inst: Instance) -> None:
        self.inst = inst

    def send(self, bodies: Sequence[str | bytes]) -> None:
        from retracer.bus import embedded
        from retracer.store import session_factory

        with session_factory(self.inst.engine)() as session, session.begin():
            embedded.append(session, [b if isinstance(b, str) else b.decode() for b in bodies])

    def close(self) -> None:
        return None


class RawAmqp:
    """Publishes bodies to the events exchange as they are, with a routing key the queue is bound to."""

    def __init__(self, inst: Instance) -> None:
        from kombu.connection import Connection

        from retracer import config as cfg
        from retracer.bus.amqp import Topology

        self.topology = Topology(cfg.load(environ=inst.env))
        self.connection = Connection(inst.env["RETRACER__BROKER__URL"], transport_options={"confirm_publish": True})
        self.topology.declare(self.connection)
        self.producer = self.connection.Producer()
        self.rng = random.Random(5)

    def send(self, bodies: Sequence[str | bytes]) -> None:
        for body in bodies:
            self.producer.publish(body if isinstance(body, bytes) else body.encode("utf-8", "surrogatepass"),
                                  exchange=self.topology.exchange, routing_key=self.rng.choice(TYPES),
                                  content_type="application/json", content_encoding="binary", delivery_mode=2)

    def close(self) -> None:
        self.connection.release()


def interleave(good: Sequence[dict[str, Any]], bad: Sequence[Hostile], seed: int) -> list[str | bytes]:
    """Bad events spread at random among the good ones; the good ones keep their order."""
    rng = random.Random(seed)
    slots = [True] * len(good) + [False] * len(bad)
    rng.shuffle(slots)
    g, b = iter(good), iter(bad)
    return [json.dumps(next(g)) if is_good else next(b).body for is_good in slots]


def send_all(bus: RawInbox | RawAmqp, bodies: Sequence[str | bytes], chunk: int = 500) -> None:
    for start in range(0, len(bodies), chunk):
        bus.send(bodies[start:start + chunk])


# -- the run and its tally ------------------------------------------------------------------------------------


@dataclass
class BadTally:
    """What became of the hostile events."""

    sent: int
    rejected_ok: int = 0
    missing: int = 0
    extra: int = 0
    unreadable: int = 0
    internal: int = 0
    replays: int = 0
    replays_changed: int = 0
    oversized: int = 0
    crashes: int = 0

    def line(self) -> str:
        return (f"hostile: sent {self.sent}, rejected with a readable reason {self.rejected_ok}, not listed "
                f"{self.missing}, listed too often {self.extra}, unreadable reason {self.unreadable}, "
                f"'internal error' {self.internal}, replays {self.replays} (changed something: "
                f"{self.replays_changed}), kept past the bound {self.oversized} | serve crashes {self.crashes}")


def run_hostile(inst: Instance, bus: RawInbox | RawAmqp, workload: Workload, bad_first: list[Hostile],
                bad_second: list[Hostile], late_count: int, deliveries: Callable[[], list[Delivered]], seed: int,
                decode: Callable[[str | bytes], str]) -> tuple[Tally, BadTally, list[str]]:
    """Submissions + bad, then the scripts + bad, then out-of-order and replays; check it all."""
    supervisor = Supervisor(inst, "embedded" if isinstance(bus, RawInbox) else "scaled", restart_delay_s=2.0)
    supervisor.start()
    examples: list[str] = []
    rest: list[dict[str, Any]] = []
    late: list[Hostile] = []
    ids: dict[str, int] = {}
    try:
        first = workload.submissions()
        send_all(bus, interleave(first, bad_first, seed))
        workload.published += len(first)
        jobs = len(workload.scripts)
        complete = wait_until("the submissions", lambda: int(inst.scalar("SELECT count(*) FROM job")) >= jobs,
                              lambda: progress_of(inst), 300, 60)
        ids = job_ids(inst, workload)
        if complete:
            rest = workload.rest(ids)
            send_all(bus, interleave(rest, bad_second, seed + 1))
            workload.published += len(rest)
            complete = wait_until("the scripts", done_predicate(inst, workload,
                                                                expected_mail_count(inst, workload, ids)),
                                  lambda: progress_of(inst), 300, 60)
        if complete:
            must_apply = workload.expected_applied()
            late = out_of_order(workload, ids, late_count, seed) + replays(
                [e for e in first + rest if e["id"] in must_apply], late_count // 4, seed)
            settled = int(inst.scalar("SELECT count(*) FROM processed_event"))
            send_all(bus, [h.body for h in late])
            complete = wait_until("the late events", lambda: _drained(inst, bus) and int(
                inst.scalar("SELECT count(*) FROM processed_event")) >= settled + late_count,
                                  lambda: progress_of(inst), 300, 60)
            time.sleep(1)
    finally:
        supervisor.stop()
    # What was not sent (the run stopped early) is not expected anywhere.
    everything = bad_first + (bad_second if rest else []) + late
    tally = check(inst, workload, ids, deliveries(), smtp="RETRACER__MAIL__URL" in inst.env,
                  other_events=_ids_of(everything))
    tally.crashes = supervisor.crashes()
    tally.complete = complete

    listed = json.loads(inst.run("rejected", "--json").stdout)
    by_body: dict[str, list[str]] = {}
    for row in listed:
        by_body.setdefault(_keepable(row["body"]), []).append(row["reason"])
    # A body is kept up to MAX_REJECTED_BODY characters (with its size and digest): compared by that prefix.
    def kept(body: str | bytes) -> str:
        return _keepable(decode(body)[:MAX_REJECTED_BODY])

    want = Counter(kept(h.body) for h in everything if h.rejected)
    bad = BadTally(sent=len(everything), crashes=len(tally.crashes))
    good_bodies = {kept(json.dumps(e)) for e in first + rest}
    for body, n in want.items():
        reasons = by_body.get(body, [])
        bad.missing += max(0, n - len(reasons))
        bad.extra += max(0, len(reasons) - n)
        for reason in reasons:
            if reason.startswith("internal error"):
                bad.internal += 1
                _note(examples, f"'internal error' for {body[:120]!r}: {reason[:300]}")
            elif not reason.strip() or len(reason) > MAX_REASON or CONTROL.search(reason):
                bad.unreadable += 1
                _note(examples, f"unreadable reason ({len(reason)} chars) for {body[:80]!r}: {reason[:200]!r}")
            else:
                bad.rejected_ok += 1
        if len(reasons) < n:
            _note(examples, f"not listed as rejected: {body[:200]!r}")
    for body in set(by_body) - set(want) - good_bodies:
        bad.extra += len(by_body[body])
        _note(examples, f"listed but never sent as a bad event: {body[:200]!r}")
    bad.replays = sum(1 for h in everything if not h.rejected)
    bad.replays_changed = sum(len(by_body.get(kept(h.body), [])) for h in everything if not h.rejected)
    bad.oversized = sum(1 for row in listed if len(row["body"]) > MAX_REJECTED_BODY * 6)  # \u0000 escapes: 6x
    return tally, bad, examples


def _drained(inst: Instance, bus: RawInbox | RawAmqp) -> bool:
    return not isinstance(bus, RawInbox) or int(inst.scalar("SELECT count(*) FROM inbox")) == 0


def _ids_of(events: Sequence[Hostile]) -> frozenset[str]:
    out = set()
    for h in events:
        try:
            value = json.loads(h.body)
        except (ValueError, RecursionError, UnicodeDecodeError):
            continue
        if isinstance(value, dict) and isinstance(value.get("id"), str):
            # The rejected list keeps the first 200 characters, NUL and lone surrogates escaped.
            out |= {value["id"], value["id"][:200], storable(value["id"][:200]) or ""}
    return frozenset(out)


def _note(examples: list[str], text: str) -> None:
    if len(examples) < 12:
        examples.append(text)


def _keepable(text: str) -> str:
    """A body as a database can keep it, for comparing what was sent with what is listed: PostgreSQL
    refuses NUL characters and no database stores lone surrogates, so either side may carry them escaped."""
    return text.replace("\x00", "\\u0000").encode("utf-8", "backslashreplace").decode("utf-8")


def _as_text(body: str | bytes) -> str:
    """The body as `rejected` keeps it: decoded, with NUL and lone surrogates escaped (events.storable)."""
    text = body if isinstance(body, str) else body.decode("utf-8", "replace")
    return storable(text) or ""


# -- the tests ----------------------------------------------------------------------------------------------------


def test_hostile_events_embedded(embedded: Instance) -> None:
    """>= 10,000 hostile events through the embedded inbox: none stops serve, each is rejected readably."""
    inst = embedded
    configure(inst)
    workload = Workload.build(300, seed=31, ooo_rate=0.3)
    started = time.monotonic()
    bad = generate(10_000, seed=SEED, unknown_job=10**7)
    made = time.monotonic() - started
    half = len(bad) // 2
    tally, hostile, examples = run_hostile(inst, RawInbox(inst), workload, bad[:half], bad[half:], 400,
                                           lambda: read_mbox(inst.data_dir / "mail" / "outbox.mbox"), 31, _as_text)
    print(f"\n[hostile events, embedded, seed {SEED}, generated in {made:.0f}s, {time.monotonic() - started:.0f}s "
          f"in all] "
          f"{hostile.line()}\n  kinds: {dict(Counter(h.kind.split(':')[0] for h in bad))}\n  {tally.line()}"
          + "".join(f"\n  EXAMPLE: {e}" for e in examples))
    assert hostile.sent >= 10_000
    problems = tally.problems() + [hostile.line()] * bool(
        hostile.missing or hostile.extra or hostile.unreadable or hostile.internal or hostile.replays_changed
        or hostile.oversized
        or hostile.crashes)
    assert not problems, "\n".join([*problems, *examples])


@pytest.mark.usefixtures("pg_database")
def test_hostile_events_rabbitmq(scaled: Instance, smtp_server: CaptureServer) -> None:
    """A smaller hostile batch (not UTF-8 bodies too) through RabbitMQ and PostgreSQL: the same guarantees."""
    inst = scaled
    configure(inst, mail_url=smtp_server.url)
    workload = Workload.build(100, seed=32, ooo_rate=0.3)
    bad = generate(1_000, seed=SEED + 1, unknown_job=10**7)
    rng = random.Random(32)
    bad += [Hostile("not_utf8", bytes(rng.randrange(128, 256) for _ in range(rng.randrange(1, 40))))
            for _ in range(50)]
    rng.shuffle(bad)
    half = len(bad) // 2
    bus = RawAmqp(inst)
    try:
        tally, hostile, examples = run_hostile(inst, bus, workload, bad[:half], bad[half:], 100,
                                               lambda: _captured(smtp_server), 32, _as_text)
    finally:
        bus.close()
    dead = _dead_letters(inst)
    print(f"\n[hostile events, RabbitMQ + PostgreSQL, seed {SEED + 1}] {hostile.line()} | dead-lettered {dead}\n"
          f"  {tally.line()}"
          + "".join(f"\n  EXAMPLE: {e}" for e in examples)
          + "".join(f"\n  SERVE EXIT {c.returncode}: {error_line(c.tail)[:400]}" for c in tally.crashes[:3]))
    problems = tally.problems() + [hostile.line()] * bool(
        hostile.missing or hostile.extra or hostile.unreadable or hostile.internal or hostile.replays_changed
        or hostile.oversized
        or hostile.crashes)
    assert not problems, "\n".join(p[:3000] for p in [*problems, *examples])


def _captured(server: CaptureServer) -> list[Delivered]:
    with server._lock:
        return delivered_from(list(server.messages))


def _dead_letters(inst: Instance) -> int:
    from kombu.connection import Connection

    with Connection(inst.env["RETRACER__BROKER__URL"]) as conn:
        _, count, _ = conn.channel().queue_declare(inst.names["dead_letter_queue"], passive=True)
        return int(count)
