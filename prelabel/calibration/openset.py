"""Open-set scoring: how well does *any* configured label fit a frame?

The softmax over the configured labels always has a winner, also for a frame that shows
none of them (an empty frame, background, a class nobody configured); with few labels that
winner is often confident. The fit score looks at the raw image-text cosine instead, which
does not renormalise over the labels:

- `fit` is the best raw cosine between the frame and any label's (ensembled) text embedding;
- `background` is the lead of the best background prompt (optional, a pseudo-label that is
  never written as a tag) over the best label: a frame it wins goes to review.

`choose_floor` learns the fit floor together with the accept threshold from ground truth in
which "none of these" frames count as errors, keeping the precision guarantee of
`calibration.choose_threshold`: the floors tried are a fixed, small set and the error rate is
split among them (Bonferroni), on top of the split among thresholds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from prelabel.calibration.maths import ThresholdChoice, adjusted_level, choose_threshold

FLOOR_QUANTILES = (0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5)
"""Floors tried by `choose_floor`: the fits below which these fractions of frames fall (and none)."""

MIN_NONE_FRAMES = 10
"""Fewer "none of these" frames than this: the reports say nothing can be concluded."""


def best_cosine(features: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """[N, D] unit image embeddings, [D, C] unit text columns -> [N] best cosine (-inf if C = 0)."""
    features = np.asarray(features, dtype=np.float64)
    weights = np.asarray(weights, dtype=np.float64)
    if weights.ndim != 2 or weights.shape[1] == 0:
        return np.full(len(features), -np.inf)
    return (features @ weights).max(axis=1)


def no_fit(fit: np.ndarray, background: np.ndarray | None, floor: float | None) -> np.ndarray:
    """Which frames "no label fits": fit below the floor, or a background prompt leading (> 0)."""
    fit = np.asarray(fit, dtype=np.float64)
    out = np.zeros(len(fit), dtype=bool)
    if floor is not None:
        out |= fit + 1e-9 < floor
    if background is not None:
        out |= np.asarray(background, dtype=np.float64) > 0
    return out


def floor_candidates(fit: np.ndarray, quantiles: tuple[float, ...] = FLOOR_QUANTILES) -> list[float | None]:
    """None (no floor) first, then the fits at the given quantiles, lowest first, without repeats."""
    fit = np.asarray(fit, dtype=np.float64)
    if len(fit) == 0:
        return [None]
    values = sorted({round(float(np.quantile(fit, q, method="lower")), 6) for q in quantiles})
    return [None, *values]


@dataclass(frozen=True)
class FloorChoice:
    floor: float | None
    """None: no floor gives the most coverage."""
    threshold: ThresholdChoice
    candidates: int
    """Floors tried (the confidence was split among them)."""


def choose_floor(
    confidence: np.ndarray,
    correct: np.ndarray,
    fit: np.ndarray,
    target: float,
    *,
    confidence_level: float = 0.95,
    eligible: np.ndarray | None = None,
    quantiles: tuple[float, ...] = FLOOR_QUANTILES,
) -> FloorChoice | None:
    """The (fit floor, accept threshold) pair with the most accepted frames whose precision
    provably reaches `target`, or None.

    `correct` must be False for frames whose truth is "none of these" (any accepted tag on
    them is an error). Each floor's thresholds are chosen by `choose_threshold` at confidence
    ``1 - (1 - confidence_level) / floors``, so the bound holds for every pair at once. On a
    tie the lower floor (or none) wins.
    """
    fit = np.asarray(fit, dtype=np.float64)
    base = np.ones(len(fit), dtype=bool) if eligible is None else np.asarray(eligible, dtype=bool)
    floors = floor_candidates(fit, quantiles)
    level = adjusted_level(confidence_level, len(floors))
    best: FloorChoice | None = None
    for floor in floors:
        allowed = base if floor is None else base & (fit + 1e-9 >= floor)
        choice = choose_threshold(confidence, correct, target, confidence_level=level, eligible=allowed)
        if choice is not None and (best is None or choice.accepted > best.threshold.accepted):
            best = FloorChoice(floor, choice, len(floors))
    return best


def auroc(scores: np.ndarray, positive: np.ndarray) -> float | None:
    """Area under the ROC curve: the chance that a random positive scores above a random
    negative (ties count half). None when either class is empty."""
    from scipy import stats  # where used: labeling runs never load scipy

    scores = np.asarray(scores, dtype=np.float64)
    positive = np.asarray(positive, dtype=bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = stats.rankdata(scores)  # average ranks over ties, 1-based
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


@dataclass(frozen=True)
class OpenSetSummary:
    """How the open-set route does on ground truth with "none of these" frames."""

    none_frames: int
    in_set_frames: int
    auroc: float | None
    """How well the fit score ranks in-set frames above "none" frames (None: a class is empty)."""
    caught: float
    """Fraction of "none" frames the open-set route sends to review."""
    in_set_sent: float
    """Fraction of in-set frames it sends to review."""
    without: tuple[float, float, int]
    """(coverage, precision, accepted) of accepted tags without the open-set route."""
    with_route: tuple[float, float, int]
    """The same with it."""

    @property
    def enough(self) -> bool:
        """Whether there are enough "none" frames to say anything."""
        return self.none_frames >= MIN_NONE_FRAMES


def summarize(
    accepted: np.ndarray,
    correct: np.ndarray,
    none: np.ndarray,
    fit: np.ndarray,
    background: np.ndarray | None,
    floor: float | None,
) -> OpenSetSummary:
    """Open-set figures: `accepted` is what confidence and margin accept, `correct` whether the
    top-1 is right (False on "none" frames), `none` which frames' truth is "none of these"."""
    accepted = np.asarray(accepted, dtype=bool)
    correct = np.asarray(correct, dtype=bool)
    none = np.asarray(none, dtype=bool)
    routed = no_fit(fit, background, floor)

    def outcome(mask: np.ndarray) -> tuple[float, float, int]:
        n = int(mask.sum())
        return (n / len(mask) if len(mask) else 0.0, float(correct[mask].mean()) if n else 0.0, n)

    return OpenSetSummary(
        none_frames=int(none.sum()),
        in_set_frames=int((~none).sum()),
        auroc=auroc(fit, ~none),
        caught=float(routed[none].mean()) if none.any() else 0.0,
        in_set_sent=float(routed[~none].mean()) if (~none).any() else 0.0,
        without=outcome(accepted),
        with_route=outcome(accepted & ~routed),
    )
