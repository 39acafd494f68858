"""Every error retracer raises on purpose derives from RetracerError.

The CLI prints ``str(error)`` and exits non-zero; each message says what was wrong and what to do.
"""

from __future__ import annotations


class RetracerError(Exception):
    """Raised for any expected failure; the root of every retracer exception."""


class ConfigError(RetracerError):
    """Raised when the configuration file or an environment override is invalid."""


class WorkflowError(RetracerError):
    """Raised when states/workflow.toml is malformed or names something that does not exist."""


class TransitionRefused(RetracerError):
    """Raised when the machine refuses a trigger for a job in its current state."""

    def __init__(self, job_id: int | None, state: str, trigger: str, why: str, allowed: list[str]) -> None:
        self.job_id = job_id
        self.state = state
        self.trigger = trigger
        self.why = why
        self.allowed = allowed
        allowed_text = ", ".join(allowed) if allowed else "nothing (final state)"
        super().__init__(
            f"job {job_id} is {state}: {trigger!r} refused ({why}); allowed from {state}: {allowed_text}"
        )


class StateWriteRefused(RetracerError):
    """Raised when code outside the machine tries to write a job's state."""


class JobNotFound(RetracerError):
    """Raised when a job id names no job."""

    def __init__(self, job_id: object) -> None:
        self.job_id = job_id
        super().__init__(f"job {job_id} does not exist (list jobs with `retracer jobs`)")


class InvalidEvent(RetracerError):
    """Raised when an event does not follow the contract (README, "Events")."""


class DatabaseNotReady(RetracerError):
    """Raised when the database has no schema or an old one; `retracer db upgrade` fixes it."""


class DatabaseUnavailable(RetracerError):
    """Raised when the database went away or refuses writes while serving; nothing uncommitted was acked."""


class BrokerError(RetracerError):
    """Raised when the message broker cannot be reached or refuses a publish."""


class MailError(RetracerError):
    """Raised when a mail cannot be rendered or delivered."""


class UploadRejected(RetracerError):
    """Raised when an upload in the spool fails its checks; the message is the upload log."""
