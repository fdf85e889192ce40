"""Open-set routing and the prior correction, on synthetic embeddings with CLIP-like geometry.

Each world has labeled classes and classes nobody configured. Image and text embeddings
share a modality offset each (so every image-text cosine is ~0.2-0.45, as with CLIP); a
label's text points partly at its class. Frames of an unconfigured class are the planted
"none of these" frames; a planted score bias on one label makes a hub.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from prelabel.calibration.fitting import (
    apply_calibration,
    fit_calibration,
    read_calibration,
    write_calibration,
)
from prelabel.calibration.ground_truth import LabeledSet
from prelabel.calibration.openset import auroc, best_cosine, choose_floor, no_fit, summarize
from prelabel.interface import Example, Prediction
from prelabel.pipeline.classifier import TextClassifier
from prelabel.pipeline.priors import compare, estimate_priors, fit_prior_shift, hub_warnings, softmax
from prelabel.pipeline.router import RoutingPolicy, route
from prelabel.pipeline.runner import RunStats, format_summary

LABELS = 6
OUTSIDE = 4
DIM = 128
SCALE = 100.0


def normalize(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x, dim=-1)


def correct_on(scores) -> np.ndarray:
    labels = [f"class{i}" for i in range(LABELS)]
    return np.array(
        [labels[i] in t for i, t in zip(scores.probabilities.argmax(1), scores.truth, strict=True)]
    )


def labeled_set(images: torch.Tensor, classes: torch.Tensor, labels: tuple[str, ...]) -> LabeledSet:
    examples = [
        Example(ref=i, key=f"k{i}", labels=(labels[c],) if c < LABELS else (), source="synthetic")
        for i, c in enumerate(classes.tolist())
    ]
    return LabeledSet(examples, images, {})


# -- the open-set score and route ----------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fit_floor_catches_planted_out_of_set_frames(seed: int):
    images, classes, classifier = symmetric(seed, outside=150, signal=OPEN, spread=0.6)
    inside = (classes < LABELS).numpy()
    fit = best_cosine(images.numpy(), classifier.weights.numpy())
    assert np.allclose(fit, classifier.fit_scores(images)[0].numpy(), atol=1e-6)
    # the softmax alone accepts most of them: the problem the route solves
    confidence = classifier.probabilities(images).max(dim=1).values.numpy()
    assert (confidence[~inside] >= 0.6).mean() > 0.3
    floor = float(np.quantile(fit[inside], 0.10))  # sends 10% of in-set frames to review
    assert no_fit(fit[inside], None, floor).mean() <= 0.10
    assert no_fit(fit[~inside], None, floor).mean() >= 0.80
    assert auroc(fit, inside) > 0.9

    # the router says why, with the floor and the score
    frame = int(np.flatnonzero(~inside & (fit < floor))[0])
    probabilities = classifier.probabilities(images[frame : frame + 1])[0]
    top = probabilities.argsort(descending=True)[:2].tolist()
    prediction = Prediction(
        ref=frame,
        name="f",
        scores=tuple((classifier.labels[i], float(probabilities[i])) for i in top),
        fit=float(fit[frame]),
    )
    decision = route(prediction, RoutingPolicy(accept_threshold=0.0, min_margin=0.0, fit_floor=floor))
    assert decision.code == "no_fit" and not decision.accepted
    assert decision.reason == f"no label fits (fit {fit[frame]:.3f} < floor {floor:.3f})"


def test_background_prompt_routes_the_frames_it_wins():
    images, classes, classifier = symmetric(5, outside=150, signal=OPEN, spread=0.6)
    # background prompts written like the labels' text, naming the classes nobody configured
    background = text_embeddings(5, range(LABELS, LABELS + OUTSIDE))
    with_background = replace(classifier, background=background.T.contiguous())
    inside = (classes < LABELS).numpy()
    fit, best_background = (t.numpy() for t in with_background.fit_scores(images))
    routed = no_fit(fit, best_background, None)
    assert routed[~inside].mean() >= 0.8 and routed[inside].mean() <= 0.1
    prediction = Prediction(
        ref=0, name="f", scores=(("class0", 0.9), ("class1", 0.05)), fit=0.21, background=0.04
    )
    decision = route(prediction, RoutingPolicy(accept_threshold=0.5, min_margin=0.0))
    assert decision.reason == "no label fits (a background prompt beats the best label by 0.040 in cosine)"
    # no fit score (an unreadable frame, an old prediction): the usual checks only
    plain = Prediction(ref=0, name="f", scores=(("class0", 0.9), ("class1", 0.05)))
    assert route(plain, RoutingPolicy(accept_threshold=0.5, min_margin=0.0, fit_floor=0.9)).accepted


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_learned_floor_keeps_the_precision_target_on_fresh_frames(seed: int, tmp_path: Path):
    target = 0.95
    images, classes, classifier = symmetric(seed, outside=150, sample=1, signal=OPEN, spread=0.6)
    labeled = labeled_set(images, classes, classifier.labels)
    learned = fit_calibration(
        labeled,
        classifier,
        RoutingPolicy(accept_threshold=0.6, min_margin=0.0),
        model_identity="m",
        target=target,
    ).calibration
    assert learned.none_examples == int((classes >= LABELS).sum())
    assert learned.fit_floor is not None
    assert learned.precision_lower_bound >= target
    path = tmp_path / "calibration.yaml"
    write_calibration(learned, path)
    assert read_calibration(path) == learned
    applied, policy = apply_calibration(
        learned,
        classifier,
        RoutingPolicy(accept_threshold=0.6, min_margin=0.0),
        model_identity="m",
        path=path,
    )
    assert policy.fit_floor == learned.fit_floor

    fresh, fresh_classes, _ = symmetric(seed, outside=150, sample=2, signal=OPEN, spread=0.6)
    probabilities = applied.probabilities(fresh)
    fit, _ = applied.fit_scores(fresh)
    correct, accepted_without = [], []
    accepted = []
    for row, fit_value, cls in zip(probabilities, fit.tolist(), fresh_classes.tolist(), strict=True):
        order = row.argsort(descending=True)[:2].tolist()
        scores = tuple((applied.labels[i], float(row[i])) for i in order)
        decision = route(Prediction(ref=0, name="f", scores=scores, fit=fit_value), policy)
        correct.append(cls < LABELS and order[0] == cls)
        accepted.append(decision.accepted)
        accepted_without.append(route(Prediction(ref=0, name="f", scores=scores), policy).accepted)
    correct, accepted, accepted_without = map(np.array, (correct, accepted, accepted_without))
    assert correct[accepted_without].mean() < target  # the same threshold without the floor misses it
    print(
        f"fresh: precision {correct[accepted].mean():.3f} at coverage {accepted.mean():.3f};"
        f" without the floor {correct[accepted_without].mean():.3f} at {accepted_without.mean():.3f}"
    )
    assert correct[accepted].mean() >= target
    assert accepted.mean() > 0.4


def test_choose_floor_prefers_no_floor_when_no_frame_is_out_of_set():
    rng = np.random.default_rng(0)
    confidence = rng.uniform(0.5, 1, 2000)
    correct = rng.random(2000) < confidence  # calibrated, no "none" frames
    fit = rng.normal(0.3, 0.03, 2000)  # unrelated to correctness
    choice = choose_floor(confidence, correct, fit, 0.9)
    assert choice is not None and choice.floor is None


def test_summary_reports_route_effect_and_auroc():
    fit = np.array([0.4, 0.35, 0.3, 0.2, 0.1, 0.15])
    none = np.array([False, False, False, False, True, True])
    correct = np.array([True, True, False, True, False, False])
    accepted = np.ones(6, dtype=bool)
    s = summarize(accepted, correct, none, fit, None, 0.18)
    assert s.auroc == 1.0 and s.caught == 1.0 and s.in_set_sent == 0.0
    assert s.without == (1.0, 0.5, 6) and s.with_route == (4 / 6, 0.75, 4)
    assert not s.enough
    assert auroc(np.array([1.0, 1.0]), np.array([True, False])) == 0.5


# -- label priors: hubness ------------------------------------------------------------------------
def basis(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Orthonormal class directions (configured first), the image offset and the text offset."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(DIM, LABELS + OUTSIDE + 2, generator=gen))
    return q.T[:-2], q.T[-2], q.T[-1]


def text_embeddings(seed: int, classes) -> torch.Tensor:
    """Unit text embeddings of prompts naming these classes, one per row."""
    directions, image_offset, text_offset = basis(seed)
    return normalize(text_offset + 0.5 * image_offset + 0.5 * directions[list(classes)])


OPEN = 0.35
"""Signal of the open-set tests (with spread 0.6: same-class image cosines ~0.75): a frame
of a configured class is clearly closer to its label."""


def symmetric(
    seed: int,
    per_label: int = 150,
    outside: int = 0,
    weights=None,
    sample: int = 0,
    signal: float = 0.25,
    spread: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, TextClassifier]:
    """Frames, their classes (>= LABELS: a class nobody configured) and a classifier.

    Class directions are orthonormal; images are their class direction plus a shared image
    offset plus noise, label texts their label's direction plus a shared text offset, so
    image-text cosines are ~0.3, same-class image cosines ~0.5 and top-1 ~91% (at `signal`
    0.25; more signal: images closer to their class, and to their label's text). Every label
    is alike but for its direction: no label has a bias of its own. `seed` makes the world,
    `sample` the frames drawn from it.
    """
    gen = torch.Generator().manual_seed(1000 * seed + sample + 1)
    directions, image_offset, _ = basis(seed)
    text = text_embeddings(seed, range(LABELS))
    if weights is None:
        inside = torch.arange(LABELS).repeat_interleave(per_label)
    else:
        chances = torch.tensor(weights, dtype=torch.float)
        inside = torch.multinomial(chances, per_label * LABELS, True, generator=gen)
    classes = torch.cat([inside, LABELS + torch.randint(0, OUTSIDE, (outside,), generator=gen)])
    noise = spread * torch.randn(len(classes), DIM, generator=gen) / DIM**0.5
    images = normalize(image_offset + signal * directions[classes] + noise)
    labels = tuple(f"class{i}" for i in range(LABELS))
    classifier = TextClassifier(
        labels, text.T.contiguous(), logit_scale=SCALE, logit_bias=None, fingerprint="s"
    )
    return images, classes, classifier


def logits_of(classifier: TextClassifier, images: torch.Tensor) -> np.ndarray:
    return classifier.logits(images).double().numpy()


def top1(logits: np.ndarray, classes: torch.Tensor) -> float:
    inside = (classes < LABELS).numpy()
    return float((logits[inside].argmax(1) == classes.numpy()[inside]).mean())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_prior_correction_undoes_a_planted_hub(seed: int):
    images, classes, classifier = symmetric(seed)
    clean = logits_of(classifier, images)
    # every label carries a score bias; label 2's is five times the others' (in cosine units)
    bias = np.full(LABELS, 0.02)
    bias[2] = 0.10
    biased = clean + SCALE * bias
    assert top1(biased, classes) < top1(clean, classes) - 0.05  # the hub costs accuracy
    shares = softmax(biased).argmax(1)
    counts = {label: int((shares == k).sum()) for k, label in enumerate(classifier.labels)}
    warnings = hub_warnings(counts, None, classifier.labels)
    assert len(warnings) == 1 and "'class2'" in warnings[0]

    shift = fit_prior_shift(biased)
    assert abs(top1(biased - shift, classes) - top1(clean, classes)) <= 0.02
    relative = SCALE * (bias - bias.mean())
    assert shift[2] == pytest.approx(relative[2], abs=1.0)
    # applied through the classifier, as `run` does
    corrected = replace(classifier, prior_shift=torch.tensor(shift, dtype=torch.float32))
    planted = replace(classifier, prior_shift=torch.tensor(-SCALE * bias, dtype=torch.float32))
    assert np.allclose(planted.probabilities(images).numpy(), softmax(biased), atol=1e-5)
    both = replace(planted, prior_shift=torch.tensor(shift - SCALE * bias, dtype=torch.float32))
    assert (
        abs(top1(np.log(both.probabilities(images).double().numpy()), classes) - top1(clean, classes)) <= 0.02
    )
    assert corrected.prior_shift is not None

    report = compare(biased, shift, [(classifier.labels[c],) for c in classes.tolist()], classifier.labels)
    assert report.top1_after > report.top1_before and report.warnings
    assert report.predicted_before["class2"] > 2 * report.truth["class2"]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_prior_correction_changes_little_without_a_mismatch(seed: int):
    images, classes, classifier = symmetric(seed + 10)
    clean = logits_of(classifier, images)
    shift = fit_prior_shift(clean)
    assert abs(top1(clean - shift, classes) - top1(clean, classes)) < 0.005


def test_prior_correction_keeps_a_real_imbalance_when_told_the_shares():
    images, classes, classifier = symmetric(3, weights=[0.4, 0.2, 0.1, 0.1, 0.1, 0.1])
    clean = logits_of(classifier, images)
    shares = np.bincount(classes.numpy(), minlength=LABELS) / len(classes)
    shift = fit_prior_shift(clean, shares)
    assert top1(clean - shift, classes) >= top1(clean, classes) - 0.005  # told the truth, it does not hurt
    assert softmax(clean - shift).mean(0) == pytest.approx(shares, abs=1e-4)


def test_em_recovers_a_planted_prior_shift():
    rng = np.random.default_rng(1)
    means = np.eye(3) * 2.0
    prior = np.array([0.6, 0.3, 0.1])
    classes = rng.choice(3, 20_000, p=prior)
    x = means[classes] + rng.normal(size=(20_000, 3))
    # posteriors of a model trained with a uniform prior: softmax of the Gaussian log-likelihoods
    logits = -0.5 * ((x[:, None, :] - means[None]) ** 2).sum(-1)
    assert estimate_priors(softmax(logits)) == pytest.approx(prior, abs=0.02)


def test_run_summary_shows_shares_and_warns_on_a_hub():
    stats = RunStats(frames=100, accepted=60, review=40, no_fit=7)
    stats.predicted.update({"cat": 70, "dog": 20, "fox": 10})
    text = format_summary(stats, labels=["cat", "dog", "fox"], expected={"cat": 0.3, "dog": 0.4, "fox": 0.3})
    assert "no label fits: 7" in text
    assert "predicted share (expected): cat 70% (30%), dog 20% (40%), fox 10% (30%)" in text
    assert "warning: label 'cat' takes 70% of the frames, more than 2x its expected 30%" in text
    calm = format_summary(
        stats, labels=["cat", "dog", "fox"], expected={"cat": 0.6, "dog": 0.25, "fox": 0.15}
    )
    assert "warning" not in calm


def test_report_says_plainly_when_there_are_too_few_none_frames():
    from prelabel.calibration.report import _openset_markdown

    few = summarize(
        np.ones(5, bool), np.ones(5, bool), np.array([1, 0, 0, 0, 0], bool), np.ones(5), None, None
    )
    assert "too few to say how well the open-set route separates them" in _openset_markdown(few)
    fit = np.linspace(0, 1, 40)
    many = summarize(np.ones(40, bool), fit > 0.3, fit < 0.3, fit, None, 0.3)
    text = _openset_markdown(many)
    assert "| AUROC of the fit score" in text and "| with it | 70.0% | 100.0% | 28 |" in text
