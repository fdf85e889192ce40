"""Calibration mathematics, the few-shot cache and the report, on synthetic data with known answers."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats

from prelabel.calibration.evaluation import evaluate
from prelabel.calibration.fitting import (
    NotEnoughData,
    apply_calibration,
    cache_from,
    fit_calibration,
    read_calibration,
    score_examples,
    write_calibration,
)
from prelabel.calibration.ground_truth import LabeledSet
from prelabel.calibration.maths import (
    choose_threshold,
    expected_calibration_error,
    fit_temperature,
    precision_lower_bound,
    risk_coverage,
)
from prelabel.calibration.report import ReportContext, write_report
from prelabel.errors import ConfigError
from prelabel.interface import Example
from prelabel.pipeline.classifier import TextClassifier
from prelabel.pipeline.router import RoutingPolicy


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


@pytest.mark.parametrize("planted", [0.5, 2.0, 3.5])
def test_temperature_fit_recovers_a_planted_temperature(planted: float):
    rng = np.random.default_rng(7)
    true_logits = rng.normal(0, 2.5, size=(20_000, 8))
    labels = np.array([rng.choice(8, p=p) for p in softmax(true_logits)])
    observed = true_logits * planted  # a model over- (or under-) confident by this factor
    assert fit_temperature(observed, labels) == pytest.approx(planted, rel=0.05)


def test_sigmoid_temperature_fit_recovers_a_planted_temperature():
    rng = np.random.default_rng(3)
    true_logits = rng.normal(-1, 2.0, size=(8_000, 6))
    targets = (rng.random(true_logits.shape) < 1 / (1 + np.exp(-true_logits))).astype(float)
    assert fit_temperature(true_logits * 2.5, targets, sigmoid=True) == pytest.approx(2.5, rel=0.05)


def test_clopper_pearson_matches_reference_values():
    # 8 of 10: the two-sided 90% interval is (0.4931, 0.9632), so the one-sided 95% lower bound is 0.4931
    assert precision_lower_bound(8, 10, 0.95) == pytest.approx(0.4931, abs=1e-4)
    # all correct: the bound solves p^n = alpha
    assert precision_lower_bound(59, 59, 0.95) == pytest.approx(0.05 ** (1 / 59), rel=1e-9)
    assert precision_lower_bound(0, 10) == 0.0
    # the defining property: at the bound, seeing k or more successes has probability alpha
    for k, n in [(95, 100), (180, 200), (7, 9), (930, 1000)]:
        bound = precision_lower_bound(k, n, 0.95)
        assert stats.binom.sf(k - 1, n, bound) == pytest.approx(0.05, rel=1e-6)


def planted_sample(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Confidences in ten bins, each with a planted accuracy."""
    accuracy = np.array([0.15, 0.3, 0.45, 0.55, 0.65, 0.75, 0.85, 0.92, 0.97, 0.995])
    confidence = rng.uniform(0, 1, n)
    correct = rng.random(n) < accuracy[np.minimum((confidence * 10).astype(int), 9)]
    return confidence, correct


@pytest.mark.parametrize("target", [0.9, 0.95])
def test_chosen_threshold_meets_the_target_on_fresh_data(target: float):
    for seed in range(10):
        rng = np.random.default_rng(seed)
        confidence, correct = planted_sample(rng, 2_000)
        choice = choose_threshold(confidence, correct, target)
        assert choice is not None
        assert choice.lower_bound >= target
        fresh_conf, fresh_correct = planted_sample(rng, 200_000)
        accepted = fresh_conf >= choice.threshold
        assert fresh_correct[accepted].mean() >= target, f"seed {seed}: threshold {choice.threshold:.3f}"
        # ...and it is not uselessly strict: it keeps a fair share of what an oracle would
        assert choice.coverage > 0.08


def test_no_threshold_when_even_the_best_bin_misses_the_target():
    rng = np.random.default_rng(0)
    confidence, correct = planted_sample(rng, 2_000)
    assert choose_threshold(confidence, correct, 0.999) is None


def test_ece_and_risk_coverage_match_a_hand_computation():
    confidence = np.array([0.95, 0.9, 0.62, 0.61, 0.3])
    correct = np.array([True, False, True, True, False])
    # 15 bins of width 1/15: 0.95 and 0.9 fall in bins 14 and 13, 0.62 and 0.61 share bin 9
    expected = (abs(1 - 0.95) + abs(0 - 0.9) + 2 * abs(1 - 0.615) + abs(0 - 0.3)) / 5
    assert expected_calibration_error(confidence, correct) == pytest.approx(expected)
    thresholds, coverage, precision = risk_coverage(confidence, correct)
    assert thresholds.tolist() == [0.95, 0.9, 0.62, 0.61, 0.3]
    assert coverage.tolist() == [0.2, 0.4, 0.6, 0.8, 1.0]
    assert precision.tolist() == pytest.approx([1.0, 0.5, 2 / 3, 0.75, 0.6])


# -- the few-shot cache ----------------------------------------------------------------------
def clustered(seed: int, per_class: int = 40, classes: int = 5, dim: int = 64):
    """Class-clustered unit embeddings with CLIP's geometry, and a text classifier that is often wrong.

    Images of a class have cosine ~0.87 with each other; image-text cosines are ~0.13 (the
    modality gap), with text embeddings that point only partly at their class.
    """
    gen = torch.Generator().manual_seed(seed)
    centers = torch.nn.functional.normalize(torch.randn(classes, dim, generator=gen), dim=1)
    text = torch.nn.functional.normalize(
        0.3 * centers + torch.randn(classes, dim, generator=gen) / dim**0.5, dim=1
    )
    targets = torch.arange(classes).repeat_interleave(per_class)
    noise = 0.05 * torch.randn(len(targets), dim, generator=gen)
    images = torch.nn.functional.normalize(centers[targets] + noise, dim=1)
    labels = tuple(f"class{i}" for i in range(classes))
    classifier = TextClassifier(
        labels, text.T.contiguous(), logit_scale=100.0, logit_bias=None, fingerprint="x"
    )
    examples = [
        Example(ref=i, key=f"k{i}", labels=(labels[t],), source="synthetic") for i, t in enumerate(targets)
    ]
    return classifier, LabeledSet(examples, images, {})


def test_cache_improves_held_out_accuracy_on_clustered_embeddings():
    gains = []
    for seed in range(3):
        classifier, labeled = clustered(seed)
        train, held_out = labeled.split(0.5)
        assert len(train) > 50 and len(held_out) > 50
        zero_shot = score_examples(held_out, classifier)
        cache = cache_from(train, classifier.labels, alpha=0.1, beta=5.5, model="m")
        boosted = score_examples(held_out, replace(classifier, cache=cache))
        before = evaluate(zero_shot.probabilities, zero_shot.truth, classifier.labels).top1
        after = evaluate(boosted.probabilities, boosted.truth, classifier.labels).top1
        assert after > before, (seed, before, after)
        gains.append(after - before)
    assert np.mean(gains) > 0.08, gains


def test_empty_cache_leaves_zero_shot_scores_unchanged():
    classifier, labeled = clustered(seed=2)
    empty = cache_from(
        LabeledSet([], labeled.features[:0], {}), classifier.labels, alpha=0.1, beta=5.5, model="m"
    )
    assert len(empty) == 0
    plain = classifier.probabilities(labeled.features)
    with_empty = replace(classifier, cache=empty).probabilities(labeled.features)
    assert torch.equal(plain, with_empty)


# -- fitting, the calibration file, applying it -------------------------------------------------
def test_fit_calibration_certifies_the_target_and_round_trips(tmp_path: Path):
    classifier, labeled = clustered(seed=4, per_class=120)
    policy = RoutingPolicy(accept_threshold=0.6, min_margin=0.0)
    result = fit_calibration(labeled, classifier, policy, model_identity="m", target=0.9, per_label_min=100)
    calibration = result.calibration
    assert calibration.precision_lower_bound >= 0.9
    assert 0 < calibration.expected_coverage <= 1
    after = result.scores_after.probabilities
    kept = after.max(axis=1) >= calibration.accept_threshold - 1e-9
    truth = np.array([classifier.labels.index(t[0]) for t in result.scores_after.truth])
    assert (after.argmax(axis=1)[kept] == truth[kept]).mean() >= 0.9

    path = tmp_path / "calibration.yaml"
    write_calibration(calibration, path)
    assert read_calibration(path) == calibration
    applied, routed = apply_calibration(calibration, classifier, policy, model_identity="m", path=path)
    assert applied.temperature == calibration.temperature
    assert routed.accept_threshold == calibration.accept_threshold
    with pytest.raises(ConfigError, match="was made for model"):
        apply_calibration(calibration, classifier, policy, model_identity="other", path=path)


def test_too_little_data_says_how_much_more_is_needed():
    classifier, labeled = clustered(seed=5, per_class=6)
    policy = RoutingPolicy(accept_threshold=0.6, min_margin=0.0)
    with pytest.raises(NotEnoughData, match=r"calibration needs at least 50 \(20 more\)"):
        fit_calibration(labeled, classifier, policy, model_identity="m", target=0.95)
    with pytest.raises(NotEnoughData, match=r"need about \d+ more"):
        fit_calibration(labeled, classifier, policy, model_identity="m", target=0.99, min_examples=10)


def test_report_plots_exist_and_numbers_match_a_direct_computation(tmp_path: Path):
    rng = np.random.default_rng(11)
    labels = ("a", "b", "c")
    probabilities = softmax(rng.normal(0, 2, size=(300, 3)))
    truth = [(labels[rng.choice(3, p=p)],) for p in probabilities]
    evaluation = evaluate(probabilities, truth, labels)
    context = ReportContext("t", "synthetic", "m", threshold=0.7, min_margin=0.0)
    report = write_report(tmp_path, evaluation, context)
    for name in ("reliability.png", "risk_coverage.png", "confidence.png"):
        data = (tmp_path / name).read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 5_000
    text = report.read_text()
    top1 = np.mean([labels[i] in t for i, t in zip(probabilities.argmax(1), truth, strict=True)])
    accepted = probabilities.max(1) >= 0.7
    precision = np.mean(
        [
            labels[i] in t
            for i, t in zip(probabilities.argmax(1)[accepted], np.array(truth)[accepted], strict=True)
        ]
    )
    assert f"| top-1 accuracy | {top1:.1%} |" in text
    assert f"| precision of accepted tags | {precision:.1%} |" in text
    assert (
        f"| accepted at that threshold (coverage) | {int(accepted.sum())} ({accepted.mean():.1%}) |" in text
    )
    # the confusion matrix rows add up to the frames of each true label
    for label in labels:
        row = re.search(rf"^\| {label} \| (\d+) \| (\d+) \| (\d+) \|$", text, re.M)
        assert row and sum(map(int, row.groups())) == sum(t == (label,) for t in truth)


# -- the commands, with bad and thin input -------------------------------------------------------
def test_calibrate_with_too_little_data_changes_nothing(tmp_path: Path):
    from tests.conftest import run_cli, variants, write_jpegs

    for i, (name, image) in enumerate(variants(6, (64, 64))):
        write_jpegs(tmp_path / "truth" / ("cat" if i % 2 else "rocket"), [(name, image)])
    calibration = tmp_path / "calibration.yaml"
    config = tmp_path / "config.yaml"
    config.write_text(f"calibration:\n  path: {calibration}\n")
    from tests.cvat_fixtures import tiny_args

    result = run_cli(
        "calibrate", "--config", str(config), "--ground-truth", str(tmp_path / "truth"),
        "--target-precision", "0.95", "--state", str(tmp_path / "state.db"), *tiny_args(),
    )  # fmt: skip
    assert result.returncode == 4
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert "only 6 reviewed frames" in line and "(44 more)" in line and "nothing was changed" in line
    assert not calibration.exists()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("file,label\nx.jpg,cat\n", "needs a header with 'path' and 'label'"),
        ("path,label\nmissing.jpg,cat\n", "no such image file: missing.jpg"),
    ],
)
def test_bad_ground_truth_is_one_line(tmp_path: Path, content: str, message: str):
    from tests.conftest import run_cli

    csv_file = tmp_path / "truth.csv"
    csv_file.write_text(content)
    result = run_cli("eval", "--ground-truth", str(csv_file), "--labels", "cat,dog")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error:")
    assert message in result.stderr and "Traceback" not in result.stderr


def test_review_list_orders_by_margin_or_by_label(tmp_path: Path):
    from prelabel.review import pending_items
    from prelabel.state import RunState

    with RunState(tmp_path / "state.db") as state:
        for frame, scores in enumerate(
            [(("cat", 0.5), ("dog", 0.4)), (("dog", 0.45), ("cat", 0.4)), (("cat", 0.4), ("dog", 0.39))]
        ):
            state.record_decision(
                job_id=1, frame=frame, task_id=1, name=f"f{frame}", fingerprint="x",
                scores=scores, decision="review", reason="low",
            )  # fmt: skip
        by_margin = [item.frame for item in pending_items(state)]
        by_label = [item.frame for item in pending_items(state, order="label")]
    assert by_margin == [2, 1, 0]  # margins 0.01, 0.05, 0.1
    assert by_label == [2, 0, 1]  # cat (0.01, 0.1), then dog


def test_leave_one_out_scores_equal_a_cache_rebuilt_without_the_frame():
    from prelabel.calibration.fewshot import FewShotCache
    from prelabel.calibration.fitting import _loo_scores

    classifier, labeled = clustered(seed=3)
    cache = cache_from(labeled, classifier.labels, alpha=0.1, beta=5.5, model="m")
    scores = _loo_scores(cache, labeled.features, chunk=7)  # several chunks
    for i in (0, 57, 199):
        keep = [j for j in range(len(labeled)) if j != i]
        without = FewShotCache(cache.labels, cache.keys[keep], cache.targets[keep], 0.1, 5.5, "m")
        assert torch.allclose(without.scores(labeled.features[i : i + 1]), scores[i : i + 1], atol=1e-6)


def test_run_applies_the_calibration_file_unless_a_threshold_is_given(tmp_path: Path):
    from prelabel.assemble import build_pipeline
    from prelabel.calibration.fitting import Calibration
    from prelabel.config import load_config, model_overrides
    from tests.conftest import TINY_MODEL

    labels = ["cat", "rocket"]
    path = tmp_path / "calibration.yaml"
    write_calibration(
        Calibration(
            model=f"{TINY_MODEL}/random-seed0", labels=labels, temperature=2.5, accept_threshold=0.7,
            label_thresholds={}, min_margin=0.05, target_precision=0.9, confidence=0.95, examples=300,
            expected_coverage=0.3, precision_on_examples=0.93, precision_lower_bound=0.9,
        ),
        path,
    )  # fmt: skip
    base = {"model.name": TINY_MODEL, "model.pretrained": "none", "calibration.path": str(path)}
    calibrated = build_pipeline(load_config(None, {**model_overrides(), **base}), labels)
    assert calibrated.calibrated == str(path)
    assert (calibrated.classifier.temperature, calibrated.policy.accept_threshold) == (2.5, 0.7)
    explicit = build_pipeline(load_config(None, {**model_overrides(accept_threshold=0.4), **base}), labels)
    assert explicit.calibrated is None
    assert (explicit.classifier.temperature, explicit.policy.accept_threshold) == (1.0, 0.4)
    with pytest.raises(ConfigError, match="was made for labels"):
        build_pipeline(load_config(None, base), ["cat", "rocket", "coffee"])
