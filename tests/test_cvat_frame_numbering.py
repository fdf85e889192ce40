"""Frame numbering as CVAT does it: frame step, start frame, overlapping jobs, deleted frames.

`prelabel run` against the test server (which numbers frames as real CVAT 2.73 does, see
`test_stepped_offset_overlapping_video_numbers_frames_as_captured`), on a stepped, offset,
overlapping video task and a stepped, offset, overlapping image task with a deleted frame.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from cvat_sdk import make_client
from PIL import Image

from connectors.cvat.frames import CvatFrameRef, JobFrameSource
from connectors.cvat.jobs import find_work
from connectors.cvat.numbering import chunk_position, frame_step, media_frame
from connectors.cvat.session import CvatSession
from connectors.cvat.sink import CvatSink, SinkSettings
from prelabel.assemble import build_pipeline
from prelabel.interface import Decision, Frame, Prediction
from prelabel.pipeline.worker import predict
from prelabel.state import RunState
from tests.conftest import run_cli, tiny_model_config
from tests.cvat_fixtures import LABELS, PASSWORD, tag_project, tiny_args
from tests.cvat_server import CvatTestServer, sample_frames, sample_jpegs


def test_chunk_position_counts_filtered_frames_from_the_job_start():
    # The capture: job 206 covers relative frames 2-5, chunk size 3: chunk 0 holds 2, 3, 4.
    assert [chunk_position(2, frame, 3) for frame in range(2, 6)] == [(0, 0), (0, 1), (0, 2), (1, 0)]
    assert [media_frame(frame, 1, frame_step("step=2")) for frame in range(2, 6)] == [5, 7, 9, 11]
    assert frame_step("") == frame_step(None) == 1
    with pytest.raises(ValueError):
        chunk_position(2, 1, 3)


@pytest.fixture
def stepped():
    """A project with a video task (15 frames, start 1, stop 13, step 2: 7 task frames, jobs
    0-3, 2-5, 4-6) and an image task (11 images, start 1, step 2: 5 frames, overlap 1, jobs
    0-2 and 2-4, frame 3 deleted)."""
    with CvatTestServer() as server:
        project_id = tag_project(server, "stepped")
        video = server.add_video_task(
            project_id,
            sample_frames(15, (160, 120)),
            name="clip",
            segment_size=4,
            chunk_size=3,
            start_frame=1,
            stop_frame=13,
            frame_step=2,
        )
        images = server.add_image_task(
            project_id,
            sample_jpegs(11, (160, 120)),
            name="stills",
            segment_size=3,
            chunk_size=2,
            start_frame=1,
            frame_step=2,
            overlap=1,
            deleted_frames=[3],
        )
        env = {"CVAT_HOST": server.url, "CVAT_USERNAME": "annotator", "CVAT_PASSWORD": PASSWORD}
        yield server, project_id, {video: set(), images: {3}}, env


def _single_frame_scores(server: CvatTestServer, tasks: dict[int, set[int]]) -> dict:
    """(task, frame) -> the model's scores on the image CVAT's single-frame endpoint returns."""
    client = make_client(server.url, credentials=("annotator", PASSWORD))
    config = tiny_model_config()
    pipeline = build_pipeline(config, LABELS)
    frames = []
    for task_id in tasks:
        for job in server.jobs(task_id):
            for number in range(job["start_frame"], job["stop_frame"] + 1):
                _, response = client.api_client.jobs_api.retrieve_data(
                    job["id"], type="frame", number=number, quality="compressed", _parse_response=False
                )
                frames.append(Frame(ref=(task_id, number), name=str(number), data=response.data))
    scores = {}
    for prediction in predict(iter(frames), pipeline.loaded, pipeline.classifier, pipeline.options):
        scores[prediction.ref] = dict(prediction.scores)
    return scores


def _distance(a: dict[str, float], b: dict[str, float]) -> float:
    return max(abs(a.get(label, 0.0) - b.get(label, 0.0)) for label in LABELS)


def test_stepped_offset_overlapping_tasks_get_one_decision_per_frame_on_the_right_image(
    stepped, tmp_path: Path
):
    server, project_id, tasks, env = stepped
    assert run_cli("setup", "--project-id", str(project_id), env=env).returncode == 0
    single = _single_frame_scores(server, tasks)
    confidences = sorted(max(scores.values()) for scores in single.values())
    threshold = confidences[len(confidences) // 2]  # about half the frames go to review
    args = ["run", "--project-id", str(project_id), *tiny_args("--accept-threshold", f"{threshold:.6f}")]
    result = run_cli(*args, "--min-margin", "0", env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr

    decisions: dict[tuple[int, int], set] = {}
    for task_id, deleted in tasks.items():
        jobs = server.jobs(task_id)
        assert len(jobs) > 1 and jobs[0]["stop_frame"] >= jobs[1]["start_frame"]  # overlapping
        for job in jobs:
            tags = server.annotations(job["id"])["tags"]
            issues = {issue["frame"] for issue in server.issues(job["id"])}
            span = range(job["start_frame"], job["stop_frame"] + 1)
            assert {tag["frame"] for tag in tags} <= set(span) and issues <= set(span)
            for frame in span:
                ours = [tag for tag in tags if tag["frame"] == frame]
                if frame in deleted:
                    assert not ours and frame not in issues
                    continue
                (tag,) = ours  # exactly one decision per frame of every job
                review = {a["value"] for a in tag["attributes"]} & {"true"} == {"true"}
                assert review == (frame in issues)
                decisions.setdefault((task_id, frame), set()).add((tag["label_id"], review))
        # A shared frame has the same decision in each job: the task view shows one tag.
        view = server.task_annotations(task_id)["tags"]
        wanted = [frame for frame in range(jobs[-1]["stop_frame"] + 1) if frame not in deleted]
        assert sorted(tag["frame"] for tag in view) == wanted
    assert all(len(found) == 1 for found in decisions.values()), decisions
    assert server.violations == []

    # Each decision was made on the image CVAT shows for that frame, up to codec noise:
    # the stored scores are those of the frame's own single-frame image, not another's
    # (among the frames the random-weight model tells apart).
    with RunState(tmp_path / ".prelabel" / "state.db", lock=False) as state:
        records = state.frames()
    assert {(r.task_id, r.frame) for r in records} == set(decisions)
    told_apart = 0
    for record in records:
        stored, own_scores = dict(record.scores), single[(record.task_id, record.frame)]
        own = _distance(stored, own_scores)
        assert own < 0.02, (record.job_id, record.frame, own)
        for key, scores in single.items():
            if key[0] == record.task_id and _distance(own_scores, scores) > 0.1:
                assert _distance(stored, scores) > own
                told_apart += 1
    assert told_apart > len(records)

    # A rerun changes nothing.
    before = {job["id"]: server.annotations(job["id"]) for task in tasks for job in server.jobs(task)}
    issues_before = server.issues()
    server.reset_counters()
    again = run_cli(*args, "--min-margin", "0", env=env, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert server.write_count == 0
    assert {job["id"]: server.annotations(job["id"]) for task in tasks for job in server.jobs(task)} == before
    assert server.issues() == issues_before


def test_job_frame_source_yields_the_single_frame_endpoint_image_of_each_frame(stepped):
    """The frames `run` scores come from `JobFrameSource` over `find_work`'s plans: each is,
    up to codec noise, the image `GET /api/jobs/{id}/data?type=frame&number=N` returns for
    its frame, and no other frame's."""
    server, project_id, tasks, _ = stepped
    session = CvatSession(make_client(server.url, credentials=("annotator", PASSWORD)))
    work = find_work(session, project_id=project_id, include_tagged=True)
    assert {plan.task_id for plan in work.jobs} == set(tasks)
    for plan in work.jobs:
        expected = {}
        for number in plan.job_frames:
            _, response = session.client.api_client.jobs_api.retrieve_data(
                plan.job_id, type="frame", number=number, quality="compressed", _parse_response=False
            )
            expected[number] = np.asarray(Image.open(io.BytesIO(response.data)).convert("RGB"), np.int16)
        assert list(plan.frames) == [f for f in plan.job_frames if f not in tasks[plan.task_id]]
        for frame in JobFrameSource(session, plan).frames():
            assert frame.error is None and frame.ref.job_id == plan.job_id
            data = frame.data if isinstance(frame.data, Image.Image) else Image.open(io.BytesIO(frame.data))
            image = np.asarray(data.convert("RGB"), np.int16)
            errors = {number: np.abs(image - other).mean() for number, other in expected.items()}
            assert min(errors, key=errors.__getitem__) == frame.ref.frame, (plan.job_id, frame.ref, errors)
            assert errors[frame.ref.frame] < 8, errors


def test_the_sink_refuses_a_frame_outside_the_jobs_relative_range(stepped):
    server, project_id, _, env = stepped
    assert run_cli("setup", "--project-id", str(project_id), env=env).returncode == 0
    session = CvatSession(make_client(server.url, credentials=("annotator", PASSWORD)))
    work = find_work(session, project_id=project_id)
    plan = work.jobs[1]  # relative frames 2-5 of the video: media frames 5-11
    labels = {label.name: label for label in work.labels}
    server.reset_counters()
    for frame in (plan.start_frame - 1, plan.stop_frame + 1, media_frame(plan.stop_frame, 1, 2)):
        sink = CvatSink(session, plan, labels, SinkSettings(model_identity="m", fingerprint="f"))
        prediction = Prediction(CvatFrameRef(plan.job_id, frame), "outside", (("cat", 0.9),))
        with pytest.raises(ValueError, match="not in job"):
            sink.write(Decision(prediction, tags=(("cat", 0.9),)))
        sink.close()
    assert server.write_count == 0


def test_a_shared_frame_gets_the_decision_the_other_job_holds_on_the_server(stepped, tmp_path: Path):
    """Job by job, each with its own state file (as queue workers on two machines): the
    second job's shared frames take the first job's decision (all to review here), while its
    own frames follow this run's thresholds (all accepted)."""
    server, project_id, tasks, env = stepped
    assert run_cli("setup", "--project-id", str(project_id), env=env).returncode == 0
    video = next(iter(tasks))
    first, second = server.jobs(video)[:2]
    for job, threshold, cwd in ((first, "1", tmp_path / "a"), (second, "0", tmp_path / "b")):
        cwd.mkdir()
        args = tiny_args("--accept-threshold", threshold, "--min-margin", "0")
        result = run_cli("run", "--job-id", str(job["id"]), *args, env=env, cwd=cwd)
        assert result.returncode == 0, result.stderr
    shared = set(range(second["start_frame"], first["stop_frame"] + 1))
    assert shared
    jobs = (first, second)
    tags = {job["id"]: {tag["frame"]: tag for tag in server.annotations(job["id"])["tags"]} for job in jobs}
    issues = {job["id"]: {issue["frame"] for issue in server.issues(job["id"])} for job in jobs}
    assert issues[first["id"]] == set(range(first["start_frame"], first["stop_frame"] + 1))
    assert issues[second["id"]] == shared
    for frame in range(second["start_frame"], second["stop_frame"] + 1):
        tag = tags[second["id"]][frame]
        review = {a["value"] for a in tag["attributes"]} & {"true"} == {"true"}
        assert review == (frame in shared)
        if frame in shared:
            assert tag["label_id"] == tags[first["id"]][frame]["label_id"]
    assert server.violations == []


@pytest.mark.parametrize("quality", ["original", "compressed"])
def test_a_video_task_with_zip_chunks_is_read_in_either_quality(quality: str):
    """CVAT gives a video task made with `use_zip_chunks` compressed chunks of JPEGs but
    original chunks of video (cvat/apps/engine/task.py): each quality is decoded as what it
    is, and every frame is the image the single-frame endpoint shows for it."""
    with CvatTestServer() as server:
        project_id = tag_project(server, "zipped")
        task_id = server.add_video_task(
            project_id, sample_frames(9, (160, 120)), name="clip", chunk_size=4, use_zip_chunks=True
        )
        session = CvatSession(make_client(server.url, credentials=("annotator", PASSWORD)))
        (plan,) = find_work(session, task_id=task_id).jobs
        assert (plan.chunk_type, plan.original_chunk_type) == ("imageset", "video")
        expected = {}
        for number in plan.job_frames:
            _, response = session.client.api_client.jobs_api.retrieve_data(
                plan.job_id, type="frame", number=number, quality="original", _parse_response=False
            )
            expected[number] = np.asarray(Image.open(io.BytesIO(response.data)).convert("RGB"), np.int16)
        frames = list(JobFrameSource(session, plan, quality=quality).frames())
        assert [frame.ref.frame for frame in frames] == list(plan.job_frames)
        for frame in frames:
            assert frame.error is None, frame.error
            data = frame.data if isinstance(frame.data, Image.Image) else Image.open(io.BytesIO(frame.data))
            image = np.asarray(data.convert("RGB"), np.int16)
            errors = {number: np.abs(image - other).mean() for number, other in expected.items()}
            assert min(errors, key=errors.__getitem__) == frame.ref.frame, (frame.ref, errors)
        requests = [r for r in server.requests if r.query.get("type") == "chunk"]
        assert requests and all(r.query.get("quality") == quality for r in requests)
