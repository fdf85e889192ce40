"""`prelabel setup` and `prelabel run` against the CVAT test server, through the real cvat-sdk.

The CLI runs as a user runs it (in-process, through the console entry point's error handling:
see `run_cli`); the test reads the results back through
cvat-sdk over HTTP and checks them against the server's own records.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from cvat_sdk import make_client

from tests.conftest import TINY_MODEL, run_cli
from tests.cvat_fixtures import LABELS, PASSWORD, Project, build_project, expected_top1, tiny_args
from tests.cvat_server import CvatTestServer


def test_setup_is_idempotent_and_changes_nothing_else(project: Project):
    before = {label["name"]: label for label in project.server.labels(project.project_id)}
    first = run_cli("setup", "--project-id", str(project.project_id), env=project.env())
    assert first.returncode == 0, first.stderr
    assert "added confidence, model, needs_review" in first.stdout

    after = {label["name"]: label for label in project.server.labels(project.project_id)}
    for name in LABELS:
        attributes = {attr["name"]: attr for attr in after[name]["attributes"]}
        assert attributes["confidence"]["input_type"] == "number"
        assert attributes["confidence"]["values"] == ["0", "100", "1"]
        assert attributes["model"]["input_type"] == "text"
        assert attributes["needs_review"]["input_type"] == "checkbox"
        assert {k: v for k, v in after[name].items() if k != "attributes"} == {
            k: v for k, v in before[name].items() if k != "attributes"
        }
    assert after["outline"] == before["outline"]  # not a tag label: untouched

    project.server.reset_counters()
    second = run_cli("setup", "--project-id", str(project.project_id), env=project.env())
    assert second.returncode == 0, second.stderr
    assert "nothing changed" in second.stdout
    assert project.server.write_count == 0
    assert project.server.labels(project.project_id) == list(after.values())


def test_run_tags_or_reviews_every_frame_and_leaves_human_tags_alone(project: Project, tmp_path: Path):
    assert run_cli("setup", "--project-id", str(project.project_id), env=project.env()).returncode == 0
    first_job = project.server.jobs(project.image_tasks[0])[0]["id"]
    human_tag = project.server.add_tag(first_job, 2, "rocket")
    human_before = project.server.annotations(first_job)["tags"]

    top1 = expected_top1(project)
    confidences = sorted(confidence for _, confidence in top1.values())
    threshold = confidences[len(confidences) // 2]  # about half the frames go to review
    result = run_cli(
        "run",
        "--project-id",
        str(project.project_id),
        *tiny_args("--accept-threshold", f"{threshold:.6f}", "--min-margin", "0"),
        env=project.env(),
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert "per label:" in result.stdout and "images/s" in result.stdout

    # Read back through cvat-sdk, over HTTP.
    client = make_client(project.server.url, credentials=("annotator", PASSWORD))
    reviewed = {
        (task_id, issue["frame"])
        for task_id in [*project.image_tasks, project.video_task]
        for job in project.server.jobs(task_id)
        for issue in project.server.issues(job["id"])
    }
    labels_by_id = {label.id: label for label in client.projects.retrieve(project.project_id).get_labels()}
    tagged: dict[tuple[int, int], list] = {}
    for task_id in [*project.image_tasks, project.video_task]:
        task = client.tasks.retrieve(task_id)
        for job in task.get_jobs():
            for tag in job.get_annotations().tags:
                tagged.setdefault((task_id, tag.frame), []).append(tag)
        frames = range(task.size)
        for frame in frames:
            key = (task_id, frame)
            if key in project.deleted:
                assert key not in tagged and key not in reviewed
                continue
            if key == (project.image_tasks[0], 2):  # the human's frame: skipped, untouched
                assert [tag.id for tag in tagged[key]] == [human_tag]
                assert key not in reviewed
                continue
            # Every frame has exactly one tag: accepted, or the suggestion of a review frame.
            (tag,) = tagged[key]
            assert tag.source == "auto"
            label = labels_by_id[tag.label_id]
            assert label.name == top1[key][0]
            values = {
                attr.name: value.value
                for value in tag.attributes
                for attr in label.attributes
                if attr.id == value.spec_id
            }
            assert 0 <= int(values["confidence"]) <= 100
            assert values["model"] == f"{TINY_MODEL}/random-seed0"
            assert values["needs_review"] == ("true" if key in reviewed else "false")
    assert tagged and reviewed, "the threshold should split the frames between tags and review"
    assert project.server.annotations(first_job)["tags"][: len(human_before)] == human_before
    assert project.server.violations == []


def test_dry_run_writes_nothing(project: Project):
    assert run_cli("setup", "--project-id", str(project.project_id), env=project.env()).returncode == 0
    before = project.snapshot()
    project.server.reset_counters()
    result = run_cli("run", "--project-id", str(project.project_id), "--dry-run", env=project.env())
    assert result.returncode == 0, result.stderr
    assert "dry run: would label" in result.stdout
    assert "21 frames in 5 jobs" in result.stdout  # 7 + (6 - 2 deleted) + 10
    assert project.server.write_count == 0
    assert project.snapshot() == before


def test_limit_caps_the_frames(project: Project):
    assert run_cli("setup", "--project-id", str(project.project_id), env=project.env()).returncode == 0
    result = run_cli(
        "run",
        "--task-id",
        str(project.image_tasks[0]),
        "--limit",
        "5",
        *tiny_args("--accept-threshold", "0", "--min-margin", "0"),
        env=project.env(),
    )
    assert result.returncode == 0, result.stderr
    tags = [
        tag
        for job in project.server.jobs(project.image_tasks[0])
        for tag in project.server.annotations(job["id"])["tags"]
    ]
    assert sorted(tag["frame"] for tag in tags) == [0, 1, 2, 3, 4]


def test_ground_truth_and_consensus_jobs_are_skipped(project: Project):
    assert run_cli("setup", "--project-id", str(project.project_id), env=project.env()).returncode == 0
    task = project.image_tasks[0]
    gt_job = project.server.add_ground_truth_job(task, [0, 3])
    replica = project.server.add_consensus_replicas(project.server.jobs(task)[0]["id"])[0]
    result = run_cli("run", "--task-id", str(task), "--dry-run", env=project.env())
    assert result.returncode == 0, result.stderr
    assert f"job {gt_job}: skipped, a ground truth job" in result.stdout
    assert f"job {replica}: skipped, a consensus replica job" in result.stdout


def test_finished_jobs_are_left_as_they_are(project: Project, tmp_path: Path):
    server = project.server
    assert run_cli("setup", "--project-id", str(project.project_id), env=project.env()).returncode == 0
    accepted, completed = (job["id"] for job in server.jobs(project.image_tasks[0]))
    client = make_client(server.url, credentials=("annotator", PASSWORD))
    client.jobs.retrieve(accepted).update({"stage": "acceptance"})  # signed off, its frames untagged
    client.jobs.retrieve(completed).update({"state": "completed"})

    def as_they_are() -> dict:
        return {
            job: (server.job(job), server.annotations(job), server.issues(job))
            for job in (accepted, completed)
        }

    before = as_they_are()
    result = run_cli(
        "run", "--project-id", str(project.project_id), *tiny_args("--accept-threshold", "0.3"),
        env=project.env(), cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert f"job {accepted}: skipped, finished (stage acceptance, " in result.stdout
    assert f"job {completed}: skipped, finished (stage annotation, state completed)" in result.stdout
    assert as_they_are() == before
    others = [job["id"] for job in project.annotation_jobs() if job["id"] not in before]
    assert others and all(server.annotations(job)["tags"] or server.issues(job) for job in others)


def test_the_parent_of_consensus_replicas_is_left_as_it_is(project: Project, tmp_path: Path):
    # CVAT's consensus merge clears the parent's annotations and merges only into a parent at
    # stage annotation: pre-labels there would be lost, and routing could block the merge.
    # (CVAT gives every job of a consensus task its replicas; one job is enough here.)
    server = project.server
    assert run_cli("setup", "--project-id", str(project.project_id), env=project.env()).returncode == 0
    parent, other = (job["id"] for job in server.jobs(project.image_tasks[0]))
    replicas = server.add_consensus_replicas(parent, 2)

    def as_they_are() -> dict:
        return {
            job: (server.job(job), server.annotations(job), server.issues(job)) for job in [parent, *replicas]
        }

    before = as_they_are()
    result = run_cli(
        "run", "--task-id", str(project.image_tasks[0]), *tiny_args("--accept-threshold", "0.3"),
        env=project.env(), cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert f"job {parent}: skipped, its annotators work in its 2 consensus replica jobs" in result.stdout
    assert as_they_are() == before
    assert server.annotations(other)["tags"] or server.issues(other)


def untagged(target: Project) -> dict[int, set[int]]:
    """Job id -> its frames that are neither deleted nor tagged, for the jobs that have any."""
    found = {}
    for job in target.annotation_jobs():
        frames = set(range(job["start_frame"], job["stop_frame"] + 1))
        frames -= {frame for task, frame in target.deleted if task == job["task_id"]}
        frames -= {tag["frame"] for tag in target.server.annotations(job["id"])["tags"]}
        if frames:
            found[job["id"]] = frames
    return found


def test_a_state_file_serves_one_server(project: Project, tmp_path: Path):
    # A second server built by the same calls has the same job, task and frame numbers. Read
    # through the first server's state file, each of its frames would look like one whose tag
    # a person removed: nothing would ever be labeled there.
    state = tmp_path / "state.db"
    tiny = tiny_args("--accept-threshold", "0", "--min-margin", "0")

    def run(target: Project, state_file: Path):
        return run_cli(
            "run", "--project-id", str(target.project_id), "--state", str(state_file), *tiny,
            env=target.env(), cwd=tmp_path,
        )  # fmt: skip

    with CvatTestServer() as other_server:
        other = build_project(other_server)
        for target in (project, other):
            assert run_cli("setup", "--project-id", str(target.project_id), env=target.env()).returncode == 0
        assert run(project, state).returncode == 0
        state_before = state.read_bytes()

        other_server.reset_counters()
        target = ("--project-id", str(other.project_id))
        for refused in (
            run(other, state),
            run_cli("run", *target, "--state", str(state), "--dry-run", env=other.env(), cwd=tmp_path),
            run_cli("review", "sync", "--state", str(state), env=other.env(), cwd=tmp_path),
            run_cli("eval", *target, "--state", str(state), *tiny_args(), env=other.env(), cwd=tmp_path),
            run_cli(
                "serve", "--listen", "127.0.0.1:0", "--state", str(state),
                env=other.env(PRELABEL_WEBHOOK_SECRET="a secret"), cwd=tmp_path,
            ),
        ):  # fmt: skip
            assert refused.returncode != 0 and "Traceback" not in refused.stderr
            (line,) = [text for text in refused.stderr.splitlines() if text.startswith("error:")]
            assert f"the CVAT server {project.server.url}, not of {other.server.url}" in line
        assert other_server.write_count == 0 and state.read_bytes() == state_before

        assert run(other, tmp_path / "other.db").returncode == 0  # its own state file
        assert untagged(other) == {}
        assert run(project, state).returncode == 0  # and the first server's still works


def test_a_trial_with_limit_leaves_its_jobs_where_they_are(project: Project, tmp_path: Path):
    # With accepted jobs routed to acceptance, a trial that routed its cut-short job there
    # would have every later run skip that job as finished, its other frames never labeled.
    server = project.server
    config = tmp_path / "config.yaml"
    config.write_text("review:\n  accepted_stage: acceptance\n")
    state = tmp_path / "state.db"
    jobs = [job["id"] for job in project.annotation_jobs()]

    def run(*extra: str):
        result = run_cli(
            "run", "--project-id", str(project.project_id), "--config", str(config), "--state", str(state),
            *tiny_args("--accept-threshold", "0", "--min-margin", "0", *extra),
            env=project.env(), cwd=tmp_path,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        return result

    assert run_cli("setup", "--project-id", str(project.project_id), env=project.env()).returncode == 0
    before = {job: server.job(job) for job in jobs}
    run("--limit", "2")
    assert {job: server.job(job)["stage"] for job in jobs} == {job: before[job]["stage"] for job in jobs}
    assert len(server.annotations(jobs[0])["tags"]) == 2

    run()
    assert untagged(project) == {}
    assert {server.job(job)["stage"] for job in jobs} == {"acceptance"}


def test_a_server_rebuilt_at_the_same_address_is_labeled_again(tmp_path: Path):
    # A CVAT rebuilt from scratch (docker compose down -v; up) numbers its jobs from 1 again
    # at the same address. Its jobs are not the ones prelabel tagged before, so no frame of
    # theirs is one whose tag a person removed.
    state = tmp_path / "state.db"
    tiny = tiny_args("--accept-threshold", "0", "--min-margin", "0")

    def labeled(target: Project) -> dict[int, set[int]]:
        assert run_cli("setup", "--project-id", str(target.project_id), env=target.env()).returncode == 0
        result = run_cli(
            "run", "--project-id", str(target.project_id), "--state", str(state), *tiny,
            env=target.env(), cwd=tmp_path,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        return {
            job["id"]: {tag["frame"] for tag in target.server.annotations(job["id"])["tags"]}
            for job in target.annotation_jobs()
        }

    with CvatTestServer() as before:
        first = labeled(build_project(before))
        port = int(before.url.rsplit(":", 1)[1])
    assert all(first.values())
    with CvatTestServer(port=port) as rebuilt:
        assert labeled(build_project(rebuilt)) == first


@pytest.mark.parametrize(
    ("case", "fragment"),
    [
        ("wrong_password", "rejected the credentials"),
        ("unknown_project", "not found"),
        ("no_tag_labels", "has no labels of type tag or any"),
        ("missing_attributes", "run `prelabel setup --project-id"),
        ("config_label_unknown", "does not have: 'zebra'"),
        ("unreachable", "cannot reach the server"),
        ("no_credentials", "no CVAT credentials given"),
    ],
)
def test_errors_are_one_line_and_non_zero(project: Project, tmp_path: Path, case: str, fragment: str):
    project_id, env, extra = project.project_id, project.env(), []
    if case != "missing_attributes":
        assert run_cli("setup", "--project-id", str(project_id), env=env).returncode == 0
    if case == "wrong_password":
        env = project.env(CVAT_PASSWORD="wrong")
    elif case == "unknown_project":
        project_id = 999
    elif case == "no_tag_labels":
        project_id = project.server.add_project(
            "boxes only", owner="annotator", labels=[{"name": "box", "type": "rectangle", "attributes": []}]
        )
    elif case == "config_label_unknown":
        config = tmp_path / "config.yaml"
        config.write_text("labels:\n  - name: zebra\n    descriptions: [a zebra]\n")
        extra = ["--config", str(config)]
    elif case == "unreachable":
        env = project.env(CVAT_HOST="http://127.0.0.1:9")
    elif case == "no_credentials":
        env = {"CVAT_HOST": project.server.url, "CVAT_USERNAME": "", "CVAT_PASSWORD": ""}
    before = project.snapshot()
    project.server.reset_counters()
    result = run_cli("run", "--project-id", str(project_id), *extra, *tiny_args(), env=env)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and fragment in errors[0], result.stderr
    assert PASSWORD not in result.stderr + result.stdout
    assert project.server.write_count == 0
    assert project.snapshot() == before


def test_access_token_and_non_admin_visibility(project: Project):
    server = project.server
    assert run_cli("setup", "--project-id", str(project.project_id), env=project.env()).returncode == 0
    server.add_user("outsider", "outsider-pass")
    server.add_token("outsider", "outsider-token")
    denied = run_cli(
        "run",
        "--project-id",
        str(project.project_id),
        "--dry-run",
        env={"CVAT_HOST": server.url, "CVAT_ACCESS_TOKEN": "outsider-token"},
    )
    assert denied.returncode != 0 and "permission denied" in denied.stderr
    server.add_token("annotator", "annotator-token")
    allowed = run_cli(
        "run",
        "--project-id",
        str(project.project_id),
        "--dry-run",
        env={"CVAT_HOST": server.url, "CVAT_ACCESS_TOKEN": "annotator-token"},
    )
    assert allowed.returncode == 0, allowed.stderr
    assert "annotator-token" not in allowed.stdout + allowed.stderr
