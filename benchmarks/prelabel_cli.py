"""(b) prelabel end to end: the real CLI in a subprocess against the test server.

Two clocks per run:

* process: from starting ``python -m prelabel run`` to its exit (interpreter start-up,
  imports, planning and model load included);
* in-run: from the first chunk request of the task's jobs, or from the moment the model was
  ready if that came later, to the last annotations PATCH. The requests are seen by polling
  the server's request log (the log has no timestamps; the polling interval, 5 ms, bounds
  the error); the model's readiness comes from the CLI's ``--profile`` (``started_at`` plus
  ``model_ready_at``, placed on this clock through the wall clock). This leaves out
  start-up and model load: the CLI requests the first chunks while its model loads, so
  from the first chunk request alone (``from_first_chunk_seconds``, the in-run clock before
  2026-12-02) the window held up to a few seconds of the load.

Seen the same way: the first write (a tag PATCH or an issue POST) after the process started
and after the first chunk request, i.e. the time to the first tag. From the CLI's own
``--profile`` file: the model's wait for decoded frames in each job (``wait_decode``), which
holds the stall at the job's start while its first chunk is fetched.

The CLI runs in a temporary working directory, so that whatever it keeps there by default
(its run state, review lists) starts empty each time and never lands in the repository.

Peak RSS comes from the kernel: the CLI process's own ``ru_maxrss`` ("Maximum resident set
size" of ``/usr/bin/time -v``), through `benchmarks.peak_rss`. Taken directly with ``os.wait4``,
it would be at least this process's RSS (a loaded model, the test server): Linux carries
the high-water mark of the spawning process's memory over into the child's.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks import peak_rss
from benchmarks.dataset import REPO, BenchProject

POLL_SECONDS = 0.005
_JOB_CHUNK = re.compile(r"^/api/jobs/(\d+)/data/?$")
_JOB_ANNOTATIONS = re.compile(r"^/api/jobs/(\d+)/annotations/?$")
_ISSUES = re.compile(r"^/api/issues/?$")
_JOB_LINE = re.compile(r"^job (\d+) \(task \d+\): \d+ frames, (\d+) accepted, (\d+) for review", re.MULTILINE)


@dataclass(frozen=True)
class Variant:
    """A way of running prelabel: a name for the report and extra ``prelabel run`` flags.

    Every variant is measured in the same alternating repetitions as the default one, and
    gets its own row in the report.
    """

    name: str
    flags: tuple[str, ...] = ()


DEFAULT_VARIANTS = (Variant("default"),)


@dataclass(frozen=True)
class PrelabelRun:
    """One measured ``prelabel run``."""

    task_id: int
    frames: int
    process_seconds: float
    in_run_seconds: float
    """From the later of the first chunk request and the model being ready to the last tag PATCH:
    the model loads while the first chunks are requested, and its load is start-up."""
    peak_rss_bytes: int
    cli_summary: str
    """The CLI's own line ``task T: N images in Xs (Y images/s)``."""
    cli_stages: str
    """The CLI's ``time per stage`` line."""
    review: int = 0
    """Frames the run sent to review (from the CLI's per-job lines)."""
    first_write_seconds: float | None = None
    """From the process start to its first tag PATCH or issue POST."""
    first_write_in_run_seconds: float | None = None
    """From the first chunk request to the first tag PATCH or issue POST."""
    model_idle_per_job: tuple[float, ...] = ()
    """Seconds the model waited for decoded frames in each job, in job order (``wait_decode``)."""
    wait_job_per_job: tuple[float, ...] = ()
    """Seconds from each job's start to its first frame, in job order (``wait_job``; 0 if unknown)."""
    from_first_chunk_seconds: float | None = None
    """From the first chunk request to the last tag PATCH (what `in_run_seconds` was before
    2026-12-02: it counted the part of the model's load that overlaps the first downloads)."""
    model_ready_seconds: float | None = None
    """From the process start to the model being ready (``model_ready_at`` of ``--profile``)."""

    @property
    def process_images_per_second(self) -> float:
        return self.frames / self.process_seconds

    @property
    def in_run_images_per_second(self) -> float:
        return self.frames / self.in_run_seconds


class _RequestWatch(threading.Thread):
    """Notes when the first chunk request and the last annotations PATCH of some jobs arrive."""

    def __init__(self, project: BenchProject, job_ids: set[int]) -> None:
        super().__init__(name="request-watch", daemon=True)
        self._server = project.server
        self._job_ids = job_ids
        self._seen = len(self._server.requests)
        self._done = threading.Event()
        self.first_chunk: float | None = None
        self.first_write: float | None = None
        self.last_patch: float | None = None

    def run(self) -> None:
        while not self._done.is_set():
            self._scan()
            time.sleep(POLL_SECONDS)
        self._scan()

    def stop(self) -> None:
        self._done.set()
        self.join()

    def _scan(self) -> None:
        log = self._server.requests
        now = time.perf_counter()
        for entry in log[self._seen :]:
            if entry.method == "GET" and entry.query.get("type") == "chunk":
                match = _JOB_CHUNK.match(entry.path)
                if match and int(match[1]) in self._job_ids and self.first_chunk is None:
                    self.first_chunk = now
            elif entry.method == "PATCH" and entry.status == 200:
                match = _JOB_ANNOTATIONS.match(entry.path)
                if match and int(match[1]) in self._job_ids:
                    self.last_patch = now
                    self.first_write = self.first_write or now
            elif entry.method == "POST" and entry.status == 201 and _ISSUES.match(entry.path):
                self.first_write = self.first_write or now  # one run at a time: its own issue
        self._seen = len(log)


def cli_env(project: BenchProject) -> dict[str, str]:
    """The environment for a prelabel subprocess: ours plus the server's address and login.

    The repository goes first on PYTHONPATH, so the CLI runs this checkout from any folder.
    """
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return {**os.environ, **project.env(), "PYTHONPATH": path}


@dataclass(frozen=True)
class MeasuredProcess:
    """One child process run to its end (or killed at its timeout), as the kernel saw it."""

    returncode: int
    """Its exit code; negative: killed by that signal (e.g. -9 at the timeout)."""
    timed_out: bool
    started: float
    """`time.perf_counter()` just before it started (the test server's request log uses the same clock)."""
    seconds: float
    """From its start to its exit."""
    peak_rss_bytes: int
    """Its own ``ru_maxrss`` (what ``/usr/bin/time -v`` reports), through `benchmarks.peak_rss`."""
    stdout: str
    stderr: str


def run_measured(
    command: list[str], *, cwd: Path, env: dict[str, str], timeout: float, output: Path
) -> MeasuredProcess:
    """Run `command` to its end (`benchmarks.peak_rss`: its own peak RSS), killed after `timeout` s.

    Its stdout and stderr go to files in the folder `output` (not pipes, which could fill
    up and stall it) and are read back afterwards.
    """
    stdout_path, stderr_path = output / "stdout", output / "stderr"
    with stdout_path.open("w") as stdout, stderr_path.open("w") as stderr:
        start = time.perf_counter()
        measured = peak_rss.run_measured(
            command, timeout=timeout, cwd=cwd, env=env, stdout=stdout, stderr=stderr
        )
        seconds = time.perf_counter() - start
    return MeasuredProcess(
        returncode=measured.returncode,
        timed_out=measured.timed_out,
        started=start,
        seconds=seconds,
        peak_rss_bytes=measured.peak_rss_bytes,
        stdout=stdout_path.read_text(),
        stderr=stderr_path.read_text(),
    )


def setup_project(project: BenchProject) -> None:
    """``prelabel setup`` on the project, once: adds the attributes prelabel writes."""
    with tempfile.TemporaryDirectory(prefix="bench-setup-") as tmp:
        result = subprocess.run(
            [sys.executable, "-m", "prelabel", "setup", "--project-id", str(project.project_id)],
            cwd=tmp,
            env=cli_env(project),
            capture_output=True,
            text=True,
            timeout=300,
        )
    if result.returncode != 0:
        raise RuntimeError(f"prelabel setup failed ({result.returncode}): {result.stderr.strip()}")


def run_prelabel(
    project: BenchProject,
    task_id: int,
    *,
    model: str,
    device: str,
    batch_size: int,
    variant: Variant = DEFAULT_VARIANTS[0],
    routing: tuple[str, ...] = ("--accept-threshold", "0", "--min-margin", "0"),
    launcher: tuple[str, ...] = (),
    timeout: float = 3600,
) -> PrelabelRun:
    """Run ``prelabel run --task-id`` on a fresh task, time it, and check every frame got one tag.

    `routing` are the threshold flags (see benchmarks/routing.py); frames sent to review
    get their top-1 as a suggestion tag, so every frame still holds exactly one tag.
    `launcher` goes between the interpreter and ``-m prelabel`` (e.g. memray's ``-m memray run``).
    """
    frames = len(project.server.state.tasks[task_id]["frames"])
    job_ids = set(project.job_ids(task_id))
    with tempfile.TemporaryDirectory(prefix="bench-prelabel-") as tmp:
        command = [
            sys.executable, *launcher, "-m", "prelabel", "run",
            "--task-id", str(task_id),
            "--model", model,
            "--pretrained", "none",
            "--device", device,
            "--batch-size", str(batch_size),
            *routing,
            "--no-progress",
            "--profile", str(Path(tmp) / "profile.json"),
            *variant.flags,
        ]  # fmt: skip
        workdir = Path(tmp) / "cwd"
        workdir.mkdir()
        watch = _RequestWatch(project, job_ids)
        watch.start()
        process = run_measured(command, cwd=workdir, env=cli_env(project), timeout=timeout, output=Path(tmp))
        watch.stop()
        start, seconds, out, err = process.started, process.seconds, process.stdout, process.stderr
        profile_path = Path(tmp) / "profile.json"
        profile = json.loads(profile_path.read_text()) if profile_path.exists() else {}

    who = f"prelabel run ({variant.name})"
    if process.returncode != 0:
        tail = "\n".join(err.strip().splitlines()[-10:])
        raise RuntimeError(f"{who} on task {task_id} exited with {process.returncode}:\n{tail}")
    if watch.first_chunk is None or watch.last_patch is None:
        raise RuntimeError(f"{who} on task {task_id}: no chunk request or no tag upload was seen")
    project.check_one_tag_per_frame(task_id, who)
    summary = re.search(rf"^task {task_id}: (\d+) images in .*$", out, re.MULTILINE)
    if summary is None or int(summary[1]) != frames:
        raise RuntimeError(f"{who} on task {task_id}: its summary does not report {frames} images:\n{out}")
    stages = re.search(r"^\s*time per stage: (.*)$", out, re.MULTILINE)
    jobs = {int(job): figures for job, figures in profile.get("jobs", {}).items()}
    idle = tuple(jobs[job]["stages"].get("wait_decode", 0.0) for job in sorted(jobs))
    wait_job = tuple(jobs[job]["stages"].get("wait_job", 0.0) for job in sorted(jobs))
    first_write = watch.first_write
    model_ready = _model_ready(profile)
    return PrelabelRun(
        task_id=task_id,
        frames=frames,
        process_seconds=seconds,
        in_run_seconds=watch.last_patch - max(watch.first_chunk, model_ready or 0.0),
        peak_rss_bytes=process.peak_rss_bytes,
        cli_summary=summary[0].strip(),
        cli_stages=stages[1].strip() if stages else "",
        review=sum(int(match[3]) for match in _JOB_LINE.finditer(out)),
        first_write_seconds=first_write - start if first_write is not None else None,
        first_write_in_run_seconds=first_write - watch.first_chunk if first_write is not None else None,
        model_idle_per_job=idle,
        wait_job_per_job=wait_job,
        from_first_chunk_seconds=watch.last_patch - watch.first_chunk,
        model_ready_seconds=model_ready - start if model_ready is not None else None,
    )


def _model_ready(profile: dict) -> float | None:
    """When the run's model was ready, on this process's `time.perf_counter` clock, from its
    ``--profile`` (``started_at``, Unix time, plus ``model_ready_at``); None if it lacks them."""
    started_at = profile.get("started_at")
    ready_at = profile.get("total", {}).get("stages", {}).get("model_ready_at")
    if started_at is None or ready_at is None:
        return None
    return time.perf_counter() - (time.time() - (started_at + ready_at))
