"""A retracer instance driven through its real command line, in real processes (integration tests, the
reliability suite and the benchmarks).

``Instance`` holds one installation's environment (data directory, database URL, broker URL and names);
``run`` executes `retracer ...` as a subprocess and ``serve`` starts `retracer serve` in the background.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from typing import Any

from kombu.connection import Connection
from sqlalchemy import text

from retracer import config as cfg
from retracer import store
from retracer.bus.amqp import Topology

RETRACER = [sys.executable, "-m", "retracer"]


class Instance:
    """One retracer installation for a test."""

    def __init__(self, data_dir: Path, db_url: str, amqp_url: str | None = None) -> None:
        self.data_dir = data_dir
        self.db_url = db_url
        self.env = {**os.environ, "RETRACER__SERVICE__DATA_DIR": str(data_dir),
                    "RETRACER__DATABASE__URL": db_url,
                    "RETRACER__MAIL__ADMINS": "celso@example.com,foo.bar@example.com",
                    "RETRACER__SERVICE__POLL_INTERVAL_S": "0.2",
                    # Workloads start jobs with events of their own, not only the ones serve offers.
                    "RETRACER__SERVICE__START_REQUIRES_OFFER": "false"}
        self.env.pop("RETRACER_CONFIG", None)
        self.names: dict[str, str] = {}
        self.amqp_url = amqp_url
        if amqp_url:
            tag = f"rt-test-{uuid.uuid4().hex[:8]}"
            self.names = {"exchange": tag, "queue": f"{tag}.events", "work_queue": f"{tag}.work",
                          "dead_letter_exchange": f"{tag}.dlx", "dead_letter_queue": f"{tag}.dead"}
            self.env["RETRACER__BROKER__URL"] = amqp_url
            for key, value in self.names.items():
                self.env[f"RETRACER__BROKER__{key.upper()}"] = value
        self.servers: list[subprocess.Popen[bytes]] = []
        self.engine = store.make_engine(db_url)

    def set(self, **settings: str) -> None:
        """Override settings, e.g. set(SERVICE__MAX_PARALLEL="2")."""
        for key, value in settings.items():
            self.env[f"RETRACER__{key}"] = value

    def run(self, *args: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([*RETRACER, *args],  # noqa: S603  (our own command, no shell)
                              env=self.env, input=input, capture_output=True, text=True, timeout=120)
        if check and proc.returncode != 0:
            raise AssertionError(f"retracer {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
        return proc

    def json(self, *args: str) -> Any:
        return json.loads(self.run(*args, "--json").stdout)

    def publish(self, *events: dict[str, Any]) -> None:
        self.run("publish", "-", input="".join(json.dumps(e) + "\n" for e in events))

    def serve(self, *extra: str, wait: bool = True) -> subprocess.Popen[bytes]:
        """Start `retracer serve`; by default return once it has its signal handlers and says "serving"."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log = self.data_dir / f"serve-{len(self.servers)}.log"
        with open(log, "ab") as out:
            proc = subprocess.Popen([*RETRACER, "serve", *extra],  # noqa: S603  (our own command, no shell)
                                    env=self.env, stdout=out, stderr=out)
        self.servers.append(proc)
        if wait:
            self.wait_for("serve to start", lambda: b'"msg": "serving"' in log.read_bytes(), timeout=30)
        return proc

    def stop(self, proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> int:
        if proc.poll() is None:
            proc.send_signal(sig)
        return proc.wait(timeout=60)

    def scalar(self, sql: str, **params: Any) -> Any:
        with self.engine.connect() as conn:
            return conn.execute(text(sql), params).scalar()

    def rows(self, sql: str, **params: Any) -> list[Any]:
        with self.engine.connect() as conn:
            return list(conn.execute(text(sql), params))

    def wait_for(self, what: str, predicate: Callable[[], bool], timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            for proc in self.servers:
                if proc.poll() not in (None, 0, -signal.SIGKILL, -signal.SIGTERM):
                    raise AssertionError(f"serve exited {proc.returncode} while waiting for {what}")
            time.sleep(0.1)
        raise AssertionError(f"timed out after {timeout}s waiting for {what}")

    def close(self) -> None:
        for proc in self.servers:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        self.engine.dispose()
        if self.amqp_url:
            _delete_broker_objects(self.amqp_url, self.env)


def _delete_broker_objects(amqp_url: str, env: dict[str, str]) -> None:
    # Cleanup must not hide the test's own result.
    with suppress(Exception), Connection(amqp_url, connect_timeout=5) as conn:
        Topology(cfg.load(environ=env)).delete(conn)
