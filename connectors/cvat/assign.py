"""Routing a finished job in CVAT: who reviews it, and which stage and state it is in.

A job with review items goes to a reviewer (one of `review.reviewers`, round-robin by job
id or by least load) with the configured stage and state; a job whose frames were all
accepted moves to `review.accepted_stage`, so that a person spot-checks it. Only fields
that differ are written.
"""

from __future__ import annotations

from dataclasses import dataclass

from cvat_sdk import models

from connectors.cvat.errors import CvatError
from connectors.cvat.labels import text_value
from connectors.cvat.session import CvatSession
from prelabel.config import ReviewConfig


@dataclass(frozen=True)
class Reviewer:
    id: int
    username: str


def resolve_reviewers(session: CvatSession, usernames: list[str]) -> list[Reviewer]:
    """Look each username up; an unknown one is an error (raised before anything is written)."""
    reviewers = []
    for username in usernames:
        found = session.list_all(
            f"looking up reviewer {username!r}",
            session.client.api_client.users_api.list_endpoint,
            username=username,
        )
        match = [user for user in found if user.username == username]
        if not match:
            raise CvatError(
                f"unknown reviewer {username!r}: no CVAT user with that username is visible",
                hint="fix review.reviewers (usernames, not e-mail addresses); outside an organization "
                "CVAT shows a regular user no other users, so assigning reviewers needs an admin",
            )
        reviewers.append(Reviewer(match[0].id, username))
    return reviewers


def route_job(
    session: CvatSession, job_id: int, review_items: int, reviewers: list[Reviewer], config: ReviewConfig
) -> tuple[dict[str, object], str | None]:
    """Set the job's assignee, stage and state for its outcome; returns the fields written and
    the job's `updated_date` after them (ISO 8601), as the server answered."""
    jobs_api = session.client.api_client.jobs_api
    job, _ = session.call(f"reading job {job_id}", lambda: jobs_api.retrieve(job_id))
    current_assignee = job.assignee.id if job.assignee else None
    wanted: dict[str, object] = {}
    if review_items:
        wanted["stage"], wanted["state"] = config.stage, config.state
        if reviewers:
            wanted["assignee"] = _pick(session, job_id, current_assignee, reviewers, config.assign)
    elif config.accepted_stage is not None:
        wanted["stage"] = config.accepted_stage
    current = {"stage": text_value(job.stage), "state": text_value(job.state), "assignee": current_assignee}
    changes = {key: value for key, value in wanted.items() if current[key] != value}
    if changes:
        request = models.PatchedJobWriteRequest(**changes)  # setting fields: safe to repeat
        job, _ = session.call(
            f"updating job {job_id}",
            lambda: jobs_api.partial_update(job_id, patched_job_write_request=request),
        )
    date = getattr(job, "updated_date", None)
    return changes, date.isoformat() if date is not None else None


def _pick(session: CvatSession, job_id: int, current: int | None, reviewers: list[Reviewer], how: str) -> int:
    if current in {reviewer.id for reviewer in reviewers}:
        return current  # already with one of the reviewers: keep it there
    if how == "round_robin":
        return reviewers[job_id % len(reviewers)].id
    loads = []
    for reviewer in reviewers:
        page, _ = session.call(
            f"counting the jobs of reviewer {reviewer.username!r}",
            lambda reviewer=reviewer: session.client.api_client.jobs_api.list(
                assignee=reviewer.username, page_size=1
            ),
        )
        loads.append((page.count, reviewers.index(reviewer), reviewer.id))
    return min(loads)[2]
