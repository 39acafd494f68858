"""Configuration: the shipped defaults, then a file, then RETRACER__<SECTION>__<KEY> environment variables.

The defaults file (config/retracer.toml) is also the schema: a key it does not have is unknown, and a value
must have the type its default has. Every problem is collected and reported at once.
"""

from __future__ import annotations

import json
import math
import os
import re
import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from retracer.errors import ConfigError

ENV_PREFIX = "RETRACER__"
EMAIL = re.compile(r"^[^@\s<>,;]+@[^@\s<>,;]+$")


def defaults() -> dict[str, dict[str, Any]]:
    text = resources.files("retracer.defaults").joinpath("retracer.toml").read_text(encoding="utf-8")
    return tomllib.loads(text)


@dataclass(frozen=True)
class Config:
    """The effective configuration, validated; ``raw`` holds it by section, ``origin`` where each key came from."""

    raw: dict[str, dict[str, Any]]
    origin: dict[str, str]
    path: str | None

    def __getitem__(self, section: str) -> dict[str, Any]:
        return self.raw[section]

    @property
    def data_dir(self) -> Path:
        return Path(os.path.expanduser(self.raw["service"]["data_dir"]))

    @property
    def database_url(self) -> str:
        return self.raw["database"]["url"] or f"sqlite:///{self.data_dir / 'retracer.db'}"

    @property
    def broker_url(self) -> str:
        return str(self.raw["broker"]["url"])

    @property
    def embedded_bus(self) -> bool:
        return not self.broker_url

    @property
    def spool_dir(self) -> Path:
        path = self.raw["spool"]["path"]
        return Path(os.path.expanduser(path)) if path else self.data_dir / "spool"

    @property
    def results_dir(self) -> Path:
        return self.data_dir / "results"

    @property
    def mailbox_path(self) -> Path:
        return self.data_dir / "mail" / "outbox.mbox"

    def describe(self) -> dict[str, Any]:
        """The effective configuration as printed by check-config, passwords masked, derived paths added."""
        shown = {s: dict(v) for s, v in self.raw.items()}
        for values in shown.values():
            if isinstance(values.get("url"), str):
                values["url"] = _mask(values["url"])
        if shown["mail"].get("password"):
            shown["mail"]["password"] = "********"  # noqa: S105  (the mask shown instead of the password)
        shown["derived"] = {
            "database": _mask(self.database_url),
            "bus": "embedded (inbox table in the database)" if self.embedded_bus else _mask(self.broker_url),
            "mail": f"mbox file {self.mailbox_path}" if not self["mail"]["url"] else _mask(self["mail"]["url"]),
            "spool": str(self.spool_dir),
            "results": str(self.results_dir),
        }
        return shown


#: How a type is named in a message about a value that does not have it.
_KINDS: dict[type, str] = {bool: "true or false", int: "an integer", float: "a number", str: "a string",
                           list: "a list"}


def _kind(default: Any) -> str:
    """What a value must be to take the place of ``default``, with an example where one fits on a line."""
    kind = _KINDS.get(type(default), type(default).__name__)
    if isinstance(default, bool):
        return kind
    if isinstance(default, int | float):
        return f"{kind} (write e.g. {default})"
    return kind


def _mask(url: str) -> str:
    return re.sub(r"(://[^:/@]+:)[^@]+@", r"\1********@", url)


def _coerce(value: str, default: Any, name: str) -> Any:
    """Turn an environment string into the default's type."""
    if isinstance(default, bool):
        low = value.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{name}={value!r} is not a boolean (use true or false)")
    if isinstance(default, int):
        try:
            return int(value)
        except ValueError:
            raise ValueError(f"{name}={value!r} is not an integer (write e.g. {default})") from None
    if isinstance(default, float):
        try:
            number = float(value)
        except ValueError:
            raise ValueError(f"{name}={value!r} is not a number (write e.g. {default})") from None
        if not math.isfinite(number):
            raise ValueError(f"{name}={value!r} must be a finite number")
        return number
    if isinstance(default, list):
        text = value.strip()
        if text.startswith("["):
            parsed = json.loads(text)
            if not isinstance(parsed, list):
                raise ValueError(f"{name} must be a JSON list or comma-separated values")
            return parsed
        return [v.strip() for v in text.split(",") if v.strip()]
    return value


def load(path: str | os.PathLike[str] | None = None, environ: dict[str, str] | None = None) -> Config:
    """Load and validate the configuration; raise ConfigError listing every problem."""
    env = dict(os.environ if environ is None else environ)
    base = defaults()
    raw = {s: dict(v) for s, v in base.items()}
    origin = {f"{s}.{k}": "default" for s, v in base.items() for k in v}
    problems: list[str] = []
    chosen = str(path) if path else env.get("RETRACER_CONFIG") or None
    if chosen:
        try:
            data = tomllib.loads(Path(chosen).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"config file {chosen} does not exist (given by --config or RETRACER_CONFIG)") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"config file {chosen} cannot be read ({exc}); give a readable UTF-8 TOML file "
                              f"with --config or RETRACER_CONFIG") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {chosen} is not valid TOML: {exc}") from None
        for section, values in data.items():
            if section not in base:
                problems.append(f"{chosen}: unknown section [{section}]; known sections: {', '.join(base)}")
                continue
            if not isinstance(values, dict):
                problems.append(f"{chosen}: [{section}] must be a table")
                continue
            for key, value in values.items():
                if key not in base[section]:
                    problems.append(f"{chosen}: unknown key [{section}] {key}; known keys: "
                                    f"{', '.join(base[section])}")
                    continue
                raw[section][key] = value
                origin[f"{section}.{key}"] = chosen
    for name, value in sorted(env.items()):
        if not name.startswith(ENV_PREFIX):
            continue
        parts = name[len(ENV_PREFIX):].lower().split("__")
        if len(parts) != 2 or parts[0] not in base or parts[1] not in base[parts[0]]:
            problems.append(f"{name}: no such setting; use RETRACER__<SECTION>__<KEY> with a key from "
                            f"`retracer check-config`")
            continue
        section, key = parts
        try:
            raw[section][key] = _coerce(value, base[section][key], name)
        except (ValueError, json.JSONDecodeError) as exc:
            problems.append(f"{name}: {exc}")
            continue
        origin[f"{section}.{key}"] = f"env {name}"
    problems += _validate(raw, base, origin)
    if problems:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(problems))
    return Config(raw, origin, chosen)


def _validate(  # noqa: C901  (one flat list of independent checks, so that every problem is reported at once)
        raw: dict[str, dict[str, Any]], base: dict[str, dict[str, Any]], origin: dict[str, str]) -> list[str]:
    problems: list[str] = []

    def bad(section: str, key: str, why: str) -> None:
        problems.append(f"[{section}] {key} = {raw[section][key]!r} (from {origin[f'{section}.{key}']}): {why}")

    for section, values in raw.items():
        for key, value in values.items():
            default = base[section][key]
            expected: type | tuple[type, ...] = (int, float) if isinstance(default, float) else type(default)
            if isinstance(value, bool) != isinstance(default, bool) or not isinstance(value, expected):
                bad(section, key, f"must be {_kind(default)}")
            elif isinstance(value, float) and not math.isfinite(value):
                bad(section, key, "must be a finite number")
    if problems:
        return problems
    for section, key in [("service", "max_parallel"), ("service", "batch_size"), ("service", "apply_workers"),
                         ("policy", "max_attempts"),
                         ("mail", "pool_size"), ("mail", "flood_threshold"), ("broker", "prefetch")]:
        if raw[section][key] < 1:
            bad(section, key, "must be at least 1")
    for section, key in [("service", "heartbeat_timeout_s"), ("service", "dispatch_timeout_s"),
                         ("service", "poll_interval_s"), ("policy", "backoff_base_s"),
                         ("mail", "flood_window_s"), ("mail", "timeout_s")]:
        if raw[section][key] <= 0:
            bad(section, key, "must be positive")
    if raw["policy"]["backoff_factor"] < 1:
        bad("policy", "backoff_factor", "must be at least 1")
    db = raw["database"]["url"]
    if db and not db.startswith(("sqlite://", "postgresql")):
        bad("database", "url", "use sqlite:///PATH or postgresql+psycopg://USER@HOST/DB")
    broker = raw["broker"]["url"]
    if broker and not broker.startswith("pyamqp://"):
        bad("broker", "url", "use pyamqp://USER:PASS@HOST:PORT// (amqp:// may pick librabbitmq, which "
                             "does not build on 3.11), or leave empty for the embedded bus")
    if raw["broker"]["queue_type"] not in ("quorum", "classic"):
        bad("broker", "queue_type", "use quorum or classic")
    mail = raw["mail"]["url"]
    if mail:
        parsed = urlparse(mail)
        if parsed.scheme not in ("smtp", "smtps") or not parsed.hostname:
            bad("mail", "url", "use smtp://HOST:PORT or smtps://HOST:PORT, or leave empty for the mbox file")
    for addr in raw["mail"]["admins"]:
        if not isinstance(addr, str) or not EMAIL.match(addr):
            bad("mail", "admins", f"{addr!r} is not an email address")
    if not EMAIL.match(raw["mail"]["sender"]):
        bad("mail", "sender", "is not an email address")
    for pattern in raw["policy"]["transient_patterns"]:
        try:
            re.compile(pattern)
        except (re.error, TypeError) as exc:
            bad("policy", "transient_patterns", f"{pattern!r} is not a regular expression: {exc}")
    return problems
