"""Learning the temperature and accept thresholds from ground truth, and the calibration file.

`fit_calibration` scores the labeled frames with the classifier, fits one temperature,
then chooses the accept threshold (global, and per label where a label has enough
predictions) whose precision lower bound reaches the target under the config's margin
rule. `prelabel run` reads the result from the calibration file through
`apply_calibration`; a file made for another model or label set is refused.
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import yaml

from prelabel.calibration.fewshot import FewShotCache
from prelabel.calibration.ground_truth import LabeledSet
from prelabel.calibration.maths import (
    adjusted_level,
    candidate_thresholds,
    choose_threshold,
    fit_temperature,
    samples_needed,
)
from prelabel.calibration.openset import FLOOR_QUANTILES, MIN_NONE_FRAMES, choose_floor, no_fit
from prelabel.errors import ConfigError, PrelabelError
from prelabel.pipeline.classifier import TextClassifier
from prelabel.pipeline.priors import expected_shares, fit_prior_shift
from prelabel.pipeline.router import RoutingPolicy


@dataclass(frozen=True)
class Calibration:
    """What `prelabel calibrate` learned; `run` applies it when model and labels match."""

    model: str
    labels: list[str]
    temperature: float
    accept_threshold: float
    label_thresholds: dict[str, float]
    min_margin: float
    target_precision: float
    confidence: float
    examples: int
    expected_coverage: float
    precision_on_examples: float
    precision_lower_bound: float
    fewshot: bool = False
    created: str = ""
    fit_floor: float | None = None
    """Learned open-set floor on the fit score (None: no floor)."""
    none_examples: int = 0
    """Frames of the ground truth whose truth is "none of these"."""
    prior_correction: bool = False
    """Whether the thresholds were chosen with `prior_shift` applied (then `run` applies it)."""
    prior_shift: dict[str, float] = field(default_factory=dict)
    """Per-label logit shift that makes the frames' mean posterior match `label_shares`."""
    label_shares: dict[str, float] = field(default_factory=dict)
    """Each label's share in the ground truth (add-one smoothed): the expected shares."""


class NotEnoughData(PrelabelError):
    """Too few reviewed frames to certify the target precision; nothing was changed."""

    exit_code = 4


@dataclass(frozen=True)
class Scores:
    """Logits and (temperature-scaled) probabilities of labeled frames."""

    logits: np.ndarray
    probabilities: np.ndarray
    truth: list[tuple[str, ...]]


def score_examples(
    labeled: LabeledSet,
    classifier: TextClassifier,
    temperature: float = 1.0,
    *,
    leave_one_out: bool = False,
) -> Scores:
    """Score labeled frames; with `leave_one_out`, a frame's own cache entry is not used.

    The cache must then hold the labeled frames row for row (see `cache_from`).
    """
    features = labeled.features
    with torch.no_grad():
        if leave_one_out and classifier.cache is not None and len(classifier.cache):
            similarity = features @ classifier.weights + classifier.cache.alpha * _loo_scores(
                classifier.cache, features
            )
            logits = classifier.logit_scale * similarity
            if classifier.logit_bias is not None:
                logits = logits + classifier.logit_bias
        else:
            logits = classifier.logits(features)
        scaled = logits / temperature
        if classifier.prior_shift is not None and classifier.logit_bias is None:
            scaled = scaled - classifier.prior_shift.to(scaled.device)
        probabilities = torch.sigmoid(scaled) if classifier.logit_bias is not None else scaled.softmax(-1)
    truth = [example.labels for example in labeled.examples]
    return Scores(logits.double().numpy(), probabilities.double().numpy(), truth)


def cache_from(
    labeled: LabeledSet, labels: tuple[str, ...], alpha: float, beta: float, model: str
) -> FewShotCache:
    """A few-shot cache of every labeled frame with exactly one known label."""
    position = {name: i for i, name in enumerate(labels)}
    rows = [i for i, e in enumerate(labeled.examples) if len(e.labels) == 1 and e.labels[0] in position]
    keys = labeled.features[rows] if rows else torch.zeros(0, labeled.features.shape[1])
    targets = torch.tensor([position[labeled.examples[i].labels[0]] for i in rows], dtype=torch.long)
    return FewShotCache(labels, keys.float(), targets, alpha, beta, model)


def _loo_scores(cache: FewShotCache, features: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """Cache scores of frames, each scored without its own cache entry (if it has one)."""
    n_labels = len(cache.labels)
    onehot = torch.nn.functional.one_hot(cache.targets, n_labels).float()
    own = torch.tensor(_own_rows(features, cache.keys))
    parts = []
    for start in range(0, len(features), chunk):  # bounded memory: chunk x cache size
        block, rows = features[start : start + chunk].float(), own[start : start + chunk]
        affinity = torch.exp(-cache.beta * (1.0 - block @ cache.keys.T))
        counts = onehot.sum(0).expand(len(block), n_labels).clone()
        mine = (rows >= 0).nonzero().flatten()
        affinity[mine, rows[mine]] = 0.0
        counts[mine] -= onehot[rows[mine]]
        present = counts > 0
        per_label = (affinity @ onehot) / counts.clamp(min=1)
        fill = (per_label * present).sum(1, keepdim=True) / present.sum(1, keepdim=True).clamp(min=1)
        parts.append(torch.where(present, per_label, fill))
    return torch.cat(parts) if parts else torch.zeros(0, n_labels)


def _own_rows(features: torch.Tensor, keys: torch.Tensor) -> list[int]:
    """For each frame, the cache row holding exactly its embedding, or -1."""
    index = {row.numpy().tobytes(): i for i, row in enumerate(keys.float())}
    return [index.get(row.numpy().tobytes(), -1) for row in features.float()]


@dataclass(frozen=True)
class FitResult:
    calibration: Calibration
    scores_before: Scores
    scores_after: Scores
    per_label_skipped: dict[str, str] = field(default_factory=dict)


def fit_calibration(
    labeled: LabeledSet,
    classifier: TextClassifier,
    policy: RoutingPolicy,
    *,
    model_identity: str,
    target: float,
    confidence: float = 0.95,
    min_examples: int = 50,
    per_label_min: int = 100,
    fewshot: bool = False,
    prior_correction: bool = False,
) -> FitResult:
    """Fit temperature, fit floor and thresholds, or raise `NotEnoughData` saying how much more is needed.

    A frame whose truth is "none of these" counts as an error whenever a tag would be
    accepted on it, so the precision bound covers the open-set route too. The fit floor and
    the accept threshold are chosen together (`openset.choose_floor`), when there are at least
    `MIN_NONE_FRAMES` "none" frames to learn the floor from; frames a background
    prompt wins are never accepted. With `prior_correction`, the per-label prior shift is
    estimated from the frames' scores alone and the thresholds are chosen with it applied.
    """
    if policy.multi_label:
        raise ConfigError("calibrate supports single-label routing only (routing.multi_label is set)")
    labels = classifier.labels
    count = len(labeled)
    if count < min_examples:
        raise NotEnoughData(
            f"only {count} reviewed frames with known labels; calibration needs at least {min_examples}"
            f" ({min_examples - count} more): review more frames, then `prelabel review sync`",
            hint="nothing was changed",
        )
    before = score_examples(labeled, classifier, leave_one_out=fewshot)
    temperature = _fit(before, labels, sigmoid=classifier.logit_bias is not None)
    sigmoid = classifier.logit_bias is not None
    shares = expected_shares(before.truth, labels)
    shift = (
        np.zeros(len(labels))
        if sigmoid
        else fit_prior_shift(before.logits / temperature, _vector(shares, labels))
    )
    if prior_correction and not sigmoid:
        classifier = replace(classifier, prior_shift=torch.tensor(shift, dtype=torch.float32))
    after = score_examples(labeled, classifier, temperature, leave_one_out=fewshot)
    confidence_, correct, predicted, margin = _ranked(after, labels)
    fit, background = fit_scores_of(labeled, classifier)
    eligible = margin + 1e-9 >= np.array([policy.margin(label) for label in predicted])
    eligible &= ~no_fit(fit, background, None)
    # The floor is learned from "none of these" frames; with too few of them only "no floor"
    # is tried, so the threshold keeps the whole confidence (as before there was a floor).
    none_count = sum(not truth for truth in after.truth)
    floor_choice = choose_floor(
        confidence_,
        correct,
        fit,
        target,
        confidence_level=confidence,
        eligible=eligible,
        quantiles=FLOOR_QUANTILES if none_count >= MIN_NONE_FRAMES else (),
    )
    if floor_choice is None:
        raise NotEnoughData(
            _shortfall(confidence_, correct, eligible, target, confidence), hint="nothing was changed"
        )
    choice, floor = floor_choice.threshold, floor_choice.floor
    if floor is not None:
        eligible &= fit + 1e-9 >= floor
    label_thresholds, skipped = {}, {}
    for label in labels:
        mine = np.array([p == label for p in predicted])
        if mine.sum() < per_label_min:
            skipped[label] = f"{int(mine.sum())} predictions (< {per_label_min})"
            continue
        own = choose_threshold(
            confidence_[mine], correct[mine], target, confidence_level=confidence, eligible=eligible[mine]
        )
        if own is None:
            skipped[label] = "no threshold certifies the target"
            continue
        label_thresholds[label] = round(own.threshold, 6)
    accepted = _accepted(confidence_, eligible, predicted, choice.threshold, label_thresholds)
    calibration = Calibration(
        model=model_identity,
        labels=sorted(labels),
        temperature=round(temperature, 6),
        accept_threshold=round(choice.threshold, 6),
        label_thresholds=label_thresholds,
        min_margin=policy.min_margin,
        target_precision=target,
        confidence=confidence,
        examples=count,
        expected_coverage=round(float(accepted.mean()), 4),
        precision_on_examples=round(float(correct[accepted].mean()) if accepted.any() else 0.0, 4),
        precision_lower_bound=round(choice.lower_bound, 4),
        fewshot=fewshot,
        created=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        fit_floor=None if floor is None else round(floor, 6),
        none_examples=none_count,
        prior_correction=prior_correction and not sigmoid,
        prior_shift={}
        if sigmoid
        else {label: round(float(v), 6) for label, v in zip(labels, shift, strict=True)},
        label_shares={label: round(share, 6) for label, share in shares.items()},
    )
    return FitResult(calibration, before, after, skipped)


def _vector(values: dict[str, float], labels: tuple[str, ...]) -> np.ndarray:
    return np.array([values.get(label, 0.0) for label in labels], dtype=np.float64)


def fit_scores_of(labeled: LabeledSet, classifier: TextClassifier) -> tuple[np.ndarray, np.ndarray | None]:
    """The open-set fit and background scores of labeled frames (see `TextClassifier.fit_scores`)."""
    with torch.no_grad():
        fit, background = classifier.fit_scores(labeled.features.to(classifier.weights.device))
    return fit.double().cpu().numpy(), None if background is None else background.double().cpu().numpy()


def _fit(scores: Scores, labels: tuple[str, ...], *, sigmoid: bool) -> float:
    position = {name: i for i, name in enumerate(labels)}
    if sigmoid:
        targets = np.array([[name in truth for name in labels] for truth in scores.truth], dtype=float)
        return fit_temperature(scores.logits, targets, sigmoid=True)
    rows, targets = [], []
    for i, truth in enumerate(scores.truth):
        known = [position[name] for name in truth if name in position]
        if known:  # the label ranked highest among the true ones
            rows.append(i)
            targets.append(max(known, key=lambda j, i=i: scores.logits[i, j]))
    if not rows:
        return 1.0
    return fit_temperature(scores.logits[rows], np.array(targets))


def _ranked(scores: Scores, labels: tuple[str, ...]):
    order = np.argsort(-scores.probabilities, axis=1, kind="stable")
    ranked = np.take_along_axis(scores.probabilities, order, axis=1)
    predicted = [labels[i] for i in order[:, 0]]
    correct = np.array([p in t for p, t in zip(predicted, scores.truth, strict=True)], dtype=bool)
    margin = ranked[:, 0] - ranked[:, 1] if ranked.shape[1] > 1 else ranked[:, 0]
    return ranked[:, 0], correct, predicted, margin


def _accepted(confidence, eligible, predicted, threshold, label_thresholds) -> np.ndarray:
    cut = np.array([label_thresholds.get(p, threshold) for p in predicted])
    return (confidence + 1e-9 >= cut) & eligible


def _shortfall(confidence, correct, eligible, target: float, level: float) -> str:
    """Why no threshold could be certified, and roughly how many more reviewed frames would do."""
    n = len(confidence)
    best: int | None = None
    top_precision = 0.0
    candidates = candidate_thresholds(confidence)
    per_candidate = adjusted_level(level, len(candidates))
    for threshold in candidates:
        accepted = (confidence >= threshold) & eligible
        k = int(accepted.sum())
        if k < 10:
            continue
        precision = float(correct[accepted].mean())
        top_precision = max(top_precision, precision)
        needed = samples_needed(precision, target, per_candidate)
        if needed is not None:
            total = math.ceil(needed * n / k)
            best = total if best is None else min(best, total)
    if best is None:
        return (
            f"no accept threshold reaches {target:.0%} precision on {n} reviewed frames: even the most"
            f" confident predictions are {top_precision:.0%} correct, so more reviews alone will not"
            " certify it; lower --target-precision, or improve the label descriptions"
        )
    return (
        f"not enough reviewed frames to certify {target:.0%} precision at {level:.0%} confidence: have {n},"
        f" need about {max(best - n, 1)} more at the current accuracy; review more frames, then"
        " `prelabel review sync` and calibrate again"
    )


# -- the calibration file -------------------------------------------------------------------
def write_calibration(calibration: Calibration, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    header = "# Written by `prelabel calibrate`; read by `prelabel run`. Do not edit by hand.\n"
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(header + yaml.safe_dump(asdict(calibration), sort_keys=False), encoding="utf-8")
    tmp.replace(path)


def read_calibration(path: Path) -> Calibration:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        return Calibration(**data)
    except (OSError, yaml.YAMLError, TypeError) as exc:
        raise ConfigError(
            f"calibration file {path} is unreadable: {' '.join(str(exc).split())}",
            hint="run `prelabel calibrate` again, or delete the file",
        ) from None


def apply_calibration(
    calibration: Calibration,
    classifier: TextClassifier,
    policy: RoutingPolicy,
    *,
    model_identity: str,
    path: Path | str,
) -> tuple[TextClassifier, RoutingPolicy]:
    """The classifier with the learned temperature, and the policy with the learned thresholds."""
    if calibration.model != model_identity:
        raise ConfigError(
            f"calibration file {path} was made for model {calibration.model!r}, not {model_identity!r}",
            hint="run `prelabel calibrate` for this model, or set calibration.use: false",
        )
    if sorted(calibration.labels) != sorted(classifier.labels):
        raise ConfigError(
            f"calibration file {path} was made for labels {', '.join(calibration.labels)},"
            f" not {', '.join(sorted(classifier.labels))}",
            hint="run `prelabel calibrate` for this label set, or set calibration.use: false",
        )
    policy = replace(
        policy,
        accept_threshold=calibration.accept_threshold,
        min_margin=calibration.min_margin,
        label_thresholds={**policy.label_thresholds, **calibration.label_thresholds},
        fit_floor=calibration.fit_floor,
    )
    classifier = replace(classifier, temperature=calibration.temperature)
    if calibration.prior_correction and calibration.prior_shift:
        shift = torch.tensor([calibration.prior_shift.get(label, 0.0) for label in classifier.labels])
        classifier = replace(classifier, prior_shift=shift.float())
    return classifier, policy
