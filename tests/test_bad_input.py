"""Bad input against a CVAT server: one line, non-zero, no traceback, nothing written."""

from __future__ import annotations

import io
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest
from cvat_sdk import make_client

from tests.conftest import run_cli
from tests.cvat_fixtures import PASSWORD, Project, build_project, server_state, tag_project, tiny_args
from tests.cvat_server import CvatTestServer


def assert_one_line_error(result, fragment: str) -> None:
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and fragment in errors[0], result.stderr


def setup(project: Project) -> None:
    result = run_cli("setup", "--project-id", str(project.project_id), env=project.env())
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    ("case", "fragment"),
    [
        ("unknown_key", "model.batchsize: unknown key"),
        ("wrong_type", "routing.top_k: Input should be a valid integer"),
        ("threshold_out_of_range", "routing.accept_threshold: Input should be less than or equal to 1"),
        ("password_in_config", "cvat.password: unknown key"),
        ("unknown_task", "reading task 999: not found"),
        ("unknown_job", "reading job 999: not found"),
        ("revoked_token", "rejected the credentials"),
        ("both_targets", "give exactly one of --project-id, --task-id or --job-id"),
    ],
)
def test_bad_input_for_run(project: Project, tmp_path: Path, case: str, fragment: str):
    setup(project)
    args = ["--project-id", str(project.project_id)]
    env = project.env()
    config = tmp_path / "config.yaml"
    config.write_text("{}\n")
    if case == "unknown_key":
        config.write_text("model:\n  batchsize: 4\n")
    elif case == "wrong_type":
        config.write_text("routing:\n  top_k: five\n")
    elif case == "threshold_out_of_range":
        config.write_text("routing:\n  accept_threshold: 1.5\n")
    elif case == "password_in_config":
        config.write_text("cvat:\n  host: http://example.invalid\n  password: hunter2\n")
    elif case == "unknown_task":
        args = ["--task-id", "999"]
    elif case == "unknown_job":
        args = ["--job-id", "999"]
    elif case == "revoked_token":
        project.server.add_token("annotator", "soon-revoked")
        project.server.revoke_token("soon-revoked")
        env = {"CVAT_HOST": project.server.url, "CVAT_ACCESS_TOKEN": "soon-revoked"}
    elif case == "both_targets":
        args += ["--task-id", "1"]
    before = server_state(project)
    project.server.reset_counters()
    result = run_cli("run", *args, "--config", str(config), *tiny_args(), env=env)
    if case == "both_targets":  # a usage error: click's own two-line message, exit 2
        assert result.returncode == 2 and fragment in result.stderr and "Traceback" not in result.stderr
    else:
        assert_one_line_error(result, fragment)
    assert "hunter2" not in result.stderr + result.stdout
    assert project.server.write_count == 0
    assert server_state(project) == before


def test_unicode_and_spaces_in_label_names_simply_work(tmp_path: Path):
    names = ["chat noir 🐈", "Öl & Wein", "<b>bold</b>"]
    with CvatTestServer() as server:
        project = build_project(server)
        for name in names:
            server.add_label(project.project_id, {"name": name, "type": "tag", "attributes": []})
        setup(project)
        config = tmp_path / "config.yaml"
        config.write_text(f"labels:\n  - name: {names[0]!r}\n    descriptions: [a black cat]\n")
        result = run_cli(
            "run", "--project-id", str(project.project_id), "--config", str(config),
            *tiny_args("--accept-threshold", "0.3", "--min-margin", "0"), env=project.env(), cwd=tmp_path,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        for name in names:
            assert name in result.stdout.splitlines()[0]  # "project N: labels ..."
        messages = [comment["message"] for comment in server.comments()]
        assert all("\n" not in message and len(message) <= 500 for message in messages)
        assert server.violations == []


def _self_signed(tmp_path: Path) -> tuple[str, str]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a test certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    return str(cert), str(key)


def test_tls_failure_hints_at_ca_bundle_and_insecure_is_explicit(tmp_path: Path):
    cert, key = _self_signed(tmp_path)
    with CvatTestServer(tls=(cert, key)) as server:
        project = build_project(server)
        env = project.env()
        refused = run_cli("run", "--project-id", str(project.project_id), "--dry-run", env=env)
        assert_one_line_error(refused, "TLS certificate verification failed")
        assert "--ca-bundle" in refused.stderr

        trusted = run_cli("setup", "--project-id", str(project.project_id), "--ca-bundle", cert, env=env)
        assert trusted.returncode == 0, trusted.stderr
        insecure = run_cli("run", "--project-id", str(project.project_id), "--dry-run", "--insecure", env=env)
        assert insecure.returncode == 0, insecure.stderr
        assert "TLS certificate verification is OFF" in insecure.stderr


def test_least_privilege(project: Project, tmp_path: Path):
    server = project.server
    setup(project)
    server.add_user("helper", "helper-pass")
    server.add_user("stranger", "stranger-pass")
    server.assign("project", project.project_id, "helper")
    before = server_state(project)
    server.reset_counters()
    denied = run_cli(
        "run", "--project-id", str(project.project_id), *tiny_args(),
        env=project.env(CVAT_USERNAME="stranger", CVAT_PASSWORD="stranger-pass"),
    )  # fmt: skip
    assert_one_line_error(denied, "permission denied")
    assert server.write_count == 0 and server_state(project) == before

    allowed = run_cli(
        "run", "--project-id", str(project.project_id), *tiny_args(),
        env=project.env(CVAT_USERNAME="helper", CVAT_PASSWORD="helper-pass"), cwd=tmp_path,
    )  # fmt: skip
    assert allowed.returncode == 0, allowed.stderr
    assert server_state(project)["tags"], "the assigned user labeled the project"
    assert PASSWORD not in allowed.stdout + allowed.stderr


def _point_cloud(points: int) -> bytes:
    """A small ASCII ``.pcd`` file (version 0.7), as a lidar export looks."""
    header = (
        "# .PCD v0.7 - Point Cloud Data file format\nVERSION 0.7\nFIELDS x y z\nSIZE 4 4 4\n"
        f"TYPE F F F\nCOUNT 1 1 1\nWIDTH {points}\nHEIGHT 1\nVIEWPOINT 0 0 0 1 0 0 0\n"
        f"POINTS {points}\nDATA ascii\n"
    )
    return (header + "".join(f"{i} {i * 0.5} 0\n" for i in range(points))).encode()


def test_a_point_cloud_project_is_refused_and_left_untouched(tmp_path: Path):
    with CvatTestServer() as server:
        project_id = tag_project(server, "lidar", ("car", "tree"))
        clouds = [(f"scan_{i}.pcd", _point_cloud(5 + i)) for i in range(4)]
        task_id = server.add_point_cloud_task(project_id, clouds, name="scans", segment_size=2)
        job_id = server.jobs(task_id)[0]["id"]
        env = {"CVAT_HOST": server.url, "CVAT_USERNAME": "annotator", "CVAT_PASSWORD": PASSWORD}
        client = make_client(server.url, credentials=("annotator", PASSWORD))
        assert client.projects.retrieve(project_id).dimension == "3d"
        assert client.jobs.retrieve(job_id).dimension == "3d"
        _, response = client.api_client.jobs_api.retrieve_data(
            job_id, type="chunk", index=0, quality="original", _parse_response=False
        )
        with zipfile.ZipFile(io.BytesIO(response.data)) as chunk:  # the files, as CVAT serves them
            assert [chunk.read(name) for name in chunk.namelist()] == [data for _, data in clouds[:2]]
            assert chunk.namelist() == ["000000.pcd", "000001.pcd"]
        labels_before = server.labels(project_id)
        for command, target in [
            ("setup", ["--project-id", str(project_id)]),
            ("run", ["--project-id", str(project_id), *tiny_args()]),
            ("run", ["--task-id", str(task_id), *tiny_args()]),
            ("run", ["--job-id", str(job_id), *tiny_args()]),
        ]:
            server.reset_counters()
            result = run_cli(command, *target, env=env, cwd=tmp_path)
            assert_one_line_error(result, "holds 3D point clouds; prelabel tags 2D images and video")
            assert server.write_count == 0
        assert server.labels(project_id) == labels_before
        assert all(not server.annotations(job["id"])["tags"] for job in server.jobs(task_id))
        assert server.issues() == []
