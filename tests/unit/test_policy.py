"""Transient-failure patterns on hostile input: a pattern either is refused when it is given (by `spurious add`
or in the configuration) or is matched in bounded time, and a stored pattern that cannot be used never stops
failures from being classified."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from retracer import config as cfg
from retracer import store
from retracer.apply.applier import Applier
from retracer.errors import ConfigError, RetracerError
from retracer.store.models import Job, SpuriousPattern
from retracer.testing.factories import event, submit
from retracer.workflow.policy import MAX_ERROR_TEXT, FailurePolicy, Pattern, check_pattern

#: Long enough that a backtracking matcher never finishes on the classic catastrophic patterns.
HOSTILE_TEXTS = ["a" * 5000 + "!", "x" * 5000, "aaaa" * 16384, "ab" * 2000 + "c", " " * 5000 + "x"]

CATASTROPHIC = [r"(a+)+$", r"(a|aa)*b", r"(x+x+)+y", r"(a*)*b", r"(.*a){25}", r"^(\w+\s?)*$", r"(a|a?)+b",
                r"([a-z]+)*[0-9]", r"(\s*)*x!"]

#: Runs in a child process: each pattern is given to `spurious add`'s check, and an accepted one classifies
#: every text. It prints, per pattern, "refused" or "accepted". A matcher that backtracks never returns, and
#: the parent's timeout turns that into a failure instead of a hung suite.
_CHILD = """
import json, sys
from retracer import config
from retracer.errors import RetracerError
from retracer.workflow.policy import FailurePolicy, check_pattern
patterns, texts = json.loads(sys.stdin.read())
section = config.load(environ={})["policy"]
verdicts = []
for pattern in patterns:
    try:
        check_pattern(pattern)
    except RetracerError:
        verdicts.append("refused")
        continue
    policy = FailurePolicy.from_config(section, [pattern])
    for text in texts:
        policy.classify(text)
    verdicts.append("accepted")
print(json.dumps(verdicts))
"""


def run_bounded(patterns: list[str], texts: list[str]) -> list[str]:
    """What the add-time check and the policy make of ``patterns`` on ``texts``, in a child process that must
    finish within a generous time."""
    try:
        done = subprocess.run([sys.executable, "-c", _CHILD], input=json.dumps([patterns, texts]),
                              capture_output=True, text=True, timeout=120, check=False)
    except subprocess.TimeoutExpired:
        pytest.fail(f"classifying a failure did not return: one of {patterns} is matched without a bound")
    assert done.returncode == 0, done.stderr
    verdicts: list[str] = json.loads(done.stdout.splitlines()[-1])
    return verdicts


def policy(*patterns: str) -> FailurePolicy:
    return FailurePolicy(3, 1.0, 2.0, 10.0, patterns)


class TestCatastrophicPatterns:
    def test_classic_patterns_return(self) -> None:
        """The textbook catastrophic-backtracking patterns are refused or classify long texts and return."""
        assert set(run_bounded(CATASTROPHIC, HOSTILE_TEXTS)) <= {"refused", "accepted"}

    @settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(st.lists(st.builds(
        lambda atom, inner, outer, tail: f"({atom}{inner}){outer}{tail}",
        st.sampled_from(["a", "a|aa", "x+x", r"\w", ".", "a|a?", r"[a-z]", r"\s*", "(a+)+"]),
        st.sampled_from(["+", "*", "{1,30}", "?"]),
        st.sampled_from(["+", "*", "{2,}", "{1,40}"]),
        st.sampled_from(["$", "b", "y", "!", "[0-9]", ""])), min_size=8, max_size=8))
    def test_nested_quantifiers_return(self, patterns: list[str]) -> None:
        """Any nesting of quantifiers over overlapping atoms is refused or classifies long texts and returns."""
        assert len(run_bounded(patterns, HOSTILE_TEXTS)) == len(patterns)

    def test_accepted_catastrophic_pattern_still_matches(self) -> None:
        """Bounded is not blind: an accepted nested-quantifier pattern still finds its match, case-insensitively."""
        assert policy(r"(x+x+)+y").classify("xxxxxxxxxxY").transient
        # Short enough for any matcher: the long texts are classified in the child process above.
        assert not policy(r"(x+x+)+y").classify("xxxxxxxxxxz").transient

    def test_huge_compiled_pattern_is_refused(self) -> None:
        """A short pattern that compiles to a huge program (large counted repetitions) is refused, saying what
        to write instead."""
        with pytest.raises(RetracerError, match=r"too large once compiled .*smaller counted repetitions"):
            check_pattern(r"[a-z][^q]{400}q")
        with pytest.raises(RetracerError, match="counted repetition is too large"):
            check_pattern(r"((a{100}){100}){100}")


class TestUnsupportedPatterns:
    @pytest.mark.parametrize(("pattern", "what"), [
        (r"(a)\1", "backreferences"),
        (r"(?P<word>\w+) (?P=word)", "backreferences"),
        (r"fetch(?= failed)", "lookahead"),
        (r"(?!timeout)error", "lookahead"),
        (r"(?<=mirror )404", "lookbehind"),
        (r"(?<!not )found", "lookbehind"),
        (r"a++b", "possessive"),
    ])
    def test_refused_with_what_to_write(self, pattern: str, what: str) -> None:
        """A pattern that needs backtracking is refused at add time, naming the feature and what to write."""
        with pytest.raises(RetracerError) as refused:
            check_pattern(pattern)
        message = str(refused.value)
        assert repr(pattern) in message and what in message and "not supported" in message
        assert "write" in message.split("not supported", 1)[1]

    def test_syntax_error_still_says_where(self) -> None:
        """An invalid expression is still refused as such, with where the parser stopped."""
        with pytest.raises(RetracerError, match=r"is not a regular expression: .*position 7"):
            check_pattern("mirror (.* 404")

    @pytest.mark.parametrize("pattern", [r"(\w+) \1", r"fetch(?= failed)"])
    def test_config_refuses_them(self, tmp_path: Path, pattern: str) -> None:
        """The configuration's built-in patterns are held to the same bound: serve does not start with one."""
        path = tmp_path / "retracer.toml"
        path.write_text(f"[policy]\ntransient_patterns = [{json.dumps(pattern)}]\n", encoding="utf-8")
        with pytest.raises(ConfigError) as refused:
            cfg.load(path, environ={})
        assert "[policy] transient_patterns" in str(refused.value) and "not supported" in str(refused.value)

    def test_config_accepts_catastrophic_shape(self, tmp_path: Path) -> None:
        """A nested quantifier in the configuration is fine: it is matched in linear time."""
        loaded = cfg.load(environ={"RETRACER__POLICY__TRANSIENT_PATTERNS": '["(a+)+$"]'})
        assert loaded["policy"]["transient_patterns"] == ["(a+)+$"]


class TestErrorTextBound:
    def test_only_the_contracts_length_is_searched(self) -> None:
        """Only the first MAX_ERROR_TEXT characters of an error (the event contract's bound) are searched."""
        assert policy("needle").classify("x" * (MAX_ERROR_TEXT - 6) + "needle").transient
        assert not policy("needle").classify("x" * MAX_ERROR_TEXT + "needle").transient

    def test_unencodable_text_is_classified(self) -> None:
        """An error text no encoder accepts (a lone surrogate) is classified, never raised on."""
        assert policy("fetch").classify("\ud800 Failed to FETCH").transient


#: Pieces of ASCII patterns both engines read alike.
_PIECES = st.sampled_from(["a", "b", "Ab", "x", ".", "[a-c]", "[^b]", r"\d", " ", "(a|b)", "(ab)?", "a*", "b+",
                           "x?", "c{1,3}", r"\.", "^", "$"])


class TestSameMeaning:
    @settings(max_examples=200)
    @given(st.lists(_PIECES, min_size=1, max_size=6).map("".join),
           st.text(alphabet="abcxABCX .1", max_size=40))
    def test_agrees_with_python_re_ignorecase(self, pattern: str, text: str) -> None:
        """On the common syntax the bounded engine finds what Python's re.IGNORECASE finds."""
        assert Pattern(pattern).search(text) == (re.search(pattern, text, re.IGNORECASE) is not None)


def _started(session: Session, applier: Applier) -> int:
    job = submit(applier, session)
    (outcome,) = applier.apply_batch(session, [event("retrace.started", job, source="w", worker="w")])
    assert outcome.status == "applied"
    return job


class TestStoredUnusablePattern:
    def test_skipped_with_one_log_line(self, caplog: pytest.LogCaptureFixture) -> None:
        """A stored pattern the engine cannot use is skipped, logged once per process, and the others match."""
        caplog.set_level(logging.ERROR, logger="retracer.policy")
        # Patterns no other test uses: the line is logged once per process.
        unusable = [rf"(ab)\1 {uuid.uuid4().hex}", f"Failed (to {uuid.uuid4().hex}"]
        for _ in range(3):
            built = policy(*unusable, "MIRROR .* 404")
            assert built.classify("E: mirror http://x returned 404").pattern == "MIRROR .* 404"
            assert [text for text, _ in built.unusable] == unusable
        skipped = [r for r in caplog.records if r.name == "retracer.policy"]
        assert [getattr(r, "pattern", None) for r in skipped] == unusable

    def test_failures_still_classified(self, config: cfg.Config, factory: sessionmaker[Session]) -> None:
        """Failures go on being classified, through the apply path, with unusable patterns in the database."""
        applier = Applier(config)
        with store.transaction(factory) as session:
            session.add_all([SpuriousPattern(pattern=p, reason="stored before they were refused", added_by="old")
                             for p in (r"(\w+) \1 again", "mirror (.* 404", r"mirror .* 404")])
        with store.transaction(factory) as session:
            flaky, broken = _started(session, applier), _started(session, applier)
        with store.transaction(factory) as session:
            outcomes = applier.apply_batch(session, [
                event("retrace.failed", flaky, source="w", error="E: mirror http://ddebs returned 404"),
                event("retrace.failed", broken, source="w", error="gdb crashed")])
        assert [o.status for o in outcomes] == ["applied", "applied"]
        with store.transaction(factory) as session:
            states = dict(session.execute(select(Job.id, Job.state).where(Job.id.in_([flaky, broken]))).all())
            pattern = session.get(Job, flaky).failure_pattern  # type: ignore[union-attr]
        assert states == {flaky: "PENDING", broken: "ON_HOLD"}
        assert pattern == r"mirror .* 404"
