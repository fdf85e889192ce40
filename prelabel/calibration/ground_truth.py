"""Ground truth: frames whose true labels people gave, and their image embeddings.

A ground-truth source (a CVAT project's reviewed work, a labeled folder) lists examples
and can fetch their frames. `embed_examples` turns them into one embedding matrix,
encoding each frame once per model: embeddings are kept in the state file under the
model's identity, so a second `eval` or `calibrate` downloads and encodes only the frames
that are new since.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from prelabel.interface import Example, GroundTruthSource
from prelabel.pipeline.model import LoadedModel
from prelabel.pipeline.worker import WorkerOptions, embed
from prelabel.state import RunState


@dataclass(frozen=True)
class LabeledSet:
    """Examples with their unit image embeddings, row for row."""

    examples: list[Example]
    features: torch.Tensor
    """[N, embed_dim] fp32 on the CPU."""
    unreadable: dict[str, str]
    """Key -> why the frame could not be encoded (left out of `examples`)."""

    def __len__(self) -> int:
        return len(self.examples)

    def split(self, held_out: float = 0.5) -> tuple[LabeledSet, LabeledSet]:
        """A deterministic (by key) split into a cache part and a held-out part."""
        mask = [_bucket(example.key) < held_out for example in self.examples]
        return self._subset([not m for m in mask]), self._subset(mask)

    def _subset(self, mask: list[bool]) -> LabeledSet:
        rows = [i for i, keep in enumerate(mask) if keep]
        return LabeledSet(
            [self.examples[i] for i in rows],
            self.features[rows] if rows else self.features[:0],
            self.unreadable,
        )


def embed_examples(
    source: GroundTruthSource,
    loaded: LoadedModel,
    options: WorkerOptions,
    state: RunState | None = None,
    examples: list[Example] | None = None,
    *,
    progress: bool = False,
) -> LabeledSet:
    """Embed the source's examples, reusing the embeddings the state already holds."""
    examples = source.examples() if examples is None else examples
    stored = state.embeddings(loaded.identity, [e.key for e in examples]) if state else {}
    vectors: dict[str, torch.Tensor] = {
        key: torch.from_numpy(np.frombuffer(blob, dtype=np.float32).copy()) for key, blob in stored.items()
    }
    missing = {e.ref: e.key for e in examples if e.key not in vectors}
    unreadable: dict[str, str] = {}
    fresh: list[tuple[str, bytes]] = []
    if missing:
        encoded = embed(source.frames(list(missing)), loaded, options)
        for item in tqdm(encoded, total=len(missing), desc="encoding", unit="frame", disable=not progress):
            key = missing.get(item.frame.ref)
            if key is None:
                continue
            if item.features is None:
                unreadable[key] = item.error or "unreadable"
                continue
            vectors[key] = item.features
            fresh.append((key, item.features.numpy().astype(np.float32).tobytes()))
            if state is not None and len(fresh) >= 256:
                state.record_embeddings(loaded.identity, fresh)
                fresh = []
    if state is not None and fresh:
        state.record_embeddings(loaded.identity, fresh)
    kept = [e for e in examples if e.key in vectors]
    features = torch.stack([vectors[e.key] for e in kept]) if kept else torch.zeros(0, 0)
    return LabeledSet(kept, features, unreadable)


def _bucket(key: str) -> float:
    digest = hashlib.sha256(key.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64
