"""The run configuration: a YAML file validated on load, plus command-line overrides.

`configs/example.yaml` documents every key. Validation is strict: an unknown key, a
wrong type or a value out of range is a `ConfigError` whose message names the key.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator

from prelabel.errors import ConfigError

# open_clip's seven "simple" ImageNet templates (open_clip.zero_shot_metadata), which
# the open_clip authors found to match the 80-template ensemble closely.
SIMPLE_TEMPLATES: tuple[str, ...] = (
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
)

Probability = Annotated[float, Field(ge=0.0, le=1.0)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(_Strict):
    """Which OpenCLIP model to run, and where."""

    name: str = "ViT-B-32"
    """An open_clip architecture name, `hf-hub:org/repo`, or `local-dir:/path`."""
    pretrained: str = "laion2b_s34b_b79k"
    """A pretrained tag, a local checkpoint file, or `none` for random weights (tests only)."""
    device: str = "auto"
    """`auto` (CUDA when available, else CPU), `cpu`, `cuda` or `cuda:N`."""
    precision: Literal["auto", "fp32", "fp16", "bf16"] = "auto"
    """Autocast precision on CUDA; `auto` picks bf16 where supported, else fp16. CPU is fp32."""
    batch_size: Annotated[int, Field(gt=0)] | None = None
    """Images per model batch; default 128 on CUDA, 32 on CPU."""
    quantize: Literal["none", "int8"] = "none"
    """int8: dynamic quantization of the linear layers (CPU only; faster, slightly different)."""
    cache_dir: str | None = None
    """Where text classifiers (and downloaded weights) are cached; default ~/.cache/prelabel."""


class LabelConfig(_Strict):
    """One candidate label, with optional descriptions and threshold overrides."""

    name: Annotated[str, Field(min_length=1)]
    descriptions: list[Annotated[str, Field(min_length=1)]] = []
    """Prompts used as they are; when empty, the name is expanded through the templates."""
    accept_threshold: Probability | None = None
    min_margin: Probability | None = None

    @field_validator("name")
    @classmethod
    def _name_not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("a label name cannot be blank")
        return value


class PromptConfig(_Strict):
    """How label names become text prompts."""

    templates: list[str] = list(SIMPLE_TEMPLATES)
    background: list[Annotated[str, Field(min_length=1)]] = []
    """Prompts of "something else" (e.g. "a photo of an empty street"): a frame whose best match is
    one of them goes to review as "no label fits"; never written as a tag."""

    @field_validator("templates")
    @classmethod
    def _templates_have_slot(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("at least one template is needed")
        for template in value:
            if "{}" not in template:
                raise ValueError(f"template {template!r} has no '{{}}' where the label goes")
        return value


class RoutingConfig(_Strict):
    """When a prediction is accepted as a tag, and when it goes to a human."""

    accept_threshold: Probability = 0.6
    """Accept when the top-1 probability is at least this (multi-label: per-label cut-off)."""
    min_margin: Probability = 0.1
    """...and the gap between the first and second probability is at least this."""
    multi_label: bool = False
    """Tag every label whose probability reaches its threshold, instead of the top-1 only."""
    top_k: Annotated[int, Field(gt=0, le=50)] = 5
    """How many candidates are kept with each prediction (review lists, state)."""
    fit_floor: Annotated[float, Field(ge=-1.0, le=1.0)] | None = None
    """Review a frame whose best raw image-text cosine with any label is below this ("no label
    fits"); null: no floor. `prelabel calibrate` learns it from "none of these" frames."""
    prior_correction: bool = False
    """Shift each label's score by the bias `calibrate` estimated from the project's frames
    (against hub labels); softmax models only."""


class DecodeConfig(_Strict):
    """Image decoding."""

    draft: bool = True
    """Decode large JPEGs at reduced scale (Pillow draft mode), and resize only the centre
    crop the model sees (`prelabel.pipeline.preprocess`); false: open_clip's exact pixels."""
    workers: Annotated[int, Field(gt=0)] | None = None
    """Decode threads; default: the number of CPU cores."""
    prefetch_batches: Annotated[int, Field(ge=0, le=16)] = 2
    """Batches decoded ahead of the model (bounds memory)."""
    nice: Annotated[int, Field(ge=0, le=19)] = 0
    """Linux: lower the decode threads' priority by this much (``nice``), so that on a CPU
    they yield the cores to the model's threads. Only where prelabel has the CPU to itself
    (a container, a dedicated machine): next to other busy programs it starves decoding."""


JobStage = Literal["annotation", "validation", "acceptance"]
JobState = Literal["new", "in progress", "rejected", "completed"]


class ReviewConfig(_Strict):
    """The review queue inside CVAT: issues, suggestions and who reviews which job."""

    upload_suggestion: bool = True
    """Also upload the top-1 tag of a review frame, marked needs_review (else upload no tag)."""
    reviewers: list[Annotated[str, Field(min_length=1)]] = []
    """CVAT usernames; a job with review items is assigned to one of them."""
    assign: Literal["round_robin", "least_load"] = "round_robin"
    """round_robin: by job id; least_load: the reviewer with the fewest assigned jobs."""
    stage: JobStage = "annotation"
    """Stage of a job that has review items."""
    state: JobState = "new"
    """State of a job that has review items."""
    accepted_stage: JobStage | None = "validation"
    """Stage of a job whose frames were all accepted (null: leave it)."""
    message_length: Annotated[int, Field(ge=80, le=4000)] = 500

    @field_validator("reviewers", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value


class RetryConfig(_Strict):
    """Retries of transient server failures (timeouts, dropped connections, 429, 502-504)."""

    attempts: Annotated[int, Field(ge=1, le=100)] = 8
    max_seconds: Annotated[float, Field(gt=0)] = 300.0
    """Give up on one operation after this long, whatever the attempts left."""
    initial_wait: Annotated[float, Field(ge=0)] = 0.5
    """First backoff; it doubles on each attempt, with jitter."""
    max_wait: Annotated[float, Field(ge=0)] = 30.0
    """Longest single wait (a server's Retry-After is honoured up to this)."""
    timeout: Annotated[float, Field(gt=0)] = 60.0
    """Seconds one request may take before it counts as failed."""


class StateConfig(_Strict):
    """Where the run state lives."""

    path: str = ".prelabel/state.db"


class CalibrationConfig(_Strict):
    """Temperature and thresholds learned from reviewed frames by `prelabel calibrate`."""

    path: str = ".prelabel/calibration.yaml"
    """Written by `prelabel calibrate`; `run` applies it when it exists."""
    use: bool = True
    """false: ignore the calibration file and route with the thresholds above."""
    confidence: Annotated[float, Field(gt=0.5, lt=1)] = 0.95
    """Confidence of the lower bound on precision (Clopper-Pearson)."""
    min_examples: Annotated[int, Field(ge=1)] = 50
    """Fewer reviewed frames than this: calibrate refuses and changes nothing."""
    per_label_min: Annotated[int, Field(ge=1)] = 100
    """A label gets its own threshold from this many predictions of it on."""


class FewShotConfig(_Strict):
    """The few-shot cache of reviewer-confirmed frames (Tip-Adapter style, no training)."""

    enabled: bool = False
    """Blend the cache into the zero-shot scores (`calibrate` builds it)."""
    alpha: Annotated[float, Field(ge=0)] = 0.1
    """Weight of the cache score, in units of cosine similarity."""
    beta: Annotated[float, Field(gt=0)] = 5.5
    """Sharpness of the affinity exp(-beta * (1 - cosine))."""
    path: str = ".prelabel/fewshot.pt"


class CvatConfig(_Strict):
    """The CVAT server. Credentials never go here: use CVAT_ACCESS_TOKEN or a cvat-cli profile."""

    host: str | None = None
    """E.g. https://app.cvat.ai; --server-host and CVAT_HOST take precedence."""
    organization: str | None = None
    """An organization slug; empty or absent means the personal workspace."""
    upload_batch_size: Annotated[int, Field(gt=0, le=10000)] = 100
    """Tags per upload request."""
    download_threads: Annotated[int, Field(gt=0, le=32)] = 2
    """Chunks downloaded at once."""
    prefetch_chunks: Annotated[int, Field(gt=0, le=64)] = 2
    """Chunks fetched ahead of the model (bounds memory)."""
    upload_queue: Annotated[int, Field(gt=0, le=64)] = 32
    """Uploads that may wait behind the ones in progress before the pipeline blocks. A model
    batch can send each of its frames to review, one issue each: with fewer places than
    that, the model waits for the server within the batch."""
    write_concurrency: Annotated[int, Field(gt=0, le=32)] = 4
    """Write requests (issues, tag batches) in flight at once; a frame's writes stay in order."""
    prefetch_jobs: Annotated[int, Field(ge=0, le=8)] = 1
    """Jobs whose first `prefetch_chunks` chunks are requested while the current job finishes
    (0: none); each holds that many more chunks in memory. With 1 or more, the next job's
    first batch is also decoded while the model finishes the current job."""
    plan_ahead: Annotated[int, Field(gt=0, le=256)] = 8
    """Jobs planned (their annotations read; data meta and issues once per task), on
    `write_concurrency` threads, ahead of the job being labeled; bounds the plans in memory."""


class WebhookConfig(_Strict):
    """`prelabel serve`: the CVAT webhook service (see README, "Hands-free")."""

    secret: SecretStr | None = None
    """The webhook secret; PRELABEL_WEBHOOK_SECRET takes precedence (better: keep it out of files)."""
    projects: list[Annotated[int, Field(gt=0)]] = []
    """Projects whose new tasks are pre-labeled; empty: every project whose webhook delivers."""
    max_body_bytes: Annotated[int, Field(ge=1024, le=64 * 1024 * 1024)] = 1024 * 1024
    """Larger deliveries are refused (413)."""
    queue_size: Annotated[int, Field(gt=0, le=100000)] = 100
    """Work items that may wait; beyond it a delivery is answered 503 (CVAT may redeliver)."""
    max_connections: Annotated[int, Field(ge=10, le=100000)] = 1000
    """Open connections (idle ones included) and requests in progress; beyond it 503."""
    client_timeout: Annotated[float, Field(gt=0, le=300)] = 10.0
    """Seconds a client may take to send a request's headers, and again its body."""


class Config(_Strict):
    """A whole prelabel configuration."""

    model: ModelConfig = ModelConfig()
    labels: list[LabelConfig] = []
    prompts: PromptConfig = PromptConfig()
    routing: RoutingConfig = RoutingConfig()
    decode: DecodeConfig = DecodeConfig()
    cvat: CvatConfig = CvatConfig()
    review: ReviewConfig = ReviewConfig()
    state: StateConfig = StateConfig()
    retry: RetryConfig = RetryConfig()
    calibration: CalibrationConfig = CalibrationConfig()
    fewshot: FewShotConfig = FewShotConfig()
    webhook: WebhookConfig = WebhookConfig()

    @field_validator("labels")
    @classmethod
    def _unique_labels(cls, value: list[LabelConfig]) -> list[LabelConfig]:
        seen: set[str] = set()
        for label in value:
            if label.name in seen:
                raise ValueError(f"label {label.name!r} is listed twice")
            seen.add(label.name)
        return value

    def label(self, name: str) -> LabelConfig | None:
        """The config entry for a label name, if the config has one."""
        return next((label for label in self.labels if label.name == name), None)


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Read and validate a YAML config (or the defaults), then apply dotted-key overrides.

    `overrides` maps dotted keys such as ``"model.batch_size"`` to values; a value of
    None means "not given" and is skipped.
    """
    data: dict[str, Any] = {}
    where = "config"
    if path is not None:
        where = str(path)
        data = _read_yaml(Path(path))
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        node = data
        *parents, leaf = dotted.split(".")
        for key in parents:
            child = node.setdefault(key, {})
            if not isinstance(child, dict):
                raise ConfigError(f"{where}: '{key}' must be a mapping")
            node = child
        node[leaf] = value
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{where}: {_describe(exc)}") from None


def model_overrides(
    *,
    model: str | None = None,
    pretrained: str | None = None,
    device: str | None = None,
    batch_size: int | None = None,
    quantize: str | None = None,
    accept_threshold: float | None = None,
    min_margin: float | None = None,
    multi_label: bool | None = None,
    **_ignored: Any,
) -> dict[str, Any]:
    """`load_config` overrides for the model and routing settings given (None: not given).

    An explicit accept threshold or minimum margin wins over the calibration file, which
    is then not applied (the one place this rule is written).
    """
    explicit = accept_threshold is not None or min_margin is not None
    return {
        "calibration.use": False if explicit else None,
        "model.name": model,
        "model.pretrained": pretrained,
        "model.device": device,
        "model.batch_size": batch_size,
        "model.quantize": quantize,
        "routing.accept_threshold": accept_threshold,
        "routing.min_margin": min_margin,
        "routing.multi_label": multi_label,
    }


def split_labels(value: str | Sequence[str] | None) -> list[str]:
    """Label names from ``"cat, dog,car"`` (or a list): stripped, empty parts dropped."""
    if value is None:
        return []
    parts = value.split(",") if isinstance(value, str) else list(value)
    return [part.strip() for part in parts if part.strip()]


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "not valid YAML"
        raise ConfigError(f"{path}: malformed YAML{at}: {problem}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, not {type(data).__name__}")
    return data


def _describe(exc: ValidationError) -> str:
    """One line naming each offending key, e.g. ``labels[0].name: field required``."""
    parts = []
    for error in exc.errors():
        key = ""
        for item in error["loc"]:
            key += f"[{item}]" if isinstance(item, int) else (f".{item}" if key else str(item))
        if error["type"] == "extra_forbidden":
            message = "unknown key"
        elif error["type"] == "missing":
            message = "required key is missing"
        else:
            message = error["msg"].removeprefix("Value error, ")
        parts.append(f"{key or 'top level'}: {message}")
    return "; ".join(parts)
