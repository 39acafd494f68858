"""The events the spool derives from processed uploads: their ids tell a replay from a new attempt."""

from __future__ import annotations

import json
from dataclasses import replace

from sqlalchemy import select

from retracer import events, store
from retracer.events import WORK_REQUEST
from retracer.service.chores.dispatch import dispatch
from retracer.store.models import Outbox
from retracer.uploads import spool
from retracer.uploads.intake import upload_event, upload_event_id
from retracer.worker.request import Request, Retraced
from retracer.worker.upload import leaf_for, manifest_for, write_upload
from tests.unit.clirun import Retracer

DIGEST = "ab" * 32
ACCEPTED = spool.UploadResult("job-7-1", 7, True, "accepted: job 7", "#0 main () at a.c:1\n", None, False,
                              digest=DIGEST)
REFUSED = replace(ACCEPTED, accepted=False, result=None,
                  upload_log="backtrace.txt: is 2000 bytes, more than the 1000 allowed ([spool] max_file_bytes)")


def test_replay_of_an_acceptance_has_the_same_id() -> None:
    """The same bytes accepted again (a replay after a crash, with another success log) are one event."""
    replayed = replace(ACCEPTED, upload_log="accepted: job 7 already holds this same backtrace (a replayed upload)")
    assert upload_event_id(replayed) == upload_event_id(ACCEPTED)


def test_refusal_and_acceptance_of_the_same_bytes_differ() -> None:
    """Bytes refused once (a limit too low) and accepted once the limit is raised are two events: the second is
    not a duplicate of the first."""
    assert upload_event_id(REFUSED) != upload_event_id(ACCEPTED)


def test_refusals_with_different_logs_differ() -> None:
    """The same bytes refused for another reason after a fix are a new attempt; the same refusal again is not."""
    other = replace(REFUSED, upload_log="manifest.json: crash_id is 'x', but job 7 retraces crash 'y'")
    assert upload_event_id(other) != upload_event_id(REFUSED)
    assert upload_event_id(replace(REFUSED)) == upload_event_id(REFUSED)


def test_a_long_leaf_still_makes_a_valid_event() -> None:
    """A leaf of the longest allowed name gives an event id within the contract's 200 characters."""
    for result in (ACCEPTED, REFUSED):
        long = replace(result, leaf="j" * 255)
        event = events.parse(upload_event(long), minted=True)
        assert len(event.id) <= 200 and event.data["leaf"] == "j" * 255
        assert upload_event_id(long) != upload_event_id(replace(result, leaf="j" * 254))


def test_an_upload_faster_than_its_started_event_waits(rt: Retracer) -> None:
    """A worker's upload can reach the spool before serve applies its retrace.started (a fast retrace): while
    the job's offer is fresh the upload waits in incoming/, and once the job is started it is accepted."""
    job = rt.submit("c1")
    with store.transaction(rt.factory) as session:
        dispatch(session, rt.config)
        body = json.loads(session.scalars(select(Outbox.body).where(Outbox.routing_key == WORK_REQUEST)).one())
    request = Request.from_body(body)
    leaf = leaf_for(request)
    (rt.config.spool_dir / "incoming").mkdir(parents=True)
    write_upload(rt.config.spool_dir, leaf, manifest_for(request, Retraced("#0  main () at c.c:3\n", "log"), "w"),
                 "#0  main () at c.c:3\n", "log")
    rt.ok("serve --until-idle --log-level ERROR")
    assert (rt.config.spool_dir / "incoming" / leaf).is_dir()
    assert rt.json(f"show {job}")["state"] == "PENDING"
    rt.apply("retrace.started", job, worker="w", attempt=1)
    rt.ok("serve --until-idle --log-level ERROR")
    assert rt.json(f"show {job}")["state"] == "FULLYBUILT"
