"""Writing one job's decisions to CVAT: accepted frames become auto tags.

Tags are created with ``PATCH /api/jobs/{id}/annotations?action=create`` in bounded
batches. The sink only ever creates: it never updates or deletes an annotation. It refuses
to write a tag outside the job's frames, which real CVAT would silently accept.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from cvat_sdk import Client, models

from connectors.cvat.connect import failing_as
from connectors.cvat.frames import CvatFrameRef
from connectors.cvat.jobs import JobPlan
from connectors.cvat.labels import CvatLabel, tag_payload
from prelabel.interface import Decision


@dataclass
class ReviewItem:
    """A frame that needs a human, with the model's candidates."""

    job_id: int
    task_id: int
    frame: int
    name: str
    reason: str
    candidates: tuple[tuple[str, float], ...]


@dataclass
class JobResult:
    """What was written for one job."""

    tags_created: list[int] = field(default_factory=list)
    review: list[ReviewItem] = field(default_factory=list)


class TagSink:
    """Uploads accepted decisions of one job as auto tags; collects the review items."""

    def __init__(
        self,
        client: Client,
        plan: JobPlan,
        labels: dict[str, CvatLabel],
        model_identity: str,
        *,
        batch_size: int = 100,
    ) -> None:
        self.client = client
        self.plan = plan
        self.labels = labels
        self.model_identity = model_identity
        self.batch_size = batch_size
        self.result = JobResult()
        self._pending: list[dict] = []
        self._job_frames = set(plan.job_frames)

    def write(self, decision: Decision) -> None:
        ref: CvatFrameRef = decision.prediction.ref
        if ref.job_id != self.plan.job_id or ref.frame not in self._job_frames:
            raise ValueError(f"frame {ref.frame} is not in job {self.plan.job_id}")
        if not decision.accepted:
            prediction = decision.prediction
            self.result.review.append(
                ReviewItem(
                    job_id=ref.job_id,
                    task_id=self.plan.task_id,
                    frame=ref.frame,
                    name=prediction.name,
                    reason=decision.reason or "",
                    candidates=prediction.scores,
                )
            )
            return
        for label_name, probability in decision.tags:
            label = self.labels[label_name]
            self._pending.append(
                tag_payload(label, ref.frame, probability, self.model_identity, needs_review=False)
            )
        if len(self._pending) >= self.batch_size:
            self._flush()

    def close(self) -> None:
        self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        batch, self._pending = self._pending, []
        request = models.PatchedLabeledDataRequest(
            version=0,
            tags=[_tag_request(tag) for tag in batch],
            shapes=[],
            tracks=[],
        )
        with failing_as(f"uploading {len(batch)} tags to job {self.plan.job_id}"):
            # The schema declares no body, but CVAT answers with the created objects.
            _, response = self.client.api_client.jobs_api.partial_update_annotations(
                "create", self.plan.job_id, patched_labeled_data_request=request, _parse_response=False
            )
            created = json.loads(response.data)
        self.result.tags_created.extend(tag["id"] for tag in created.get("tags", []))


def _tag_request(tag: dict) -> models.LabeledImageRequest:
    attributes = [models.AttributeValRequest(**attribute) for attribute in tag["attributes"]]
    return models.LabeledImageRequest(**{**tag, "attributes": attributes})
