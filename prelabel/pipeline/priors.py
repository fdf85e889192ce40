"""Label priors: the label distribution a project's frames imply, and a correction against hubs.

A hub label is one whose text embedding is the nearest neighbour of far too many images:
the zero-shot model carries a label bias, as if it believed in a skewed prior. Two tools:

- `estimate_priors` is the EM re-estimation of class priors of Saerens, Latinne & Decaestecker
  (2002): from unlabeled posteriors alone, the label distribution under which the model's
  posteriors, re-weighted by it, average to it. It assumes the model's own prior is known
  (uniform here); it answers "what share would each label get if the model were unbiased".
- `fit_prior_shift` corrects the bias. The correct posteriors of a project average to its
  label distribution (the fixed point EM relies on). With the expected distribution known
  (the ground truth's shares, else uniform), we solve that condition for one additive logit
  shift per label instead of for the prior: the shift minimises the convex function
  ``mean_i logsumexp(l_i - b) + sum_k t_k b_k``, whose gradient vanishes exactly when
  ``mean_i softmax(l_i - b) = t``. EM itself cannot remove a hub: a biased model's posteriors
  make the hub look frequent, and EM would raise its prior further.

Everything works on plain arrays; softmax (CLIP-style) models only. scipy is imported where
it is used: a labeling run, which only counts shares here, never loads it (about 50 MB of RSS).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

HUB_RATIO = 2.0
"""A label predicted for more than this many times its expected share is flagged."""

HUB_MIN_FRAMES = 20
"""No hub warning on fewer scored frames than this."""

_SHIFT_BOUND = 30.0


def softmax(logits: np.ndarray) -> np.ndarray:
    from scipy import special

    return special.softmax(np.asarray(logits, dtype=np.float64), axis=1)


def estimate_priors(
    probabilities: np.ndarray, *, model_prior: np.ndarray | None = None, iterations: int = 1000
) -> np.ndarray:
    """Saerens et al. (2002) EM: the label distribution of these frames, from posteriors alone."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    n_labels = probabilities.shape[1]
    base = np.full(n_labels, 1.0 / n_labels) if model_prior is None else np.asarray(model_prior, float)
    prior = base.copy()
    if len(probabilities) == 0:
        return prior
    for _ in range(iterations):
        weighted = probabilities * (prior / base)
        weighted /= weighted.sum(axis=1, keepdims=True)
        new = weighted.mean(axis=0)
        done = np.abs(new - prior).max() < 1e-9
        prior = new
        if done:
            break
    return prior


def fit_prior_shift(logits: np.ndarray, target: np.ndarray | None = None) -> np.ndarray:
    """The per-label logit shift b (mean zero) with ``mean_i softmax(l_i - b) = target``.

    `logits` are [N, C] (already divided by any temperature); `target` is the expected label
    distribution (default uniform). Zero shift when there are no frames.
    """
    from scipy import optimize, special

    logits = np.asarray(logits, dtype=np.float64)
    n, n_labels = logits.shape
    target = np.full(n_labels, 1.0 / n_labels) if target is None else np.asarray(target, dtype=np.float64)
    target = target / target.sum()
    if n == 0:
        return np.zeros(n_labels)

    def objective(shift: np.ndarray) -> tuple[float, np.ndarray]:
        shifted = logits - shift
        value = float(special.logsumexp(shifted, axis=1).mean() + target @ shift)
        return value, target - special.softmax(shifted, axis=1).mean(axis=0)

    result = optimize.minimize(
        objective,
        np.zeros(n_labels),
        jac=True,
        method="L-BFGS-B",
        bounds=[(-_SHIFT_BOUND, _SHIFT_BOUND)] * n_labels,
        options={"maxiter": 1000, "gtol": 1e-10, "ftol": 1e-14},
    )
    shift = np.asarray(result.x, dtype=np.float64)
    return shift - shift.mean()


def expected_shares(truth: Sequence[Sequence[str]], labels: Sequence[str]) -> dict[str, float]:
    """Each label's share among the frames whose truth names a label (add-one smoothed)."""
    counts = {label: 1.0 for label in labels}
    for names in truth:
        for name in names:
            if name in counts:
                counts[name] += 1.0
    total = sum(counts.values())
    return {label: counts[label] / total for label in labels}


def predicted_shares(predicted: Mapping[str, int], labels: Sequence[str]) -> dict[str, float]:
    """Each label's share of the top-1 predictions."""
    total = sum(predicted.get(label, 0) for label in labels)
    return {label: (predicted.get(label, 0) / total if total else 0.0) for label in labels}


def hub_warnings(
    predicted: Mapping[str, int], expected: Mapping[str, float] | None, labels: Sequence[str]
) -> list[str]:
    """One line per label predicted for more than HUB_RATIO times its expected share.

    `predicted` counts top-1 predictions per label; `expected` is the expected share per
    label (None: uniform). Nothing on fewer than HUB_MIN_FRAMES predictions.
    """
    total = sum(predicted.get(label, 0) for label in labels)
    if total < HUB_MIN_FRAMES or not labels:
        return []
    shares = predicted_shares(predicted, labels)
    warnings = []
    for label in labels:
        want = expected.get(label, 0.0) if expected else 1.0 / len(labels)
        if want > 0 and shares[label] > HUB_RATIO * want:
            warnings.append(
                f"label {label!r} takes {shares[label]:.0%} of the frames, more than {HUB_RATIO:g}x its"
                f" expected {want:.0%}: it may be a hub (see README, prior correction)"
            )
    return warnings


def recall_per_label(predicted: np.ndarray, truth: Sequence[Sequence[str]], labels: Sequence[str]) -> dict:
    """Recall of each label: of the frames whose truth includes it, the share predicted as it."""
    out = {}
    for k, label in enumerate(labels):
        mine = np.array([label in names for names in truth], dtype=bool)
        out[label] = float((np.asarray(predicted)[mine] == k).mean()) if mine.any() else 0.0
    return out


@dataclass(frozen=True)
class PriorComparison:
    """Top-1 and per-label recall without and with the prior shift, and the label shares."""

    labels: tuple[str, ...]
    shift: dict[str, float]
    top1_before: float
    top1_after: float
    recall_before: dict[str, float]
    recall_after: dict[str, float]
    predicted_before: dict[str, float]
    """Each label's share of the top-1 predictions, without the shift."""
    predicted_after: dict[str, float]
    estimated: dict[str, float]
    """Saerens EM estimate of the label distribution (model prior taken as uniform)."""
    truth: dict[str, float]
    """Each label's share among the frames whose truth names a label."""
    warnings: list[str]
    """Hub warnings on the predictions without the shift, against the truth's shares."""


def compare(
    logits: np.ndarray, shift: np.ndarray, truth: Sequence[Sequence[str]], labels: Sequence[str]
) -> PriorComparison:
    """What `shift` does to [N, C] (temperature-scaled) logits, measured against `truth`."""
    logits = np.asarray(logits, dtype=np.float64)
    labels = tuple(labels)
    before, after = logits.argmax(axis=1), (logits - shift).argmax(axis=1)

    def top1(predicted: np.ndarray) -> float:
        hits = [labels[k] in names for k, names in zip(predicted, truth, strict=True)]
        return float(np.mean(hits)) if hits else 0.0

    def counts(predicted: np.ndarray) -> dict[str, int]:
        return {label: int((predicted == k).sum()) for k, label in enumerate(labels)}

    in_set = [names for names in truth if any(name in labels for name in names)]
    truth_counts = {label: sum(label in names for names in in_set) for label in labels}
    total = sum(truth_counts.values())
    truth_shares = {label: (truth_counts[label] / total if total else 0.0) for label in labels}
    return PriorComparison(
        labels=labels,
        shift={label: float(v) for label, v in zip(labels, shift, strict=True)},
        top1_before=top1(before),
        top1_after=top1(after),
        recall_before=recall_per_label(before, truth, labels),
        recall_after=recall_per_label(after, truth, labels),
        predicted_before=predicted_shares(counts(before), labels),
        predicted_after=predicted_shares(counts(after), labels),
        estimated=dict(zip(labels, estimate_priors(softmax(logits)).tolist(), strict=True)),
        truth=truth_shares,
        warnings=hub_warnings(counts(before), truth_shares if total else None, labels),
    )
