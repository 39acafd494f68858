"""schemathesis against the JSON API's own /openapi.json, on SQLite and PostgreSQL: whatever it sends, valid
or not, no answer is a server error, and every answer (status code, content type, body) is one the
description allows."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.core.result import Err, Ok

from retracer import store
from retracer.web.app import create_app
from tests.unit.clirun import Retracer

#: Examples per operation and generation mode: bounded so that the whole file stays under a minute.
EXAMPLES = 40


@pytest.fixture
def instance(tmp_path: Path, db_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Retracer]:
    """An instance with a job in each of a few states and a rejected event, on either database."""
    for name in list(os.environ):
        if name.startswith("RETRACER"):
            monkeypatch.delenv(name)
    rt = Retracer({"RETRACER__SERVICE__DATA_DIR": str(tmp_path / "data"), "RETRACER__DATABASE__URL": db_url,
                   "RETRACER__MAIL__ADMINS": "celso@example.com", "RETRACER__SERVICE__START_REQUIRES_OFFER": "false",
                   "RETRACER__WEB__PAGE_SIZE": "5"})
    jobs = [rt.submit(f"crash-{n}") for n in range(6)]
    for job in jobs[1:]:
        rt.apply("retrace.started", job, worker="w1")
    rt.apply("upload.accepted", jobs[2], leaf="up-2")
    rt.apply("upload.failed", jobs[3], leaf="up-3", upload_log="bad checksum")
    rt.apply("retrace.failed", jobs[4], error="gdb crashed")
    rt.apply("retrace.failed", jobs[5], error="E: Failed to fetch", transient=True)
    rt.ok(f"publish --as celso {write_event(tmp_path, jobs[2])}")
    rt.ok("serve --until-idle")
    assert rt.json("rejected"), "the instance should have a rejected event to list"
    yield rt
    rt.engine.dispose()


def write_event(where: Path, job: int) -> Path:
    """A heartbeat for a finished job: applied by serve, it is rejected (and listed by /api/rejected)."""
    import json

    from retracer.testing.factories import event

    path = where / "late-heartbeat.json"
    path.write_text(json.dumps(event("retrace.heartbeat", job, source="w1", worker="w1")) + "\n")
    return path


OPERATIONS = ["GET /api/status", "GET /api/jobs", "GET /api/jobs/{job_id}", "GET /api/rejected"]


#: Each operation with valid input, and those that take parameters with invalid input too.
RUNS = [pytest.param(op, mode, id=f"{op}-{mode.value}") for op in OPERATIONS
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
        if mode is GenerationMode.POSITIVE or op != "GET /api/status"]


@pytest.mark.parametrize(("operation", "mode"), RUNS)
def test_api_conforms(instance: Retracer, operation: str, mode: GenerationMode) -> None:
    """Every check schemathesis has (no 5xx; documented status codes, content types, headers and bodies; bad
    input refused, good input accepted) holds for each /api operation, with valid and with invalid input."""
    engine = store.make_engine(instance.config.database_url, read_only=True)
    app = create_app(instance.config, store.session_factory(engine))
    schema = schemathesis.openapi.from_asgi("/openapi.json", app).include(path_regex="^/api/")
    results = list(schema.get_all_operations())
    problems = [r.err() for r in results if isinstance(r, Err)]
    assert not problems, f"/openapi.json does not describe the API validly: {problems}"
    found = {f"{r.ok().method.upper()} {r.ok().path}": r.ok() for r in results if isinstance(r, Ok)}
    assert sorted(found) == sorted(OPERATIONS), "the description lists exactly the API's routes"

    @given(case=found[operation].as_strategy(generation_mode=mode))
    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    def conforms(case: schemathesis.Case[Any]) -> None:
        case.call_and_validate()

    try:
        conforms()
    finally:
        engine.dispose()
