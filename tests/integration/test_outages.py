"""RabbitMQ stopped and restarted while events flow: none is lost, none applied twice."""

from __future__ import annotations

import json
import subprocess
import threading
import time

import pytest

from retracer.testing.factories import crash_data, event
from retracer.testing.instance import Instance

from ..conftest import IN_CI

pytestmark = pytest.mark.slow


def rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", *args], check=True, capture_output=True, timeout=120)


def broker_answers() -> bool:
    return subprocess.run(["rabbitmqctl", "await_startup", "--timeout", "60"], capture_output=True).returncode == 0


@pytest.fixture
def restartable_broker() -> None:
    try:
        rabbitmqctl("status")
    except (OSError, subprocess.CalledProcessError) as exc:
        if IN_CI:
            pytest.fail(f"rabbitmqctl cannot reach the broker: {exc}")
        pytest.skip(f"rabbitmqctl cannot reach the broker: {exc}")


@pytest.mark.usefixtures("restartable_broker")
def test_broker_restart_loses_nothing(scaled: Instance) -> None:
    """Events published before, during (retried by the publisher) and after a broker restart all apply once."""
    inst = scaled
    inst.set(SERVICE__BATCH_SIZE="25")
    serve = inst.serve()
    jobs = 300
    batches = [[event("crash.submitted", **crash_data(crash_id=f"o-{i}")) for i in range(n, n + 20)]
               for n in range(0, jobs, 20)]
    failures: list[str] = []

    def publisher() -> None:
        for batch in batches:
            for _ in range(60):  # at-least-once from the publisher's side: resend the batch until confirmed
                if inst.run("publish", "-", input="".join(json.dumps(e) + "\n" for e in batch),
                            check=False).returncode == 0:
                    break
                time.sleep(1)
            else:
                failures.append(f"batch {batch[0]['data']['crash_id']} never confirmed")
            time.sleep(0.05)

    thread = threading.Thread(target=publisher)
    thread.start()
    inst.wait_for("the first events", lambda: inst.scalar("SELECT count(*) FROM job") > 40)
    rabbitmqctl("stop_app")
    time.sleep(5)
    rabbitmqctl("start_app")
    assert broker_answers()
    thread.join(timeout=300)
    assert not failures
    inst.wait_for("every event", lambda: inst.scalar("SELECT count(*) FROM processed_event") == jobs, timeout=120)
    assert inst.stop(serve) == 0
    assert inst.scalar("SELECT count(*) FROM job") == jobs
    assert inst.scalar("SELECT count(DISTINCT crash_id) FROM job") == jobs
    assert inst.scalar("SELECT count(*) FROM history") == jobs
