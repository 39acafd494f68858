"""One RabbitMQ user per role, each allowed to publish only its own event types (README, "RabbitMQ users and
permissions").

The module gets a vhost and three users of its own, made with exactly the README's `rabbitmqctl` commands
(RECIPE, with the vhost and user names swapped for unique ones) and removed afterwards, pass or fail; each
test starts with no exchange or queue in that vhost.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from amqp.exceptions import AccessRefused, NotFound
from kombu.connection import Connection
from kombu.entity import Exchange

from retracer import config as cfg
from retracer.bus.amqp import Topology
from retracer.events import TYPES, WORK_REQUEST
from retracer.testing.factories import crash_data, event
from retracer.testing.instance import Instance

from ..conftest import AMQP_URL, IN_CI, require_server

pytestmark = pytest.mark.rabbitmq

#: The README's commands, word for word (without the leading `rabbitmqctl`). The names are the README's:
#: vhost `retracer`, users `retracer-serve`, `retracer-worker`, `retracer-submitter`, and the default [broker]
#: names; `add_user` reads the password from standard input.
RECIPE: list[tuple[str, ...]] = [
    ("add_vhost", "retracer"),
    ("add_user", "retracer-serve"),
    ("add_user", "retracer-worker"),
    ("add_user", "retracer-submitter"),
    ("set_permissions", "-p", "retracer", "retracer-serve",
     r"^retracer(\.dlx|\.events|\.events\.dead|\.work)?$",
     r"^retracer(\.dlx|\.events|\.events\.dead|\.work)?$",
     r"^retracer(\.dlx|\.events)?$"),
    ("set_topic_permissions", "-p", "retracer", "retracer-serve", "retracer", r"^retrace\.requested$", ".*"),
    ("set_permissions", "-p", "retracer", "retracer-worker", "^$", "^retracer$", r"^retracer\.work$"),
    ("set_topic_permissions", "-p", "retracer", "retracer-worker", "retracer",
     r"^retrace\.(started|heartbeat|failed)$", "^$"),
    ("set_permissions", "-p", "retracer", "retracer-submitter", "^$", "^retracer$", "^$"),
    ("set_topic_permissions", "-p", "retracer", "retracer-submitter", "retracer", r"^crash\.submitted$", "^$"),
]

ROLES = ("serve", "worker", "submitter")

#: The [broker] names the recipe's regular expressions are written for (config/retracer.toml's defaults).
BROKER_NAMES = {"EXCHANGE": "retracer", "QUEUE": "retracer.events", "WORK_QUEUE": "retracer.work",
                "DEAD_LETTER_EXCHANGE": "retracer.dlx", "DEAD_LETTER_QUEUE": "retracer.events.dead"}

WORKER_TYPES = ("retrace.started", "retrace.heartbeat", "retrace.failed")


def rabbitmqctl(*args: str, stdin: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["rabbitmqctl", "-q", *args], input=stdin, capture_output=True, text=True, timeout=60)
    if check and proc.returncode != 0:
        raise AssertionError(f"rabbitmqctl {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def broker_admin() -> None:
    """rabbitmqctl must reach the node the tests connect to (as root or the rabbitmq user, on that machine)."""
    require_server("RabbitMQ", "127.0.0.1", 5672)
    problem = None
    if shutil.which("rabbitmqctl") is None:
        problem = "rabbitmqctl is not installed"
    else:
        probe = rabbitmqctl("list_vhosts", check=False)
        if probe.returncode != 0:
            problem = f"rabbitmqctl cannot manage the node: {(probe.stderr or probe.stdout).strip()}"
    if problem is not None:
        if IN_CI:
            pytest.fail(problem + " (CI runs as root next to the broker .ci/run starts)")
        pytest.skip(problem)


@dataclass
class Site:
    """A vhost with the recipe's three users: the roles' AMQP URLs, their user names."""

    vhost: str
    users: dict[str, str]
    urls: dict[str, str]

    def config(self, role: str) -> cfg.Config:
        return cfg.load(environ={"RETRACER__BROKER__URL": self.urls[role],
                                 **{f"RETRACER__BROKER__{k}": v for k, v in BROKER_NAMES.items()}})

    def declare(self) -> None:
        """What `serve` does first: its user declares the topology."""
        with Connection(self.urls["serve"], connect_timeout=10) as conn:
            Topology(self.config("serve")).declare(conn)

    def consumers(self, queue: str) -> int:
        """How many consumers ``queue`` has; 0 while it does not exist."""
        with Connection(self.urls["serve"], connect_timeout=10) as conn:
            try:
                count: int = conn.channel().queue_declare(queue, passive=True).consumer_count
            except NotFound:
                return 0
        return count

    def drain(self, queue: str) -> list[str]:
        """The routing keys of every message on ``queue``, taken off it as serve's user (events queue) or the
        worker's (work queue)."""
        role = "worker" if queue == BROKER_NAMES["WORK_QUEUE"] else "serve"
        keys: list[str] = []
        with Connection(self.urls[role], connect_timeout=10) as conn:
            channel = conn.channel()
            while (message := channel.basic_get(queue, no_ack=True)) is not None:
                keys.append(message.delivery_info["routing_key"])
        return keys


def localized(command: tuple[str, ...], vhost: str, users: dict[str, str]) -> list[str]:
    """A recipe command with this test's vhost and users in place of the README's."""
    readme_users = {f"retracer-{role}": name for role, name in users.items()}
    out: list[str] = []
    for i, word in enumerate(command):
        if (i == 1 and command[0] == "add_vhost") or (i > 0 and command[i - 1] == "-p"):
            out.append(vhost)
        else:
            out.append(readme_users.get(word, word))
    return out


@pytest.fixture(scope="module")
def recipe_applied(broker_admin: None) -> Iterator[Site]:
    """The recipe applied once for the module (rabbitmqctl starts an Erlang VM per command, ~0.6 s each)."""
    tag = f"rt-perm-{uuid.uuid4().hex[:8]}"
    users = {role: f"{tag}-{role}" for role in ROLES}
    passwords = {role: uuid.uuid4().hex for role in ROLES}
    by_user = {name: passwords[role] for role, name in users.items()}
    split = urlsplit(AMQP_URL)
    where = f"{split.hostname}:{split.port or 5672}"
    urls = {role: f"pyamqp://{users[role]}:{passwords[role]}@{where}/{tag}" for role in ROLES}
    try:
        for command in RECIPE:
            words = localized(command, tag, users)
            rabbitmqctl(*words, stdin=by_user[words[1]] + "\n" if words[0] == "add_user" else None)
        yield Site(tag, users, urls)
    finally:
        # Also after a half-applied recipe: whatever exists is removed, whatever does not is no error.
        for name in users.values():
            rabbitmqctl("delete_user", name, check=False)
        rabbitmqctl("delete_vhost", tag, check=False)


@pytest.fixture
def site(recipe_applied: Site) -> Site:
    """The module's vhost with no exchange or queue in it: each test starts from what a new site has."""
    with Connection(recipe_applied.urls["serve"], connect_timeout=10) as conn:
        Topology(recipe_applied.config("serve")).delete(conn)
    return recipe_applied


def publish(url: str, routing_key: str, body: dict[str, Any] | None = None, exchange: str = "retracer") -> None:
    """Publish one message as a well-behaved client would: no declare (a worker's user may not configure),
    publisher confirms on, so that a refusal raises here rather than on some later call."""
    with Connection(url, transport_options={"confirm_publish": True}, connect_timeout=10) as conn:
        target = Exchange(exchange, type="topic", durable=True) if exchange else Exchange("")
        conn.Producer().publish(json.dumps(body or {}), exchange=target, routing_key=routing_key, declare=[],
                                delivery_mode=2, content_type="application/json")


def refused(site: Site, role: str, what: str) -> str:
    """RabbitMQ's own wording for a refused publish (ACCESS_REFUSED, 403, the channel closed)."""
    return f"ACCESS_REFUSED - access to {what} in vhost '{site.vhost}' refused for user '{site.users[role]}'"


def assert_refused(site: Site, role: str, routing_key: str) -> None:
    with pytest.raises(AccessRefused) as caught:
        publish(site.urls[role], routing_key)
    assert refused(site, role, f"topic '{routing_key}' in exchange 'retracer'") in str(caught.value)


def test_worker_publishes_its_events_and_nothing_else(site: Site) -> None:
    """A worker's retrace.* events reach the events queue; crash.submitted (which mails its creator), a work
    request, an upload verdict and a message sent around the exchange are refused and reach nothing."""
    site.declare()
    for routing_key in WORKER_TYPES:
        publish(site.urls["worker"], routing_key)
    for routing_key in [*(t for t in TYPES if t not in WORKER_TYPES), WORK_REQUEST]:
        assert_refused(site, "worker", routing_key)
    # The default exchange routes by queue name straight into the events queue, past every topic check.
    with pytest.raises(AccessRefused) as caught:
        publish(site.urls["worker"], BROKER_NAMES["QUEUE"], exchange="")
    assert refused(site, "worker", "exchange 'amq.default'") in str(caught.value)
    with Connection(site.urls["worker"], connect_timeout=10) as conn, pytest.raises(AccessRefused):
        conn.channel().basic_get(BROKER_NAMES["QUEUE"])  # taking events away from serve
    assert sorted(site.drain(BROKER_NAMES["QUEUE"])) == sorted(WORKER_TYPES)
    assert site.drain(BROKER_NAMES["WORK_QUEUE"]) == []


def test_submitter_publishes_crash_submitted_and_nothing_else(site: Site) -> None:
    """A submitter's crash.submitted goes through; it can neither fail a retrace nor read work requests."""
    site.declare()
    publish(site.urls["submitter"], "crash.submitted")
    for routing_key in [*(t for t in TYPES if t != "crash.submitted"), WORK_REQUEST]:
        assert_refused(site, "submitter", routing_key)
    with Connection(site.urls["submitter"], connect_timeout=10) as conn, pytest.raises(AccessRefused):
        conn.channel().basic_get(BROKER_NAMES["WORK_QUEUE"])
    assert site.drain(BROKER_NAMES["QUEUE"]) == ["crash.submitted"]
    assert site.drain(BROKER_NAMES["WORK_QUEUE"]) == []


@pytest.fixture
def installation(tmp_path: Path, sqlite_url: str) -> Iterator[Instance]:
    """retracer on SQLite; each test points its broker URL at one role's user."""
    # No amqp_url: Instance would give the exchange and queues names of its own, which the recipe's regexes
    # do not cover; the module's vhost keeps this run's names apart instead.
    inst = Instance(tmp_path / "data", sqlite_url)
    inst.set(**{f"BROKER__{k}": v for k, v in BROKER_NAMES.items()})
    yield inst
    inst.close()


def test_serve_declares_consumes_and_sends_work_requests(site: Site, installation: Instance) -> None:
    """`retracer serve` as its own user: a submitter's crash becomes a job, its work request reaches the
    worker's queue, and the worker's retrace.started moves the job."""
    inst = installation
    inst.set(BROKER__URL=site.urls["serve"])
    serve = inst.serve()
    # serve declares the exchange and queues only when it starts consuming, a moment after it says "serving";
    # published before that, the crash would find no exchange.
    inst.wait_for("serve to consume", lambda: site.consumers(BROKER_NAMES["QUEUE"]) == 1)
    publish(site.urls["submitter"], "crash.submitted", event("crash.submitted", **crash_data()))
    requests: list[dict[str, Any]] = []

    def work_request() -> bool:
        with Connection(site.urls["worker"], connect_timeout=10) as conn:
            message = conn.channel().basic_get(BROKER_NAMES["WORK_QUEUE"], no_ack=True)
        if message is not None:
            requests.append(json.loads(message.body))
        return bool(requests)

    inst.wait_for("the work request", work_request)
    assert requests[0]["type"] == WORK_REQUEST and requests[0]["job"] == 1
    publish(site.urls["worker"], "retrace.started", event("retrace.started", 1, worker="w1"))
    inst.wait_for("RETRACING", lambda: inst.scalar("SELECT state FROM job WHERE id = 1") == "RETRACING")
    assert inst.stop(serve) == 0
    assert inst.scalar("SELECT count(*) FROM rejected") == 0
    assert b"ACCESS_REFUSED" not in (inst.data_dir / "serve-0.log").read_bytes()


def test_retracer_publish_says_in_one_line_why_the_broker_refused(site: Site, installation: Instance) -> None:
    """`retracer publish` as the worker, with a crash.submitted: exit 1, one `Error:` line naming the
    refusal, no traceback, nothing on the events queue."""
    site.declare()
    inst = installation
    inst.set(BROKER__URL=site.urls["worker"])
    out = inst.run("publish", "-", input=json.dumps(event("crash.submitted", **crash_data())) + "\n", check=False)
    assert out.returncode == 1, out
    assert "Traceback" not in out.stderr + out.stdout, out.stderr
    assert out.stderr.startswith("Error: could not publish crash.submitted ")
    assert "(403) ACCESS_REFUSED" in out.stderr and f"refused for user '{site.users['worker']}'" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    assert site.drain(BROKER_NAMES["QUEUE"]) == []


def test_retracer_publish_as_the_worker_sends_a_heartbeat(site: Site, installation: Instance) -> None:
    """A worker's own event through `retracer publish`, on a site whose topology `serve` has declared: the
    publisher only checks that the topology is there (a passive declare needs no permission)."""
    site.declare()
    inst = installation
    inst.set(BROKER__URL=site.urls["worker"], DATABASE__URL=f"sqlite:///{inst.data_dir}/none/absent.db")
    inst.publish(event("retrace.heartbeat", 1, worker="w1"))
    assert site.drain(BROKER_NAMES["QUEUE"]) == ["retrace.heartbeat"]
    assert not (inst.data_dir / "none").exists()  # a worker's host needs broker credentials, no database
