"""Summaries of the repetitions, the printed table, and the rows appended to docs/benchmarks.md."""

from __future__ import annotations

import datetime as dt
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from benchmarks.machine import Machine, percent

COLUMNS = (
    "date", "machine", "torch", "device", "model", "latency", "variant", "case", "review", "N", "batch",
    "a ceiling", "b process", "b in-run", "c in-process", "c process", "b/a", "b in-run / c in-process",
    "b process / c in-process", "b process / c process", "first write s", "model idle per job s",
    "RSS at N", "RSS at 4N", "c process RSS", "other load",
)  # fmt: skip

INTRO = """\
# Benchmarks

Throughput of prelabel against CVAT, measured by `make bench` (`python -m benchmarks.throughput`).
The benchmark starts the CVAT-compatible test server (`tests/cvat_server`) on loopback,
creates a project with the tag labels cat, coffee, rocket, astronaut and galaxy and an image
task of N frames: 1280x720 JPEGs (quality 90) cut, resized, mirrored and colour-jittered
from the photographs in `samples/images`, 128 frames per job, 72 frames per chunk. The model
has random weights (`--pretrained none`): the weights do not change the speed. Every run
labels a fresh copy of the task. The server runs with a latency model of a real CVAT 2.73.0
on 2 cores (`tests/cvat_server/latency.py`, profile `cvat-2.73-2core` unless `--latency`
says otherwise): each chunk is built on its first request, as real CVAT does (about 19 ms
per frame compressed, 12 ms original, at most 2 builds at once), later requests of a chunk
cost about 345 ms per 64 frames, a tag PATCH 50 ms, an issue POST 48 ms, and so on.

The three measurements run in alternating repetitions (a, b, c, a, b, c, ...) on the same
machine. Each figure is the median over the repetitions, with the range (min-max) in
brackets; a ratio is computed within each repetition, then summarised the same way.

Columns:

- **latency**: the server's latency profile (`none`: answers at once); `+cpu builds`: its
  chunk builds used this machine's CPU (`--server-cpu`); `+cpu all calls`: so did the modelled
  time of all of its calls (`--server-cpu all`, an upper bound).
- **case**: `accepted` (every frame accepted: thresholds 0), `review-30%` (the accept
  threshold set so that 30% of the frames go to review), `review-all` (every frame to
  review). A review frame costs an issue POST and a suggestion tag. **review** is the
  share that went to review, from prelabel's own report.

- **a ceiling**: images/s of the bare `encode_image` on random, already preprocessed
  tensors, at prelabel's batch size and device, under its inference mode and autocast. No
  pipeline with this model can beat it.
- **b process**: prelabel end to end, `prelabel run --task-id T` as a subprocess:
  N / (process start to exit). Interpreter start, imports, planning and model load included.
- **b in-run**: the same runs, N / (first chunk request, or the model being ready if that
  came later, to the last tag upload), timed by polling the server's request log (5 ms
  resolution) and from `prelabel run --profile`. Start-up and model load left out. Before
  2026-12-02 the window started at the first chunk request; since the model has loaded
  while the first chunks download (2026-12-01), that counted up to ~3 s of the load.
- **c in-process**: the baseline, `cvat_sdk.auto_annotation.annotate_task` with the same model
  and classifier wrapped as a DetectionFunction (one `detect` call per image, top-1 tag):
  N / (call to return), in the benchmark's process with the model already loaded.
- **c process**: the same baseline as a whole process, `python -m benchmarks.sdk_baseline`
  (imports cvat-sdk and open_clip, logs in as the CLI does, loads the same model, builds the
  same classifier, runs `annotate_task`): N / (process start to exit), on its own fresh task.
- **b/a**: b in-run / a, the share of the model's speed that reaches CVAT. From 2026-12-01
  06:30 each b run is divided by the mean of the ceilings measured just before and just
  after it (before: by the repetition's one ceiling, measured before all its runs).
- **b in-run / c in-process**: the speed-up over cvat-sdk, both with the model already loaded.
- **b process / c in-process**: the same but charging prelabel alone its start-up and model load.
- **b process / c process**: both whole processes, start-up included on both sides (the
  issue's target).
- **first write s**: seconds from the prelabel process start to its first tag PATCH or
  issue POST (time to the first tag), median over the repetitions.
- **model idle per job s**: seconds the model waited for decoded frames in each job
  (`wait_decode` of `prelabel run --profile`), job by job, median over the repetitions.
  It holds the stall at each job's start while its first chunk is built and fetched.
- **RSS at N, 4N**: peak resident memory of the prelabel process on an N- and a 4N-frame task
  (its own `ru_maxrss`, what `/usr/bin/time -v` reports, through `benchmarks/peak_rss.py`;
  rows before 2026-12-01 took `ru_maxrss` straight from `os.wait4`, which is at least the
  benchmark process's own RSS, so they are too high where that held a model). **c process
  RSS**: the same for the whole-process baseline, at N.
- **other load**: the share of the machine's CPU time that other processes used during the
  benchmark (`/proc/stat` minus the benchmark's own `getrusage`). Figures measured next to a
  busy neighbour are too low; trust rows where this is near 0%.

Every run is checked: each frame must hold exactly one tag on the server afterwards, or the
benchmark stops. Other options: `python -m benchmarks.throughput --help`.

"""


@dataclass(frozen=True)
class Spread:
    """The median and range of one figure over the repetitions."""

    median: float
    low: float
    high: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        return cls(statistics.median(values), min(values), max(values))

    def format_percent(self) -> str:
        if self.low == self.high:
            return f"{self.median:.0%}"
        return f"{self.median:.0%} ({self.low:.0%}–{self.high:.0%})"

    def format(self, digits: int = 1) -> str:
        if self.low == self.high:
            return f"{self.median:.{digits}f}"
        return f"{self.median:.{digits}f} ({self.low:.{digits}f}–{self.high:.{digits}f})"


@dataclass(frozen=True)
class Row:
    """One variant's results, as printed and as appended to the report."""

    date: str
    machine: Machine
    model: str
    latency: str
    variant: str
    case: str
    review_share: Spread
    frames: int
    batch_size: int
    ceiling: Spread
    process: Spread
    in_run: Spread
    baseline: Spread
    b_over_a: Spread
    b_over_c: Spread
    b_over_c_process: Spread
    baseline_process: Spread | None
    b_process_over_c_process: Spread | None
    rss_baseline_process: int | None
    first_write: Spread | None
    model_idle_per_job: tuple[float, ...]
    rss_n: int
    rss_4n: int | None
    other_load: float | None

    def cells(self) -> list[str]:
        return [
            self.date,
            self.machine.describe(),
            self.machine.torch,
            self.machine.device,
            self.model,
            self.latency,
            self.variant,
            self.case,
            self.review_share.format_percent(),
            str(self.frames),
            str(self.batch_size),
            self.ceiling.format(),
            self.process.format(),
            self.in_run.format(),
            self.baseline.format(),
            _format(self.baseline_process),
            self.b_over_a.format(2),
            self.b_over_c.format(2),
            self.b_over_c_process.format(2),
            _format(self.b_process_over_c_process, 2),
            self.first_write.format(2) if self.first_write is not None else "–",
            idle_per_job(self.model_idle_per_job),
            mib(self.rss_n),
            mib(self.rss_4n) if self.rss_4n is not None else "–",
            mib(self.rss_baseline_process) if self.rss_baseline_process else "–",
            percent(self.other_load),
        ]

    def table(self, repeats: int) -> str:
        """The printed summary: one line per figure, saying what each one measures."""
        lines = [
            f"images/s, median (min–max) over {repeats} repetition(s); variant {self.variant!r}, "
            f"case {self.case!r} ({self.review_share.format_percent()} to review), "
            f"latency {self.latency}",
            f"  (a) ceiling, encode_image on ready tensors      {self.ceiling.format():>22}",
            f"  (b) prelabel, process start to exit             {self.process.format():>22}",
            f"  (b) prelabel, model ready to last tag PATCH     {self.in_run.format():>22}",
            f"  (c) cvat-sdk annotate_task, call to return      {self.baseline.format():>22}",
            f"  (c) cvat-sdk script, process start to exit      {_format(self.baseline_process):>22}",
            f"  b/a  (b in-run / a)                             {self.b_over_a.format(2):>22}",
            f"  b in-run / c in-process                         {self.b_over_c.format(2):>22}",
            f"  b process / c in-process                        {self.b_over_c_process.format(2):>22}",
            "  b process / c process                           "
            f"{_format(self.b_process_over_c_process, 2):>22}",
            "  first tag PATCH or issue POST, s after start    "
            f"{self.first_write.format(2) if self.first_write is not None else '–':>22}",
            f"  model idle waiting for frames, per job, s: {idle_per_job(self.model_idle_per_job)}",
            f"  peak RSS of prelabel (its own ru_maxrss): {mib(self.rss_n)} at {self.frames} frames"
            + (f", {mib(self.rss_4n)} at {4 * self.frames} frames" if self.rss_4n is not None else ""),
            "  peak RSS of the cvat-sdk process: "
            + (mib(self.rss_baseline_process) if self.rss_baseline_process else "–"),
            f"  CPU used by other processes meanwhile: {percent(self.other_load)} of the machine",
        ]
        return "\n".join(lines)


def _format(spread: Spread | None, digits: int = 1) -> str:
    return spread.format(digits) if spread is not None else "–"


def idle_per_job(seconds: Sequence[float]) -> str:
    """E.g. ``1.21 / 0.95 / 0.97 / 1.02`` (job order); "–" when unknown."""
    return " / ".join(f"{s:.2f}" for s in seconds) if seconds else "–"


def mib(size: int) -> str:
    return f"{size / 2**20:.0f} MiB"


def today() -> str:
    return dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M")


def append_rows(path: Path, rows: Sequence[Row]) -> None:
    """Append the rows to the results table, creating the file with its intro first."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        header = "| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS) + "\n"
        path.write_text(INTRO + "## Results\n\n" + header, encoding="utf-8")
    with path.open("a", encoding="utf-8") as handle:
        for row in rows:
            handle.write("| " + " | ".join(cell.replace("|", "/") for cell in row.cells()) + " |\n")
