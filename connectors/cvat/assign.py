"""Routing a finished job in CVAT: who reviews it, and which stage and state it is in.

A job with review items goes to a reviewer (one of `review.reviewers`, round-robin by job
id or by least load) with the configured stage and state; a job whose frames were all
accepted moves to `review.accepted_stage`, so that a person spot-checks it. Only fields
that differ are written; CVAT sets a job whose stage changes to state ``new`` unless the
request names a state, so the configured state goes with a stage change. A job whose
assignee runs prelabel but who is not staff of its task cannot be routed (CVAT's jobs.rego:
``update:stage`` and ``update:assignee``): it keeps its labels and is left as it is.
"""

from __future__ import annotations

from dataclasses import dataclass

from cvat_sdk import models

from connectors.cvat.errors import CvatError, CvatPermissionError
from connectors.cvat.labels import text_value
from connectors.cvat.session import CvatSession
from prelabel.config import ReviewConfig

ROUTING_RIGHTS = (
    "CVAT lets only the owner or assignee of the job's task or project, an organization's "
    "maintainer or an admin change a job's stage or assignee"
)


@dataclass(frozen=True)
class Reviewer:
    id: int
    username: str


@dataclass(frozen=True)
class Routing:
    """What routing did to one job."""

    changes: dict[str, object]
    """The fields that changed (stage, state, assignee id), as the server answered."""
    updated_date: str | None
    """The job's `updated_date` after them (ISO 8601)."""
    refused: str | None = None
    """Why the server refused to change the job, which it left as it was; None if it did not."""


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
                hint="fix review.reviewers (usernames, not e-mail addresses); in an organization CVAT "
                "lists only its members, and outside one it shows a regular user no other users, so "
                "assigning reviewers there needs an admin",
            )
        reviewers.append(Reviewer(match[0].id, username))
    return reviewers


def route_job(
    session: CvatSession, job_id: int, review_items: int, reviewers: list[Reviewer], config: ReviewConfig
) -> Routing:
    """Set the job's assignee, stage and state for its outcome; a 403 leaves it as it is."""
    jobs_api = session.client.api_client.jobs_api
    job, _ = session.call(f"reading job {job_id}", lambda: jobs_api.retrieve(job_id))
    current = _fields(job)
    wanted: dict[str, object] = {}
    if review_items:
        wanted["stage"], wanted["state"] = config.stage, config.state
        if reviewers:
            wanted["assignee"] = _pick(session, job_id, current["assignee"], reviewers, config.assign)
    elif config.accepted_stage is not None:
        wanted["stage"] = config.accepted_stage
    changes = {key: value for key, value in wanted.items() if current[key] != value}
    if "stage" in changes and "state" in wanted:
        changes["state"] = wanted["state"]
    if changes:
        request = models.PatchedJobWriteRequest(**changes)  # setting fields: safe to repeat
        try:
            job, _ = session.call(
                f"updating job {job_id}",
                lambda: jobs_api.partial_update(job_id, patched_job_write_request=request),
            )
        except CvatPermissionError:
            return Routing({}, None, refused=ROUTING_RIGHTS)
    after = _fields(job)
    date = getattr(job, "updated_date", None)
    return Routing(
        {key: value for key, value in after.items() if current[key] != value},
        date.isoformat() if date is not None else None,
    )


def _fields(job) -> dict[str, object]:
    """The job's stage, state and assignee id, as routing sets them."""
    return {
        "stage": text_value(job.stage),
        "state": text_value(job.state),
        "assignee": job.assignee.id if job.assignee else None,
    }


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
