"""Stale mails: a mail announces that its job entered a state; once the job has left it, the mail is not true.

A FAILEDTOUPLOAD mail still in the outbox when an admin rescues the job would ask people to rescue a job that
is already done. The sender checks each due mail here before sending it or folding it into a digest.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from retracer.mail.render import DIGEST
from retracer.store.models import History, Job

#: Ids per IN list: SQLite before 3.32 allows 999 parameters a statement.
CHUNK = 500


def chunks(ids: Sequence[int]) -> Iterable[Sequence[int]]:
    return (ids[i:i + CHUNK] for i in range(0, len(ids), CHUNK))


def stale_reasons(session: Session, mails: Iterable[tuple[int, int | None, int | None, str]]) -> dict[int, str]:
    """Which of ``mails`` (id, job, history row, state announced) are stale, with why, in two queries.

    Stale: the job's state now is not the one announced, or a transition after the mail's own took the job
    out of that state (it left and came back: a newer mail tells the newer story). A job that no longer
    exists is left alone (its mail is the last word on it)."""
    by_job: dict[int, list[tuple[int, int | None, str]]] = {}
    for mail_id, job_id, history_id, state in mails:
        if job_id is not None and state != DIGEST:
            by_job.setdefault(job_id, []).append((mail_id, history_id, state))
    if not by_job:
        return {}
    jobs = sorted(by_job)
    now: dict[int, str] = {}
    left: dict[tuple[int, str], int] = {}
    for chunk in chunks(jobs):
        now.update((job, state) for job, state in session.execute(select(Job.id, Job.state).where(Job.id.in_(chunk))))
        left.update(((job, str(state)), last) for job, state, last in session.execute(
            select(History.job_id, History.from_state, func.max(History.id))
            .where(History.job_id.in_(chunk), History.from_state != History.to_state)
            .group_by(History.job_id, History.from_state)))
    reasons: dict[int, str] = {}
    for job_id, rows in by_job.items():
        current = now.get(job_id)
        if current is None:
            continue
        for mail_id, history_id, state in rows:
            if current != state:
                reasons[mail_id] = f"not sent: job {job_id} is {current} now, no longer {state}"
            elif left.get((job_id, state), 0) > (history_id or 0):
                reasons[mail_id] = (f"not sent: job {job_id} left {state} after this mail was written and "
                                    f"came back (a newer mail tells that)")
    return reasons
