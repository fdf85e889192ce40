"""`prelabel eval` and `prelabel calibrate`: measure the model on ground truth, learn thresholds.

Both read ground truth from a CVAT project, task or job (what reviewers confirmed, see
connectors/cvat/ground_truth.py) or from labeled files (``--ground-truth DIR|CSV``), encode
each frame once (embeddings are kept in the state file), and score them with the same
classifier `run` uses.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from pathlib import Path

import click

from prelabel.cli.options import (
    connect_to,
    labels_option,
    model_options,
    one_target,
    progress_option,
    server_options,
    state_option,
    target_options,
)
from prelabel.errors import InputError


def _ground_truth_options(func):
    func = click.option(
        "--ground-truth",
        "ground_truth",
        type=click.Path(path_type=Path),
        help="Labeled files instead of CVAT: a folder with one subfolder per label, or a CSV (path,label).",
    )(func)
    func = state_option(func)
    func = labels_option(
        "Comma-separated labels to classify into (files only; default: those in the truth)."
    )(func)
    func = progress_option(func)
    return target_options(server_options(model_options(func)))


def _load(config, ground_truth, labels, target, server, state):
    """The ground-truth source and the label names to classify into."""
    if ground_truth is not None:
        if target:
            raise click.UsageError("give either --ground-truth or a CVAT target, not both")
        from connectors.labeled_folder import LabeledFolder

        source = LabeledFolder(ground_truth)
        names = labels or [label.name for label in config.labels]
        if not names:
            names = sorted({name for example in source.examples() for name in example.labels})
        return source, names
    from connectors.cvat.driver import setup_hint
    from connectors.cvat.ground_truth import CvatGroundTruth
    from connectors.cvat.labels import check_schema

    target = one_target(target)
    session = connect_to(config, server, target)
    state.claim_host(session.host)  # its review outcomes and embeddings are this server's
    source = CvatGroundTruth(session, **target, state=state)
    check_schema(source.labels, source.where, setup_hint(target))
    return source, [label.name for label in source.labels]


def _labeled_set(config, source, names, state, *, fresh: bool, progress: bool):
    """Load the pipeline (`fresh`: ignoring any calibration and cache) and embed the truth."""
    from prelabel.assemble import build_image_pipeline
    from prelabel.calibration.ground_truth import embed_examples

    if fresh:
        config = config.model_copy(
            update={
                "calibration": config.calibration.model_copy(update={"use": False}),
                "fewshot": config.fewshot.model_copy(update={"enabled": False}),
            }
        )
    pipeline = build_image_pipeline(config, names)  # no other classifier is built
    labeled = embed_examples(source, pipeline.loaded, pipeline.options, state, progress=progress)
    if labeled.unreadable:
        click.echo(f"  {len(labeled.unreadable)} labeled frames could not be read and are left out")
    if not len(labeled):
        raise InputError(f"{source.where} has no ground truth yet: no frame was reviewed, accepted or tagged")
    return pipeline, labeled


@click.command(name="eval")
@_ground_truth_options
@click.option(
    "--out",
    "out_dir",
    type=click.Path(path_type=Path),
    default=Path("prelabel-report"),
    show_default=True,
    help="Folder for report.md and its plots.",
)
def eval_command(
    target, ground_truth, labels, state_path, progress, out_dir, config_path, overrides, profile_path, server
):
    """Measure the model on ground truth and write a report with plots.

    Reports top-1 and top-5 accuracy, per-label precision and recall, the confusion
    matrix, expected calibration error, and precision against coverage as the accept
    threshold moves, for the model as `run` would use it (calibration included). It also
    compares zero-shot scores with zero-shot plus the few-shot cache on a held-out half.
    """
    from prelabel.config import load_config
    from prelabel.state import RunState

    config = load_config(config_path, overrides)
    with RunState(Path(state_path or config.state.path), lock=False) as state:
        source, names = _load(config, ground_truth, labels, target, server, state)
        pipeline, labeled = _labeled_set(config, source, names, state, fresh=False, progress=progress)
    from prelabel.calibration.evaluation import evaluate
    from prelabel.calibration.fitting import cache_from, score_examples
    from prelabel.calibration.report import ReportContext, write_report

    classifier = pipeline.classifier
    scores = score_examples(
        labeled, classifier, classifier.temperature, leave_one_out=classifier.cache is not None
    )
    evaluation = evaluate(scores.probabilities, scores.truth, classifier.labels)

    comparison = None
    train, held_out = labeled.split(0.5)
    if len(train) and len(held_out):
        zero_shot = replace(classifier, cache=None, temperature=1.0)
        cache = cache_from(
            train, classifier.labels, config.fewshot.alpha, config.fewshot.beta, pipeline.loaded.identity
        )
        boosted = replace(zero_shot, cache=cache)
        comparison = []
        for name, scorer in (
            ("zero-shot", zero_shot),
            (f"zero-shot + cache of {len(cache)} frames", boosted),
        ):
            held_out_scores = score_examples(held_out, scorer)
            comparison.append(
                (name, evaluate(held_out_scores.probabilities, held_out_scores.truth, scorer.labels))
            )
    context = ReportContext(
        title="prelabel evaluation",
        where=source.where,
        model=pipeline.loaded.identity,
        threshold=pipeline.policy.accept_threshold,
        min_margin=pipeline.policy.min_margin,
        temperature=classifier.temperature,
        sources=dict(Counter(example.source for example in labeled.examples)),
    )
    openset, priors = _openset_and_priors(labeled, classifier, scores, evaluation, pipeline)
    path = write_report(out_dir, evaluation, context, comparison, openset=openset, priors=priors)
    coverage, precision, _ = evaluation.at_threshold(context.threshold, context.min_margin)
    click.echo(
        f"{evaluation.count} frames: top-1 {evaluation.top1:.1%}, top-5 {evaluation.top5:.1%},"
        f" ECE {evaluation.ece:.3f}; at threshold {context.threshold:.3f}: coverage {coverage:.1%},"
        f" precision {precision:.1%}"
    )
    if comparison:
        click.echo(
            "  held-out top-1: " + ", ".join(f"{name} {result.top1:.1%}" for name, result in comparison)
        )
    if openset.enough:
        with_cov, with_prec, _ = openset.with_route
        click.echo(
            f"  {openset.none_frames} 'none of these' frames: fit-score AUROC {openset.auroc:.3f};"
            f" the open-set route reviews {openset.caught:.0%} of them and {openset.in_set_sent:.0%} of the"
            f" others; accepted tags: precision {openset.without[1]:.1%} -> {with_prec:.1%},"
            f" coverage {openset.without[0]:.1%} -> {with_cov:.1%}"
        )
    else:
        click.echo(
            f"  only {openset.none_frames} 'none of these' frames in the ground truth: too few to measure"
            " the open-set route"
        )
    if priors is not None:
        click.echo(f"  prior correction: top-1 {priors.top1_before:.1%} -> {priors.top1_after:.1%}")
        for warning in priors.warnings:
            click.echo(f"  warning: {warning}")
    if pipeline.calibrated:
        click.echo(f"  calibration applied: {pipeline.calibrated}")
    click.echo(f"  report: {path}")


def _openset_and_priors(labeled, classifier, scores, evaluation, pipeline):
    """The open-set figures at the routing policy, and what the prior shift does (softmax models):
    the calibration's shift when it is applied, else one estimated on these frames' scores alone."""
    import numpy as np

    from prelabel.calibration.fitting import fit_scores_of
    from prelabel.calibration.openset import summarize
    from prelabel.pipeline.priors import compare, expected_shares, fit_prior_shift

    policy = pipeline.policy
    fit, background = fit_scores_of(labeled, classifier)
    none = np.array([not truth for truth in scores.truth], dtype=bool)
    cut = np.array([policy.threshold(classifier.labels[i]) for i in scores.probabilities.argmax(axis=1)])
    accepted = (evaluation.confidence + 1e-9 >= cut) & (evaluation.margin + 1e-9 >= policy.min_margin)
    openset = summarize(accepted, evaluation.correct, none, fit, background, policy.fit_floor)
    if classifier.logit_bias is not None or not len(scores.logits):
        return openset, None
    logits = scores.logits / classifier.temperature
    if classifier.prior_shift is not None:
        shift = classifier.prior_shift.double().cpu().numpy()
    else:
        shares = expected_shares(scores.truth, classifier.labels)
        shift = fit_prior_shift(logits, np.array([shares[label] for label in classifier.labels]))
    return openset, compare(logits, shift, scores.truth, classifier.labels)


@click.command(name="calibrate")
@_ground_truth_options
@click.option(
    "--target-precision",
    type=click.FloatRange(0.5, 0.999),
    required=True,
    help="Accepted tags must be at least this precise (e.g. 0.95), with the configured confidence.",
)
def calibrate_command(
    target, ground_truth, labels, state_path, progress, target_precision, config_path, overrides,
    profile_path, server,
):  # fmt: skip
    """Learn the temperature and accept thresholds that reach a target precision.

    Fits one temperature on the ground truth, then picks the accept threshold (global,
    and per label with enough data) whose Clopper-Pearson lower bound on precision
    reaches the target, and writes them to the calibration file that `run` applies.
    With the few-shot cache enabled, it also rebuilds the cache from every confirmed
    frame. With too little data it says how much more is needed and changes nothing.
    """
    from prelabel.config import load_config
    from prelabel.state import RunState

    config = load_config(config_path, overrides)
    with RunState(Path(state_path or config.state.path), lock=False) as state:
        source, names = _load(config, ground_truth, labels, target, server, state)
        pipeline, labeled = _labeled_set(config, source, names, state, fresh=True, progress=progress)
    from prelabel.calibration.fewshot import save_cache
    from prelabel.calibration.fitting import cache_from, fit_calibration, write_calibration
    from prelabel.calibration.openset import MIN_NONE_FRAMES
    from prelabel.pipeline.router import RoutingPolicy

    classifier = pipeline.classifier
    identity = pipeline.loaded.identity
    cache = None
    if config.fewshot.enabled:
        cache = cache_from(labeled, classifier.labels, config.fewshot.alpha, config.fewshot.beta, identity)
        classifier = replace(classifier, cache=cache)
    settings = config.calibration
    result = fit_calibration(
        labeled,
        classifier,
        RoutingPolicy.from_config(config),
        model_identity=identity,
        target=target_precision,
        confidence=settings.confidence,
        min_examples=settings.min_examples,
        per_label_min=settings.per_label_min,
        fewshot=cache is not None,
        prior_correction=config.routing.prior_correction,
    )
    calibration = result.calibration
    path = Path(settings.path)
    write_calibration(calibration, path)
    if cache is not None:
        save_cache(cache, Path(config.fewshot.path))
        click.echo(f"  few-shot cache: {len(cache)} confirmed frames -> {config.fewshot.path}")
    per_label = ", ".join(f"{k} {v:.3f}" for k, v in sorted(calibration.label_thresholds.items()))
    click.echo(
        f"calibrated on {calibration.examples} frames from {source.where}: temperature"
        f" {calibration.temperature:.3f}, accept threshold {config.routing.accept_threshold:.3f}"
        f" -> {calibration.accept_threshold:.3f}" + (f" (per label: {per_label})" if per_label else "")
    )
    click.echo(
        f"  expected coverage {calibration.expected_coverage:.1%}; precision on these frames"
        f" {calibration.precision_on_examples:.1%}, at least {calibration.precision_lower_bound:.1%}"
        f" with {calibration.confidence:.0%} confidence (target {target_precision:.1%})"
    )
    floor = "none" if calibration.fit_floor is None else f"{calibration.fit_floor:.3f}"
    click.echo(
        f"  open set: fit floor {floor}, learned with {calibration.none_examples} 'none of these' frames"
        + (" (too few to say much)" if calibration.none_examples < MIN_NONE_FRAMES else "")
    )
    if calibration.prior_shift:
        shift = ", ".join(f"{k} {v:+.2f}" for k, v in calibration.prior_shift.items())
        use = "applied" if calibration.prior_correction else "not applied: routing.prior_correction is off"
        click.echo(f"  prior shift ({use}): {shift}")
    click.echo(f"  written to {path}; `prelabel run` applies it")
