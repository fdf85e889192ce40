"""Calibration mathematics: temperature scaling and accept thresholds with a guarantee.

Everything here works on plain arrays, so it is tested on synthetic data with known
answers:

- `fit_temperature` finds the T that minimises the negative log-likelihood of the true
  labels under ``softmax(logits / T)`` (or per-label sigmoids for SigLIP-style models);
- `precision_lower_bound` is the one-sided Clopper-Pearson bound on a binomial proportion;
- `choose_threshold` picks the accept threshold with the largest coverage whose precision
  bound reaches the target. It looks at a fixed number of candidate thresholds and splits
  the error rate among them (Bonferroni), so the bounds hold for all candidates at once:
  the chosen threshold's precision is at least the target with the stated confidence,
  even though the best of several thresholds was picked.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

TEMPERATURE_BOUNDS = (0.02, 50.0)


def fit_temperature(logits: np.ndarray, targets: np.ndarray, *, sigmoid: bool = False) -> float:
    """The temperature T > 0 that minimises the NLL of `targets` under the scaled logits.

    Softmax: `logits` is [N, C] and `targets` holds N class indices. Sigmoid: `targets`
    is an [N, C] 0/1 matrix and each entry is an independent Bernoulli. One scalar for all
    labels, as in Guo et al. (2017); it never changes which label ranks first.
    """
    from scipy import optimize, special  # where used: labeling runs never load scipy

    logits = np.asarray(logits, dtype=np.float64)
    targets = np.asarray(targets)
    if len(logits) == 0:
        raise ValueError("no examples to fit a temperature on")

    def nll(log_t: float) -> float:
        scaled = logits / math.exp(log_t)
        if sigmoid:
            # -log sigmoid(x) = softplus(-x), -log(1 - sigmoid(x)) = softplus(x)
            return float(np.mean(np.logaddexp(0, np.where(targets > 0, -scaled, scaled))))
        picked = scaled[np.arange(len(scaled)), targets]
        return float(np.mean(special.logsumexp(scaled, axis=1) - picked))

    low, high = (math.log(bound) for bound in TEMPERATURE_BOUNDS)
    result = optimize.minimize_scalar(nll, bounds=(low, high), method="bounded", options={"xatol": 1e-5})
    return float(math.exp(result.x))


def precision_lower_bound(correct: int, total: int, confidence: float = 0.95) -> float:
    """One-sided Clopper-Pearson lower bound on a proportion: `correct` of `total`."""
    from scipy import stats  # where used: labeling runs never load scipy

    if total <= 0 or correct <= 0:
        return 0.0
    return float(stats.beta.ppf(1.0 - confidence, correct, total - correct + 1))


def samples_needed(precision: float, target: float, confidence: float = 0.95) -> int | None:
    """Fewest accepted frames at which a precision of `precision` would certify `target`.

    None when no amount of data would (the precision is not above the target).
    """
    if precision <= target:
        return None
    n = 1
    while n < 1_000_000:
        if precision_lower_bound(math.floor(precision * n), n, confidence) >= target:
            return n
        n = max(n + 1, int(n * 1.1))
    return None


@dataclass(frozen=True)
class ThresholdChoice:
    """An accept threshold and what it does on the data it was chosen on."""

    threshold: float
    accepted: int
    correct: int
    total: int
    lower_bound: float

    @property
    def coverage(self) -> float:
        """The fraction of frames accepted."""
        return self.accepted / self.total if self.total else 0.0

    @property
    def precision(self) -> float:
        return self.correct / self.accepted if self.accepted else 0.0


DEFAULT_STEPS = 20


def candidate_thresholds(confidence: np.ndarray, steps: int = DEFAULT_STEPS) -> list[float]:
    """Strictest first: the confidences at which 1/steps, 2/steps, ... of the frames are accepted."""
    ordered = np.sort(np.asarray(confidence, dtype=np.float64))[::-1]
    if len(ordered) == 0:
        return []
    picks = {
        float(ordered[min(len(ordered) - 1, math.ceil(len(ordered) * i / steps) - 1)])
        for i in range(1, steps + 1)
    }
    return sorted(picks, reverse=True)


def choose_threshold(
    confidence: np.ndarray,
    correct: np.ndarray,
    target: float,
    *,
    confidence_level: float = 0.95,
    eligible: np.ndarray | None = None,
    steps: int = DEFAULT_STEPS,
) -> ThresholdChoice | None:
    """The loosest threshold whose precision provably reaches `target`, or None.

    A frame is accepted when ``confidence >= threshold`` (and `eligible`, e.g. its margin
    rule, holds). The candidates are the thresholds that accept 1/steps, 2/steps, ... of
    the frames; each one's Clopper-Pearson lower bound is taken at confidence
    ``1 - (1 - confidence_level) / candidates``, and the candidate with the most accepted
    frames whose bound reaches the target wins.
    """
    confidence = np.asarray(confidence, dtype=np.float64)
    correct = np.asarray(correct, dtype=bool)
    eligible = np.ones_like(correct) if eligible is None else np.asarray(eligible, dtype=bool)
    total = len(confidence)
    candidates = candidate_thresholds(confidence, steps)
    level = adjusted_level(confidence_level, len(candidates))
    best: ThresholdChoice | None = None
    for threshold in candidates:
        accepted = (confidence >= threshold) & eligible
        n, k = int(accepted.sum()), int((accepted & correct).sum())
        bound = precision_lower_bound(k, n, level)
        if bound >= target and (best is None or n > best.accepted):
            best = ThresholdChoice(threshold, n, k, total, bound)
    return best


def adjusted_level(confidence_level: float, candidates: int) -> float:
    """The per-candidate confidence that keeps `confidence_level` for all candidates at once."""
    return 1.0 - (1.0 - confidence_level) / max(1, candidates)


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, bins: int = 15) -> float:
    """ECE over equal-width confidence bins: sum over bins of weight * |accuracy - confidence|."""
    table = reliability_table(confidence, correct, bins)
    total = sum(row.count for row in table)
    if total == 0:
        return 0.0
    return float(sum(row.count * abs(row.accuracy - row.confidence) for row in table if row.count) / total)


@dataclass(frozen=True)
class ReliabilityBin:
    low: float
    high: float
    count: int
    confidence: float
    """Mean confidence of the bin's frames (0 when empty)."""
    accuracy: float


def reliability_table(confidence: np.ndarray, correct: np.ndarray, bins: int = 15) -> list[ReliabilityBin]:
    """Equal-width bins over [0, 1]; the last bin includes 1.0."""
    confidence = np.asarray(confidence, dtype=np.float64)
    correct = np.asarray(correct, dtype=bool)
    edges = np.linspace(0.0, 1.0, bins + 1)
    index = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    table = []
    for b in range(bins):
        members = index == b
        count = int(members.sum())
        table.append(
            ReliabilityBin(
                low=float(edges[b]),
                high=float(edges[b + 1]),
                count=count,
                confidence=float(confidence[members].mean()) if count else 0.0,
                accuracy=float(correct[members].mean()) if count else 0.0,
            )
        )
    return table


def risk_coverage(confidence: np.ndarray, correct: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(thresholds, coverage, precision) as the threshold falls through every confidence.

    Entry i accepts the i+1 most confident frames; ties are cut at the last frame of a tie.
    """
    confidence = np.asarray(confidence, dtype=np.float64)
    order = np.argsort(-confidence, kind="stable")
    ranked_conf = confidence[order]
    hits = np.cumsum(np.asarray(correct, dtype=np.float64)[order])
    counts = np.arange(1, len(order) + 1)
    last_of_tie = np.append(ranked_conf[1:] != ranked_conf[:-1], True)
    return ranked_conf[last_of_tie], counts[last_of_tie] / len(order), hits[last_of_tie] / counts[last_of_tie]
