"""The zero-shot text classifier: one ensembled text embedding per label.

Each label's prompts are its configured descriptions, or its name expanded through the
prompt templates. Their normalised text embeddings are averaged and re-normalised (prompt
ensembling, as in the CLIP paper). A classifier is built once per (model, labels,
prompts) and cached on disk under its fingerprint.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import open_clip
import torch

from prelabel.config import Config
from prelabel.pipeline.model import LoadedModel, inference

if TYPE_CHECKING:  # the few-shot cache is built by prelabel.calibration and passed in
    from prelabel.calibration.fewshot import FewShotCache

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TextClassifier:
    """Turns normalised image embeddings into per-label probabilities."""

    labels: tuple[str, ...]
    weights: torch.Tensor
    """[embed_dim, n_labels], unit columns, fp32, on the model's device."""
    logit_scale: float
    logit_bias: float | None
    """Set for SigLIP-family models, whose scores are per-label sigmoids."""
    fingerprint: str
    """Of the text weights: model and prompts."""
    temperature: float = 1.0
    """Calibrated temperature the logits are divided by (1: as the model says)."""
    cache: FewShotCache | None = None
    """Few-shot cache of confirmed frames blended into the logits (None: zero-shot only)."""
    background: torch.Tensor | None = None
    """[embed_dim, n_prompts] unit columns of the background prompts (a pseudo-label never tagged)."""
    prior_shift: torch.Tensor | None = None
    """[n_labels] per-label shift subtracted from the scaled logits (prior correction; softmax only)."""

    def logits(self, image_features: torch.Tensor) -> torch.Tensor:
        """[N, embed_dim] unit image embeddings -> [N, n_labels] logits, before temperature.

        ``logit_scale * cosine`` (plus ``logit_bias`` for SigLIP), with the few-shot
        cache's scores added to the cosine when a cache is set.
        """
        features = image_features.float()
        similarity = features @ self.weights
        if self.cache is not None and len(self.cache):
            similarity = similarity + self.cache.alpha * self.cache.scores(features)
        logits = self.logit_scale * similarity
        return logits + self.logit_bias if self.logit_bias is not None else logits

    def probabilities(self, image_features: torch.Tensor) -> torch.Tensor:
        """[N, embed_dim] unit image embeddings -> [N, n_labels] probabilities.

        CLIP: softmax over the labels of ``logits / temperature``. SigLIP: an independent
        sigmoid of ``logits / temperature`` per label.
        """
        logits = self.logits(image_features) / self.temperature
        if self.logit_bias is not None:
            return torch.sigmoid(logits)
        if self.prior_shift is not None:
            logits = logits - self.prior_shift.to(logits.device)
        return logits.softmax(dim=-1)

    def fit_scores(self, image_features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The open-set scores of [N, embed_dim] unit image embeddings.

        [N] fit: the best raw cosine with any label's text embedding; and [N] the lead of the
        best background prompt's cosine over the best label's (None without background prompts;
        above 0: the background wins).
        """
        cosine = image_features.float() @ self.weights
        fit = cosine.max(dim=-1).values
        if self.background is None or self.background.shape[1] == 0:
            return fit, None
        background = (image_features.float() @ self.background.to(cosine.device)).max(dim=-1).values
        return fit, background - fit


def label_prompts(labels: Sequence[str], config: Config) -> dict[str, list[str]]:
    """The prompts of each label: its config descriptions, else the templates filled in."""
    prompts = {}
    for name in labels:
        entry = config.label(name)
        if entry is not None and entry.descriptions:
            prompts[name] = list(entry.descriptions)
        else:
            prompts[name] = [template.replace("{}", name) for template in config.prompts.templates]
    return prompts


def classifier_fingerprint(model_identity: str, prompts: dict[str, list[str]]) -> str:
    """A stable hash of everything the classifier's weights depend on."""
    payload = {
        "model": model_identity,
        "prompts": [[label, list(texts)] for label, texts in prompts.items()],
        "open_clip": open_clip.__version__,
    }
    return hashlib.sha256(json.dumps(payload, ensure_ascii=False).encode()).hexdigest()[:16]


def build_classifier(
    loaded: LoadedModel, prompts: dict[str, list[str]], cache_dir: Path | None = None
) -> TextClassifier:
    """Build (or read from the disk cache) the classifier for these prompts.

    A long-lived process keeps the classifiers it built in its `PipelineCache`
    (`prelabel.assemble`); nothing is kept process-wide here.
    """
    fingerprint = classifier_fingerprint(loaded.identity, prompts)
    path = cache_dir / "classifiers" / f"{fingerprint}.pt" if cache_dir else None
    weights = _read_cached(path, len(prompts))
    if weights is None:
        weights = _ensemble(loaded, prompts)
        _write_cached(path, weights)
    model = loaded.model
    bias = getattr(model, "logit_bias", None)
    classifier = TextClassifier(
        labels=tuple(prompts),
        weights=weights.to(loaded.device),
        logit_scale=float(model.logit_scale.detach().float().exp()),
        logit_bias=None if bias is None else float(bias.detach().float()),
        fingerprint=fingerprint,
    )
    return classifier


def _ensemble(loaded: LoadedModel, prompts: dict[str, list[str]]) -> torch.Tensor:
    texts = [text for label_texts in prompts.values() for text in label_texts]
    with inference(loaded):
        tokens = loaded.tokenizer(texts).to(loaded.device)
        embeddings = loaded.model.encode_text(tokens, normalize=True).float()
    columns, start = [], 0
    for label_texts in prompts.values():
        mean = embeddings[start : start + len(label_texts)].mean(dim=0)
        columns.append(mean / mean.norm())
        start += len(label_texts)
    return torch.stack(columns, dim=1).cpu()


def _read_cached(path: Path | None, n_labels: int) -> torch.Tensor | None:
    if path is None or not path.is_file():
        return None
    try:
        weights = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a corrupt cache entry is rebuilt, never fatal
        log.warning("ignoring unreadable classifier cache %s: %s", path, exc)
        return None
    if not isinstance(weights, torch.Tensor) or weights.ndim != 2 or weights.shape[1] != n_labels:
        return None
    return weights


def _write_cached(path: Path | None, weights: torch.Tensor) -> None:
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(weights, tmp)
        tmp.replace(path)
    except OSError as exc:
        log.warning("could not cache the classifier at %s: %s", path, exc)
