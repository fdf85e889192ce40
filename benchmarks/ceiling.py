"""(a) The ceiling: the bare image encoder on already preprocessed tensors.

Decoding, preprocessing, networking and uploading are all left out, so no pipeline built on
this model, batch size and device can go faster.
"""

from __future__ import annotations

import time

import torch

from prelabel.pipeline.model import LoadedModel, inference


def encode_throughput(loaded: LoadedModel, batch_size: int, batches: int, *, seed: int = 0) -> float:
    """Images/s of ``encode_image`` over `batches` batches of random input, after one warm-up batch.

    Runs under the same inference mode and autocast as prelabel's worker
    (`prelabel.pipeline.model.inference`), on the model's device.
    """
    generator = torch.Generator().manual_seed(seed)
    height, width = loaded.image_size
    pixels = torch.randn(batch_size, 3, height, width, generator=generator).to(loaded.device)
    with inference(loaded):
        loaded.model.encode_image(pixels, normalize=True)  # warm-up: allocations, kernel choice
        _synchronize(loaded.device)
        start = time.perf_counter()
        for _ in range(batches):
            loaded.model.encode_image(pixels, normalize=True)
        _synchronize(loaded.device)
        seconds = time.perf_counter() - start
    return batch_size * batches / seconds


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
