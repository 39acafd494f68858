"""The event contract: every type and every field is validated, and every error names the field."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from retracer import addresses
from retracer import events as ev
from retracer.errors import InvalidEvent
from retracer.events import MAX_BODY_BYTES, TYPES

# What the contract (README, "Events") promises for each data field: its kind and its size limit.
# A field added to events.TYPES without an entry here fails test_every_field_is_specified.
MIB = 1024 * 1024
FIELDS: dict[str, tuple[str, int]] = {
    "crash_id": ("line", 200), "creator": ("address", 254), "package": ("line", 200), "version": ("line", 200),
    "architecture": ("line", 50), "release": ("line", 100), "core": ("line", 4096),
    "executable": ("line", 4096), "worker": ("line", 200), "leaf": ("line", 255),
    "error": ("text", 65536), "upload_log": ("text", MIB), "result": ("text", MIB),
    "build_ids": ("build_ids", 512), "priority": ("priority", 1000), "transient": ("bool", 0),
    "attempt": ("attempt", 2**31 - 1), "signature": ("line", 1024), "address_signature": ("line", 4096),
    "missing": ("missing", 512),
}
VALID: dict[str, Any] = {
    "crash_id": "crash-1", "creator": "mark@example.com", "package": "cdrkit", "version": "1.0-2ubuntu1",
    "architecture": "amd64", "release": "noble", "core": "/srv/crashes/1/core", "executable": "/usr/bin/cdrecord",
    "worker": "worker-1", "leaf": "upload-20261121", "error": "gdb failed\nwith detail",
    "upload_log": "Rejected:\n  unknown build-id", "result": "#0 main () at main.c:3",
    "build_ids": ["0123456789abcdef"], "priority": 5, "transient": True, "attempt": 1,
    "signature": "/usr/bin/cdrecord:11:main", "address_signature": "0123abcd+0x1139",
    "missing": [{"build_id": "0123456789abcdef", "module": "/usr/lib/libcdio.so.19"}],
}
# A value of the right size that also satisfies the field's pattern, for the length boundaries.
SIZED: dict[str, Any] = {}


def envelope(etype: str, data: Any = ..., **fields: Any) -> dict[str, Any]:
    """A valid event of ``etype`` (all its fields, required and optional), with fields replaced as given."""
    needs_job, required, optional = TYPES[etype]
    body: dict[str, Any] = {
        "id": "evt-1", "type": etype, "job": 12 if needs_job else None, "occurred_at": "2026-11-21T08:00:00Z",
        "source": "worker-1", "data": {name: VALID[name] for name in [*required, *optional]},
    }
    if data is not ...:
        body["data"] = data
    body.update(fields)
    return body


def with_data(etype: str, **changes: Any) -> dict[str, Any]:
    """A valid event of ``etype`` with some data fields changed (a value of ... removes the field)."""
    body = envelope(etype)
    for name, value in changes.items():
        if value is ...:
            del body["data"][name]
        else:
            body["data"][name] = value
    return body


def problem(body: Any) -> str:
    """The InvalidEvent message parse() gives for ``body`` (the test fails if it is accepted)."""
    with pytest.raises(InvalidEvent) as exc:
        ev.parse(body)
    return str(exc.value)


def fields(kinds: set[str]) -> list[Any]:
    """(type, field) params for every data field of every type whose kind is in ``kinds``."""
    return [pytest.param(etype, name, id=f"{etype}.{name}")
            for etype, (_, required, optional) in TYPES.items()
            for name in [*required, *optional] if FIELDS[name][0] in kinds]


REQUIRED = [pytest.param(t, n, id=f"{t}.{n}") for t, (_, req, _) in TYPES.items() for n in req]
LINE_FIELDS = fields({"line"})
TEXT_FIELDS = fields({"line", "text"})
JOB_TYPES = [t for t, (needs_job, _, _) in TYPES.items() if needs_job]


class TestValidEvents:
    def test_every_field_is_specified(self) -> None:
        """This file knows the kind and limit of every data field that events.TYPES validates."""
        assert {n for _, req, opt in TYPES.values() for n in [*req, *opt]} == set(FIELDS)

    def test_the_contract_types(self) -> None:
        """The six event types of the contract are known; only crash.submitted has no job."""
        assert set(TYPES) >= {"crash.submitted", "retrace.started", "retrace.heartbeat", "retrace.failed",
                              "upload.accepted", "upload.failed"}
        assert [t for t in TYPES if t not in JOB_TYPES] == ["crash.submitted"]

    @pytest.mark.parametrize("etype", list(TYPES))
    def test_valid_event_of_each_type(self, etype: str) -> None:
        """A well-formed event of each type, as a dict, a JSON string and UTF-8 bytes, parses to the same Event."""
        body = envelope(etype)
        parsed = [ev.parse(body), ev.parse(json.dumps(body)), ev.parse(json.dumps(body).encode())]
        assert parsed[0] == parsed[1] == parsed[2]
        event = parsed[0]
        assert (event.id, event.type, event.job, event.source) == ("evt-1", etype, body["job"], "worker-1")
        assert event.data == body["data"]
        assert event.occurred_at == datetime(2026, 11, 21, 8, tzinfo=UTC)

    @pytest.mark.parametrize("etype", list(TYPES))
    def test_only_required_fields(self, etype: str) -> None:
        """Optional data fields may be left out."""
        _, required, _ = TYPES[etype]
        assert ev.parse(envelope(etype, data={n: VALID[n] for n in required})).type == etype

    def test_unknown_data_fields_are_kept(self) -> None:
        """Extra data fields are welcome and kept as they are."""
        event = ev.parse(with_data("retrace.started", host={"cpu": 4}))
        assert event.data["host"] == {"cpu": 4}

    def test_time_zones_are_normalised_to_utc(self) -> None:
        """occurred_at with an offset or a lower-case z becomes an aware UTC time."""
        plus_two = ev.parse(envelope("retrace.started", occurred_at="2026-11-21T10:00:00+02:00"))
        lower_z = ev.parse(envelope("retrace.started", occurred_at="2026-11-21T08:00:00z"))
        assert plus_two.occurred_at == lower_z.occurred_at == datetime(2026, 11, 21, 8, tzinfo=UTC)
        assert plus_two.occurred_at.utcoffset() == timedelta(0)

    def test_to_json_round_trip(self) -> None:
        """An Event printed with to_json parses back to itself."""
        event = ev.parse(envelope("upload.failed"))
        assert ev.parse(event.to_json()) == event

    def test_make_validates(self) -> None:
        """events.make builds a valid event and refuses an invalid one."""
        assert ev.make("retrace.started", 3, {"worker": "w"}, source="t").job == 3
        with pytest.raises(InvalidEvent, match=r"data\.worker is required for retrace\.started"):
            ev.make("retrace.started", 3, {}, source="t")


class TestDataFields:
    @pytest.mark.parametrize(("etype", "name"), REQUIRED)
    def test_missing(self, etype: str, name: str) -> None:
        """A missing required data field is named, with the type that requires it."""
        assert problem(with_data(etype, **{name: ...})) == f"data.{name} is required for {etype}"

    @pytest.mark.parametrize(("etype", "name"), TEXT_FIELDS)
    @pytest.mark.parametrize("value", [12345, None, ["a"], {"a": 1}, True, "", "   \t"])
    def test_text_wrong_type_or_blank(self, etype: str, name: str, value: Any) -> None:
        """A text field that is not a non-blank string is refused, naming the field."""
        assert problem(with_data(etype, **{name: value})) == f"data.{name} must be a non-empty string"

    @pytest.mark.parametrize(("etype", "name"), TEXT_FIELDS)
    def test_too_long(self, etype: str, name: str) -> None:
        """A text field one character over its limit is refused with its length and the limit."""
        limit = FIELDS[name][1]
        value = SIZED.get(name, lambda n: "a" * n)(limit + 1)
        assert problem(with_data(etype, **{name: value})) == (
            f"data.{name} is {limit + 1} characters long, at most {limit} allowed")

    @pytest.mark.parametrize(("etype", "name"), TEXT_FIELDS)
    def test_at_the_limit(self, etype: str, name: str) -> None:
        """A text field exactly at its limit is accepted."""
        limit = FIELDS[name][1]
        value = SIZED.get(name, lambda n: "a" * n)(limit)
        assert ev.parse(with_data(etype, **{name: value})).data[name] == value

    @pytest.mark.parametrize(("etype", "name"), LINE_FIELDS)
    @pytest.mark.parametrize("char", ["\n", "\r", "\x00", "\x1b", "\x7f", "\x85", "\x9b"],
                             ids=["LF", "CR", "NUL", "ESC", "DEL", "NEL", "CSI"])
    def test_control_characters_in_single_line_fields(self, etype: str, name: str, char: str) -> None:
        """A control character in a single-line field (it may end up in a mail header) is refused."""
        value = VALID[name][:3] + char + VALID[name][3:]
        assert problem(with_data(etype, **{name: value})) == (
            f"data.{name} must not contain control characters (CR, LF, NUL, ...)")

    @pytest.mark.parametrize(("etype", "name"), fields({"text"}))
    def test_multi_line_fields(self, etype: str, name: str) -> None:
        """Logs and errors may span lines and carry tabs, but not NUL characters."""
        assert ev.parse(with_data(etype, **{name: "line 1\r\n\tline 2"})).data[name] == "line 1\r\n\tline 2"
        assert problem(with_data(etype, **{name: "a\x00b"})) == f"data.{name} must not contain NUL characters"

    @pytest.mark.parametrize("value", ["mark", "mark@", "@example.com", "Mark <mark@example.com>",
                                       "a@example.com, b@example.com", "a b@example.com", "a@example..com"])
    def test_creator_must_be_an_email(self, value: str) -> None:
        """crash.submitted's creator must be one plain email address (it becomes a mail recipient); the reason
        is the address rule's (tests/unit/test_addresses.py covers it)."""
        assert problem(with_data("crash.submitted", creator=value)) == f"data.creator {addresses.problem(value)}"

    def test_creator_at_localhost(self) -> None:
        """A local address (user@localhost) is a valid creator."""
        assert ev.parse(with_data("crash.submitted", creator="root@localhost")).data["creator"] == "root@localhost"

    @pytest.mark.parametrize("value", ["x86 64", "-amd64", "amd64/i386"])
    def test_architecture_must_be_a_name(self, value: str) -> None:
        """The architecture is a plain name."""
        assert problem(with_data("crash.submitted", architecture=value)) == (
            "data.architecture is not an architecture name")

    @pytest.mark.parametrize("etype", ["upload.accepted", "upload.failed"])
    @pytest.mark.parametrize("value", ["../etc", "a/b", ".hidden", "up load", "-x"])
    def test_leaf_must_be_a_plain_directory_name(self, etype: str, value: str) -> None:
        """An upload leaf cannot climb out of the spool or name a hidden file."""
        assert problem(with_data(etype, leaf=value)).startswith("data.leaf is not a plain directory name")

    @pytest.mark.parametrize("value", ["0123abcd", "A" * 128, "deadBEEF" * 5])
    def test_build_ids_accepted(self, value: str) -> None:
        """Build-ids are 8 to 128 hex digits, either case."""
        assert ev.parse(with_data("crash.submitted", build_ids=[value])).data["build_ids"] == [value]

    @pytest.mark.parametrize(("value", "message"), [
        ("0123abcd", "data.build_ids must be a list of at most 512 hex build-ids"),
        ({"a": "0123abcd"}, "data.build_ids must be a list of at most 512 hex build-ids"),
        (["0123abcd"] * 513, "data.build_ids must be a list of at most 512 hex build-ids"),
        (["abc"], "data.build_ids has entries that are not hex build-ids: ['abc']"),
        (["0123abcz"], "data.build_ids has entries that are not hex build-ids: ['0123abcz']"),
        (["a" * 129], "data.build_ids has entries that are not hex build-ids: ['" + "a" * 129 + "']"),
        ([12345678], "data.build_ids has entries that are not hex build-ids: [12345678]"),
    ], ids=["string", "object", "513", "short", "not-hex", "long", "number"])
    def test_build_ids_refused(self, value: Any, message: str) -> None:
        """build_ids must be a bounded list of hex strings."""
        assert problem(with_data("crash.submitted", build_ids=value)) == message

    @pytest.mark.parametrize(("value", "message"), [
        (True, "data.priority must be an integer"), (1.5, "data.priority must be an integer"),
        ("5", "data.priority must be an integer"), (None, "data.priority must be an integer"),
        (1001, "data.priority must be between -1000 and 1000"),
        (-1001, "data.priority must be between -1000 and 1000"),
    ])
    def test_priority_refused(self, value: Any, message: str) -> None:
        """priority must be an integer (not a bool) within -1000..1000."""
        assert problem(with_data("crash.submitted", priority=value)) == message

    @pytest.mark.parametrize("value", [-1000, 0, 1000])
    def test_priority_bounds(self, value: int) -> None:
        """The priority bounds themselves are accepted."""
        assert ev.parse(with_data("crash.submitted", priority=value)).data["priority"] == value

    @pytest.mark.parametrize("value", ["yes", 1, 0, None, "true"])
    def test_transient_must_be_a_bool(self, value: Any) -> None:
        """retrace.failed's transient hint must be JSON true or false."""
        assert problem(with_data("retrace.failed", transient=value)) == "data.transient must be true or false"

    @pytest.mark.parametrize("value", [["a"], "text", 3, None])
    def test_data_must_be_an_object(self, value: Any) -> None:
        """data must be a JSON object."""
        assert problem(envelope("retrace.started", data=value)) == "data must be a JSON object"

    def test_data_missing(self) -> None:
        """An envelope without data is refused naming data."""
        body = envelope("retrace.started")
        del body["data"]
        assert problem(body) == "data must be a JSON object"


class TestEnvelope:
    @pytest.mark.parametrize("etype", JOB_TYPES)
    @pytest.mark.parametrize("job", [None, 0, -3, True, "12", 12.0, [12]])
    def test_job_must_be_a_job_id(self, etype: str, job: Any) -> None:
        """Events about a job need a positive integer job id."""
        assert problem(envelope(etype, job=job)) == (
            f"job must be a positive integer job id for {etype}, got {job!r}")

    def test_job_missing(self) -> None:
        """An event about a job without a job field is refused naming job."""
        body = envelope("retrace.started")
        del body["job"]
        assert problem(body) == "job must be a positive integer job id for retrace.started, got None"

    @pytest.mark.parametrize("job", [1, 0, "x"])
    def test_submitted_job_must_be_null(self, job: Any) -> None:
        """crash.submitted creates the job, so its job must be null."""
        assert problem(envelope("crash.submitted", job=job)) == (
            f"job must be null for crash.submitted (the job does not exist yet), got {job!r}")

    @pytest.mark.parametrize(("value", "message"), [
        (..., "occurred_at must be an ISO 8601 time string"),
        (1763712000, "occurred_at must be an ISO 8601 time string"),
        ("yesterday", "occurred_at Invalid isoformat string: 'yesterday'"),
        ("2026-02-30T08:00:00Z", "occurred_at day is out of range for month"),
        ("2026-11-21T08:00:00", "occurred_at must carry a time zone (e.g. 2026-11-21T08:00:00Z)"),
    ], ids=["missing", "number", "words", "no-such-day", "naive"])
    def test_bad_occurred_at(self, value: Any, message: str) -> None:
        """occurred_at must be an ISO 8601 time with a time zone."""
        body = envelope("retrace.started", occurred_at=value)
        if value is ...:
            del body["occurred_at"]
        assert problem(body) == message

    @pytest.mark.parametrize(("value", "message"), [
        (..., "id must be a non-empty string"), ("", "id must be a non-empty string"),
        (7, "id must be a non-empty string"), ("x" * 201, "id is 201 characters long, at most 200 allowed"),
        ("a\nb", "id must not contain control characters (CR, LF, NUL, ...)"),
    ], ids=["missing", "empty", "number", "long", "newline"])
    def test_bad_id(self, value: Any, message: str) -> None:
        """The event id (the exactly-once key) must be a short single-line string."""
        body = envelope("retrace.started", id=value)
        if value is ...:
            del body["id"]
        assert problem(body) == message

    @pytest.mark.parametrize(("value", "message"), [
        (..., "source must be a non-empty string"), (" ", "source must be a non-empty string"),
        (["w"], "source must be a non-empty string"), ("s" * 201, "source is 201 characters long, at most 200 allowed"),
        ("w\r", "source must not contain control characters (CR, LF, NUL, ...)"),
    ], ids=["missing", "blank", "list", "long", "CR"])
    def test_bad_source(self, value: Any, message: str) -> None:
        """The source (who sent it, shown in history) must be a short single-line string."""
        body = envelope("retrace.started", source=value)
        if value is ...:
            del body["source"]
        assert problem(body) == message

    @pytest.mark.parametrize("value", ["crash.exploded", "", 5, None, ...])
    def test_unknown_type(self, value: Any) -> None:
        """An unknown or missing type is refused with the list of known types."""
        body = envelope("retrace.started", type=value)
        if value is ...:
            del body["type"]
        shown = None if value is ... else value
        assert problem(body).startswith(f"type {shown!r} is unknown; known types: crash.submitted, ")

    def test_unknown_envelope_fields(self) -> None:
        """Fields outside the envelope are refused, saying where extra information goes."""
        assert problem(envelope("retrace.started", priority=3, zzz=1)) == (
            "unknown envelope fields ['priority', 'zzz']; put extra information under data")

    def test_several_problems_at_once(self) -> None:
        """Every problem in an event is reported in one message, each naming its field."""
        body = envelope("crash.submitted", job=4, source="", occurred_at="soon",
                        data={**{n: VALID[n] for n in TYPES["crash.submitted"][1]}, "package": "", "priority": "9"})
        del body["data"]["core"]
        assert problem(body).split("; ") == [
            "job must be null for crash.submitted (the job does not exist yet), got 4",
            "occurred_at Invalid isoformat string: 'soon'",
            "source must be a non-empty string",
            "data.package must be a non-empty string",
            "data.core is required for crash.submitted",
            "data.priority must be an integer",
        ]


class TestBodies:
    @pytest.mark.parametrize("body", ["", "{", "{'id': 1}", "nope", '{"id": "a",}'])
    def test_not_json(self, body: str) -> None:
        """A body that is not JSON is refused as such."""
        assert problem(body).startswith("event is not JSON: ")

    def test_deeply_nested_json(self) -> None:
        """A body nested deeper than the parser can follow is refused, not a crash."""
        assert problem("[" * 200_000 + "]" * 200_000).startswith("event is not JSON: ")

    def test_not_utf8(self) -> None:
        """Bytes that are not UTF-8 are refused as such."""
        assert problem(b'{"id": "\xff"}').startswith("event is not UTF-8: ")

    @pytest.mark.parametrize(("body", "kind"), [("[1, 2]", "list"), ("3", "int"), ("null", "NoneType"),
                                                ('"text"', "str"), ([1], "list"), (b"true", "bool")])
    def test_not_an_object(self, body: Any, kind: str) -> None:
        """A JSON value that is not an object is refused, saying what it was."""
        assert problem(body) == f"event must be a JSON object, got {kind}"

    def test_huge_text_body(self) -> None:
        """A text body over the size limit is refused before it is parsed."""
        body = json.dumps(with_data("retrace.failed", error="e" * MAX_BODY_BYTES))
        assert problem(body) == f"event is {len(body)} characters, at most {MAX_BODY_BYTES} allowed"

    def test_huge_bytes_body(self) -> None:
        """A bytes body over the size limit is refused before it is decoded."""
        body = b" " * (MAX_BODY_BYTES + 1)
        assert problem(body) == f"event is {MAX_BODY_BYTES + 1} bytes, at most {MAX_BODY_BYTES} allowed"

    def test_peek_reads_what_it_can(self) -> None:
        """peek() recovers id, type and job from an invalid body for the rejected list, and nothing else."""
        assert ev.peek('{"id": "e1", "type": "x", "job": 3, "data": 1}') == {"id": "e1", "type": "x", "job": 3}
        assert ev.peek('{"id": 5, "job": true}') == {}
        assert ev.peek("not json") == {} and ev.peek(b"\xff") == {} and ev.peek("[1]") == {}


class TestKnownCrashes:
    def test_huge_integer_literal(self) -> None:
        """A body with an integer literal too long for int() is refused as not JSON, not a crash."""
        assert problem('{"id": "e1", "job": ' + "9" * 5000 + "}").startswith("event is not JSON")

    @pytest.mark.parametrize("when", ["0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00"])
    def test_occurred_at_out_of_range(self, when: str) -> None:
        """An occurred_at that cannot be expressed in UTC is refused naming occurred_at."""
        assert problem(envelope("retrace.started", occurred_at=when)).startswith("occurred_at ")

    def test_lone_surrogate(self) -> None:
        """A string field carrying a lone UTF-16 surrogate (not storable as UTF-8) is refused naming the field."""
        body = json.dumps(envelope("retrace.started")).replace('"worker": "worker-1"', '"worker": "w\\ud800"')
        assert '"w\\ud800"' in body
        assert problem(body).startswith("data.worker ")

    def test_non_string_keys_in_a_dict_body(self) -> None:
        """A dict body with a non-string key is refused as an unknown envelope field, not a crash."""
        assert "unknown envelope fields" in problem({**envelope("retrace.started"), 1: "x", "zz": 2})


# -- property: arbitrary JSON-ish input only ever raises InvalidEvent ------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
# Years 2..9998 keep clear of the OverflowError edge, which test_occurred_at_out_of_range covers.
times = st.builds(
    lambda when, minutes: when.replace(tzinfo=timezone(timedelta(minutes=minutes))).isoformat(),
    st.datetimes(min_value=datetime(2, 1, 1), max_value=datetime(9998, 12, 31)),
    st.integers(min_value=-1439, max_value=1439),
)
field_values = st.one_of(st.sampled_from(list(VALID.values())), json_values, st.text(max_size=300),
                         st.lists(st.text(alphabet="0123456789abcdefg", max_size=20), max_size=3))
envelopes = st.fixed_dictionaries({}, optional={
    "id": st.one_of(st.text(max_size=210), json_values),
    "type": st.one_of(st.sampled_from(list(TYPES)), json_values),
    "job": st.one_of(st.none(), st.integers(), json_values),
    "occurred_at": st.one_of(times, st.text(max_size=30), json_values),
    "source": st.one_of(st.text(max_size=210), json_values),
    "data": st.one_of(st.dictionaries(st.one_of(st.sampled_from(list(FIELDS)), st.text(max_size=8)),
                                      field_values, max_size=10), json_values),
    "extra": json_values,
})
bodies = st.one_of(
    envelopes,
    envelopes.map(lambda d: json.dumps(d)),
    envelopes.map(lambda d: json.dumps(d).encode()),
    json_values,
    json_values.map(lambda v: json.dumps(v)),
    st.text(max_size=100),
    st.binary(max_size=100),
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(bodies)
def test_parse_only_raises_invalid_event(body: Any) -> None:
    """events.parse on arbitrary JSON-ish input returns an Event or raises InvalidEvent, never anything else."""
    try:
        event = ev.parse(body)
    except InvalidEvent as exc:
        message = str(exc)
        assert message, "an InvalidEvent always says what is wrong"
    else:
        assert event.type in TYPES and event.occurred_at.utcoffset() == timedelta(0)
