"""The calibrate loop on the CVAT test server: run, review, sync, calibrate, eval, run again."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml
from cvat_sdk import make_client

from connectors.cvat.frames import JobFrameSource
from connectors.cvat.jobs import find_work
from connectors.cvat.session import CvatSession
from prelabel.assemble import build_pipeline
from prelabel.pipeline.worker import WorkerOptions, predict
from tests.conftest import run_cli, tiny_model_config
from tests.cvat_fixtures import LABELS, PASSWORD, Project, resolve_and_accept, tiny_args
from tests.cvat_server import sample_jpegs
from tests.test_review import _edit_tag, _label_names, _same_attributes


def probabilities(project: Project, **target: int) -> dict[tuple[int, int], dict[str, float]]:
    """Uncalibrated probabilities of every label per (job, frame) of a target, computed in-process."""
    config = tiny_model_config()
    session = CvatSession(make_client(project.server.url, credentials=("annotator", PASSWORD)))
    work = find_work(session, **target, include_tagged=True, relabel=True)
    pipeline = build_pipeline(config, LABELS)
    options = WorkerOptions(batch_size=8, top_k=len(LABELS))
    found = {}
    for plan in work.jobs:
        for p in predict(
            JobFrameSource(session, plan).frames(), pipeline.loaded, pipeline.classifier, options
        ):
            found[(plan.job_id, p.ref.frame)] = dict(p.scores)
    return found


def calibrated(scores: dict[str, float], temperature: float) -> tuple[str, float]:
    """Top-1 after temperature scaling: softmax(log p / T) equals softmax(logits / T)."""
    weights = {label: math.exp(math.log(max(p, 1e-30)) / temperature) for label, p in scores.items()}
    total = sum(weights.values())
    label = max(weights, key=weights.get)
    return label, weights[label] / total


@pytest.fixture
def big_project(project: Project) -> Project:
    """The shared project plus a task of 36 small frames, so that there is enough to calibrate on."""
    task = project.server.add_image_task(
        project.project_id, sample_jpegs(36, (96, 96), prefix="c_"), name="c", segment_size=12, chunk_size=6
    )
    project.image_tasks.append(task)
    return project


def first_run(project: Project, tmp_path: Path) -> tuple[Path, Path, Path, list[str], dict[str, str]]:
    """`setup`, then a first `run` of the project with a calibration config in `tmp_path`.

    Returns the calibration file, the config, the state file, the common CLI arguments
    (target, config, state) and the environment with the project's credentials.
    """
    calibration_file = tmp_path / "calibration.yaml"
    config = tmp_path / "config.yaml"
    config.write_text(
        "routing:\n  accept_threshold: 0.34\n  min_margin: 0.0\n"
        f"calibration:\n  path: {calibration_file}\n  min_examples: 20\n  confidence: 0.8\n"
    )
    state = tmp_path / "state.db"
    common = ["--project-id", str(project.project_id), "--config", str(config), "--state", str(state)]
    env = project.env()
    assert run_cli("setup", "--project-id", str(project.project_id), env=env).returncode == 0
    first = run_cli("run", *common, *tiny_args(), env=env)
    assert first.returncode == 0, first.stderr
    return calibration_file, config, state, common, env


def test_run_review_sync_calibrate_run(big_project: Project, tmp_path: Path):
    project, server = big_project, big_project.server
    calibration_file, config, state, common, env = first_run(project, tmp_path)
    old_scores = probabilities(project, project_id=project.project_id)  # before any review

    # Reviewers, through the API as in CVAT's UI: the model is right when it is confident.
    # Each review frame's issue is resolved; its suggestion is kept when its confidence is
    # in the upper half of review frames, else changed to another label. Accepted tags
    # below the median confidence are changed too. Then every job goes to acceptance.
    reviewer = make_client(server.url, credentials=("annotator", PASSWORD))
    names = _label_names(project)
    ids = {name: label_id for label_id, name in names.items()}
    conf_attr = {
        label["id"]: next(a["id"] for a in label["attributes"] if a["name"] == "confidence")
        for label in server.labels(project.project_id)
        if label["name"] in LABELS
    }
    tags = []
    for job in project.annotation_jobs():
        for tag in server.annotations(job["id"])["tags"]:
            confidence = next(
                float(a["value"]) for a in tag["attributes"] if a["spec_id"] == conf_attr[tag["label_id"]]
            )
            tags.append((confidence, job["id"], tag))
    median = sorted(c for c, _, _ in tags)[len(tags) // 2]
    truth = {}
    for confidence, job_id, tag in tags:
        label = names[tag["label_id"]]
        if confidence < median:
            label = LABELS[(LABELS.index(label) + 1) % len(LABELS)]
            _edit_tag(
                reviewer, job_id, tag, label_id=ids[label], source="semi-auto",
                attributes=_same_attributes(project, tag, ids[label]),
            )  # fmt: skip
        truth[(job_id, tag["frame"])] = label
    resolve_and_accept(reviewer, project)
    synced = run_cli("review", "sync", "--config", str(config), "--state", str(state), env=env)
    assert synced.returncode == 0, synced.stderr

    # calibrate: a threshold whose precision on these frames reaches the target
    result = run_cli("calibrate", *common, "--target-precision", "0.75", *tiny_args(), env=env)
    assert result.returncode == 0, result.stderr + result.stdout
    learned = yaml.safe_load(calibration_file.read_text())
    assert learned["examples"] == len(truth)
    assert learned["accept_threshold"] != 0.34 and learned["temperature"] > 0
    assert f"accept threshold 0.340 -> {learned['accept_threshold']:.3f}" in result.stdout
    accepted = [
        (label, key) for key, scores in old_scores.items()
        if key in truth
        for label, p in [calibrated(scores, learned["temperature"])]
        if p >= learned["accept_threshold"] - 1e-6
    ]  # fmt: skip
    hits = sum(truth[key] == label for label, key in accepted)
    assert accepted and hits / len(accepted) >= 0.75
    assert len(accepted) / len(truth) == pytest.approx(learned["expected_coverage"], abs=0.02)

    # eval: the report, over the same ground truth, with the calibration applied
    report_dir = tmp_path / "report"
    evaluated = run_cli("eval", *common, "--out", str(report_dir), *tiny_args(), env=env)
    assert evaluated.returncode == 0, evaluated.stderr
    assert f"{len(truth)} frames: top-1" in evaluated.stdout
    assert "calibration applied" in evaluated.stdout
    for plot in ("reliability.png", "risk_coverage.png", "confidence.png"):
        assert (report_dir / plot).stat().st_size > 5_000
    assert f"{len(truth)} accepted job" in (report_dir / "report.md").read_text()

    # run again: the old jobs are untouched; a new task is labeled with the learned thresholds
    before = {job["id"]: server.annotations(job["id"]) for job in project.annotation_jobs()}
    issues_before = server.issues()
    new_task = server.add_image_task(
        project.project_id, sample_jpegs(12, (128, 96), prefix="d_"), name="d", segment_size=12
    )
    second = run_cli("run", *common, *tiny_args(), env=env)
    assert second.returncode == 0, second.stderr
    assert {job_id: server.annotations(job_id) for job_id in before} == before
    assert [i for i in server.issues() if i["job_id"] in before] == issues_before
    (new_job,) = server.jobs(new_task)
    expected = {
        frame
        for (_, frame), scores in probabilities(project, task_id=new_task).items()
        if calibrated(scores, learned["temperature"])[1] >= learned["accept_threshold"] - 1e-6
    }
    reviewed = {issue["frame"] for issue in server.issues(new_job["id"])}
    tagged = {tag["frame"] for tag in server.annotations(new_job["id"])["tags"]}
    assert tagged - reviewed == expected
    assert reviewed == set(range(12)) - expected
    assert server.violations == []
