"""Memory of prelabel over N and 8N frames: ``python -m benchmarks.memory`` (``make bench-memory``).

For each model (the tiny test model, fast over many frames, and ViT-B-32 with random
weights) and each connector (a folder of JPEGs, and a task on the CVAT test server without
latency), prelabel runs as a subprocess on N and on 8N frames (the N benchmark frames, 1280x720,
repeated under new names). It reports the peak RSS of each (the child's own ``ru_maxrss``
through `benchmarks.peak_rss`, not this process's, which holds the frames and the test server)
and the slope (RSS at 8N - RSS at N) / 7N in bytes per frame: a pipeline with bounded memory
has a slope near 0. With ``--repeats R`` each is the median of R runs (the peak of one run
moves by up to 100 MiB from run to run).

With ``--trace`` the same two runs go again under memray, and the allocations alive at each
run's high-water mark are summed by where they were made (the innermost Python frame, and the
innermost frame in prelabel/ or connectors/), leaving out what imports made. The difference
between 8N and N over 7N frames is what grows per frame, printed largest first. Use an N of
a few batches, so that the N run is already in its steady state: the default 64 (two batches
of 32) is enough through a folder, but ViT-B-32 through CVAT reaches its plateau only from
about 128 frames (docs/benchmarks.md, "after the allocator change"), so use ``--frames 128``
for it. memray sees native allocations too (PIL, numpy, torch's CPU allocator), which
tracemalloc would miss.

Unless ``--no-checkpoint``, each model is also loaded from a checkpoint file (its random
weights saved to a ``.safetensors`` and a ``.bin``, as real weights come) and run over N
frames of a folder: the peak of a real model's load, which random weights do not show.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from benchmarks.dataset import LABELS, REPO, BenchProject, FrameSpec, make_jpegs
from benchmarks.machine import Machine
from benchmarks.peak_rss import run_measured
from benchmarks.prelabel_cli import run_prelabel, setup_project
from benchmarks.report import mib
from tests.cvat_server import CvatTestServer

TINY_MODEL = f"local-dir:{REPO / 'tests' / 'assets' / 'tiny-clip'}"
MODELS = {"tiny": TINY_MODEL, "ViT-B-32": "ViT-B-32"}
OURS = (str(REPO / "prelabel"), str(REPO / "connectors"))


@dataclass(frozen=True)
class Measure:
    """Peak RSS at N and 8N frames, and what grew at the high-water mark (if traced)."""

    model: str
    connector: str
    frames: int
    rss_n: int
    rss_8n: int
    growth: list[tuple[str, float]]
    """(where, bytes per frame), largest first; empty unless traced."""

    @property
    def slope(self) -> float:
        """Bytes of peak RSS per extra frame."""
        return (self.rss_8n - self.rss_n) / (7 * self.frames)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.memory",
        description="Peak RSS of prelabel at N and 8N frames, and the per-frame slope; "
        "with --trace, what grows (memray).",
    )
    parser.add_argument("--frames", type=int, default=64, help="N (default 64); the large run has 8N")
    parser.add_argument(
        "--models", default="tiny,ViT-B-32", help=f"comma-separated, of {', '.join(MODELS)} (default both)"
    )
    parser.add_argument(
        "--connectors", default="folder,cvat", help="comma-separated, of folder, cvat (default both)"
    )
    parser.add_argument("--batch-size", type=int, default=32, help="model batch size (default 32)")
    parser.add_argument("--trace", action="store_true", help="also find what grows, with memray")
    parser.add_argument("--top", type=int, default=8, help="growth lines to print per run (default 8)")
    parser.add_argument(
        "--repeats", type=int, default=1, help="runs at N and at 8N each, alternating; medians (default 1)"
    )
    parser.add_argument(
        "--checkpoint",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also load each model from a checkpoint file (default on)",
    )
    args = parser.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    args.connectors = [c.strip() for c in args.connectors.split(",") if c.strip()]
    if unknown := [m for m in args.models if m not in MODELS]:
        parser.error(f"unknown model(s) {', '.join(unknown)}; known: {', '.join(MODELS)}")
    if unknown := [c for c in args.connectors if c not in ("folder", "cvat")]:
        parser.error(f"unknown connector(s) {', '.join(unknown)}; known: folder, cvat")
    if args.frames < 1 or args.batch_size < 1 or args.repeats < 1:
        parser.error("--frames, --batch-size and --repeats must be at least 1")
    return args


def say(message: str) -> None:
    print(message, flush=True)


def _wait(command: list[str], env: dict[str, str], cwd: Path, timeout: float) -> int:
    """Run `command`, fail on a non-zero exit, return the child's own peak RSS in bytes."""
    with (cwd / "stderr").open("w") as stderr:
        measured = run_measured(
            command, timeout=timeout, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=stderr
        )
    if measured.returncode != 0:
        tail = "\n".join((cwd / "stderr").read_text().strip().splitlines()[-10:])
        raise RuntimeError(f"{' '.join(command[:6])} ... exited with {measured.returncode}:\n{tail}")
    return measured.peak_rss_bytes


def _memray(trace: Path | None) -> tuple[str, ...]:
    return ("-m", "memray", "run", "-q", "--force", "-o", str(trace)) if trace is not None else ()


def folder_run(
    jpegs: Sequence[tuple[str, bytes]],
    times: int,
    model: str,
    batch: int,
    trace: Path | None,
    pretrained: str = "none",
) -> int:
    """Peak RSS of ``prelabel folder`` over the frames repeated `times` times."""
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        images = Path(tmp) / "images"
        images.mkdir()
        for round_ in range(times):
            for name, data in jpegs:
                (images / f"r{round_}-{name}").write_bytes(data)
        command = [
            sys.executable, *_memray(trace), "-m", "prelabel", "folder", str(images),
            "--labels", ",".join(LABELS), "--out", str(Path(tmp) / "out"),
            "--model", model, "--pretrained", pretrained, "--device", "cpu", "--batch-size", str(batch),
            "--no-progress",
        ]  # fmt: skip
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        }
        return _wait(command, env, Path(tmp), timeout=3600)


def cvat_run(project: BenchProject, times: int, model: str, batch: int, trace: Path | None) -> int:
    """Peak RSS of ``prelabel run`` on a fresh task of the frames repeated `times` times."""
    run = run_prelabel(
        project,
        project.new_task(times),
        model=model,
        device="cpu",
        batch_size=batch,
        launcher=_memray(trace),
        timeout=3600,
    )
    return run.peak_rss_bytes


def checkpoint_runs(jpegs: Sequence[tuple[str, bytes]], model: str, batch: int) -> dict[str, int]:
    """Peak RSS of ``prelabel folder`` over the frames with `model`'s random weights loaded
    from a checkpoint file, per file format (a local-dir model is left out: its folder
    names its own weights)."""
    if model.startswith("local-dir:"):
        return {}
    import open_clip
    import torch
    from safetensors.torch import save_file

    peaks = {}
    with tempfile.TemporaryDirectory(prefix="bench-checkpoint-") as tmp:
        state = open_clip.create_model(model).state_dict()
        files = {"safetensors": Path(tmp) / "weights.safetensors", "bin": Path(tmp) / "weights.bin"}
        save_file({key: tensor.contiguous() for key, tensor in state.items()}, files["safetensors"])
        torch.save(state, files["bin"])
        del state
        for kind, path in files.items():
            peaks[kind] = folder_run(jpegs, 1, model, batch, None, pretrained=str(path))
    return peaks


def growth(small: Path, large: Path, extra_frames: int, top: int) -> list[tuple[str, float]]:
    """What is alive at the 8N high-water mark but not at N's, per extra frame, largest first."""
    from memray import FileReader

    def at_peak(path: Path) -> Counter[str]:
        sizes: Counter[str] = Counter()
        with FileReader(str(path)) as reader:
            for record in reader.get_high_watermark_allocation_records(merge_threads=True):
                stack = record.stack_trace()
                if any(function == "<module>" for function, _, _ in stack):
                    continue  # made while importing: once per process, whatever the frame count
                sizes[_where(stack)] += record.size
        return sizes

    before, after = at_peak(small), at_peak(large)
    delta = {where: (after[where] - before.get(where, 0)) / extra_frames for where in after}
    return sorted(((w, b) for w, b in delta.items() if b > 0), key=lambda item: -item[1])[:top]


def _where(stack: Sequence[tuple[str, str, int]]) -> str:
    """``file:line (function)`` of the innermost frame, plus the innermost one of ours if different."""
    if not stack:
        return "(no Python frame: native or interpreter start-up)"

    def name(frame: tuple[str, str, int]) -> str:
        function, filename, line = frame
        path = Path(filename)
        shown = path.relative_to(REPO) if path.is_relative_to(REPO) else Path(*path.parts[-2:])
        return f"{shown}:{line} ({function})"

    ours = next((f for f in stack if f[1].startswith(OURS)), None)
    if ours is None or ours == stack[0]:
        return name(stack[0])
    return f"{name(stack[0])} <- {name(ours)}"


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.getLogger("cvat_sdk").setLevel(logging.ERROR)
    started = time.perf_counter()
    spec = FrameSpec(count=args.frames)
    say(f"making {spec.count} frames of {spec.size[0]}x{spec.size[1]} ...")
    jpegs = make_jpegs(spec)
    import torch

    say(f"{Machine.here(torch.device('cpu')).describe()}; N = {args.frames}, 8N = {8 * args.frames}")
    results: list[Measure] = []
    with (
        CvatTestServer(check_answers=False) as server,
        tempfile.TemporaryDirectory(prefix="bench-memray-") as traces,
    ):
        project = None
        if "cvat" in args.connectors:
            project = BenchProject.create(server, spec)
            setup_project(project)
        for model_name in args.models:
            model = MODELS[model_name]
            for connector in args.connectors:

                def once(
                    times: int, trace: Path | None, connector: str = connector, model: str = model
                ) -> int:
                    if connector == "folder":
                        return folder_run(jpegs, times, model, args.batch_size, trace)
                    assert project is not None
                    return cvat_run(project, times, model, args.batch_size, trace)

                at_n: list[int] = []
                at_8n: list[int] = []
                for _ in range(args.repeats):  # alternating, so that a drift hits both alike
                    at_n.append(once(1, None))
                    at_8n.append(once(8, None))
                rss_n, rss_8n = int(statistics.median(at_n)), int(statistics.median(at_8n))
                if args.repeats > 1:
                    say(
                        f"{model_name:>8} via {connector:<6}: runs at N {', '.join(map(mib, at_n))}; "
                        f"at 8N {', '.join(map(mib, at_8n))}"
                    )
                found: list[tuple[str, float]] = []
                if args.trace:
                    small, large = Path(traces) / "n.bin", Path(traces) / "8n.bin"
                    once(1, small)
                    once(8, large)
                    found = growth(small, large, 7 * args.frames, args.top)
                measure = Measure(model_name, connector, args.frames, rss_n, rss_8n, found)
                results.append(measure)
                say(
                    f"{model_name:>8} via {connector:<6}: peak RSS {mib(rss_n)} at N, {mib(rss_8n)} at 8N; "
                    f"slope {measure.slope / 1024:.1f} KiB per frame"
                )
                for where, per_frame in found:
                    say(f"      +{per_frame / 1024:8.1f} KiB/frame at the high-water mark: {where}")
            if args.checkpoint:
                for kind, peak in checkpoint_runs(jpegs, model, args.batch_size).items():
                    say(f"{model_name:>8} from a .{kind} checkpoint, folder: peak RSS {mib(peak)} at N")
    say(f"(memory benchmark took {time.perf_counter() - started:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
