"""`review sync`: reading back what reviewers did with prelabel's work, frame by frame.

For every frame the state file records, the job is read again and the frame gets one
outcome, stored with the frame's final labels (the ground truth later calibration uses):

- ``kept``: prelabel's tag is there with the label it predicted (for a review frame: the
  reviewer resolved the issue, or tagged the frame with the predicted label);
- ``changed``: the frame now carries another label than the one predicted;
- ``deleted``: prelabel's tag is gone and nothing replaced it;
- ``added``: a review frame that got no suggestion now carries a reviewer's tag;
- ``pending``: a review frame whose issue is still open and untouched.
"""

from __future__ import annotations

from collections import Counter

from connectors.cvat.existing import JobOnServer, read_job
from connectors.cvat.labels import candidate_labels
from connectors.cvat.session import CvatSession
from prelabel.state import FrameRecord, Outcome, RunState


def sync_reviews(session: CvatSession, state: RunState, job_ids: list[int] | None = None) -> Counter[str]:
    """Record an outcome for each frame of the given jobs (default: every job in the state)."""
    counts: Counter[str] = Counter()
    for job_id in job_ids or state.job_ids():
        labels = candidate_labels(
            session.list_all(
                f"reading the labels of job {job_id}",
                session.client.api_client.labels_api.list_endpoint,
                job_id=job_id,
            )
        )
        existing = read_job(session, job_id, {label.id: label for label in labels})
        for record in state.frames(job_id=job_id):
            outcome = frame_outcome(record, existing)
            state.record_outcome(outcome)
            counts[outcome.outcome] += 1
    return counts


def frame_outcome(record: FrameRecord, existing: JobOnServer) -> Outcome:
    """What became of one frame that prelabel decided."""
    frame = record.frame
    predicted = record.scores[0][0] if record.scores else None
    ours = [tag.label for tag in existing.tags.get(frame, [])]
    humans = existing.human_labels.get(frame, [])
    final = sorted(set(ours + humans))
    issues = existing.issues.get(frame, [])
    resolved = any(issue.resolved for issue in issues) if issues else None
    untouched = not humans and all(label == predicted for label in ours)
    if record.decision == "review" and resolved is False and untouched:
        kind = "pending"
    elif not final:
        kind = "deleted"
    elif final == [predicted]:
        kind = "kept"
    elif record.decision == "review" and not record.tag_ids and not ours:
        kind = "added"
    else:
        kind = "changed"
    return Outcome(record.job_id, frame, predicted, record.decision, kind, final, resolved)
