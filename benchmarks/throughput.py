"""Throughput of prelabel against CVAT: ``python -m benchmarks.throughput`` (``make bench``).

Measures, in alternating repetitions on one machine and one test server that is as slow as
a real CVAT 2.73 (its latency model, `tests/cvat_server/latency.py`; ``--latency none``
turns it off), with chunks built on their first request:

(a) the ceiling: the bare image encoder on ready tensors, measured before each (b) run and
    once after the last, so that each (b) is compared with the mean of the two around it
    (this machine's speed drifts by a quarter within minutes);
(b) prelabel end to end: ``prelabel run`` as a subprocess, by process time and in-run time,
    once per routing case (all accepted, 30% to review, all to review; benchmarks/routing.py);
(c) the baseline: cvat-sdk's ``annotate_task`` with the same model and classifier, in this
    process with the model loaded, and as a whole process (start-up and model load included);

then the peak memory of (b) on a task four times as large. It prints a table and appends
one row per prelabel variant to docs/benchmarks.md, which explains every column.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from benchmarks.ceiling import encode_throughput
from benchmarks.dataset import REPO, BenchProject, FrameSpec
from benchmarks.machine import Machine, OtherLoad, percent
from benchmarks.prelabel_cli import DEFAULT_VARIANTS, PrelabelRun, Variant, run_prelabel, setup_project
from benchmarks.quantization import int8_agreement
from benchmarks.report import Row, Spread, append_rows, mib, today
from benchmarks.routing import CASES, Case, case_by_name, routing_flags, threshold_for, top1_probabilities
from benchmarks.sdk_baseline import BaselineRun, OpenClipTagger, run_baseline, run_baseline_process
from prelabel.assemble import build_pipeline
from prelabel.config import load_config
from prelabel.pipeline.memory import tune_allocator
from tests.cvat_server import CvatTestServer
from tests.cvat_server.latency import PROFILES, profile

VARIANTS: tuple[Variant, ...] = (*DEFAULT_VARIANTS, Variant("int8", ("--quantize", "int8")))
"""The prelabel variants measured as (b); add one (a name and extra CLI flags) to compare it.
int8 runs on the CPU only, in the "accepted" case only; on CUDA it is left out."""


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
        "--latency",
        default="cvat-2.73-2core",
        help=f"the test server's latency profile, NAME or NAME*FACTOR ({', '.join(PROFILES)}; "
        "default cvat-2.73-2core; none: answer at once)",
    )
    parser.add_argument(
        "--chunk-builders", type=int, default=2, help="chunks the server builds at once (default 2)"
    )
    parser.add_argument(
        "--server-cpu",
        nargs="?",
        const="builds",
        choices=("builds", "all"),
        help="the server's chunk builds (builds, the default), or all of its calls' modelled "
        "time (all: an upper bound), use this machine's CPU, as a CVAT on it would, instead of "
        "sleeping; the latency column says '+cpu builds' or '+cpu all calls'",
    )
    parser.add_argument(
        "--cases",
        default=",".join(case.name for case in CASES),
        help="routing cases, comma-separated (default "
        + ",".join(case.name for case in CASES).replace("%", "%%")  # argparse formats help with %
        + ")",
    )
    parser.add_argument("--no-int8", action="store_true", help="leave out the int8 variant")
    parser.add_argument(
        "--decode-nice",
        type=int,
        default=0,
        metavar="N",
        help="also measure a variant 'nice-N' with decode.nice: N (the decode threads' priority lowered)",
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
    if args.chunk_builders < 1:
        parser.error("--chunk-builders must be at least 1")
    try:
        profile(args.latency)
        args.cases = [case_by_name(name.strip()) for name in args.cases.split(",") if name.strip()]
    except ValueError as exc:
        parser.error(str(exc))
    if not args.cases:
        parser.error("--cases names no case")
    if args.model.startswith("local-dir:"):  # the CLI runs in a temporary folder of its own
        args.model = "local-dir:" + str(Path(args.model.removeprefix("local-dir:")).resolve())
    return args


def cpu_note(server_cpu: str | None) -> str:
    """What the latency column adds for `--server-cpu`."""
    return {None: "", "builds": " +cpu builds", "all": " +cpu all calls"}[server_cpu]


def say(message: str) -> None:
    print(message, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    tune_allocator()  # the ceiling (a) runs under the allocator settings that prelabel's CLI uses
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
    with (
        tempfile.TemporaryDirectory(prefix="bench-throughput-") as workdir,
        CvatTestServer(  # measure prelabel, not the schema check
            check_answers=False,
            latency=args.latency,
            chunk_builders=args.chunk_builders,
            builds_use_cpu=args.server_cpu is not None,
            calls_use_cpu=args.server_cpu == "all",
        ) as server,
    ):
        latency = server.latency.describe()
        say(f"test server latency profile: {latency}")
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
        variants = [
            v for v in VARIANTS if v.name != "int8" or (loaded.device.type == "cpu" and not args.no_int8)
        ]
        if args.decode_nice:
            nice = Path(workdir) / "decode-nice.yaml"
            nice.write_text(f"decode:\n  nice: {args.decode_nice}\n", encoding="utf-8")
            variants.append(Variant(f"nice-{args.decode_nice}", ("--config", str(nice))))
        cases = args.cases
        thresholds = {case.name: threshold_for(case, []) for case in cases if case.review_share in (0, 1)}
        if len(thresholds) < len(cases):
            top1 = top1_probabilities(project.frames, pipeline)
            thresholds = {case.name: threshold_for(case, top1) for case in cases}
        measured = [(v, c) for v in variants for c in cases if v.name != "int8" or c.name == "accepted"]
        say("cases: " + ", ".join(f"{c.name} (accept threshold {thresholds[c.name]:.6g})" for c in cases))

        def fresh_task(times: int = 1) -> int:
            return project.new_task(times)  # chunks are built on their first request, as in CVAT

        def prelabel(task_id: int, variant: Variant, case: Case = cases[0]) -> PrelabelRun:
            meter = OtherLoad()
            run = run_prelabel(
                project,
                task_id,
                model=args.model,
                device=args.device,
                batch_size=batch_size,
                variant=variant,
                routing=routing_flags(thresholds[case.name]),
                timeout=600 + 2 * spec.count * 4,
            )
            first = f"{run.first_write_seconds:.2f}s" if run.first_write_seconds is not None else "–"
            window = ""
            if run.from_first_chunk_seconds is not None and run.model_ready_seconds is not None:
                window = (
                    f"; {run.from_first_chunk_seconds:.1f}s from the first chunk request, "
                    f"model ready {run.model_ready_seconds:.1f}s after start"
                )
            if run.first_write_in_run_seconds is not None:
                first += f" ({run.first_write_in_run_seconds:.2f}s after the first chunk request)"
            say(
                f"  (b) {variant.name}, {case.name}: {run.frames} frames, {run.review} to review, "
                f"process {run.process_seconds:.1f}s "
                f"({run.process_images_per_second:.2f}/s), in-run {run.in_run_seconds:.1f}s "
                f"({run.in_run_images_per_second:.2f}/s{window}), peak RSS {mib(run.peak_rss_bytes)}, "
                f"other load {percent(meter.share())}\n"
                f"      first write {first} after start; model idle per job "
                f"{' / '.join(f'{s:.2f}' for s in run.model_idle_per_job)} s; job start to first frame "
                f"{' / '.join(f'{s:.2f}' for s in run.wait_job_per_job)} s\n"
                f"      prelabel says: {run.cli_summary}\n"
                f"      time per stage: {run.cli_stages}"
            )
            return run

        ceilings: list[float] = []
        runs: dict[tuple[str, str], list[PrelabelRun]] = {(v.name, c.name): [] for v, c in measured}
        around: dict[tuple[str, str], list[float]] = {(v.name, c.name): [] for v, c in measured}
        """Per (b) run: the mean of the ceilings measured just before and just after it."""
        baselines: list[BaselineRun] = []
        baseline_processes: list[BaselineRun] = []
        if args.rss_only:
            for variant in variants:
                runs[variant.name, cases[0].name].append(prelabel(fresh_task(), variant))
        else:
            tagger = OpenClipTagger(loaded, pipeline.classifier)
            for repeat in range(1, args.repeats + 1):
                say(f"repetition {repeat} of {args.repeats}")

                def ceiling() -> float:
                    meter = OtherLoad()
                    ceilings.append(encode_throughput(loaded, batch_size, args.ceiling_batches))
                    say(
                        f"  (a) ceiling: {ceilings[-1]:.2f} images/s ({args.ceiling_batches} batches), "
                        f"other load {percent(meter.share())}"
                    )
                    return ceilings[-1]

                before = ceiling()
                for variant, case in measured:
                    runs[variant.name, case.name].append(prelabel(fresh_task(), variant, case))
                    after = ceiling()
                    around[variant.name, case.name].append((before + after) / 2)
                    before = after
                task_id, meter = fresh_task(), OtherLoad()
                baselines.append(run_baseline(project, task_id, tagger))
                say(
                    f"  (c) cvat-sdk: {baselines[-1].seconds:.1f}s "
                    f"({baselines[-1].images_per_second:.2f} images/s), other load {percent(meter.share())}"
                )
                task_id, meter = fresh_task(), OtherLoad()
                done = run_baseline_process(
                    project, task_id, model=args.model, device=args.device, timeout=600 + 2 * spec.count * 4
                )
                baseline_processes.append(done)
                say(
                    f"  (c) cvat-sdk, whole process: {done.seconds:.1f}s ({done.images_per_second:.2f} "
                    f"images/s), peak RSS {mib(done.peak_rss_bytes or 0)}, "
                    f"other load {percent(meter.share())}"
                )
        agreement = None
        if not args.rss_only and any(v.name == "int8" for v in variants):
            agreement = int8_agreement(client, fresh_task(), config, project.labels)
            say(
                f"int8 vs fp32 on {agreement.frames} frames: top-1 agreement "
                f"{agreement.top1_agreement:.1%}, largest probability difference "
                f"{agreement.max_probability_difference:.4f}"
            )
        say(f"memory: one run on a {4 * spec.count}-frame task ({cases[0].name})")
        large = {variant.name: prelabel(fresh_task(times=4), variant) for variant in variants}
        client.close()
    other_load = load.share()

    say("")
    if args.rss_only:
        for variant in variants:
            say(
                f"peak RSS of prelabel ({variant.name}; its own ru_maxrss): "
                f"{mib(runs[variant.name, cases[0].name][0].peak_rss_bytes)} at {spec.count} frames, "
                f"{mib(large[variant.name].peak_rss_bytes)} at {4 * spec.count} frames"
            )
        return 0

    rows = []
    for variant, case in measured:
        done = runs[variant.name, case.name]
        process = [run.process_images_per_second for run in done]
        in_run = [run.in_run_images_per_second for run in done]
        baseline = [run.images_per_second for run in baselines]
        baseline_process = [run.images_per_second for run in baseline_processes]
        firsts = [run.first_write_seconds for run in done if run.first_write_seconds is not None]
        idle = [run.model_idle_per_job for run in done if run.model_idle_per_job]
        row = Row(
            date=today(),
            machine=machine,
            model=args.model.rpartition("/")[2] if args.model.startswith("local-dir:") else args.model,
            latency=server.latency.profile.name + cpu_note(args.server_cpu),
            variant=variant.name,
            case=case.name,
            review_share=Spread.of([run.review / run.frames for run in done]),
            frames=spec.count,
            batch_size=batch_size,
            ceiling=Spread.of(ceilings),
            process=Spread.of(process),
            in_run=Spread.of(in_run),
            baseline=Spread.of(baseline),
            b_over_a=Spread.of([b / a for b, a in zip(in_run, around[variant.name, case.name], strict=True)]),
            b_over_c=Spread.of([b / c for b, c in zip(in_run, baseline, strict=True)]),
            b_over_c_process=Spread.of([b / c for b, c in zip(process, baseline, strict=True)]),
            baseline_process=Spread.of(baseline_process),
            b_process_over_c_process=Spread.of(
                [b / c for b, c in zip(process, baseline_process, strict=True)]
            ),
            rss_baseline_process=max(run.peak_rss_bytes or 0 for run in baseline_processes),
            first_write=Spread.of(firsts) if firsts else None,
            model_idle_per_job=tuple(statistics.median(job) for job in zip(*idle, strict=True))
            if idle
            else (),
            rss_n=max(run.peak_rss_bytes for run in done),
            rss_4n=large[variant.name].peak_rss_bytes if case == cases[0] else None,
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
