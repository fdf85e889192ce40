"""Throughput of prelabel against CVAT: ``python -m benchmarks.throughput`` (``make bench``).

Measures, in alternating repetitions on one machine and one test server:

(a) the ceiling: the bare image encoder on ready tensors;
(b) prelabel end to end: ``prelabel run`` as a subprocess, by process time and in-run time;
(c) the baseline: cvat-sdk's ``annotate_task`` with the same model and classifier;

then the peak memory of (b) on a task four times as large. It prints a table and appends
one row per prelabel variant to docs/benchmarks.md, which explains every column.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from benchmarks.ceiling import encode_throughput
from benchmarks.dataset import REPO, BenchProject, FrameSpec
from benchmarks.machine import Machine, OtherLoad, percent
from benchmarks.prelabel_cli import DEFAULT_VARIANTS, PrelabelRun, Variant, run_prelabel, setup_project
from benchmarks.quantization import int8_agreement
from benchmarks.report import Row, Spread, append_rows, mib, today
from benchmarks.sdk_baseline import BaselineRun, OpenClipTagger, run_baseline
from prelabel.assemble import build_pipeline
from prelabel.config import load_config
from tests.cvat_server import CvatTestServer

VARIANTS: tuple[Variant, ...] = (*DEFAULT_VARIANTS, Variant("int8", ("--quantize", "int8")))
"""The prelabel variants measured as (b); add one (a name and extra CLI flags) to compare it.
int8 runs on the CPU only; on CUDA it is left out."""


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.throughput",
        description="Images/s of prelabel against a local CVAT test server, next to the model's "
        "ceiling and cvat-sdk's annotate_task; appends a row to docs/benchmarks.md.",
    )
    parser.add_argument("--frames", type=int, default=512, help="frames in the task, N (default 512)")
    parser.add_argument("--repeats", type=int, default=3, help="alternating repetitions (default 3)")
    parser.add_argument("--batch-size", type=int, help="model batch size (default: prelabel's own)")
    parser.add_argument("--model", default="ViT-B-32", help="open_clip model (default ViT-B-32)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] (default auto)")
    parser.add_argument("--segment-size", type=int, default=128, help="frames per job (default 128)")
    parser.add_argument("--chunk-size", type=int, default=72, help="frames per chunk (default 72)")
    parser.add_argument(
        "--ceiling-batches", type=int, default=4, help="timed batches per (a) measurement (default 4)"
    )
    parser.add_argument(
        "--rss-only",
        action="store_true",
        help="only the peak RSS of prelabel at N and 4N frames (printed, not written)",
    )
    parser.add_argument(
        "--out", type=Path, default=REPO / "docs" / "benchmarks.md", help="report to append to"
    )
    parser.add_argument("--no-write", action="store_true", help="print only; do not append to --out")
    args = parser.parse_args(argv)
    for name in ("frames", "repeats", "segment_size", "chunk_size", "ceiling_batches"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.batch_size is not None and args.batch_size < 1:
        parser.error("--batch-size must be at least 1")
    return args


def say(message: str) -> None:
    print(message, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.getLogger("cvat_sdk").setLevel(logging.ERROR)  # not its server-version warning per client
    spec = FrameSpec(count=args.frames, segment_size=args.segment_size, chunk_size=args.chunk_size)
    config = load_config(
        None,
        {
            "model.name": args.model,
            "model.pretrained": "none",
            "model.device": args.device,
            "model.batch_size": args.batch_size,
        },
    )
    started, load = time.perf_counter(), OtherLoad()
    with CvatTestServer(check_answers=False) as server:  # measure prelabel, not the schema check
        say(f"making {spec.count} frames of {spec.size[0]}x{spec.size[1]} ...")
        project = BenchProject.create(server, spec)
        setup_project(project)
        # The CLI resolves device and batch size the same way, and finds this classifier in its cache.
        pipeline = build_pipeline(config, project.labels)
        loaded, batch_size = pipeline.loaded, pipeline.options.batch_size
        machine = Machine.here(loaded.device)
        jobs = -(-spec.count // spec.segment_size)
        say(
            f"{args.model} (random weights) on {machine.device}, batch {batch_size}; "
            f"{machine.describe()}, torch {machine.torch}\n"
            f"task: {spec.count} frames, {jobs} jobs of up to {spec.segment_size} frames, "
            f"chunks of {spec.chunk_size}"
        )
        client = project.client()
        variants = [v for v in VARIANTS if v.name != "int8" or loaded.device.type == "cpu"]

        def fresh_task(times: int = 1) -> int:
            task_id = project.new_task(times)
            project.warm_chunks(client, task_id)
            return task_id

        def prelabel(task_id: int, variant: Variant) -> PrelabelRun:
            meter = OtherLoad()
            run = run_prelabel(
                project,
                task_id,
                model=args.model,
                device=args.device,
                batch_size=batch_size,
                variant=variant,
                timeout=600 + 2 * spec.count * 4,
            )
            say(
                f"  (b) {variant.name}: {run.frames} frames, process {run.process_seconds:.1f}s "
                f"({run.process_images_per_second:.2f}/s), in-run {run.in_run_seconds:.1f}s "
                f"({run.in_run_images_per_second:.2f}/s), peak RSS {mib(run.peak_rss_bytes)}, "
                f"other load {percent(meter.share())}\n"
                f"      prelabel says: {run.cli_summary}\n"
                f"      time per stage: {run.cli_stages}"
            )
            return run

        ceilings: list[float] = []
        runs: dict[str, list[PrelabelRun]] = {variant.name: [] for variant in variants}
        baselines: list[BaselineRun] = []
        if args.rss_only:
            for variant in variants:
                runs[variant.name].append(prelabel(fresh_task(), variant))
        else:
            tagger = OpenClipTagger(loaded, pipeline.classifier)
            for repeat in range(1, args.repeats + 1):
                say(f"repetition {repeat} of {args.repeats}")
                meter = OtherLoad()
                ceilings.append(encode_throughput(loaded, batch_size, args.ceiling_batches))
                say(
                    f"  (a) ceiling: {ceilings[-1]:.2f} images/s ({args.ceiling_batches} batches), "
                    f"other load {percent(meter.share())}"
                )
                for variant in variants:
                    runs[variant.name].append(prelabel(fresh_task(), variant))
                task_id, meter = fresh_task(), OtherLoad()
                baselines.append(run_baseline(project, task_id, tagger))
                say(
                    f"  (c) cvat-sdk: {baselines[-1].seconds:.1f}s "
                    f"({baselines[-1].images_per_second:.2f} images/s), other load {percent(meter.share())}"
                )
        agreement = None
        if not args.rss_only and any(v.name == "int8" for v in variants):
            agreement = int8_agreement(client, fresh_task(), config, project.labels)
            say(
                f"int8 vs fp32 on {agreement.frames} frames: top-1 agreement "
                f"{agreement.top1_agreement:.1%}, largest probability difference "
                f"{agreement.max_probability_difference:.4f}"
            )
        say(f"memory: one run on a {4 * spec.count}-frame task")
        large = {variant.name: prelabel(fresh_task(times=4), variant) for variant in variants}
        client.close()
    other_load = load.share()

    say("")
    if args.rss_only:
        for variant in variants:
            say(
                f"peak RSS of prelabel ({variant.name}; ru_maxrss via wait4): "
                f"{mib(runs[variant.name][0].peak_rss_bytes)} at {spec.count} frames, "
                f"{mib(large[variant.name].peak_rss_bytes)} at {4 * spec.count} frames"
            )
        return 0

    rows = []
    for variant in variants:
        measured = runs[variant.name]
        process = [run.process_images_per_second for run in measured]
        in_run = [run.in_run_images_per_second for run in measured]
        baseline = [run.images_per_second for run in baselines]
        row = Row(
            date=today(),
            machine=machine,
            model=args.model,
            variant=variant.name,
            frames=spec.count,
            batch_size=batch_size,
            ceiling=Spread.of(ceilings),
            process=Spread.of(process),
            in_run=Spread.of(in_run),
            baseline=Spread.of(baseline),
            b_over_a=Spread.of([b / a for b, a in zip(in_run, ceilings, strict=True)]),
            b_over_c=Spread.of([b / c for b, c in zip(in_run, baseline, strict=True)]),
            b_over_c_process=Spread.of([b / c for b, c in zip(process, baseline, strict=True)]),
            rss_n=max(run.peak_rss_bytes for run in measured),
            rss_4n=large[variant.name].peak_rss_bytes,
            other_load=other_load,
        )
        rows.append(row)
        say(row.table(args.repeats))
    say(f"(benchmark took {time.perf_counter() - started:.0f}s)")
    if not args.no_write:
        append_rows(args.out, rows)
        if agreement is not None:
            with args.out.open("a", encoding="utf-8") as report:
                report.write(
                    f"\nint8 vs fp32, {today()}, {machine.describe()}, {args.model}, {agreement.frames} "
                    f"frames: top-1 agreement {agreement.top1_agreement:.1%}, largest probability "
                    f"difference {agreement.max_probability_difference:.4f}\n"
                )
        say(f"appended {len(rows)} row(s) to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
