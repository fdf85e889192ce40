"""CPU time per frame of decoding and preprocessing: ``python -m benchmarks.preprocess``.

One thread, the benchmark's 1280x720 JPEG frames, the model's input size: decoding (with
and without draft mode), then open_clip's own transform next to `crop_first`'s and next to
the run's (`split`: per frame on the decode threads, then once per batch on the model's
thread, whose CPU time is counted per frame), in alternating rounds so that the machine's
drift hits all alike. Prints CPU milliseconds per frame (the median of the rounds) and the
ratios.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Sequence

import open_clip
import torch

from benchmarks.dataset import FrameSpec, make_jpegs
from prelabel.interface import Frame
from prelabel.pipeline.decode import decode
from prelabel.pipeline.preprocess import crop_first, split


def _per_frame_ms(
    step: Callable[[object], object], items: Sequence[object], frames: int | None = None
) -> float:
    """CPU time of the whole process (torch's threads too) per frame; `items` holds `frames` frames."""
    start = time.process_time()
    for item in items:
        step(item)
    return (time.process_time() - start) / (frames or len(items)) * 1000


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.preprocess", description=__doc__)
    parser.add_argument("--frames", type=int, default=64, help="frames per round (default 64)")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds (default 5)")
    parser.add_argument("--image-size", type=int, default=224, help="the model's input size (default 224)")
    args = parser.parse_args(argv)

    spec = FrameSpec(count=args.frames)
    frames = [Frame(index, name, data) for index, (name, data) in enumerate(make_jpegs(spec))]
    size = (args.image_size, args.image_size)
    transform = open_clip.image_transform(args.image_size, is_train=False)
    fast = crop_first(transform)
    parts = split(transform, crop=True)
    images = [decode(frame, size, draft=True)[0] for frame in frames]
    stacked = [torch.stack([parts.frame(image) for image in images])]
    steps: dict[str, tuple[Callable[[object], object], Sequence[object], int | None]] = {
        "decode, full size": (lambda frame: decode(frame, size, draft=False), frames, None),
        "decode, draft": (lambda frame: decode(frame, size, draft=True), frames, None),
        "open_clip transform": (transform, images, None),
        "crop_first transform": (fast, images, None),
        "split: per frame": (parts.frame, images, None),
        "split: per batch": (parts.batch, stacked, len(images)),
    }
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, (step, items, count) in steps.items():
            times[name].append(_per_frame_ms(step, items, count))
    print(
        f"{spec.count} frames of {spec.size[0]}x{spec.size[1]} (decoded with draft: "
        f"{images[0].size[0]}x{images[0].size[1]}), model input {args.image_size}, "
        f"one thread (and torch's, whose CPU time counts), median of {args.rounds} rounds"
    )
    for name, values in times.items():
        print(f"  {name:22} {statistics.median(values):6.2f} ms/frame")
    slow = statistics.median(times["open_clip transform"])
    quick = statistics.median(times["crop_first transform"])
    draft = statistics.median(times["decode, draft"])
    on_threads = statistics.median(times["split: per frame"])
    print(
        f"  transform: crop_first / open_clip = {quick / slow:.2f}; "
        f"decode (draft) + transform: {draft + slow:.2f} -> {draft + quick:.2f} ms/frame; "
        f"on the decode threads with split: {draft + on_threads:.2f} ms/frame "
        f"(+{statistics.median(times['split: per batch']):.2f} on the model's thread)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
