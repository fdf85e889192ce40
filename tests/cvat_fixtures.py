"""A CVAT project on the test server, shared by the CVAT tests, and helpers to inspect it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from cvat_sdk import Client, make_client, models

from connectors.cvat.frames import JobFrameSource
from connectors.cvat.jobs import find_work
from connectors.cvat.session import CvatSession
from prelabel.assemble import build_pipeline
from prelabel.pipeline.worker import predict
from tests.conftest import TINY_MODEL, tiny_model_config
from tests.cvat_server import CvatTestServer, sample_frames, sample_jpegs

LABELS = ["cat", "coffee", "rocket"]
PASSWORD = "correct horse battery staple"


@dataclass
class Project:
    server: CvatTestServer
    project_id: int
    image_tasks: list[int]
    video_task: int
    deleted: set[tuple[int, int]]
    """(task, frame) pairs deleted in CVAT."""

    def env(self, **extra: str) -> dict[str, str]:
        return {
            "CVAT_HOST": self.server.url,
            "CVAT_USERNAME": "annotator",
            "CVAT_PASSWORD": PASSWORD,
            **extra,
        }

    def annotation_jobs(self) -> list[dict]:
        return [job for task in [*self.image_tasks, self.video_task] for job in self.server.jobs(task)]

    def snapshot(self) -> dict:
        """Everything a run could change, to compare before and after."""
        return {
            "annotations": {job["id"]: self.server.annotations(job["id"]) for job in self.annotation_jobs()},
            "issues": self.server.issues(),
            "jobs": [self.server.job(job["id"]) for job in self.annotation_jobs()],
            "labels": self.server.labels(self.project_id),
        }


def tag_project(server: CvatTestServer, name: str, labels: Sequence[str] = LABELS) -> int:
    """A project whose labels are `labels`, as tag labels without attributes (`prelabel setup`
    adds them), owned by the user "annotator" (added here, with `PASSWORD`); returns its id."""
    server.add_user("annotator", PASSWORD)
    tags = [{"name": label, "type": "tag", "attributes": []} for label in labels]
    return server.add_project(name, owner="annotator", labels=tags)


def build_project(server: CvatTestServer) -> Project:
    """3 tag labels, 2 image tasks of 2 jobs each (one with deleted frames), 1 video task.

    The same calls on a new server give the same ids, so two servers can be compared.
    """
    server.add_user("annotator", PASSWORD)
    project_id = server.add_project(
        "pets and things",
        owner="annotator",
        labels=[{"name": name, "type": "tag", "attributes": []} for name in LABELS]
        + [{"name": "outline", "type": "rectangle", "attributes": []}],
    )
    first = server.add_image_task(
        project_id, sample_jpegs(7, prefix="a_"), name="a", segment_size=4, chunk_size=3
    )
    second = server.add_image_task(
        project_id,
        sample_jpegs(6, (352, 288), prefix="b_"),
        name="b",
        segment_size=3,
        chunk_size=2,
        deleted_frames=[1, 4],
    )
    video = server.add_video_task(project_id, sample_frames(10), name="clip", chunk_size=4)
    return Project(server, project_id, [first, second], video, {(second, 1), (second, 4)})


def tiny_args(*extra: str) -> list[str]:
    return ["--model", TINY_MODEL, "--pretrained", "none", "--no-progress", *extra]


def expected_top1(project: Project) -> dict[tuple[int, int], tuple[str, float]]:
    """The worker's top-1 (label, probability) per frame, computed in-process over the same chunks."""
    config = tiny_model_config()
    session = CvatSession(make_client(project.server.url, credentials=("annotator", PASSWORD)))
    work = find_work(session, project_id=project.project_id, include_tagged=True)
    pipeline = build_pipeline(config, LABELS)
    top1 = {}
    for plan in work.jobs:
        for prediction in predict(
            JobFrameSource(session, plan).frames(), pipeline.loaded, pipeline.classifier, pipeline.options
        ):
            top1[(plan.task_id, prediction.ref.frame)] = (prediction.top_label, prediction.confidence)
    return top1


def split_threshold(project: Project) -> float:
    """An accept threshold halfway between two frames' confidences: about half go to review."""
    confidences = sorted({confidence for _, confidence in expected_top1(project).values()})
    middle = len(confidences) // 2
    return (confidences[middle - 1] + confidences[middle]) / 2


def server_state(project: Project) -> dict[str, set]:
    """Tags, issues and job fields of the project, as sets without server ids."""
    server = project.server
    tags, issues, jobs = set(), set(), set()
    for job in project.annotation_jobs():
        for tag in server.annotations(job["id"])["tags"]:
            values = tuple(sorted((a["spec_id"], a["value"]) for a in tag["attributes"]))
            tags.add((job["id"], tag["frame"], tag["label_id"], tag["source"], values))
        for issue in server.issues(job["id"]):
            messages = tuple(c["message"] for c in server.comments(issue["id"]))
            issues.add((job["id"], issue["frame"], tuple(issue["position"]), issue["resolved"], messages))
        record = server.job(job["id"])
        jobs.add((job["id"], record["stage"], record["state"], record.get("assignee_id")))
    return {"tags": tags, "issues": issues, "jobs": jobs}


def resolve_and_accept(reviewer: Client, project: Project) -> None:
    """As a reviewer in CVAT's UI: resolve every issue, then move every annotation job to acceptance."""
    for issue in project.server.issues():
        reviewer.api_client.issues_api.partial_update(
            issue["id"], patched_issue_write_request=models.PatchedIssueWriteRequest(resolved=True)
        )
    for job in project.annotation_jobs():
        reviewer.api_client.jobs_api.partial_update(
            job["id"], patched_job_write_request=models.PatchedJobWriteRequest(stage="acceptance")
        )


def delete_tag(client, job_id: int, tag: dict) -> None:
    """Delete a tag as CVAT's UI does: PATCH action=delete."""
    patch_tag(client, job_id, tag, "delete")


def patch_tag(client, job_id: int, tag: dict, action: str) -> None:
    """One tag, whole, in `PATCH /api/jobs/{id}/annotations?action=...` (``update`` or ``delete``)."""
    request = models.PatchedLabeledDataRequest(
        version=0,
        tags=[
            models.LabeledImageRequest(
                id=tag["id"],
                frame=tag["frame"],
                label_id=tag["label_id"],
                source=tag["source"],
                group=tag.get("group") or 0,
                attributes=[
                    models.AttributeValRequest(spec_id=a["spec_id"], value=a["value"])
                    for a in tag["attributes"]
                ],
            )
        ],
        shapes=[],
        tracks=[],
    )
    client.api_client.jobs_api.partial_update_annotations(
        action, job_id, patched_labeled_data_request=request
    )
