"""The evaluation report: a Markdown file with tables and three matplotlib plots beside it.

- ``reliability.png``: accuracy against confidence per bin (a calibrated model follows the
  diagonal);
- ``risk_coverage.png``: precision of accepted tags against the fraction accepted, as the
  accept threshold moves, with the configured threshold marked;
- ``confidence.png``: confidence histograms of correct and wrong predictions.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from prelabel.calibration.evaluation import NONE_LABEL, Evaluation
from prelabel.calibration.openset import MIN_NONE_FRAMES, OpenSetSummary
from prelabel.pipeline.priors import PriorComparison


@dataclass(frozen=True)
class ReportContext:
    """What the numbers are about."""

    title: str
    where: str
    model: str
    threshold: float
    min_margin: float
    temperature: float = 1.0
    sources: dict[str, int] | None = None
    """How the ground truth is known -> frames."""
    target: float | None = None


def write_report(
    out_dir: Path,
    evaluation: Evaluation,
    context: ReportContext,
    comparison: list[tuple[str, Evaluation]] | None = None,
    *,
    openset: OpenSetSummary | None = None,
    priors: PriorComparison | None = None,
) -> Path:
    """Write ``report.md`` and its PNG plots into `out_dir`; returns the report's path.

    With `openset`, a section on "none of these" frames; with `priors`, one on label shares
    and the prior correction."""
    out_dir.mkdir(parents=True, exist_ok=True)
    _reliability_plot(evaluation, out_dir / "reliability.png")
    _risk_coverage_plot(evaluation, context, out_dir / "risk_coverage.png")
    _confidence_plot(evaluation, out_dir / "confidence.png")
    path = out_dir / "report.md"
    text = _markdown(evaluation, context, comparison)
    text += _openset_markdown(openset) + _priors_markdown(priors)
    path.write_text(text, encoding="utf-8")
    return path


def _markdown(e: Evaluation, c: ReportContext, comparison: list[tuple[str, Evaluation]] | None) -> str:
    coverage, precision, accepted = e.at_threshold(c.threshold, c.min_margin)
    lines = [
        f"# {c.title}",
        "",
        f"{e.count} labeled frames from {c.where}; model `{c.model}`; temperature {c.temperature:.3f}.",
    ]
    if c.sources:
        lines.append(
            "Ground truth: " + ", ".join(f"{n} {kind}" for kind, n in sorted(c.sources.items())) + "."
        )
    lines += [
        "",
        "| measure | value |",
        "|---|---|",
        f"| top-1 accuracy | {e.top1:.1%} |",
        f"| top-5 accuracy | {e.top5:.1%} |",
        f"| expected calibration error (15 bins) | {e.ece:.3f} |",
        f"| accept threshold / min margin | {c.threshold:.3f} / {c.min_margin:.3f} |",
        f"| accepted at that threshold (coverage) | {accepted} ({coverage:.1%}) |",
        f"| precision of accepted tags | {precision:.1%} |",
    ]
    if c.target is not None:
        lines.append(f"| target precision | {c.target:.1%} |")
    if comparison:
        lines += ["", "## Zero-shot against zero-shot plus few-shot cache (held-out half, temperature 1)", ""]
        lines += ["| scorer | frames | top-1 | top-5 | ECE |", "|---|---|---|---|---|"]
        for name, other in comparison:
            lines.append(
                f"| {name} | {other.count} | {other.top1:.1%} | {other.top5:.1%} | {other.ece:.3f} |"
            )
    lines += [
        "",
        "## Per label",
        "",
        "| label | precision | recall | predicted | support |",
        "|---|---|---|---|---|",
    ]
    for label, q in e.per_label.items():
        lines.append(f"| {label} | {q.precision:.1%} | {q.recall:.1%} | {q.predicted} | {q.support} |")
    lines += ["", "## Confusion matrix (rows: truth, columns: predicted)", ""]
    lines.append("| truth \\ predicted | " + " | ".join(e.labels) + " |")
    lines.append("|---" * (len(e.labels) + 1) + "|")
    for name, row in zip([*e.labels, NONE_LABEL], e.confusion, strict=True):
        if name == NONE_LABEL and not row.any():
            continue
        lines.append(f"| {name} | " + " | ".join(str(int(v)) for v in row) + " |")
    lines += [
        "",
        "## Reliability",
        "",
        "![reliability diagram](reliability.png)",
        "",
        "| confidence bin | frames | mean confidence | accuracy |",
        "|---|---|---|---|",
    ]
    for b in e.reliability:
        if b.count:
            lines.append(f"| {b.low:.2f}-{b.high:.2f} | {b.count} | {b.confidence:.3f} | {b.accuracy:.3f} |")
    lines += [
        "",
        "## Risk versus coverage",
        "",
        "![risk-coverage curve](risk_coverage.png)",
        "",
        "![confidence of correct and wrong predictions](confidence.png)",
        "",
    ]
    return "\n".join(lines)


def _openset_markdown(o: OpenSetSummary | None) -> str:
    if o is None:
        return ""
    lines = ["", "## Frames that fit no label (open set)", ""]
    if not o.enough:
        lines.append(
            f'The ground truth has {o.none_frames} "none of these" frames (fewer than {MIN_NONE_FRAMES}):'
            " too few to say how well the open-set route separates them. Resolve review issues on frames"
            " that show none of the labels, removing every tag, to collect them."
        )
        return "\n".join(lines) + "\n"
    auroc = f"{o.auroc:.3f}" if o.auroc is not None else "n/a"
    lines += [
        f'{o.none_frames} "none of these" frames, {o.in_set_frames} frames with a label.',
        "",
        "| measure | value |",
        "|---|---|",
        f'| AUROC of the fit score (labeled frames above "none" frames) | {auroc} |',
        f'| "none" frames sent to review by the open-set route | {o.caught:.1%} |',
        f"| labeled frames sent to review by it | {o.in_set_sent:.1%} |",
        "",
        "| accepted tags | coverage | precision | accepted |",
        "|---|---|---|---|",
        f"| without the open-set route | {o.without[0]:.1%} | {o.without[1]:.1%} | {o.without[2]} |",
        f"| with it | {o.with_route[0]:.1%} | {o.with_route[1]:.1%} | {o.with_route[2]} |",
    ]
    return "\n".join(lines) + "\n"


def _priors_markdown(p: PriorComparison | None) -> str:
    if p is None:
        return ""
    lines = [
        "",
        "## Label shares and the prior correction",
        "",
        "Predicted share: of the top-1 predictions. EM estimate: the label distribution the scores imply"
        " (Saerens et al. 2002). Ground truth: among frames with a label.",
        "",
        "| label | predicted share | after correction | EM estimate | ground truth | shift (subtracted)"
        " | recall | recall after |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label in p.labels:
        lines.append(
            f"| {label} | {p.predicted_before[label]:.1%} | {p.predicted_after[label]:.1%}"
            f" | {p.estimated[label]:.1%} | {p.truth[label]:.1%} | {p.shift[label]:+.3f}"
            f" | {p.recall_before[label]:.1%} | {p.recall_after[label]:.1%} |"
        )
    lines += ["", f"Top-1 accuracy: {p.top1_before:.1%} without the correction, {p.top1_after:.1%} with it."]
    lines.append("")
    lines += [f"- **warning:** {text}" for text in p.warnings] or [
        "No label takes more than twice its share."
    ]
    return "\n".join(lines) + "\n"


def _reliability_plot(e: Evaluation, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(5, 5), dpi=100)
    filled = [b for b in e.reliability if b.count]
    ax.bar(
        [(b.low + b.high) / 2 for b in filled],
        [b.accuracy for b in filled],
        width=[b.high - b.low for b in filled],
        edgecolor="black",
        alpha=0.7,
        label="accuracy",
    )
    ax.plot([0, 1], [0, 1], "k--", label="perfect calibration")
    ax.set(
        xlim=(0, 1),
        ylim=(0, 1),
        xlabel="confidence",
        ylabel="accuracy",
        title=f"Reliability (ECE {e.ece:.3f})",
    )
    ax.legend(loc="upper left")
    _save(fig, path)


def _risk_coverage_plot(e: Evaluation, c: ReportContext, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=100)
    _, coverage, precision = e.curve
    ax.plot(coverage, precision, label="precision of accepted tags")
    cov, prec, _ = e.at_threshold(c.threshold, c.min_margin)
    ax.plot([cov], [prec], "o", color="crimson", label=f"threshold {c.threshold:.2f}")
    if c.target is not None:
        ax.axhline(c.target, color="gray", linestyle=":", label=f"target {c.target:.0%}")
    ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="coverage (fraction accepted)", ylabel="precision")
    ax.set_title("Risk versus coverage")
    ax.legend(loc="lower left")
    _save(fig, path)


def _confidence_plot(e: Evaluation, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    bins = [i / 20 for i in range(21)]
    ax.hist(e.confidence[e.correct], bins=bins, alpha=0.6, label=f"correct ({int(e.correct.sum())})")
    ax.hist(e.confidence[~e.correct], bins=bins, alpha=0.6, label=f"wrong ({int((~e.correct).sum())})")
    ax.set(xlim=(0, 1), xlabel="top-1 confidence", ylabel="frames", title="Confidence of correct and wrong")
    ax.legend()
    _save(fig, path)


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
