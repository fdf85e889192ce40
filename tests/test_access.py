"""Two traps of a real CVAT (issue 20): a read-only access token, and a project in an organization.

The test server models both as CVAT 2.73 does (tests/cvat_server/access.py): a read-only
token's writes get a bare 403 and `GET /api/auth/access_tokens/self` tells the flag; an
organization's jobs are listed only in its context. The CLI runs as a subprocess.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from cvat_sdk import make_client
from cvat_sdk.api_client.exceptions import ApiException

from tests.conftest import TINY_MODEL, run_cli
from tests.cvat_fixtures import LABELS, PASSWORD, Project, tiny_args
from tests.cvat_server import CvatTestServer, sample_jpegs


def _errors(result) -> list[str]:
    assert "Traceback" not in result.stderr, result.stderr
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


# ------------------------------------------------------------------ read-only token


def test_the_test_server_refuses_a_read_only_tokens_writes_as_cvat_does(project: Project):
    server = project.server
    server.add_token("annotator", "ro-token", read_only=True)
    client = make_client(server.url, access_token="ro-token")
    job_id = project.annotation_jobs()[0]["id"]
    client.jobs.retrieve(job_id)  # reading is allowed
    with pytest.raises(ApiException) as refused:
        client.api_client.jobs_api.partial_update(job_id, patched_job_write_request={"state": "in progress"})
    assert refused.value.status == 403
    body = refused.value.body
    assert "You do not have permission" in (body.decode() if isinstance(body, bytes) else body)
    token, _ = client.api_client.auth_api.retrieve_access_tokens_self()
    assert token.read_only is True and token.owner.username == "annotator"


@pytest.mark.parametrize("command", ["setup", "run", "webhook install", "serve"])
def test_a_read_only_token_stops_every_writing_command_at_once(project: Project, command: str):
    server = project.server
    assert run_cli("setup", "--project-id", str(project.project_id), env=project.env()).returncode == 0
    server.add_token("annotator", "ro-token", read_only=True)
    env = {"CVAT_HOST": server.url, "CVAT_ACCESS_TOKEN": "ro-token", "PRELABEL_WEBHOOK_SECRET": "s3cret"}
    args = {
        "setup": ["setup", "--project-id", str(project.project_id)],
        "run": ["run", "--project-id", str(project.project_id), "--relabel", *tiny_args()],
        "webhook install": [
            "webhook",
            "install",
            "--project-id",
            str(project.project_id),
            "--url",
            "http://x/",
        ],
        "serve": ["serve", "--listen", "127.0.0.1:0"],
    }[command]
    before = project.snapshot()
    server.reset_counters()
    result = run_cli(*args, env=env)
    assert result.returncode != 0
    errors = _errors(result)
    assert len(errors) == 1, result.stderr
    assert f"`prelabel {command}` writes to CVAT" in errors[0] and "read-only" in errors[0]
    assert "Personal access tokens" in errors[0]
    assert "ro-token" not in result.stdout + result.stderr
    # Stopped right after logging in: nothing planned, no model loaded, nothing written.
    paths = {request.path.rstrip("/") for request in server.requests}
    assert paths <= {"/api/server/about", "/api/users/self", "/api/auth/access_tokens/self"}, paths
    assert "labeling" not in result.stdout and "frames in" not in result.stdout
    assert server.write_count == 0
    assert project.snapshot() == before


def test_a_read_only_token_may_still_look(project: Project):
    server = project.server
    assert run_cli("setup", "--project-id", str(project.project_id), env=project.env()).returncode == 0
    server.add_token("annotator", "ro-token", read_only=True)
    env = {"CVAT_HOST": server.url, "CVAT_ACCESS_TOKEN": "ro-token"}
    result = run_cli("run", "--project-id", str(project.project_id), "--dry-run", env=env)
    assert result.returncode == 0, result.stderr
    assert "dry run: would label" in result.stdout


def test_a_write_token_runs(project: Project):
    server = project.server
    server.add_token("annotator", "rw-token")
    env = {"CVAT_HOST": server.url, "CVAT_ACCESS_TOKEN": "rw-token"}
    result = run_cli("setup", "--project-id", str(project.project_id), env=env)
    assert result.returncode == 0, result.stderr
    assert "added confidence, model, needs_review" in result.stdout


# ------------------------------------------------------------------ organizations


@pytest.fixture
def org_server():
    """Organization 'acme' (owner olga, maintainer maria, worker walt) holding a project of
    6 images in 3 jobs; an admin; eve, who is in no organization; a personal project of maria."""
    with CvatTestServer() as server:
        for name in ("olga", "maria", "walt", "eve"):
            server.add_user(name, PASSWORD)
        server.add_user("root", PASSWORD, is_superuser=True)
        server.add_organization("acme", owner="olga")
        server.add_organization("other", owner="eve")
        server.add_member("acme", "maria", "maintainer")
        server.add_member("acme", "walt", "worker")
        labels = [{"name": name, "type": "tag", "attributes": []} for name in LABELS]
        project = server.add_project("acme pets", owner="olga", labels=labels, organization="acme")
        task = server.add_image_task(project, sample_jpegs(6, prefix="o_"), name="o", segment_size=2)
        personal = server.add_project("mine", owner="maria", labels=labels)
        server.add_image_task(personal, sample_jpegs(2, prefix="p_"), name="p", segment_size=2)
        server.org_project, server.org_task, server.personal_project = project, task, personal
        yield server


def _env(server, user: str) -> dict[str, str]:
    return {"CVAT_HOST": server.url, "CVAT_USERNAME": user, "CVAT_PASSWORD": PASSWORD}


def test_the_webhook_service_works_on_each_task_in_its_own_organization(org_server, tmp_path: Path):
    # `prelabel serve` knows no target when it starts: each delivery's task (or job) is worked
    # on in its organization, the next one in its own, as `run` does with its target.
    from connectors.cvat.perform import CvatWork
    from connectors.cvat.session import CvatSession
    from prelabel.config import load_config

    for project in (org_server.org_project, org_server.personal_project):
        assert run_cli("setup", "--project-id", str(project), env=_env(org_server, "maria")).returncode == 0
    config = tmp_path / "config.yaml"
    config.write_text(f'model: {{name: "{TINY_MODEL}", pretrained: none}}\n')
    client = make_client(org_server.url, credentials=("maria", PASSWORD))
    work = CvatWork(CvatSession(client), load_config(config), tmp_path / "state.db")
    tasks = org_server.state.tasks
    personal = next(t for t in tasks if tasks[t]["project_id"] == org_server.personal_project)
    later = org_server.add_image_task(
        org_server.org_project, sample_jpegs(2, prefix="l_"), name="l", segment_size=2
    )
    wanted = {org_server.org_task: "3 jobs labeled, 6 frames", personal: "1 jobs labeled, 2 frames"}
    wanted[later] = "1 jobs labeled, 2 frames"
    for task, says in wanted.items():
        done = work({"kind": "label_task", "project_id": None, "task_id": task})
        assert done.startswith(f"task {task}: {says},"), done


def test_reviewers_in_an_organization_are_its_members(org_server, tmp_path: Path):
    # users.rego: in an organization the user list holds its members, for an admin too
    setup = run_cli("setup", "--project-id", str(org_server.org_project), env=_env(org_server, "olga"))
    assert setup.returncode == 0, setup.stderr
    for user, reviewer, found in (("maria", "walt", True), ("root", "eve", False)):
        config = tmp_path / f"{user}.yaml"
        config.write_text(f'review:\n  reviewers: ["{reviewer}"]\n')
        result = run_cli(
            "run", "--project-id", str(org_server.org_project), "--dry-run", "--config", str(config),
            env=_env(org_server, user),
        )  # fmt: skip
        if found:
            assert result.returncode == 0, result.stderr
        else:
            assert result.returncode != 0 and "Traceback" not in result.stderr
            assert f"unknown reviewer '{reviewer}'" in result.stderr and "its members" in result.stderr


def test_the_test_server_lists_an_organizations_jobs_only_in_its_context(org_server):
    client = make_client(org_server.url, credentials=("root", PASSWORD))
    project = org_server.org_project
    assert client.projects.retrieve(project).organization is not None
    assert client.api_client.jobs_api.list(project_id=project)[0].count == 0
    client.organization_slug = "acme"
    assert client.api_client.jobs_api.list(project_id=project)[0].count == 3
    client.organization_slug = "nope"
    with pytest.raises(ApiException) as unknown:
        client.api_client.jobs_api.list(project_id=project)
    assert unknown.value.status == 404


@pytest.mark.parametrize("user", ["root", "maria"])
def test_an_organizations_project_is_worked_on_in_its_organization(org_server, user: str):
    """Admin and maintainer alike: without --org, prelabel says it follows the organization,
    plans every job (never "0 frames" for work it merely did not see), and labels them."""
    project, env = str(org_server.org_project), _env(org_server, user)
    setup = run_cli("setup", "--project-id", project, env=env)
    assert setup.returncode == 0, setup.stderr
    assert "belongs to organization 'acme': working in it (--org acme)" in setup.stderr
    dry = run_cli("run", "--project-id", project, "--dry-run", env=env)
    assert dry.returncode == 0, dry.stderr
    assert "6 frames in 3 jobs" in dry.stdout
    explicit = run_cli("run", "--project-id", project, "--dry-run", "--org", "acme", env=env)
    assert explicit.returncode == 0, explicit.stderr
    assert explicit.stdout == dry.stdout and "working in it" not in explicit.stderr

    result = run_cli("run", "--project-id", project, *tiny_args(), env=env)
    assert result.returncode == 0, result.stderr
    jobs = org_server.jobs(org_server.org_task)
    labeled = {
        (job["id"], tag["frame"]) for job in jobs for tag in org_server.annotations(job["id"])["tags"]
    } | {(issue["job_id"], issue["frame"]) for issue in org_server.issues()}
    assert len(labeled) == 6  # every frame got a tag or went to review


def test_a_worker_runs_the_job_assigned_to_them_in_the_organization(org_server):
    job_id = org_server.jobs(org_server.org_task)[1]["id"]
    org_server.assign("job", job_id, "walt")
    env = _env(org_server, "olga")
    assert run_cli("setup", "--project-id", str(org_server.org_project), env=env).returncode == 0
    result = run_cli("run", "--job-id", str(job_id), "--dry-run", env=_env(org_server, "walt"))
    assert result.returncode == 0, result.stderr
    assert "working in it" in result.stderr and "2 frames in 1 jobs" in result.stdout

    # CVAT lets a job's assignee write its annotations, not move it to another stage
    # (jobs.rego: update:stage is for the task's staff): the tags stay, the job stays put.
    before = org_server.job(job_id)
    args = ("run", "--job-id", str(job_id), *tiny_args("--accept-threshold", "0", "--min-margin", "0"))
    for attempt, says in enumerate(
        ("job left as it is (CVAT lets only the owner", "skipped, nothing to label")
    ):
        result = run_cli(*args, env=_env(org_server, "walt"))
        assert result.returncode == 0, result.stderr
        assert says in result.stdout, attempt
        assert {tag["frame"] for tag in org_server.annotations(job_id)["tags"]} == {
            before["start_frame"],
            before["stop_frame"],
        }
        assert {key: org_server.job(job_id)[key] for key in ("stage", "state", "assignee_id")} == {
            key: before[key] for key in ("stage", "state", "assignee_id")
        }


def test_relabel_by_a_job_s_assignee_leaves_the_issues_they_may_not_delete(org_server):
    # issues.rego: only an issue's owner, the task's staff or an organization maintainer may
    # delete it. The refused deletion comes before any of the frame's tags are touched.
    job_id = org_server.jobs(org_server.org_task)[1]["id"]
    org_server.assign("job", job_id, "walt")
    owner = _env(org_server, "olga")
    assert run_cli("setup", "--project-id", str(org_server.org_project), env=owner).returncode == 0
    to_review = tiny_args("--accept-threshold", "1", "--min-margin", "0")  # every frame: an issue by olga
    assert run_cli("run", "--job-id", str(job_id), *to_review, env=owner).returncode == 0
    before = (org_server.annotations(job_id), org_server.issues(job_id))
    assert len(before[1]) == 2

    result = run_cli("run", "--job-id", str(job_id), "--relabel", *to_review, env=_env(org_server, "walt"))
    assert result.returncode != 0 and "Traceback" not in result.stderr
    (line,) = [text for text in result.stderr.splitlines() if text.startswith("error:")]
    assert "removing prelabel's issue from frame" in line and "permission denied" in line
    assert (org_server.annotations(job_id), org_server.issues(job_id)) == before


@pytest.mark.parametrize(
    ("user", "extra", "fragment"),
    [
        ("eve", [], "'eve' may not see it"),
        ("root", ["--org", "other"], "belongs to organization 'acme', not to organization 'other'"),
        ("maria", ["--org", "acme", "--personal"], "in the personal workspace, not in organization 'acme'"),
    ],
)
def test_organization_mistakes_end_in_one_line(org_server, user: str, extra: list[str], fragment: str):
    project = org_server.org_project
    if "--personal" in extra:
        extra, project = [arg for arg in extra if arg != "--personal"], org_server.personal_project
    org_server.reset_counters()
    for command in (["setup"], ["run", "--dry-run"]):
        result = run_cli(*command, "--project-id", str(project), *extra, env=_env(org_server, user))
        assert result.returncode != 0
        errors = _errors(result)
        assert len(errors) == 1 and fragment in errors[0], result.stderr
        assert "--org" in errors[0]
        assert "frames in" not in result.stdout
    assert org_server.write_count == 0
