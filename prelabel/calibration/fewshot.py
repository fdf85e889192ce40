"""The few-shot cache: image embeddings of human-confirmed frames, blended into zero-shot scores.

In the spirit of Tip-Adapter (Zhang et al., 2022), and training-free: a frame's affinity to
each cached example is ``exp(-beta * (1 - cosine))``; a label's cache score is the mean
affinity to that label's examples, so frequent labels gain nothing from their number. The
blended logits are ``logit_scale * (cosine_to_text + alpha * cache_score)``. A label without
cached examples gets the mean cache score of the others, which leaves the ranking among
the text-only labels as zero-shot had it. An empty cache changes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from prelabel.errors import PrelabelError


@dataclass(frozen=True)
class FewShotCache:
    """Unit image embeddings of confirmed frames and the index of each one's label."""

    labels: tuple[str, ...]
    keys: torch.Tensor
    """[n, embed_dim] unit embeddings, fp32."""
    targets: torch.Tensor
    """[n] label indices into `labels`."""
    alpha: float = 0.1
    beta: float = 5.5
    model_identity: str = ""

    def __len__(self) -> int:
        return int(self.keys.shape[0])

    def scores(self, features: torch.Tensor) -> torch.Tensor:
        """[N, embed_dim] unit image embeddings -> [N, n_labels] cache scores in [0, 1]."""
        n_labels = len(self.labels)
        keys = self.keys.to(features.device)
        affinity = torch.exp(-self.beta * (1.0 - features.float() @ keys.T))  # [N, n]
        onehot = torch.nn.functional.one_hot(self.targets.to(features.device), n_labels).float()
        counts = onehot.sum(dim=0)
        present = counts > 0
        per_label = (affinity @ onehot) / counts.clamp(min=1)
        if not bool(present.all()):
            fill = per_label[:, present].mean(dim=1, keepdim=True)
            per_label = torch.where(present, per_label, fill)
        return per_label

    def for_labels(self, labels: tuple[str, ...]) -> FewShotCache:
        """The same cache re-indexed to `labels`; examples of other labels are dropped."""
        position = {name: i for i, name in enumerate(labels)}
        old = [position.get(name, -1) for name in self.labels]
        mapped = torch.tensor(old, dtype=torch.long)[self.targets] if len(self) else self.targets
        keep = mapped >= 0
        return FewShotCache(labels, self.keys[keep], mapped[keep], self.alpha, self.beta, self.model_identity)


def build_cache(
    features: torch.Tensor,
    label_names: list[str],
    labels: tuple[str, ...],
    *,
    alpha: float,
    beta: float,
    model_identity: str,
) -> FewShotCache:
    """A cache from confirmed examples: `label_names[i]` is the true label of `features[i]`.

    Examples whose label is not in `labels` are left out.
    """
    position = {name: i for i, name in enumerate(labels)}
    keep = [i for i, name in enumerate(label_names) if name in position]
    keys = features[keep].float() if keep else torch.zeros(0, features.shape[1])
    targets = torch.tensor([position[label_names[i]] for i in keep], dtype=torch.long)
    return FewShotCache(labels, keys, targets, alpha, beta, model_identity)


def save_cache(cache: FewShotCache, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(
        {
            "labels": list(cache.labels),
            "keys": cache.keys.cpu(),
            "targets": cache.targets.cpu(),
            "model": cache.model_identity,
        },
        tmp,
    )
    tmp.replace(path)


def load_cache(path: Path, *, alpha: float, beta: float) -> FewShotCache:
    """Read a cache file written by `save_cache` (by `prelabel calibrate`)."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
        return FewShotCache(
            tuple(data["labels"]), data["keys"].float(), data["targets"].long(), alpha, beta, data["model"]
        )
    except FileNotFoundError:
        raise PrelabelError(
            f"few-shot cache {path} not found", hint="run `prelabel calibrate` after `review sync` first"
        ) from None
    except Exception as exc:
        raise PrelabelError(f"few-shot cache {path} is unreadable: {exc}") from None
