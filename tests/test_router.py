"""Routing at and around the thresholds."""

from __future__ import annotations

import pytest

from prelabel.config import Config
from prelabel.interface import Prediction
from prelabel.pipeline.router import RoutingPolicy, route


def prediction(*scores: tuple[str, float], error: str | None = None) -> Prediction:
    return Prediction(ref=0, name="frame", scores=tuple(scores), error=error)


POLICY = RoutingPolicy(accept_threshold=0.6, min_margin=0.1)


@pytest.mark.parametrize(
    ("top", "second", "accepted", "reason"),
    [
        (0.60, 0.40, True, None),  # exactly at the threshold, margin 0.2
        (0.5999, 0.30, False, "low confidence"),
        (0.70, 0.60, True, None),  # margin exactly 0.1
        (0.70, 0.6001, False, "small margin"),
        (0.95, 0.05, True, None),
    ],
)
def test_single_label_thresholds(top, second, accepted, reason):
    decision = route(prediction(("cat", top), ("dog", second)), POLICY)
    assert decision.accepted is accepted
    if accepted:
        assert decision.tags == (("cat", top),)
    else:
        assert decision.tags == ()
        assert decision.reason.startswith(reason)


def test_margin_of_a_single_label_is_its_probability():
    assert route(prediction(("cat", 0.65)), POLICY).accepted


def test_per_label_overrides_from_config():
    config = Config.model_validate(
        {
            "routing": {"accept_threshold": 0.6, "min_margin": 0.1},
            "labels": [
                {"name": "cat", "accept_threshold": 0.9},
                {"name": "dog", "min_margin": 0.0},
                {"name": "car"},
            ],
        }
    )
    policy = RoutingPolicy.from_config(config)
    assert not route(prediction(("cat", 0.85), ("dog", 0.1)), policy).accepted
    assert route(prediction(("cat", 0.90), ("dog", 0.1)), policy).accepted
    assert route(prediction(("dog", 0.61), ("cat", 0.60)), policy).accepted
    assert not route(prediction(("car", 0.61), ("cat", 0.60)), policy).accepted


def test_multi_label_tags_every_label_over_its_own_threshold():
    policy = RoutingPolicy(
        accept_threshold=0.5, min_margin=0.3, multi_label=True, label_thresholds={"car": 0.2}
    )
    decision = route(prediction(("cat", 0.7), ("dog", 0.5), ("car", 0.25), ("fox", 0.49)), policy)
    assert decision.accepted
    assert [label for label, _ in decision.tags] == ["cat", "dog", "car"]
    nothing = route(prediction(("cat", 0.49), ("car", 0.19)), policy)
    assert not nothing.accepted and nothing.reason == "no label reached its threshold"


def test_unreadable_frames_go_to_review_with_the_reason():
    decision = route(prediction(error="empty file (0 bytes)"), POLICY)
    assert not decision.accepted
    assert decision.reason == "unreadable: empty file (0 bytes)"
