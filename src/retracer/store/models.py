"""The database schema: jobs, their history, and the tables that make effects exactly-once.

Only the workflow machine writes ``Job.state``: any other assignment raises StateWriteRefused, the way
Launchpad makes direct writes to a build's status fail.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    event,
    false,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, object_session, relationship, validates

from retracer.errors import StateWriteRefused
from retracer.workflow import load_spec, machine_is_writing

#: The workflow's states, in the file's order: the only values the state column admits.
STATES = tuple(load_spec().states)


#: Who did something: "event:" or "admin:" before a name of at most 200 characters (an event's source, an
#: admin's --as), or the service's own name.
MAX_ACTOR = 255

#: How much of a rejected event is kept (characters); a longer one keeps this much, its size and its digest.
MAX_REJECTED_BODY = 64 * 1024


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes on both databases (SQLite would otherwise hand back naive ones)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the database; use retracer.models.utcnow()")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class Job(Base):
    """A crash to retrace, and where it is in the workflow."""

    __tablename__ = "job"
    __table_args__ = (
        CheckConstraint("state IN ('" + "', '".join(STATES) + "')", name="state"),
        # The dispatcher's order: priority (an admin's or the automatic one), then age.
        Index("ix_job_dispatch", "state", "priority", "id"),
        # The queue split by retry time (ready now, waiting), counted and listed by the status report.
        Index("ix_job_retry_time", "state", "not_before"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    state: Mapped[str] = mapped_column(String(20), index=True)
    crash_id: Mapped[str] = mapped_column(String(200), index=True)
    creator: Mapped[str] = mapped_column(String(320))
    package: Mapped[str] = mapped_column(String(200))
    version: Mapped[str] = mapped_column(String(200))
    architecture: Mapped[str] = mapped_column(String(50))
    release: Mapped[str] = mapped_column(String(100))
    core: Mapped[str] = mapped_column(Text)
    executable: Mapped[str] = mapped_column(Text)
    build_ids: Mapped[list[str]] = mapped_column(JSON, default=list)
    priority: Mapped[int] = mapped_column(Integer, default=0)
    manual_priority: Mapped[bool] = mapped_column(Boolean, default=False)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    not_before: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    dispatched_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    last_heartbeat: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    worker: Mapped[str | None] = mapped_column(String(200), nullable=True)
    upload_leaf: Mapped[str | None] = mapped_column(String(255), nullable=True)
    upload_log: Mapped[str | None] = mapped_column(Text, nullable=True)
    hold_reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    failure_pattern: Mapped[str | None] = mapped_column(Text, nullable=True)
    result: Mapped[str | None] = mapped_column(Text, nullable=True)
    # The crash's signatures from its accepted upload: symbolic (executable, signal, top functions) and by
    # address (module build-id + offset per frame); a job with an earlier job's signature is its duplicate.
    signature: Mapped[str | None] = mapped_column(String(1024), nullable=True, index=True)
    address_signature: Mapped[str | None] = mapped_column(Text, nullable=True)
    duplicate_of: Mapped[int | None] = mapped_column(Integer, nullable=True, index=True)
    # Whether serve could read the core when the crash was submitted: "read" (build-ids taken from it) or
    # "unreadable" (kept as given: workers may see storage that serve does not); None before this was kept.
    core_check: Mapped[str | None] = mapped_column(String(20), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    # Counts every write. Writers serialise on the row itself (SELECT ... FOR UPDATE on PostgreSQL,
    # BEGIN IMMEDIATE on SQLite) rather than through SQLAlchemy's version_id_col, whose optimistic check
    # forces one UPDATE round trip per job: a batch of 200 events would cost ~70 of them.
    version_id: Mapped[int] = mapped_column(Integer, nullable=False, default=1)

    history: Mapped[list[History]] = relationship(
        back_populates="job", order_by="History.id", cascade="all, delete-orphan"
    )

    @validates("state")
    def _only_the_machine(self, key: str, value: str) -> str:
        if not machine_is_writing():
            raise StateWriteRefused(
                f"job {self.id}: state is written only by the workflow machine; "
                f"fire a trigger (retracer.workflow.load().fire) instead of assigning {value!r}"
            )
        return value

    def __repr__(self) -> str:
        return f"<Job {self.id} {self.state} {self.package} {self.version}>"


class JobRecord:
    """A job's columns as a plain object outside any session: the jobs of the batch apply path (retracer.apply).

    The batch writes its jobs itself (retracer.store.bulk, from ``__dict__``); a mapped Job's instrumented attributes
    would track every assignment for a session it is never in (~15% of the embedded apply path). Unset
    columns read None, as on a new Job, and the state is still written by the workflow machine alone.
    """

    def __init__(self, values: Mapping[str, Any] | None = None) -> None:
        self.__dict__.update(_UNSET)
        if values:
            self.__dict__.update(values)

    @property
    def state(self) -> str:
        value: str = self.__dict__["state"]  # None until the machine creates the job, as on a new Job
        return value

    @state.setter
    def state(self, value: str) -> None:
        self.__dict__["state"] = Job._only_the_machine(self, "state", value)  # type: ignore[arg-type]

    def __repr__(self) -> str:
        return f"<JobRecord {self.__dict__['id']} {self.state} {self.__dict__['package']}>"


_UNSET = {column.name: None for column in Job.__table__.columns}


@event.listens_for(Job, "before_update")
def _count_write(mapper: object, connection: object, job: Job) -> None:
    session = object_session(job)
    # before_update also fires for objects whose changes were written already (a batch's bulk UPDATE).
    if session is not None and session.is_modified(job, include_collections=False):
        job.version_id = (job.version_id or 0) + 1


class History(Base):
    """One row per recorded transition: from, to, trigger, who or which event, why, when."""

    __tablename__ = "history"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("job.id", ondelete="CASCADE"), index=True)
    from_state: Mapped[str | None] = mapped_column(String(20), nullable=True)
    to_state: Mapped[str] = mapped_column(String(20))
    trigger: Mapped[str] = mapped_column(String(50))
    event_id: Mapped[str | None] = mapped_column(String(200), nullable=True, index=True)
    actor: Mapped[str] = mapped_column(String(MAX_ACTOR))
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    job: Mapped[Job] = relationship(back_populates="history")


class ProcessedEvent(Base):
    """Every event id ever applied or rejected, written in the same transaction as its effects."""

    __tablename__ = "processed_event"

    event_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    job_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    outcome: Mapped[str] = mapped_column(String(20))
    # What the event said (a digest of its canonical form), so that its id reused for other content is told
    # apart from a redelivery; None for the service's own markers.
    digest: Mapped[str | None] = mapped_column(String(64), nullable=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Inbox(Base):
    """The embedded bus: publishers append events here; `serve` drains them in order."""

    __tablename__ = "inbox"

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    body: Mapped[str] = mapped_column(Text)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Outbox(Base):
    """Messages leaving the process (the work requests), written in the dispatching transaction: relayed to the
    broker after commit by the relay chore, or taken from here by embedded workers (`retracer work take`)."""

    __tablename__ = "outbox"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    routing_key: Mapped[str] = mapped_column(String(100), index=True)
    message_id: Mapped[str] = mapped_column(String(200), unique=True)
    body: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True, index=True)


class Rejected(Base):
    """An event that could not be applied, with the reason, until an admin replays it: kept whole up to
    MAX_REJECTED_BODY characters, else its first ones with its size and digest (a publisher must not be able
    to fill the disk with events nobody can apply)."""

    __tablename__ = "rejected"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    event_id: Mapped[str | None] = mapped_column(String(200), nullable=True, index=True)
    event_type: Mapped[str | None] = mapped_column(String(100), nullable=True)
    job_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    body: Mapped[str] = mapped_column(Text)
    body_bytes: Mapped[int | None] = mapped_column(Integer, nullable=True)
    body_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    truncated: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    # Made by the service itself (an upload's event): only then may a replay use a reserved id.
    minted: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    reason: Mapped[str] = mapped_column(Text)
    at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    replayed_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)


class Mail(Base):
    """A notification to one recipient for one transition; unique per (job, transition, recipient).

    A flood-control digest is a Mail too, with no job or transition of its own (job_id and history_id
    NULL, state "DIGEST"); the mails it replaces have status "digested" and digest_of set to its id.
    Status: pending, sending (claimed by a sender until next_attempt_at), sent, failing (retried after
    next_attempt_at), failed (cannot be rendered or delivered: never retried), digested.
    """

    __tablename__ = "mail"
    __table_args__ = (UniqueConstraint("job_id", "history_id", "recipient", name="uq_mail_once"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[int | None] = mapped_column(Integer, index=True, nullable=True)
    history_id: Mapped[int | None] = mapped_column(ForeignKey("history.id", ondelete="CASCADE"), nullable=True)
    state: Mapped[str] = mapped_column(String(20))
    recipient: Mapped[str] = mapped_column(String(320), index=True)
    rationale: Mapped[str] = mapped_column(String(50))
    context: Mapped[dict[str, Any]] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(20), default="pending", index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    next_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    message_id: Mapped[str | None] = mapped_column(String(255), unique=True, nullable=True)
    digest_of: Mapped[int | None] = mapped_column(Integer, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)

    history: Mapped[History | None] = relationship()


class SpuriousPattern(Base):
    """An admin-registered regular expression: a failure whose error matches it is transient."""

    __tablename__ = "spurious_pattern"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    pattern: Mapped[str] = mapped_column(Text, unique=True)
    reason: Mapped[str] = mapped_column(Text)
    added_by: Mapped[str] = mapped_column(String(MAX_ACTOR))
    added_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Audit(Base):
    """Admin actions that are not job transitions (spurious patterns, replays), with who and why."""

    __tablename__ = "audit"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    actor: Mapped[str] = mapped_column(String(MAX_ACTOR))
    action: Mapped[str] = mapped_column(String(50))
    detail: Mapped[str] = mapped_column(Text)
    at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class SymbolArchive(Base):
    """A package (.deb, .ddeb) or a loose ELF file imported into the symbol index, indexed where it lies:
    its members are served from there. The same content (by SHA-256) is imported once."""

    __tablename__ = "symbol_archive"
    __table_args__ = (Index("ix_symbol_archive_package", "package", "version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    path: Mapped[str] = mapped_column(Text)
    sha256: Mapped[str] = mapped_column(String(64), unique=True)
    size: Mapped[int] = mapped_column(BigInteger)
    # "deb", "ddeb" or "file" (a loose ELF or debug file from a directory import).
    kind: Mapped[str] = mapped_column(String(10))
    package: Mapped[str | None] = mapped_column(String(200), nullable=True)
    version: Mapped[str | None] = mapped_column(String(200), nullable=True)
    architecture: Mapped[str | None] = mapped_column(String(50), nullable=True)
    imported_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    imported_by: Mapped[str] = mapped_column(String(MAX_ACTOR))

    files: Mapped[list[SymbolFile]] = relationship(back_populates="archive", cascade="all, delete-orphan")


class SymbolFile(Base):
    """One ELF member of an imported archive: its GNU build-id, whether it is an executable or library
    ("executable") or separate debug info ("debuginfo"), and where it lies inside the archive."""

    __tablename__ = "symbol_file"
    __table_args__ = (Index("ix_symbol_file_build_id", "build_id", "kind"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    archive_id: Mapped[int] = mapped_column(ForeignKey("symbol_archive.id", ondelete="CASCADE"), index=True)
    build_id: Mapped[str] = mapped_column(String(128))
    kind: Mapped[str] = mapped_column(String(10))
    member: Mapped[str] = mapped_column(Text)
    size: Mapped[int] = mapped_column(BigInteger)

    archive: Mapped[SymbolArchive] = relationship(back_populates="files")


class MissingSymbol(Base):
    """A build-id a worker could not find symbols for, for one job: what `retracer symbols missing` lists and
    what an import that brings it releases the job for."""

    __tablename__ = "missing_symbol"
    __table_args__ = (UniqueConstraint("job_id", "build_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("job.id", ondelete="CASCADE"), index=True)
    build_id: Mapped[str] = mapped_column(String(128), index=True)
    module: Mapped[str | None] = mapped_column(Text, nullable=True)
    recorded_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
