"""A flaky server: retries converge on exactly the state of a fault-free run; no secret leaks."""

from __future__ import annotations

import io
import sqlite3
from pathlib import Path

from tests.conftest import TINY_MODEL, run_cli, variants
from tests.cvat_fixtures import PASSWORD, Project, server_state
from tests.cvat_server import CvatTestServer

FRAMES_PER_TASK = 110
API = r"^/api/(jobs|issues|comments|labels|tasks|projects|users)"
"""Faults hit the pipeline's calls; the login itself is left alone (it is not retried)."""


def big_project(server: CvatTestServer) -> Project:
    server.add_user("annotator", PASSWORD)
    project_id = server.add_project(
        "flaky",
        owner="annotator",
        labels=[{"name": name, "type": "tag", "attributes": []} for name in ("cat", "coffee", "rocket")],
    )
    tasks = []
    for index in range(2):
        frames = []
        for name, image in variants(FRAMES_PER_TASK, (96, 72)):
            buffer = io.BytesIO()
            image.rotate(90 * index).save(buffer, "JPEG", quality=90)
            frames.append((f"{index}-{name}.jpg", buffer.getvalue()))
        tasks.append(
            server.add_image_task(project_id, frames, name=f"t{index}", segment_size=55, chunk_size=8)
        )
    return Project(server, project_id, tasks[:1], tasks[1], set())


def write_config(tmp_path: Path) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(
        f"""
model: {{name: "{TINY_MODEL}", pretrained: none, batch_size: 16}}
routing: {{accept_threshold: 0.5, min_margin: 0.0}}
cvat: {{upload_batch_size: 10}}
retry: {{attempts: 30, max_seconds: 120, initial_wait: 0.01, max_wait: 0.2, timeout: 1.0}}
"""
    )
    return path


def run_once(project: Project, config: Path, state: Path, env: dict | None = None):
    return run_cli(
        "run", "--project-id", str(project.project_id), "--config", str(config), "--state", str(state),
        "--no-progress", env=env or project.env(),
    )  # fmt: skip


def test_twenty_percent_faults_converge_to_the_fault_free_state(tmp_path: Path):
    config = write_config(tmp_path)
    with CvatTestServer() as server:
        clean = big_project(server)
        assert run_cli("setup", "--project-id", str(clean.project_id), env=clean.env()).returncode == 0
        manual = server.add_tag(server.jobs(clean.video_task)[0]["id"], 3, "cat")
        result = run_once(clean, config, tmp_path / "clean.db")
        assert result.returncode == 0, result.stderr
        expected = server_state(clean)
    assert len(expected["tags"]) >= 2 * FRAMES_PER_TASK - 1 and expected["issues"]

    with CvatTestServer(seed=7) as server:
        flaky = big_project(server)
        assert run_cli("setup", "--project-id", str(flaky.project_id), env=flaky.env()).returncode == 0
        assert server.add_tag(server.jobs(flaky.video_task)[0]["id"], 3, "cat") == manual
        manual_before = [
            t for t in server.annotations(server.jobs(flaky.video_task)[0]["id"])["tags"] if t["id"] == manual
        ]
        faults = [
            server.fail(API, 503, times=None, probability=0.04),
            server.fail(API, 429, times=None, probability=0.02, retry_after=0),
            server.fail(API, 502, times=None, probability=0.02),
            server.drop(API, times=None, probability=0.04),
            server.fail_after_write(API, status=None, times=None, probability=0.04),
            server.fail_after_write(API, status=504, times=None, probability=0.02),
            server.delay(API, 1.5, times=None, probability=0.02),  # past the 1 s client timeout
        ]
        result = run_once(flaky, config, tmp_path / "flaky.db")
        fired = {fault.kind: fault.fired for fault in faults}
        assert result.returncode == 0, result.stderr[-3000:]
        assert "retrying" in result.stderr
        assert all(fired.values()), fired
        server.clear_faults()
        assert server_state(flaky) == expected  # nothing lost, nothing duplicated
        after = [
            t for t in server.annotations(server.jobs(flaky.video_task)[0]["id"])["tags"] if t["id"] == manual
        ]
        assert after == manual_before
        assert server.violations == []


def test_server_gone_mid_run_stops_cleanly_and_the_next_run_finishes(tmp_path: Path):
    config = write_config(tmp_path)
    config.write_text(
        config.read_text().replace("attempts: 30, max_seconds: 120", "attempts: 3, max_seconds: 5")
    )
    with CvatTestServer() as server:
        project = big_project(server)
        assert run_cli("setup", "--project-id", str(project.project_id), env=project.env()).returncode == 0
        server.fail(r"/annotations", 503, method="PATCH", times=None)  # uploads keep failing
        failed = run_once(project, config, tmp_path / "state.db")
        assert failed.returncode != 0
        errors = [line for line in failed.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "503" in errors[0] and "job" in errors[0], failed.stderr
        assert "Traceback" not in failed.stderr
        server.clear_faults()
        again = run_once(project, config, tmp_path / "state.db")
        assert again.returncode == 0, again.stderr
        tagged = {
            (job["id"], tag["frame"])
            for task in [*project.image_tasks, project.video_task]
            for job in server.jobs(task)
            for tag in server.annotations(job["id"])["tags"]
        }
        assert len(tagged) == 2 * FRAMES_PER_TASK


def test_no_secret_reaches_logs_state_reports_or_cvat(tmp_path: Path):
    config = write_config(tmp_path)
    token = "pat-SECRET-0123456789abcdef"
    with CvatTestServer() as server:
        project = big_project(server)
        server.add_token("annotator", token)
        outputs = [run_cli("setup", "--project-id", str(project.project_id), env=project.env())]
        state = tmp_path / "state.db"
        outputs.append(run_once(project, config, state))
        outputs.append(
            run_once(project, config, state, env={"CVAT_HOST": server.url, "CVAT_ACCESS_TOKEN": token})
        )
        outputs.append(run_cli("review", "list", "--state", str(state), "--format", "json"))
        outputs.append(
            run_cli(
                "review",
                "sync",
                "--state",
                str(state),
                env={"CVAT_HOST": server.url, "CVAT_ACCESS_TOKEN": token},
            )
        )
        outputs.append(
            run_once(project, config, state, env=project.env(CVAT_PASSWORD="wrong-" + PASSWORD))
        )  # a failed login: its message must not echo the password either
        assert all(o.returncode == 0 for o in outputs[:-1]), [o.stderr for o in outputs]
        assert outputs[-1].returncode != 0
        texts = [o.stdout + o.stderr for o in outputs]
        with sqlite3.connect(state) as db:
            texts.append("\n".join(db.iterdump()))
        texts += [comment["message"] for comment in server.comments()]
        texts += [
            path.read_text(errors="replace")
            for path in tmp_path.rglob("*")
            if path.is_file() and path.suffix != ".db"
        ]
        for secret in (PASSWORD, token, "wrong-" + PASSWORD):
            assert not [text for text in texts if secret in text], f"{secret!r} leaked"
