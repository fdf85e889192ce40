"""The review queue inside CVAT, idempotent reruns, crash resume and --relabel."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cvat_sdk import make_client, models

from tests.conftest import run_cli
from tests.cvat_fixtures import (
    LABELS,
    PASSWORD,
    Project,
    build_project,
    delete_tag,
    expected_top1,
    patch_tag,
    server_state,
    split_threshold,
    tiny_args,
)
from tests.cvat_server import CvatTestServer

REVIEWERS = ["rev-a", "rev-b"]


def write_config(tmp_path: Path, threshold: float, **review) -> Path:
    lines = [
        "routing:",
        f"  accept_threshold: {threshold!r}",
        "  min_margin: 0.0",
        "cvat:",
        "  upload_batch_size: 2",
        "review:",
        f"  reviewers: {json.dumps(review.pop('reviewers', REVIEWERS))}",
        *(f"  {key}: {json.dumps(value)}" for key, value in review.items()),
    ]
    path = tmp_path / "config.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def prepare(project: Project) -> dict[str, int]:
    """Reviewer accounts, and the label attributes, as an admin would set them up.

    The runs below are made by an admin: outside an organization CVAT shows a regular user
    no other user, so only an admin can hand jobs to reviewers there.
    """
    ids = {name: project.server.add_user(name, "pw") for name in REVIEWERS}
    project.server.add_user("lead", "lead-password", is_superuser=True)
    result = run_cli("setup", "--project-id", str(project.project_id), env=lead_env(project))
    assert result.returncode == 0, result.stderr
    return ids


def lead_env(project: Project) -> dict[str, str]:
    return project.env(CVAT_USERNAME="lead", CVAT_PASSWORD="lead-password")


def run_args(project: Project, config: Path, state: Path, *extra: str) -> list[str]:
    return [
        "run", "--project-id", str(project.project_id), "--config", str(config), "--state", str(state),
        *tiny_args(*extra),
    ]  # fmt: skip


def test_review_flow_in_cvat(project: Project, tmp_path: Path):
    reviewer_ids = prepare(project)
    top1 = expected_top1(project)
    config = write_config(tmp_path, split_threshold(project))
    state = tmp_path / "state.db"
    result = run_cli(*run_args(project, config, state), env=lead_env(project))
    assert result.returncode == 0, result.stderr

    server = project.server
    review_frames = set()
    for job in project.annotation_jobs():
        record = server.job(job["id"])
        issues = server.issues(job["id"])
        tags = {tag["frame"]: tag for tag in server.annotations(job["id"])["tags"]}
        for issue in issues:
            frame = issue["frame"]
            review_frames.add((job["task_id"], frame))
            width, height = _frame_size(project, job["id"], frame)
            assert issue["position"] == [0.0, 0.0, float(width), float(height)]
            (comment,) = server.comments(issue["id"])
            message = comment["message"]
            label, confidence = top1[(job["task_id"], frame)]
            assert message.startswith(f"prelabel: low confidence {confidence:.0%} (margin ")
            assert f"Candidates: {label} {confidence:.0%}, " in message
            assert len(message) <= 500
            assert _attribute(server, job, tags[frame], "needs_review") == "true"  # the suggestion
            assert _label_names(project)[tags[frame]["label_id"]] == label
        if issues:
            assert record["stage"] == "annotation" and record["state"] == "new"
            assert record["assignee_id"] == reviewer_ids[REVIEWERS[job["id"] % 2]]
        else:
            assert record["stage"] == "validation"
            assert record["assignee_id"] is None
    assert review_frames and len(review_frames) < len(top1)

    # review list: the same frames, with direct links
    listed = run_cli("review", "list", "--state", str(state), "--format", "json")
    assert listed.returncode == 0, listed.stderr
    items = json.loads(listed.stdout)
    assert {(item["task"], item["frame"]) for item in items} == review_frames
    for item in items:
        assert item["link"] == f"{server.url}/tasks/{item['task']}/jobs/{item['job']}?frame={item['frame']}"
    margins = [_margin(item["candidates"]) for item in items]
    assert margins == sorted(margins), "the least certain frames come first"

    # A reviewer, through the API: resolves one issue (keeping the suggestion) and gives
    # another frame a different label (CVAT marks an edited auto tag semi-auto).
    resolved_item, changed_item = items[0], items[1]
    issue = next(i for i in server.issues(resolved_item["job"]) if i["frame"] == resolved_item["frame"])
    reviewer = _client(project)
    reviewer.api_client.issues_api.partial_update(
        issue["id"], patched_issue_write_request=models.PatchedIssueWriteRequest(resolved=True)
    )
    tag = next(
        t for t in server.annotations(changed_item["job"])["tags"] if t["frame"] == changed_item["frame"]
    )
    names = _label_names(project)
    other = next(
        label_id for label_id, name in names.items() if name in LABELS and label_id != tag["label_id"]
    )
    _edit_tag(
        reviewer, changed_item["job"], tag, label_id=other, source="semi-auto",
        attributes=_same_attributes(project, tag, other),
    )  # fmt: skip

    synced = run_cli("review", "sync", "--state", str(state), env=lead_env(project))
    assert synced.returncode == 0, synced.stderr
    assert "kept 1" in synced.stdout and "changed 1" in synced.stdout

    remaining = json.loads(run_cli("review", "list", "--state", str(state), "--format", "json").stdout)
    assert {(i["job"], i["frame"]) for i in remaining} == {(i["job"], i["frame"]) for i in items[2:]}
    handled = json.loads(run_cli("review", "list", "--state", str(state), "--format", "json", "--all").stdout)
    outcomes = {(i["job"], i["frame"]): i["outcome"] for i in handled}
    assert outcomes[(resolved_item["job"], resolved_item["frame"])] == "kept"
    assert outcomes[(changed_item["job"], changed_item["frame"])] == "changed"
    assert server.violations == []


def test_unknown_reviewer_fails_before_any_write(project: Project, tmp_path: Path):
    prepare(project)
    config = write_config(tmp_path, 0.5, reviewers=["rev-a", "nobody"])
    project.server.reset_counters()
    result = run_cli(*run_args(project, config, tmp_path / "state.db"), env=lead_env(project))
    assert result.returncode != 0
    assert "unknown reviewer 'nobody'" in result.stderr and "Traceback" not in result.stderr
    assert project.server.write_count == 0


def test_a_job_moved_to_another_stage_gets_the_configured_state(project: Project, tmp_path: Path):
    # CVAT sets a job whose stage changes to state new unless the request names the state:
    # a job already in the configured state must not end up new.
    prepare(project)
    lead = make_client(project.server.url, credentials=("lead", "lead-password"))
    jobs = [job["id"] for job in project.annotation_jobs()]
    for job in jobs:
        lead.api_client.jobs_api.partial_update(job, patched_job_write_request={"state": "in progress"})
    config = write_config(tmp_path, 1.0, stage="validation", state="in progress")  # every frame to review
    result = run_cli(*run_args(project, config, tmp_path / "state.db"), env=lead_env(project))
    assert result.returncode == 0, result.stderr
    assert all(project.server.issues(job) for job in jobs)
    assert {(project.server.job(job)["stage"], project.server.job(job)["state"]) for job in jobs} == {
        ("validation", "in progress")
    }


def test_second_run_writes_nothing(project: Project, tmp_path: Path):
    prepare(project)
    config = write_config(tmp_path, split_threshold(project))
    state = tmp_path / "state.db"
    assert run_cli(*run_args(project, config, state), env=lead_env(project)).returncode == 0
    before = server_state(project)
    project.server.reset_counters()
    again = run_cli(*run_args(project, config, state), env=lead_env(project))
    assert again.returncode == 0, again.stderr
    assert project.server.write_count == 0
    assert server_state(project) == before
    # Even with the state file gone, the server's state alone prevents any duplicate.
    fresh = run_cli(*run_args(project, config, tmp_path / "other.db"), env=lead_env(project))
    assert fresh.returncode == 0, fresh.stderr
    assert project.server.write_count == 0


def test_second_concurrent_run_is_refused(project: Project, tmp_path: Path):
    from prelabel.state import RunState

    prepare(project)
    state = tmp_path / "state.db"
    with RunState(state):
        result = run_cli(*run_args(project, write_config(tmp_path, 0.5), state), env=lead_env(project))
    assert result.returncode != 0
    assert "only one prelabel run at a time" in result.stderr and "Traceback" not in result.stderr


def _start_run(project: Project, config: Path, state: Path) -> subprocess.Popen:
    """`prelabel run` in the background, to be killed at some point."""
    return subprocess.Popen(
        [sys.executable, "-m", "prelabel", *run_args(project, config, state)],
        env={**os.environ, **lead_env(project)},
        cwd=state.parent,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _kill_when(process: subprocess.Popen, ready, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        if ready():
            process.send_signal(signal.SIGKILL)
            break
        time.sleep(0.002)
    process.wait()


def _clean_run_state(tmp_path: Path, config: Path) -> dict[str, set]:
    with CvatTestServer() as server:
        clean = build_project(server)
        prepare(clean)
        result = run_cli(*run_args(clean, config, tmp_path / "clean.db"), env=lead_env(clean))
        assert result.returncode == 0, result.stderr
        return server_state(clean)


@pytest.mark.parametrize("kill_point", ["after 1 write", "after 5 writes", "after an issue, before its tag"])
def test_resume_after_sigkill_matches_a_clean_run(project: Project, tmp_path: Path, kill_point: str):
    prepare(project)
    config = write_config(tmp_path, split_threshold(project))
    expected = _clean_run_state(tmp_path, config)
    server = project.server
    server.set_global_delay(0.05, methods=["POST", "PATCH"])  # room to kill between writes
    server.reset_counters()
    state = tmp_path / "state.db"
    process = _start_run(project, config, state)
    if kill_point == "after an issue, before its tag":
        _kill_when(process, lambda: any(r.method == "POST" and "/issues" in r.path for r in server.requests))
    else:
        count = int(kill_point.split()[1])
        _kill_when(process, lambda: server.write_count >= count)
    assert process.returncode == -signal.SIGKILL, "the run finished before the kill point"
    server.set_global_delay(0)

    rerun = run_cli(*run_args(project, config, state), env=lead_env(project))
    assert rerun.returncode == 0, rerun.stderr
    assert server_state(project) == expected
    assert server.violations == []


def test_random_sigkills_converge(project: Project, tmp_path: Path):
    seed = int(os.environ.get("PRELABEL_TEST_SEED", random.randrange(1 << 30)))
    print(f"random kill seed: {seed}")
    rng = random.Random(seed)
    prepare(project)
    config = write_config(tmp_path, split_threshold(project))
    expected = _clean_run_state(tmp_path, config)
    server = project.server
    server.set_global_delay(0.05, methods=["POST", "PATCH"])
    state = tmp_path / "state.db"
    kills = int(os.environ.get("PRELABEL_TEST_KILLS", "6"))  # more for a soak: PRELABEL_TEST_KILLS=50
    killed = 0
    for _ in range(kills):  # each run resumes what the killed one left
        server.reset_counters()
        process = _start_run(project, config, state)
        target = rng.randint(1, 8)
        _kill_when(process, lambda target=target: server.write_count >= target)
        killed += process.returncode == -signal.SIGKILL
    # A run that finds too little left to write finishes before its kill point; the first
    # ones must have been killed, or this test would not test recovery at all.
    assert killed >= 1, f"no run was killed mid-way (seed {seed})"
    print(f"killed {killed} of {kills} runs")
    server.set_global_delay(0)
    final = run_cli(*run_args(project, config, state), env=lead_env(project))
    assert final.returncode == 0, final.stderr
    assert server_state(project) == expected, f"seed {seed}"


def test_relabel_replaces_only_prelabels_own_work(project: Project, tmp_path: Path):
    prepare(project)
    config = write_config(tmp_path, split_threshold(project))
    state = tmp_path / "state.db"
    server = project.server
    first_job = project.annotation_jobs()[0]["id"]
    human = server.add_tag(first_job, 0, "cat")
    assert run_cli(*run_args(project, config, state), env=lead_env(project)).returncode == 0

    # A reviewer edits one suggestion (CVAT marks an edited auto tag semi-auto).
    suggestion = next(
        tag
        for job in project.annotation_jobs()
        for tag in server.annotations(job["id"])["tags"]
        if tag["source"] == "auto" and _attribute(server, job, tag, "needs_review") == "true"
    )
    suggestion_job = next(
        job["id"] for job in project.annotation_jobs()
        if any(t["id"] == suggestion["id"] for t in server.annotations(job["id"])["tags"])
    )  # fmt: skip
    _edit_tag(_client(project), suggestion_job, suggestion, source="semi-auto")
    keep = {
        tag["id"]: tag
        for job in project.annotation_jobs()
        for tag in server.annotations(job["id"])["tags"]
        if tag["source"] != "auto"
    }
    assert human in keep and suggestion["id"] in keep

    result = run_cli(*run_args(project, config, state, "--relabel"), env=lead_env(project))
    assert result.returncode == 0, result.stderr
    after = {
        tag["id"]: tag for job in project.annotation_jobs() for tag in server.annotations(job["id"])["tags"]
    }
    for tag_id, tag in keep.items():
        assert after[tag_id] == tag, "a human's or reviewer's tag changed"
    relabeled = [tag for tag in after.values() if tag["source"] == "auto"]
    assert relabeled, "prelabel's own tags were written again"
    per_frame = {}
    for job in project.annotation_jobs():
        for tag in server.annotations(job["id"])["tags"]:
            per_frame.setdefault((job["id"], tag["frame"]), []).append(tag)
    assert all(len(tags) == 1 for tags in per_frame.values()), "no frame has two tags"
    assert server.violations == []


def test_tags_a_reviewer_removed_are_never_written_again(project: Project, tmp_path: Path):
    from prelabel.state import RunState

    prepare(project)
    config = write_config(tmp_path, split_threshold(project))
    state = tmp_path / "state.db"
    server = project.server
    assert run_cli(*run_args(project, config, state), env=lead_env(project)).returncode == 0

    # A reviewer removes an accepted tag ("none of these") and a suggestion, whose issue stays open.
    ours: dict[str, tuple[int, dict]] = {}  # needs_review -> the first such tag and its job
    for job in project.annotation_jobs():
        for tag in server.annotations(job["id"])["tags"]:
            ours.setdefault(_attribute(server, job, tag, "needs_review"), (job["id"], tag))
    assert set(ours) == {"false", "true"}
    removed = {(job_id, tag["frame"]) for job_id, tag in ours.values()}
    for job_id, tag in ours.values():
        delete_tag(_client(project), job_id, tag)
    open_issues = {
        (job["id"], i["id"]) for job in project.annotation_jobs() for i in server.issues(job["id"])
    }
    before = server_state(project)

    dry = run_cli(*run_args(project, config, state, "--dry-run"), env=lead_env(project))  # as the run plans
    assert dry.returncode == 0 and "\n  0 frames in 0 jobs" in dry.stdout, dry.stdout
    project.server.reset_counters()
    again = run_cli(*run_args(project, config, state), env=lead_env(project))
    assert again.returncode == 0, again.stderr
    assert project.server.write_count == 0 and server_state(project) == before

    relabeled = run_cli(*run_args(project, config, state, "--relabel"), env=lead_env(project))
    assert relabeled.returncode == 0, relabeled.stderr
    assert "whose tags people removed)" in relabeled.stdout
    tagged = {
        (job["id"], t["frame"])
        for job in project.annotation_jobs()
        for t in server.annotations(job["id"])["tags"]
    }
    assert not removed & tagged, "a tag a reviewer removed was written again"
    suggestion_job, suggestion = ours["true"]
    kept = {i["id"] for i in server.issues(suggestion_job) if i["frame"] == suggestion["frame"]}
    assert kept and {(suggestion_job, issue) for issue in kept} <= open_issues  # its issue is left open

    synced = run_cli("review", "sync", "--config", str(config), "--state", str(state), env=lead_env(project))
    assert synced.returncode == 0, synced.stderr
    with RunState(state, lock=False) as records:
        outcomes = {(o.job_id, o.frame): o.outcome for o in records.outcomes()}
    assert outcomes[(ours["false"][0], ours["false"][1]["frame"])] == "deleted"
    assert server.violations == []


def _client(project: Project):
    return make_client(project.server.url, credentials=("annotator", PASSWORD))


def _label_names(project: Project) -> dict[int, str]:
    return {label["id"]: label["name"] for label in project.server.labels(project.project_id)}


def _frame_size(project: Project, job_id: int, frame: int) -> tuple[int, int]:
    job = _client(project).jobs.retrieve(job_id)
    entries = job.get_meta().frames
    entry = entries[0] if len(entries) == 1 else entries[frame - job.start_frame]
    return entry.width, entry.height


def _attribute(server, job: dict, tag: dict, name: str) -> str | None:
    (label,) = [lb for lb in server.labels(1) if lb["id"] == tag["label_id"]]  # the only project
    specs = {a["id"]: a["name"] for a in label["attributes"]}
    return next((a["value"] for a in tag["attributes"] if specs.get(a["spec_id"]) == name), None)


def _same_attributes(project: Project, tag: dict, label_id: int) -> list[dict]:
    """The tag's attribute values moved to another label's attributes of the same names."""
    labels = {label["id"]: label for label in project.server.labels(project.project_id)}
    names = {a["id"]: a["name"] for a in labels[tag["label_id"]]["attributes"]}
    specs = {a["name"]: a["id"] for a in labels[label_id]["attributes"]}
    return [{"spec_id": specs[names[a["spec_id"]]], "value": a["value"]} for a in tag["attributes"]]


def _edit_tag(client, job_id: int, tag: dict, **changes) -> None:
    """Change a tag as CVAT's UI does: PATCH action=update with the whole tag."""
    patch_tag(client, job_id, {**tag, **changes}, "update")


def _margin(candidates: str) -> float:
    scores = [int(part.rsplit(" ", 1)[1].rstrip("%")) for part in candidates.split(", ")] + [0, 0]
    return scores[0] - scores[1]


def _review_state(path: Path, frames: int = 360) -> dict[tuple[int, int], tuple[list, str]]:
    """A state file with `frames` frames over 12 jobs, about half routed to review, some of
    those handled by a reviewer; (job, frame) -> (scores, outcome) of each review frame."""
    from prelabel.state import Outcome, RunState

    rng = random.Random(7)
    review: dict[tuple[int, int], tuple[list, str]] = {}
    with RunState(path) as state:
        state.set_meta("host", "http://cvat.example:8080")
        for index in range(frames):
            job, frame = 100 + index % 12, index
            top = round(rng.uniform(0.3, 0.9), 2)  # ties in margin and label on purpose
            scores = [(rng.choice(["cat", "dog", "fox"]), top), ("other", round(rng.uniform(0, 1 - top), 2))]
            decision = "review" if rng.random() < 0.5 else "accept"
            state.record_decision(
                job_id=job, frame=frame, task_id=job // 10, name=f"f{frame}.jpg", fingerprint="x",
                scores=tuple(scores), decision=decision, reason="low confidence",
            )  # fmt: skip
            if decision == "review":
                outcome = rng.choice(["pending", "pending", "kept", "changed"])
                if outcome != "pending" or rng.random() < 0.5:  # a synced 'pending' and none at all alike
                    state.record_outcome(Outcome(job, frame, scores[0][0], "review", outcome, [], None))
                review[(job, frame)] = ([list(pair) for pair in scores], outcome)
    return review


def test_review_list_pages_are_disjoint_and_complete_in_either_order(tmp_path: Path):
    from prelabel.review import review_page
    from prelabel.state import RunState

    path = tmp_path / "state.db"
    review = _review_state(path)

    def margin(key):
        scores = review[key][0]
        return scores[0][1] - scores[1][1]

    expected_orders = {
        "margin": lambda key: (margin(key), *key),
        "label": lambda key: (review[key][0][0][0], margin(key), *key),
    }
    with RunState(path, lock=False) as state:
        for handled in (False, True):
            wanted = [key for key in review if handled or review[key][1] == "pending"]
            for order, sort_key in expected_orders.items():
                pages, offset = [], 0
                while True:
                    page = review_page(state, include_handled=handled, order=order, limit=40, offset=offset)
                    assert page.total == len(wanted) and page.offset == offset
                    pages.append([(item.job_id, item.frame) for item in page.items])
                    offset += 40
                    if not page.more:
                        break
                listed = [key for keys in pages for key in keys]
                assert len(pages) == -(-len(wanted) // 40) and all(len(keys) == 40 for keys in pages[:-1])
                assert len(set(listed)) == len(listed), "pages overlap"
                assert listed == sorted(wanted, key=sort_key), (order, handled)
        everything = review_page(state, include_handled=True, limit=None).items
        assert {(i.job_id, i.frame): i.outcome for i in everything} == {k: v[1] for k, v in review.items()}


def test_review_list_cli_pages_in_every_format(tmp_path: Path):
    path = tmp_path / "state.db"
    review = _review_state(path)
    pending = sum(outcome == "pending" for _, outcome in review.values())
    base = ("review", "list", "--state", str(path), "--limit", "25")

    first = run_cli(*base, "--format", "json")
    second = run_cli(*base, "--format", "json", "--page", "2")
    rows = json.loads(first.stdout) + json.loads(second.stdout)
    assert len(rows) == 50 and len({(r["job"], r["frame"]) for r in rows}) == 50
    assert f"frames 26-50 of {pending} to review (--page 3: the next 25)" in second.stderr
    every = json.loads(run_cli(*base[:4], "--format", "json", "--limit", "0").stdout)
    assert [(r["job"], r["frame"]) for r in every[:50]] == [(r["job"], r["frame"]) for r in rows]
    assert len(every) == pending

    table = run_cli(*base, "--page", "2").stdout.splitlines()
    assert len(table) == 26 and table[0].startswith(
        f"http://cvat.example:8080/tasks/{rows[25]['task']}/jobs/"
    )
    assert table[-1] == f"frames 26-50 of {pending} to review (--page 3: the next 25)"
    default = run_cli("review", "list", "--state", str(path)).stdout.splitlines()
    assert len(default) == 51 and default[-1].startswith(f"frames 1-50 of {pending} to review")

    csv_rows = run_cli(*base, "--format", "csv", "--page", "2").stdout.splitlines()
    assert csv_rows[0].startswith("job,task,frame,") and len(csv_rows) == 26
    last = -(-pending // 25)
    tail = json.loads(run_cli(*base, "--format", "json", "--page", str(last)).stdout)
    assert len(tail) == pending - 25 * (last - 1)
    assert json.loads(run_cli(*base, "--format", "json", "--page", str(last + 1)).stdout) == []
