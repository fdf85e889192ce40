"""Scoring a classifier on ground truth: accuracy, per-label quality, calibration, risk versus coverage.

A prediction is correct when its top-1 label is among the frame's true labels; a frame
whose truth is "none of these" is wrong whatever was predicted.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from prelabel.calibration.maths import (
    ReliabilityBin,
    expected_calibration_error,
    reliability_table,
    risk_coverage,
)

NONE_LABEL = "(none)"


@dataclass(frozen=True)
class LabelQuality:
    precision: float
    recall: float
    predicted: int
    support: int
    """Frames whose truth includes the label."""


@dataclass(frozen=True)
class Evaluation:
    """Every figure the report shows, computed from probabilities and truth."""

    labels: tuple[str, ...]
    count: int
    top1: float
    top5: float
    ece: float
    per_label: dict[str, LabelQuality]
    confusion: np.ndarray
    """[truth, predicted] counts; rows are `labels` then NONE_LABEL, columns `labels`."""
    reliability: list[ReliabilityBin]
    confidence: np.ndarray
    correct: np.ndarray
    margin: np.ndarray
    curve: tuple[np.ndarray, np.ndarray, np.ndarray] = field(repr=False)
    """(thresholds, coverage, precision), see `calibration.risk_coverage`."""

    def at_threshold(self, threshold: float, min_margin: float = 0.0) -> tuple[float, float, int]:
        """(coverage, precision, accepted) when accepting at this threshold and margin."""
        accepted = (self.confidence >= threshold - 1e-9) & (self.margin >= min_margin - 1e-9)
        n = int(accepted.sum())
        precision = float(self.correct[accepted].mean()) if n else 0.0
        return n / self.count if self.count else 0.0, precision, n


def evaluate(probabilities: np.ndarray, truth: list[tuple[str, ...]], labels: tuple[str, ...]) -> Evaluation:
    """Evaluate [N, C] probabilities (columns in `labels` order) against each frame's true labels."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    n, n_labels = probabilities.shape if probabilities.ndim == 2 else (0, len(labels))
    order = np.argsort(-probabilities, axis=1, kind="stable") if n else np.zeros((0, n_labels), int)
    top = order[:, 0] if n else np.zeros(0, int)
    truth_sets = [set(t) for t in truth]
    predicted = [labels[i] for i in top]
    correct = np.array([p in t for p, t in zip(predicted, truth_sets, strict=True)], dtype=bool)
    top5 = np.array(
        [any(labels[i] in t for i in row[:5]) for row, t in zip(order, truth_sets, strict=True)], dtype=bool
    )
    ranked = np.take_along_axis(probabilities, order, axis=1) if n else np.zeros((0, n_labels))
    confidence = ranked[:, 0] if n else np.zeros(0)
    margin = ranked[:, 0] - ranked[:, 1] if n and n_labels > 1 else confidence.copy()

    index = {name: i for i, name in enumerate(labels)}
    confusion = np.zeros((n_labels + 1, n_labels), dtype=int)
    for p, t, top_index in zip(predicted, truth, top, strict=True):
        row = index[p] if p in t else (index.get(t[0], n_labels) if t else n_labels)
        confusion[row, top_index] += 1
    per_label = {}
    for name in labels:
        was_predicted = np.array([p == name for p in predicted], dtype=bool)
        is_true = np.array([name in t for t in truth_sets], dtype=bool)
        hits = int((was_predicted & is_true).sum())
        per_label[name] = LabelQuality(
            precision=hits / int(was_predicted.sum()) if was_predicted.any() else 0.0,
            recall=hits / int(is_true.sum()) if is_true.any() else 0.0,
            predicted=int(was_predicted.sum()),
            support=int(is_true.sum()),
        )
    return Evaluation(
        labels=labels,
        count=n,
        top1=float(correct.mean()) if n else 0.0,
        top5=float(top5.mean()) if n else 0.0,
        ece=expected_calibration_error(confidence, correct),
        per_label=per_label,
        confusion=confusion,
        reliability=reliability_table(confidence, correct),
        confidence=confidence,
        correct=correct,
        margin=margin,
        curve=risk_coverage(confidence, correct),
    )
