"""Configuration: the shipped defaults, then a file, then RETRACER__<SECTION>__<KEY> environment variables.

The defaults file (config/retracer.toml) is also the schema: a key it does not have is unknown, and a value
must have the type its default has. Every problem is collected and reported at once.
"""

from __future__ import annotations

import json
import math
import os
import re
import reprlib
import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from retracer import addresses
from retracer.errors import ConfigError
from retracer.workflow.policy import pattern_problem

ENV_PREFIX = "RETRACER__"
#: A configuration file is a few KiB; reading stops past this, so that `--config /dev/zero` (or a core dump
#: given by mistake) is refused instead of filling memory.
MAX_FILE_BYTES = 1024 * 1024
INT32_MAX = 2**31 - 1
WEEK_S = 7 * 24 * 3600.0

#: Every numeric key's range, (low, high, why), enforced by check-config and at every start, and written next
#: to each key in config/retracer.toml. Seconds stay below a week so that ``now + value`` and a backoff's
#: growth stay far inside what a datetime and a float hold; counts stay within a 32-bit INTEGER column, or
#: what the code or protocol using them can take.
RANGES: dict[str, tuple[float, float, str]] = {
    "service.max_parallel": (1, INT32_MAX, "jobs at once"),
    "service.heartbeat_timeout_s": (0.01, WEEK_S, "seconds, up to 7 days"),
    "service.dispatch_timeout_s": (0.01, WEEK_S, "seconds, up to 7 days"),
    # SQLite binds one parameter per event of a batch in some statements, and allows 32766.
    "service.batch_size": (1, 10_000, "events per transaction"),
    "service.batch_wait_ms": (0, 60_000, "milliseconds, up to a minute"),
    "service.apply_workers": (1, 64, "processes"),
    "service.poll_interval_s": (0.01, 300.0, "seconds, up to 5 minutes"),
    # AMQP's basic.qos prefetch-count is a 16-bit field.
    "broker.prefetch": (1, 65_535, "messages (AMQP's limit)"),
    "broker.publish_retries": (0, 100, "retries"),
    "mail.pool_size": (1, 100, "SMTP connections"),
    "mail.timeout_s": (0.01, 3600.0, "seconds, up to an hour"),
    "mail.backoff_s": (0, 86_400.0, "seconds, up to a day"),
    "mail.max_backoff_s": (0, WEEK_S, "seconds, up to 7 days"),
    "mail.flood_threshold": (1, INT32_MAX, "mails"),
    "mail.flood_window_s": (0.01, WEEK_S, "seconds, up to 7 days"),
    # With at most 100 attempts and a factor of at most 10, base * factor^(attempts-1) stays a finite float.
    "policy.max_attempts": (1, 100, "attempts"),
    "policy.backoff_base_s": (0.01, WEEK_S, "seconds, up to 7 days"),
    "policy.backoff_factor": (1, 10, "times the previous wait"),
    "policy.backoff_max_s": (0.01, WEEK_S, "seconds, up to 7 days"),
    # A file is read into memory to be checked; the upload's total is only summed.
    "spool.max_file_bytes": (1, 2**30, "bytes, up to 1 GiB"),
    "spool.max_upload_bytes": (1, 2**36, "bytes, up to 64 GiB"),
    "gc.fullybuilt_days": (1, 36500, "days"),
    "gc.failed_upload_days": (1, 36500, "days"),
    "gc.marker_days": (1, 36500, "days"),
    "gc.mail_days": (1, 36500, "days"),
    "gc.rejected_days": (1, 36500, "days"),
    "gc.batch_size": (1, 10_000, "rows per transaction"),
    "gc.interval_s": (0, WEEK_S, "seconds, up to 7 days"),
    "backup.keep": (1, 1000, "backups"),
    "worker.concurrency": (1, 64, "attempts at once"),
    "worker.heartbeat_interval_s": (0.01, WEEK_S, "seconds, up to 7 days"),
    "worker.gdb_timeout_s": (0.01, WEEK_S, "seconds, up to 7 days"),
    "worker.debuginfod_timeout_s": (1, 3600, "seconds, up to an hour"),
    "worker.index_cache_bytes": (0, 2**40, "bytes, up to 1 TiB"),
    "service.metrics_port": (0, 65535, "TCP port (0: none)"),
    "worker.metrics_port": (0, 65535, "TCP port (0: none)"),
    "web.port": (1, 65535, "TCP port"),
    "web.page_size": (1, 1000, "rows"),
    "symbols.max_members": (1, 10_000_000, "members"),
    "symbols.max_member_bytes": (1, 2**36, "bytes, up to 64 GiB"),
    "symbols.max_archive_bytes": (1, 2**40, "bytes, up to 1 TiB"),
}


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
                values["url"] = mask(values["url"])
        if shown["mail"].get("password"):
            shown["mail"]["password"] = "********"  # noqa: S105  (the mask shown instead of the password)
        shown["derived"] = {
            "database": mask(self.database_url),
            "bus": "embedded (inbox table in the database)" if self.embedded_bus else mask(self.broker_url),
            "mail": f"mbox file {self.mailbox_path}" if not self["mail"]["url"] else mask(self["mail"]["url"]),
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


#: A value as quoted in a message: long strings, big numbers and deep nesting are cut short.
_SHORT = reprlib.Repr()
_SHORT.maxstring, _SHORT.maxother, _SHORT.maxlong, _SHORT.maxlevel, _SHORT.maxlist = 120, 120, 40, 3, 20


def _short(value: Any) -> str:
    return _SHORT.repr(value)


def _number(value: float) -> str:
    """A bound as written in the TOML and in messages: 604800, 0.01, 2147483647."""
    return str(int(value)) if float(value).is_integer() else repr(float(value))


_QUERY_SECRET = re.compile(r"([?&;]pass(?:word|wd)?=)[^&;#]*", re.IGNORECASE)


def mask(url: str) -> str:
    """The url as it may be printed. Everything between the user name and the *last* ``@`` is hidden: a
    password may itself hold ``@``, ``/`` or ``?`` unencoded, and some clients accept that; a ``password=``
    in the query is hidden too."""
    scheme, sep, rest = url.partition("://")
    if sep and "@" in rest:
        userinfo, _, after = rest.rpartition("@")
        user, colon, _ = userinfo.partition(":")
        if colon:
            url = f"{scheme}://{user}:********@{after}"
    return _QUERY_SECRET.sub(r"\1********", url)


def _coerce(value: str, default: Any, name: str, span: tuple[float, float, str] | None = None) -> Any:
    """Turn an environment string into the default's type (``span``: the key's range, if it is a number)."""
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
            # Python refuses to convert more than 4300 digits: that is not a bad spelling but far out of range.
            if re.fullmatch(r"\s*[+-]?[\d_]+\s*", value) and span is not None:
                raise ValueError(f"{name}={_short(value)} is far out of range: it must be from "
                                 f"{_number(span[0])} to {_number(span[1])} (write e.g. {default})") from None
            raise ValueError(f"{name}={_short(value)} is not an integer (write e.g. {default})") from None
    if isinstance(default, float):
        try:
            number = float(value)
        except ValueError:
            raise ValueError(f"{name}={_short(value)} is not a number (write e.g. {default})") from None
        if not math.isfinite(number):
            raise ValueError(f"{name}={_short(value)} must be a finite number (write e.g. {default})")
        return number
    if isinstance(default, list):
        text = value.strip()
        if text.startswith("["):
            try:
                parsed = json.loads(text)
            except RecursionError:
                raise ValueError(f"{name} is nested too deeply; give a flat list of strings, e.g. "
                                 f"a,b or [\"a\", \"b\"]") from None
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
        data = _read_file(chosen)
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
            raw[section][key] = _coerce(value, base[section][key], name, RANGES.get(f"{section}.{key}"))
        except (ValueError, json.JSONDecodeError) as exc:
            problems.append(f"{name}: {exc}")
            continue
        origin[f"{section}.{key}"] = f"env {name}"
    problems += _validate(raw, base, origin)
    if problems:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(problems))
    return Config(raw, origin, chosen)


def _read_file(chosen: str) -> dict[str, Any]:
    """The TOML file ``chosen``, read no further than MAX_FILE_BYTES; ConfigError saying what is wrong with it."""
    given = "give a readable UTF-8 TOML file with --config or RETRACER_CONFIG"
    try:
        with open(chosen, "rb") as file:
            raw = file.read(MAX_FILE_BYTES + 1)
        if len(raw) > MAX_FILE_BYTES:
            raise ConfigError(f"config file {chosen} is larger than {MAX_FILE_BYTES // 2**20} MiB (or endless, "
                              f"like a device): it cannot be a configuration file; {given}")
        return tomllib.loads(raw.decode("utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file {chosen} does not exist (given by --config or RETRACER_CONFIG)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {chosen} cannot be read ({exc}); {given}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {chosen} is not valid TOML: {exc}") from None
    except RecursionError:
        raise ConfigError(f"config file {chosen} nests arrays or tables too deeply to be read; every value of "
                          f"a configuration is a string, number, boolean or flat list") from None
    except ValueError as exc:  # tomllib leaves Python's own refusals (an integer of over 4300 digits) raw
        raise ConfigError(f"config file {chosen} holds a value that cannot be read ({_short(str(exc))}); "
                          f"no number a key takes has more than a dozen digits") from None


def _smtp_url(url: str) -> bool:
    try:
        parsed = urlparse(url)
        return parsed.scheme in ("smtp", "smtps") and bool(parsed.hostname) and (parsed.port or 0) >= 0
    except ValueError:  # an unclosed [IPv6] bracket, a port out of range
        return False


def _range_problem(key: str, value: float, default: float) -> str | None:
    """Why ``value`` is outside ``key``'s range, with the range and what to write; None if it is inside."""
    low, high, unit = RANGES[key]
    if low <= value <= high:
        return None
    return f"must be from {_number(low)} to {_number(high)} ({unit}); write e.g. {default}"


def _validate(  # noqa: C901  (one flat list of independent checks, so that every problem is reported at once)
        raw: dict[str, dict[str, Any]], base: dict[str, dict[str, Any]], origin: dict[str, str]) -> list[str]:
    problems: list[str] = []

    def bad(section: str, key: str, why: str) -> None:
        problems.append(f"[{section}] {key} = {_short(raw[section][key])} (from {origin[f'{section}.{key}']}): "
                        f"{why}")

    for section, values in raw.items():
        for key, value in values.items():
            default = base[section][key]
            expected: type | tuple[type, ...] = (int, float) if isinstance(default, float) else type(default)
            if isinstance(value, bool) != isinstance(default, bool) or not isinstance(value, expected):
                bad(section, key, f"must be {_kind(default)}")
            elif isinstance(value, float) and not math.isfinite(value):
                bad(section, key, f"must be a finite number (write e.g. {default})")
            elif isinstance(value, list) and any(isinstance(item, list | dict) for item in value):
                bad(section, key, "must be a flat list of strings, not of lists or tables")
    if problems:
        return problems
    for section, values in raw.items():
        for key, value in values.items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                why = _range_problem(f"{section}.{key}", value, base[section][key])
                if why is not None:
                    bad(section, key, why)
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
    if mail and not _smtp_url(mail):
        bad("mail", "url", "use smtp://HOST:PORT or smtps://HOST:PORT, or leave empty for the mbox file")
    for addr in raw["mail"]["admins"]:
        if (why := addresses.problem(addr)) is not None:
            bad("mail", "admins", f"{_short(addr)} is not an email address: it {why}")
    if (why := addresses.problem(raw["mail"]["sender"])) is not None:
        bad("mail", "sender", f"is not an email address: it {why}")
    for addr in raw["mail"]["maintainers"]:
        if (why := addresses.problem(addr)) is not None:
            bad("mail", "maintainers", f"{_short(addr)} is not an email address: it {why}")
    for domain in raw["mail"]["creator_domains"]:
        if not isinstance(domain, str) or addresses.problem(f"user@{domain}") is not None:
            bad("mail", "creator_domains", f"{_short(domain)} is not a domain name (example.org)")
    # Checked as the failure policy will match them (RE2, linear time), so that a pattern serve could not
    # use, or that needs backtracking, stops the configuration instead of being skipped at every failure.
    for pattern in raw["policy"]["transient_patterns"]:
        problem = pattern_problem(pattern)
        if problem is not None:
            bad("policy", "transient_patterns", problem)
    return problems
