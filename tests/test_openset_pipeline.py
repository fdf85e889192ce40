"""The open-set pieces as `build_pipeline` assembles them, with the tiny real model: background
prompts, the fit scores the worker attaches, the fingerprint, and the calibration checks."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from connectors.folder import FolderSource
from prelabel.assemble import build_pipeline
from prelabel.calibration.fitting import Calibration
from prelabel.config import Config
from prelabel.errors import ConfigError
from prelabel.pipeline.worker import embed, predict
from tests.conftest import LABELS, tiny_model_config

BACKGROUND = ["a photo of something else.", "an empty frame."]


def _config(tmp_path: Path, **overrides) -> Config:
    return tiny_model_config(
        {
            "model.batch_size": 5,
            "model.cache_dir": str(tmp_path / "cache"),
            "decode.draft": False,
            **overrides,
        }
    )


def test_background_prompts_give_each_prediction_its_fit_and_background_lead(tmp_path: Path, photo_dir: Path):
    pipeline = build_pipeline(_config(tmp_path, **{"prompts.background": BACKGROUND}), LABELS)
    classifier = pipeline.classifier
    assert classifier.background is not None and tuple(classifier.background.shape) == (
        classifier.weights.shape[0],
        len(BACKGROUND),
    )
    frames = list(FolderSource(photo_dir).frames())
    predictions = list(predict(frames, pipeline.loaded, classifier, pipeline.options))
    embedded = list(embed(frames, pipeline.loaded, pipeline.options))
    assert len(predictions) == len(embedded) == 12
    for prediction, item in zip(predictions, embedded, strict=True):
        assert item.features is not None
        # Reference: the frame's own embedding against the label and background columns.
        labels = item.features @ classifier.weights
        background = (item.features @ classifier.background).max()
        assert prediction.fit == pytest.approx(labels.max().item(), abs=1e-5)
        assert prediction.background == pytest.approx((background - labels.max()).item(), abs=1e-5)
        probabilities = classifier.probabilities(item.features[None])[0]
        top = int(probabilities.argmax())
        assert prediction.scores[0] == (LABELS[top], pytest.approx(probabilities[top].item(), abs=1e-5))


def test_without_background_prompts_there_is_a_fit_and_no_background(tmp_path: Path, photo_dir: Path):
    pipeline = build_pipeline(_config(tmp_path), LABELS)
    assert pipeline.classifier.background is None
    frames = list(FolderSource(photo_dir).frames())[:3]
    for prediction in predict(frames, pipeline.loaded, pipeline.classifier, pipeline.options):
        assert prediction.fit is not None and -1.0 <= prediction.fit <= 1.0
        assert prediction.background is None


def test_fingerprint_covers_background_prompts_fit_floor_and_prior_shift(tmp_path: Path):
    plain = build_pipeline(_config(tmp_path), LABELS)
    assert build_pipeline(_config(tmp_path), LABELS).fingerprint == plain.fingerprint
    with_background = build_pipeline(_config(tmp_path, **{"prompts.background": BACKGROUND}), LABELS)
    with_floor = build_pipeline(_config(tmp_path, **{"routing.fit_floor": 0.2}), LABELS)
    shifted = replace(
        plain, classifier=replace(plain.classifier, prior_shift=torch.linspace(-0.5, 0.5, len(LABELS)))
    )
    prints = {p.fingerprint for p in (plain, with_background, with_floor, shifted)}
    assert len(prints) == 4


def _calibration(identity: str, *, prior_correction: bool) -> Calibration:
    return Calibration(
        model=identity,
        labels=list(LABELS),
        temperature=0.5,
        accept_threshold=0.4,
        label_thresholds={},
        min_margin=0.0,
        target_precision=0.9,
        confidence=0.95,
        examples=100,
        expected_coverage=0.5,
        precision_on_examples=0.95,
        precision_lower_bound=0.9,
        fit_floor=0.123,
        prior_correction=prior_correction,
        prior_shift={label: 0.1 * i for i, label in enumerate(LABELS)},
        label_shares={label: 0.2 for label in LABELS},
    )


def test_calibration_brings_floor_shift_and_shares_and_must_match_the_prior_setting(tmp_path: Path):
    config = _config(tmp_path, **{"routing.prior_correction": True})
    loaded = build_pipeline(config, LABELS).loaded
    pipeline = build_pipeline(
        config, LABELS, loaded=loaded, calibration=_calibration(loaded.identity, prior_correction=True)
    )
    assert pipeline.policy.fit_floor == pytest.approx(0.123)
    assert pipeline.classifier.prior_shift is not None
    assert pipeline.classifier.prior_shift.tolist() == pytest.approx([0.1 * i for i in range(len(LABELS))])
    assert pipeline.label_shares == {label: 0.2 for label in LABELS}

    without = _config(tmp_path)  # routing.prior_correction: false
    with pytest.raises(ConfigError, match="made with the prior correction"):
        build_pipeline(
            without, LABELS, loaded=loaded, calibration=_calibration(loaded.identity, prior_correction=True)
        )
