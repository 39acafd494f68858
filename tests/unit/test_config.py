"""Configuration: shipped defaults, a file, RETRACER__<SECTION>__<KEY> overrides, and check-config."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from retracer import config as cfg
from retracer.cli import cli
from retracer.errors import ConfigError
from retracer.workflow.policy import FailurePolicy


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No RETRACER_CONFIG or RETRACER__* from the developer's shell leaks into these tests."""
    for name in list(os.environ):
        if name.startswith("RETRACER"):
            monkeypatch.delenv(name)


def write(tmp_path: Path, text: str, name: str = "retracer.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def error_of(path: Path | None = None, /, **env: str) -> str:
    """The ConfigError message for loading ``path`` with ``env`` (the test fails if it loads)."""
    with pytest.raises(ConfigError) as exc:
        cfg.load(path, environ=env)
    return str(exc.value)


class TestDefaults:
    def test_defaults_load(self) -> None:
        """With no file and no environment, the shipped defaults load and describe the embedded mode."""
        config = cfg.load(environ={})
        assert config.raw == cfg.defaults()
        assert config.path is None
        assert set(config.origin.values()) == {"default"}
        assert config.embedded_bus
        assert config.database_url == f"sqlite:///{Path(os.path.expanduser('~/.local/share/retracer'))}/retracer.db"

    def test_sections_of_the_card(self) -> None:
        """The defaults have the sections the issue names, each key with a value of a definite type."""
        base = cfg.defaults()
        assert {"service", "database", "broker", "mail", "policy"} <= set(base)
        assert base["database"]["url"] == "" and base["broker"]["url"] == "" and base["mail"]["url"] == ""

    def test_derived_paths_follow_data_dir(self, tmp_path: Path) -> None:
        """The database, spool, results and mailbox live under the configured data directory."""
        config = cfg.load(environ={"RETRACER__SERVICE__DATA_DIR": str(tmp_path)})
        assert config.database_url == f"sqlite:///{tmp_path}/retracer.db"
        assert (config.spool_dir, config.results_dir) == (tmp_path / "spool", tmp_path / "results")
        assert config.mailbox_path == tmp_path / "mail" / "outbox.mbox"


class TestFile:
    def test_file_by_path(self, tmp_path: Path) -> None:
        """A file given as the path overrides the keys it names and nothing else."""
        path = write(tmp_path, '[service]\nmax_parallel = 9\n[mail]\nadmins = ["a@example.com"]\n')
        config = cfg.load(path, environ={})
        assert config["service"]["max_parallel"] == 9 and config["mail"]["admins"] == ["a@example.com"]
        assert config["service"]["batch_size"] == cfg.defaults()["service"]["batch_size"]
        assert config.path == str(path)
        assert config.origin["service.max_parallel"] == str(path)
        assert config.origin["service.batch_size"] == "default"

    def test_file_by_environment(self, tmp_path: Path) -> None:
        """RETRACER_CONFIG names the file when no path is given."""
        path = write(tmp_path, "[policy]\nmax_attempts = 5\n")
        config = cfg.load(environ={"RETRACER_CONFIG": str(path)})
        assert config["policy"]["max_attempts"] == 5 and config.path == str(path)

    def test_path_beats_environment(self, tmp_path: Path) -> None:
        """An explicit path (--config) wins over RETRACER_CONFIG."""
        chosen = write(tmp_path, "[policy]\nmax_attempts = 5\n", "a.toml")
        other = write(tmp_path, "[policy]\nmax_attempts = 7\n", "b.toml")
        assert cfg.load(chosen, environ={"RETRACER_CONFIG": str(other)})["policy"]["max_attempts"] == 5

    def test_int_for_a_float_key(self, tmp_path: Path) -> None:
        """An integer is accepted where the default is a float."""
        path = write(tmp_path, "[policy]\nbackoff_factor = 3\n")
        assert cfg.load(path, environ={})["policy"]["backoff_factor"] == 3

    def test_missing_file(self, tmp_path: Path) -> None:
        """A file that does not exist is named, with where it was given."""
        message = error_of(tmp_path / "nope.toml")
        assert message == f"config file {tmp_path / 'nope.toml'} does not exist (given by --config or RETRACER_CONFIG)"

    def test_bad_toml(self, tmp_path: Path) -> None:
        """A file that is not TOML is named with the parser's position."""
        path = write(tmp_path, "[service\nmax_parallel = 4\n")
        assert error_of(path).startswith(f"config file {path} is not valid TOML: ")
        assert "line 1" in error_of(path)

    def test_directory_instead_of_file(self, tmp_path: Path) -> None:
        """A directory given as the config file is a ConfigError naming it."""
        assert str(tmp_path) in error_of(tmp_path)

    def test_file_not_utf8(self, tmp_path: Path) -> None:
        """A config file that is not UTF-8 is a ConfigError naming it."""
        path = tmp_path / "latin1.toml"
        path.write_bytes(b'[mail]\nsender = "h\xe9l\xe8ne@example.com"\n')
        assert str(path) in error_of(path)


class TestEnvironment:
    def test_database_broker_and_mail_urls(self) -> None:
        """RETRACER__DATABASE__URL, __BROKER__URL and __MAIL__URL switch to the at-scale services."""
        config = cfg.load(environ={
            "RETRACER__DATABASE__URL": "postgresql+psycopg://postgres@127.0.0.1/retracer",
            "RETRACER__BROKER__URL": "pyamqp://guest:guest@127.0.0.1:5672//",
            "RETRACER__MAIL__URL": "smtp://mail.example.com:25",
        })
        assert config.database_url == "postgresql+psycopg://postgres@127.0.0.1/retracer"
        assert config.broker_url == "pyamqp://guest:guest@127.0.0.1:5672//" and not config.embedded_bus
        assert config["mail"]["url"] == "smtp://mail.example.com:25"
        assert config.origin["database.url"] == "env RETRACER__DATABASE__URL"

    @pytest.mark.parametrize("value", ["a@example.com,b@example.com", " a@example.com , b@example.com ,",
                                       '["a@example.com", "b@example.com"]'], ids=["comma", "spaces", "json"])
    def test_admins_list(self, value: str) -> None:
        """RETRACER__MAIL__ADMINS takes a comma-separated list or a JSON list."""
        config = cfg.load(environ={"RETRACER__MAIL__ADMINS": value})
        assert config["mail"]["admins"] == ["a@example.com", "b@example.com"]

    def test_empty_admins(self) -> None:
        """An empty RETRACER__MAIL__ADMINS means no admins."""
        assert cfg.load(environ={"RETRACER__MAIL__ADMINS": ""})["mail"]["admins"] == []

    @pytest.mark.parametrize(("value", "expected"), [("true", True), ("YES", True), ("1", True), ("on", True),
                                                     ("false", False), ("no", False), ("0", False)])
    def test_booleans(self, value: str, expected: bool) -> None:
        """Boolean keys accept the usual spellings."""
        assert cfg.load(environ={"RETRACER__MAIL__STARTTLS": value})["mail"]["starttls"] is expected

    def test_numbers_are_coerced(self) -> None:
        """Integer and float keys get numbers from their environment strings."""
        config = cfg.load(environ={"RETRACER__SERVICE__MAX_PARALLEL": "16", "RETRACER__POLICY__BACKOFF_FACTOR": "1.5"})
        assert config["service"]["max_parallel"] == 16 and config["policy"]["backoff_factor"] == 1.5

    def test_environment_beats_file(self, tmp_path: Path) -> None:
        """An environment override wins over the file, and its origin says so."""
        path = write(tmp_path, "[service]\nmax_parallel = 9\n")
        config = cfg.load(path, environ={"RETRACER__SERVICE__MAX_PARALLEL": "2"})
        assert config["service"]["max_parallel"] == 2
        assert config.origin["service.max_parallel"] == "env RETRACER__SERVICE__MAX_PARALLEL"

    def test_other_variables_are_ignored(self) -> None:
        """Variables without the RETRACER__ prefix do not count as overrides."""
        assert cfg.load(environ={"RETRACER_X": "1", "HOME": "/root"}).raw == cfg.defaults()

    def test_password_is_masked(self) -> None:
        """The effective configuration shown to people masks the mail password."""
        config = cfg.load(environ={"RETRACER__MAIL__PASSWORD": "s3cret"})
        assert config.describe()["mail"]["password"] == "********"
        assert "s3cret" not in json.dumps(config.describe())
        assert config["mail"]["password"] == "s3cret"

    def test_derived_urls_are_masked(self) -> None:
        """The derived database and bus URLs shown to people hide the password in the URL."""
        config = cfg.load(environ={"RETRACER__DATABASE__URL": "postgresql+psycopg://rt:pw123@db/retracer",
                                   "RETRACER__BROKER__URL": "pyamqp://bob:hunter2@mq:5672//"})
        derived = config.describe()["derived"]
        assert derived["database"] == "postgresql+psycopg://rt:********@db/retracer"
        assert derived["bus"] == "pyamqp://bob:********@mq:5672//"

    def test_url_passwords_are_never_shown(self) -> None:
        """No password given in a URL appears anywhere in the configuration check-config prints."""
        config = cfg.load(environ={"RETRACER__DATABASE__URL": "postgresql+psycopg://rt:pw123@db/retracer",
                                   "RETRACER__BROKER__URL": "pyamqp://bob:hunter2@mq:5672//",
                                   "RETRACER__MAIL__URL": "smtp://mailer:letmein@mail.example.com:25"})
        shown = json.dumps(config.describe())
        assert not [secret for secret in ("pw123", "hunter2", "letmein") if secret in shown]


# (environment, the key the message must name, what the message must say to do)
BAD_ENV = [
    ({"RETRACER__SERVICE__NOPE": "1"}, "RETRACER__SERVICE__NOPE", "use RETRACER__<SECTION>__<KEY>"),
    ({"RETRACER__NOPE__URL": "1"}, "RETRACER__NOPE__URL", "use RETRACER__<SECTION>__<KEY>"),
    ({"RETRACER__SERVICE": "1"}, "RETRACER__SERVICE", "use RETRACER__<SECTION>__<KEY>"),
    ({"RETRACER__MAIL__STARTTLS": "maybe"}, "RETRACER__MAIL__STARTTLS", "use true or false"),
    ({"RETRACER__MAIL__ADMINS": '["a@example.com"'}, "RETRACER__MAIL__ADMINS", "delimiter"),
    ({"RETRACER__MAIL__ADMINS": "root"}, "[mail] admins", "'root' is not an email address"),
    ({"RETRACER__MAIL__ADMINS": '["a@example.com", 3]'}, "[mail] admins", "3 is not an email address"),
    ({"RETRACER__MAIL__SENDER": "retracer"}, "[mail] sender", "is not an email address"),
    ({"RETRACER__SERVICE__MAX_PARALLEL": "0"}, "[service] max_parallel", "must be from 1 to 2147483647"),
    ({"RETRACER__SERVICE__BATCH_SIZE": "-5"}, "[service] batch_size", "must be from 1 to 10000"),
    ({"RETRACER__POLICY__MAX_ATTEMPTS": "0"}, "[policy] max_attempts", "must be from 1 to 100"),
    ({"RETRACER__SERVICE__POLL_INTERVAL_S": "0"}, "[service] poll_interval_s", "must be from 0.01 to 300"),
    ({"RETRACER__SERVICE__HEARTBEAT_TIMEOUT_S": "-1"}, "[service] heartbeat_timeout_s",
     "must be from 0.01 to 604800"),
    ({"RETRACER__POLICY__BACKOFF_FACTOR": "0.5"}, "[policy] backoff_factor", "must be from 1 to 10"),
    ({"RETRACER__DATABASE__URL": "mysql://db/retracer"}, "[database] url", "use sqlite:///PATH or postgresql"),
    ({"RETRACER__BROKER__URL": "amqp://guest@mq//"}, "[broker] url", "use pyamqp://"),
    ({"RETRACER__BROKER__QUEUE_TYPE": "stream"}, "[broker] queue_type", "use quorum or classic"),
    ({"RETRACER__MAIL__URL": "http://mail.example.com"}, "[mail] url", "use smtp://HOST:PORT"),
    ({"RETRACER__MAIL__URL": "smtp://"}, "[mail] url", "use smtp://HOST:PORT"),
    ({"RETRACER__POLICY__TRANSIENT_PATTERNS": "Failed (to"}, "[policy] transient_patterns",
     "is not a regular expression"),
]


class TestBadValues:
    @pytest.mark.parametrize(("env", "key", "hint"), BAD_ENV, ids=[",".join(f"{k}={v}" for k, v in e.items())
                                                                     for e, _, _ in BAD_ENV])
    def test_bad_environment_value(self, env: dict[str, str], key: str, hint: str) -> None:
        """A bad environment override is a ConfigError naming the key and what to do."""
        message = error_of(**env)
        assert message.startswith("invalid configuration:\n  - ")
        assert key in message and hint in message, message
        assert message.count("\n  - ") == 1

    def test_origin_is_named(self) -> None:
        """A bad value says where it came from (the environment variable)."""
        assert "(from env RETRACER__SERVICE__MAX_PARALLEL)" in error_of(RETRACER__SERVICE__MAX_PARALLEL="0")

    @pytest.mark.parametrize(("name", "hint"), [("RETRACER__SERVICE__MAX_PARALLEL", "integer"),
                                                ("RETRACER__POLICY__BACKOFF_FACTOR", "number")])
    def test_not_a_number(self, name: str, hint: str) -> None:
        """A non-numeric override of a number says that a number is expected."""
        message = error_of(**{name: "abc"})
        assert name in message and hint in message, message

    @pytest.mark.parametrize("value", ["nan", "inf"])
    def test_non_finite_float(self, value: str) -> None:
        """A NaN or infinite interval is refused naming the key."""
        message = error_of(RETRACER__SERVICE__POLL_INTERVAL_S=value)
        assert "RETRACER__SERVICE__POLL_INTERVAL_S" in message and "must be a finite number" in message

    @pytest.mark.parametrize(("text", "key", "hint"), [
        ("[servce]\nmax_parallel = 2\n", "unknown section [servce]", "known sections: service, "),
        ("[service]\nmax_paralel = 2\n", "unknown key [service] max_paralel", "known keys: data_dir, "),
        ('service = "x"\n', "[service]", "must be a table"),
        ('[service]\nmax_parallel = "4"\n', "[service] max_parallel = '4'", "must be an integer (write e.g. 4)"),
        ("[mail]\nstarttls = 1\n", "[mail] starttls = 1", "must be true or false"),
        ("[service]\nmax_parallel = true\n", "[service] max_parallel = True", "must be an integer (write e.g. 4)"),
        ('[mail]\nadmins = "a@example.com"\n', "[mail] admins", "must be a list"),
        ('[service]\npoll_interval_s = "1"\n', "[service] poll_interval_s = '1'",
         "must be a number (write e.g. 1.0)"),
        ("[service]\ndata_dir = 3\n", "[service] data_dir = 3", "must be a string"),
        ("[policy]\ntransient_patterns = [3]\n", "[policy] transient_patterns", "is not a regular expression"),
    ], ids=["section", "key", "not-table", "str-for-int", "int-for-bool", "bool-for-int", "str-for-list",
            "str-for-float", "int-for-str", "int-pattern"])
    def test_bad_file_value(self, tmp_path: Path, text: str, key: str, hint: str) -> None:
        """A bad key or value in the file is a ConfigError naming it, the file, and what to do."""
        path = write(tmp_path, text)
        message = error_of(path)
        assert key in message and hint in message and str(path) in message, message

    def test_several_problems_at_once(self, tmp_path: Path) -> None:
        """Every problem in the file and the environment is reported in one error."""
        path = write(tmp_path, "[service]\nmax_paralel = 2\n[policy]\nmax_attempts = 0\n")
        message = error_of(path, RETRACER__MAIL__ADMINS="root", RETRACER__BROKER__NOPE="1",
                           RETRACER__DATABASE__URL="mysql://x")
        lines = message.splitlines()
        assert lines[0] == "invalid configuration:" and len(lines) == 6, message
        for fragment in ("unknown key [service] max_paralel", "RETRACER__BROKER__NOPE", "[policy] max_attempts",
                         "[mail] admins", "[database] url"):
            assert sum(fragment in line for line in lines) == 1, fragment


class TestCheckConfig:
    def test_prints_the_effective_configuration(self, tmp_path: Path) -> None:
        """check-config prints every section and key, marking where overridden values came from."""
        env = {"RETRACER__SERVICE__DATA_DIR": str(tmp_path), "RETRACER__MAIL__ADMINS": "a@example.com"}
        result = CliRunner().invoke(cli, ["check-config"], env=env)
        assert result.exit_code == 0, result.output
        assert result.output.startswith("configuration OK (file: built-in defaults only)")
        for section, values in cfg.defaults().items():
            assert f"\n[{section}]\n" in result.output
            for key in values:
                assert f"\n{key} = " in result.output, key
        assert f"data_dir = '{tmp_path}'  # env RETRACER__SERVICE__DATA_DIR" in result.output
        assert f"database = 'sqlite:///{tmp_path}/retracer.db'" in result.output

    def test_config_option(self, tmp_path: Path) -> None:
        """retracer --config FILE check-config reads that file and says so."""
        path = write(tmp_path, "[service]\nmax_parallel = 9\n")
        result = CliRunner().invoke(cli, ["--config", str(path), "check-config"])
        assert result.exit_code == 0, result.output
        assert f"configuration OK (file: {path})" in result.output
        assert f"max_parallel = 9  # {path}" in result.output

    def test_json(self, tmp_path: Path) -> None:
        """check-config --json gives the file, the effective values and each key's origin."""
        result = CliRunner().invoke(cli, ["check-config", "--json"], env={"RETRACER__POLICY__MAX_ATTEMPTS": "5"})
        assert result.exit_code == 0, result.output
        shown = json.loads(result.output)
        assert shown["config_file"] is None
        assert shown["effective"]["policy"]["max_attempts"] == 5
        assert shown["origin"]["policy.max_attempts"] == "env RETRACER__POLICY__MAX_ATTEMPTS"

    def test_bad_value_exits_1_with_the_message(self) -> None:
        """check-config on a bad value exits 1 with the ConfigError message and no traceback."""
        result = CliRunner().invoke(cli, ["check-config"], env={"RETRACER__SERVICE__MAX_PARALLEL": "0",
                                                                "RETRACER__BROKER__URL": "amqp://x//"})
        assert result.exit_code == 1
        assert result.output.startswith("Error: invalid configuration:\n")
        assert ("[service] max_parallel = 0 (from env RETRACER__SERVICE__MAX_PARALLEL): must be from 1 to "
                "2147483647 (jobs at once); write e.g. 4") in result.output
        assert "[broker] url = 'amqp://x//'" in result.output
        assert "Traceback" not in result.output


#: Every numeric key of the shipped defaults, as "section.key".
NUMERIC = [f"{s}.{k}" for s, v in cfg.defaults().items() for k, d in v.items()
           if isinstance(d, int | float) and not isinstance(d, bool)]


def _env_name(key: str) -> str:
    return "RETRACER__" + key.replace(".", "__").upper()


def _spelled(key: str, value: float) -> str:
    """``value`` written as the key's type takes it (an integer key gets an integer)."""
    section, name = key.split(".")
    return str(int(value)) if isinstance(cfg.defaults()[section][name], int) else repr(float(value))


class TestRanges:
    def test_every_number_has_a_documented_range(self) -> None:
        """Each numeric key has a range holding its default, and the shipped TOML states it on the key's line."""
        text = (Path(__file__).parents[2] / "config" / "retracer.toml").read_text(encoding="utf-8")
        assert sorted(cfg.RANGES) == sorted(NUMERIC)
        for key in NUMERIC:
            section, name = key.split(".")
            low, high, _ = cfg.RANGES[key]
            assert low <= cfg.defaults()[section][name] <= high, key
            block = text.split(f"[{section}]\n", 1)[1].split("\n[", 1)[0]
            (line,) = [line for line in block.splitlines() if line.startswith(f"{name} = ")]
            assert f"# {cfg._number(low)} to {cfg._number(high)}" in line, (key, line)

    @pytest.mark.parametrize("key", NUMERIC)
    def test_out_of_range_is_explained(self, key: str) -> None:
        """A value just outside the range, and a hostile one (1e300, 2**64, negative), is refused naming the
        key, where it came from, the range and what to write; the bounds themselves are accepted."""
        low, high, _ = cfg.RANGES[key]
        section, name = key.split(".")
        default = cfg.defaults()[section][name]
        step = 1 if isinstance(default, int) else 0.001
        for value in (low - step, high + step, 2**64, -(2**64), 1e300):
            message = error_of(**{_env_name(key): _spelled(key, value)})
            assert f"[{section}] {name} = " in message and f"(from env {_env_name(key)})" in message, message
            assert f"must be from {cfg._number(low)} to {cfg._number(high)}" in message, message
            assert f"write e.g. {default}" in message, message
        for value in (low, high):
            assert cfg.load(environ={_env_name(key): _spelled(key, value)})[section][name] == value

    @pytest.mark.parametrize("key", NUMERIC)
    def test_out_of_range_in_a_file_names_the_file(self, tmp_path: Path, key: str) -> None:
        """The same value in a file names the file."""
        section, name = key.split(".")
        path = write(tmp_path, f"[{section}]\n{name} = {_spelled(key, cfg.RANGES[key][1] * 2 + 1)}\n")
        assert f"[{section}] {name} = " in error_of(path) and f"(from {path})" in error_of(path)

    @settings(max_examples=300)
    @given(key=st.sampled_from(NUMERIC), value=st.one_of(st.integers(), st.floats(allow_nan=False)))
    def test_any_number_loads_or_is_explained(self, key: str, value: float) -> None:
        """Any number at all, for any key, either loads inside the range or is a ConfigError naming the key:
        never another exception."""
        section, name = key.split(".")
        low, high, _ = cfg.RANGES[key]
        spelled = str(value) if isinstance(value, int) or not isinstance(cfg.defaults()[section][name], int) else (
            repr(value))
        inside = low <= value <= high and (isinstance(value, int) or isinstance(cfg.defaults()[section][name], float))
        if inside:
            assert cfg.load(environ={_env_name(key): spelled})[section][name] == value
        else:
            assert _env_name(key) in error_of(**{_env_name(key): spelled})

    def test_extremes_are_usable(self) -> None:
        """At the edges of every range, what serve computes from the values stays representable: every
        retry's backoff and every timeout added to now."""
        env = {_env_name(k): _spelled(k, cfg.RANGES[k][1]) for k in NUMERIC}
        config = cfg.load(environ=env)
        policy = FailurePolicy.from_config(config["policy"])
        now = datetime.now(UTC)
        for attempt in range(1, config["policy"]["max_attempts"] + 1):
            assert now + policy.backoff(attempt) <= now + timedelta(days=7)
        for key in NUMERIC:
            if key.endswith("_s"):
                section, name = key.split(".")
                assert now + timedelta(seconds=config[section][name]) > now


class TestHostileInput:
    def test_endless_file(self) -> None:
        """--config /dev/zero is refused after reading a bounded amount, saying it cannot be a config file."""
        message = error_of(Path("/dev/zero"))
        assert message.startswith("config file /dev/zero is larger than 1 MiB"), message

    def test_huge_file(self, tmp_path: Path) -> None:
        """A file over 1 MiB is refused unread, naming it."""
        path = write(tmp_path, "# " + "x" * (1024 * 1024) + "\n")
        assert error_of(path).startswith(f"config file {path} is larger than 1 MiB")

    @pytest.mark.parametrize("value", ["[" * 5000 + "]" * 5000, "{a=" * 3000 + "1" + "}" * 3000],
                             ids=["arrays", "tables"])
    def test_deep_file(self, tmp_path: Path, value: str) -> None:
        """A file nesting thousands deep is a ConfigError, not a RecursionError."""
        path = write(tmp_path, f"[mail]\nadmins = {value}\n")
        assert "nests arrays or tables too deeply" in error_of(path)

    def test_file_integer_beyond_any_limit(self, tmp_path: Path) -> None:
        """An integer of 5000 digits in a file is a ConfigError naming the file."""
        path = write(tmp_path, f"[service]\nmax_parallel = {'9' * 5000}\n")
        message = error_of(path)
        assert message.startswith(f"config file {path} holds a value that cannot be read") and len(message) < 400

    def test_environment_integer_beyond_any_limit(self) -> None:
        """An integer of 5000 digits in the environment is out of range, said with the range, briefly."""
        message = error_of(RETRACER__SERVICE__MAX_PARALLEL="9" * 5000)
        assert "is far out of range: it must be from 1 to 2147483647" in message and len(message) < 400

    @settings(max_examples=50)
    @given(depth=st.integers(min_value=2, max_value=20_000))
    def test_nested_environment_list(self, depth: int) -> None:
        """A list setting nested any depth is refused as not flat (or too deep to read), never RecursionError."""
        message = error_of(RETRACER__MAIL__ADMINS="[" * depth + "]" * depth)
        assert "RETRACER__MAIL__ADMINS" in message or "[mail] admins" in message
        assert "nested too deeply" in message or "must be a flat list of strings" in message
        assert len(message) < 400

    def test_nested_list_in_a_file(self, tmp_path: Path) -> None:
        """A file's list of lists is refused as not flat, the value shown cut short."""
        path = write(tmp_path, "[mail]\nadmins = " + "[" * 200 + "]" * 200 + "\n")
        message = error_of(path)
        assert "[mail] admins = [[[[...]]]]" in message and "must be a flat list of strings" in message

    @pytest.mark.parametrize("url", ["smtp://[abc", "smtp://host:99999999"])
    def test_unparseable_mail_url(self, url: str) -> None:
        """A mail URL urllib cannot parse is explained, not a traceback."""
        assert "use smtp://HOST:PORT" in error_of(RETRACER__MAIL__URL=url)

    @settings(max_examples=200)
    @given(password=st.text(min_size=1), user=st.from_regex(r"\A[a-z][a-z0-9]{0,8}\Z"),
           host=st.from_regex(r"\A[a-z][a-z0-9.]{0,12}\Z"))
    def test_url_password_never_shown(self, password: str, user: str, host: str) -> None:
        """Whatever a password in a URL holds (@, :, /, ?), check-config shows the URL with all of it
        replaced by the mask and every other part intact."""
        config = cfg.load(environ={"RETRACER__BROKER__URL": f"pyamqp://{user}:{password}@{host}:5672//",
                                   "RETRACER__DATABASE__URL": f"postgresql+psycopg://{user}:{password}@{host}/db"})
        shown = config.describe()
        assert shown["broker"]["url"] == shown["derived"]["bus"] == f"pyamqp://{user}:********@{host}:5672//"
        assert shown["database"]["url"] == shown["derived"]["database"] == (
            f"postgresql+psycopg://{user}:********@{host}/db")

    def test_password_with_at_sign(self) -> None:
        """The issue's case: no part of a password holding @ is printed by check-config."""
        result = CliRunner().invoke(cli, ["check-config"], env={
            "RETRACER__BROKER__URL": "pyamqp://bob:hunter@2@mq:5672//",
            "RETRACER__MAIL__URL": "smtp://mailer:let@me@in@mail.example.com:25"})
        assert result.exit_code == 0, result.output
        assert "hunter" not in result.output and "2@mq" not in result.output and "me@in" not in result.output
        assert "url = 'pyamqp://bob:********@mq:5672//'" in result.output

    def test_password_in_the_query(self) -> None:
        """A password given as a query parameter is masked too."""
        config = cfg.load(environ={"RETRACER__DATABASE__URL": "postgresql+psycopg://db/x?user=rt&password=pw123"})
        assert config.describe()["derived"]["database"] == "postgresql+psycopg://db/x?user=rt&password=********"
