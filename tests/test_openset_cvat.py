"""The open-set loop on the CVAT test server: run, reviewers say "none of these", calibrate, run again.

The tiny test model has random weights, so which frames "fit no label" is planted as in
`test_calibrate_cvat.py` plants correctness: the reviewers call the quarter of the frames with
the lowest fit score (best image-text cosine) "none of these", deleting every tag on them and
resolving their issues, and confirm the model's top-1 elsewhere.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from cvat_sdk import make_client

from connectors.cvat.frames import JobFrameSource
from connectors.cvat.jobs import find_work
from connectors.cvat.session import CvatSession
from prelabel.assemble import build_pipeline
from prelabel.interface import Prediction
from prelabel.pipeline.worker import WorkerOptions, predict
from tests.conftest import run_cli, tiny_model_config
from tests.cvat_fixtures import LABELS, PASSWORD, Project, delete_tag, resolve_and_accept, tiny_args
from tests.cvat_server import sample_jpegs
from tests.test_calibrate_cvat import big_project, first_run  # noqa: F401  (fixture)


def predictions(
    project: Project, config_path: Path | None = None, **target: int
) -> dict[tuple[int, int], Prediction]:
    """What `run` would predict per (job, frame) of a target, in-process (calibration file applied)."""
    config = tiny_model_config(path=config_path)
    session = CvatSession(make_client(project.server.url, credentials=("annotator", PASSWORD)))
    work = find_work(session, **target, include_tagged=True, relabel=True)
    pipeline = build_pipeline(config, LABELS)
    options = WorkerOptions(batch_size=8, top_k=len(LABELS))
    return {
        (plan.job_id, p.ref.frame): p
        for plan in work.jobs
        for p in predict(
            JobFrameSource(session, plan).frames(), pipeline.loaded, pipeline.classifier, options
        )
    }


def test_none_of_these_frames_teach_the_floor_and_route_to_review(big_project: Project, tmp_path: Path):  # noqa: F811
    project, server = big_project, big_project.server
    calibration_file, config, state, common, env = first_run(project, tmp_path)
    before = predictions(project, project_id=project.project_id)
    assert all(p.fit is not None for p in before.values() if p.scores)

    # Reviewers, through the API: the lowest-fit quarter is "none of these" (every tag deleted,
    # issue resolved); elsewhere the model's top-1 stands. Then every job goes to acceptance.
    reviewer = make_client(server.url, credentials=("annotator", PASSWORD))
    fits = sorted(p.fit for p in before.values() if p.fit is not None)
    cut = fits[len(fits) // 4]
    none = {key for key, p in before.items() if p.fit is not None and p.fit < cut}
    for job in project.annotation_jobs():
        for tag in server.annotations(job["id"])["tags"]:
            if (job["id"], tag["frame"]) in none:
                delete_tag(reviewer, job["id"], tag)
    resolve_and_accept(reviewer, project)
    synced = run_cli("review", "sync", "--config", str(config), "--state", str(state), env=env)
    assert synced.returncode == 0, synced.stderr

    result = run_cli("calibrate", *common, "--target-precision", "0.8", *tiny_args(), env=env)
    assert result.returncode == 0, result.stderr + result.stdout
    learned = yaml.safe_load(calibration_file.read_text())
    assert learned["none_examples"] >= len(none) // 2, (learned["none_examples"], len(none))
    assert learned["fit_floor"] is not None
    assert (
        f"open set: fit floor {learned['fit_floor']:.3f}, learned with {learned['none_examples']}"
        in result.stdout
    )

    # eval: the open-set section, on the same ground truth
    report_dir = tmp_path / "report"
    evaluated = run_cli("eval", *common, "--out", str(report_dir), *tiny_args(), env=env)
    assert evaluated.returncode == 0, evaluated.stderr
    report = (report_dir / "report.md").read_text()
    assert "## Frames that fit no label (open set)" in report
    assert "## Label shares and the prior correction" in report

    # a new task: copies of the first job's frames of task "c", some of them "none of these"
    new_task = server.add_image_task(
        project.project_id, sample_jpegs(12, (96, 96), prefix="c_"), name="e", segment_size=12
    )
    second = run_cli("run", *common, *tiny_args(), env=env)
    assert second.returncode == 0, second.stderr
    (new_job,) = server.jobs(new_task)
    now = predictions(project, config, task_id=new_task)
    # A frame within `near` of the floor may fall either side of it: the run scores batches
    # of 32, this check batches of 8, and batched float sums differ in the last digits.
    near = 1e-4
    misfit = {frame for (_, frame), p in now.items() if p.fit < learned["fit_floor"] - near}
    fits = {frame for (_, frame), p in now.items() if p.fit > learned["fit_floor"] + near}
    assert misfit, "no frame of the new task is below the learned floor"
    issues = {issue["frame"]: issue for issue in server.issues(new_job["id"])}
    tags = {tag["frame"] for tag in server.annotations(new_job["id"])["tags"]}
    for frame in misfit:
        assert frame in issues and frame not in tags  # reviewed, and no suggestion tag
        (comment,) = server.comments(issues[frame]["id"])
        assert "no label fits (fit " in comment["message"], comment["message"]
    for frame in set(issues) & fits:
        (comment,) = server.comments(issues[frame]["id"])
        assert "no label fits" not in comment["message"]
    assert "no label fits:" in second.stdout
    assert server.violations == []
