"""Routing: each prediction is accepted as tags, or sent to a human with a reason."""

from __future__ import annotations

from dataclasses import dataclass, field

from prelabel.config import Config
from prelabel.interface import Decision, Prediction

_EPSILON = 1e-9
"""Comparisons at a threshold forgive float rounding (0.7 - 0.6 is 0.0999...)."""


@dataclass(frozen=True)
class RoutingPolicy:
    """Thresholds, global and per label (a per-label value overrides the global one)."""

    accept_threshold: float
    min_margin: float
    multi_label: bool = False
    label_thresholds: dict[str, float] = field(default_factory=dict)
    label_margins: dict[str, float] = field(default_factory=dict)
    fit_floor: float | None = None
    """Frames whose best label cosine is below this go to review ("no label fits")."""

    @classmethod
    def from_config(cls, config: Config) -> RoutingPolicy:
        routing = config.routing
        return cls(
            accept_threshold=routing.accept_threshold,
            min_margin=routing.min_margin,
            multi_label=routing.multi_label,
            label_thresholds={
                label.name: label.accept_threshold
                for label in config.labels
                if label.accept_threshold is not None
            },
            label_margins={
                label.name: label.min_margin for label in config.labels if label.min_margin is not None
            },
            fit_floor=routing.fit_floor,
        )

    def threshold(self, label: str) -> float:
        return self.label_thresholds.get(label, self.accept_threshold)

    def margin(self, label: str) -> float:
        return self.label_margins.get(label, self.min_margin)


def route(prediction: Prediction, policy: RoutingPolicy) -> Decision:
    """Decide one frame.

    Single-label: accept the top-1 label when its probability reaches the label's
    threshold and its lead over the second reaches the label's minimum margin.
    Multi-label: accept every label whose probability reaches its own threshold.
    Before either, a frame no label fits goes to review: a background prompt scores higher
    than every label, or the best label cosine is below the fit floor.
    Anything else, and every unreadable frame, goes to review with the reason.
    """
    if prediction.error is not None:
        return Decision(prediction, reason=f"unreadable: {prediction.error}", code="unreadable")
    if not prediction.scores:
        return Decision(prediction, reason="no scores", code="unreadable")
    misfit = no_label_fits(prediction, policy)
    if misfit is not None:
        return Decision(prediction, reason=f"no label fits ({misfit})", code="no_fit")
    if policy.multi_label:
        tags = tuple((label, p) for label, p in prediction.scores if p + _EPSILON >= policy.threshold(label))
        if tags:
            return Decision(prediction, tags=tags)
        return Decision(prediction, reason="no label reached its threshold", code="no_label")
    label, confidence = prediction.scores[0]
    threshold = policy.threshold(label)
    if confidence + _EPSILON < threshold:
        return Decision(
            prediction, reason=f"low confidence {confidence:.1%} < {threshold:.1%}", code="low_confidence"
        )
    min_margin = policy.margin(label)
    if prediction.margin + _EPSILON < min_margin:
        return Decision(
            prediction, reason=f"small margin {prediction.margin:.1%} < {min_margin:.1%}", code="small_margin"
        )
    return Decision(prediction, tags=((label, confidence),))


def no_label_fits(prediction: Prediction, policy: RoutingPolicy) -> str | None:
    """Why no configured label fits the frame, or None when one does (or nothing is known)."""
    fit = prediction.fit
    if fit is None:
        return None
    if prediction.background is not None and prediction.background > 0:
        return f"a background prompt beats the best label by {prediction.background:.3f} in cosine"
    if policy.fit_floor is not None and fit + _EPSILON < policy.fit_floor:
        return f"fit {fit:.3f} < floor {policy.fit_floor:.3f}"
    return None
