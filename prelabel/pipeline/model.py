"""Loading an OpenCLIP model: by name and pretrained tag, `hf-hub:`, `local-dir:` or a file.

`load_model` returns the model in eval mode on its device, with its own preprocessing
transform and tokenizer, and an `identity` string that names the weights exactly; the
identity goes into every fingerprint and into each tag written to CVAT.

Once the text classifiers a run needs are built, `LoadedModel.images_only` gives the same
model without its text tower (a third of ViT-B-32's weights), for runs that score images only.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from urllib.parse import urlsplit

import open_clip
import torch
from PIL import Image
from torch.overrides import TorchFunctionMode

from prelabel.config import ModelConfig
from prelabel.errors import ConfigError, ModelError
from prelabel.pipeline.memory import release_gpu_libraries

log = logging.getLogger(__name__)

RANDOM_SEED = 0
"""Seed for `pretrained: none`, so that random-weight runs are reproducible."""


@dataclass(frozen=True)
class LoadedModel:
    """An OpenCLIP model ready for inference."""

    model: torch.nn.Module
    preprocess: Callable[[Image.Image], torch.Tensor]
    tokenizer: Callable[[list[str]], torch.Tensor]
    identity: str
    """E.g. ``ViT-B-32/laion2b_s34b_b79k``; random weights say so (``.../random-seed0``)."""
    device: torch.device
    autocast_dtype: torch.dtype | None
    """fp16 or bf16 on CUDA, None (plain fp32) on CPU."""
    image_size: tuple[int, int]

    @property
    def random_weights(self) -> bool:
        return f"/random-seed{RANDOM_SEED}" in self.identity

    @property
    def has_text_tower(self) -> bool:
        """False once `images_only` released it: text can no longer be encoded."""
        return not isinstance(self.model, ImageTower)

    def images_only(self) -> LoadedModel:
        """This model without its text tower: the image tower and the logit scale (and bias) only.

        Image embeddings (`encode_image`) are unchanged, and so is the identity; encoding text
        raises `ModelError`. The text tower's memory is freed once nothing else holds the full
        model (this `LoadedModel` or a `Pipeline` built on it), so drop those. Models whose
        image path is not the plain image tower (CoCa) are returned as they are.
        """
        if not isinstance(self.model, (open_clip.model.CLIP, open_clip.model.CustomTextCLIP)):
            return self
        return replace(self, model=ImageTower(self.model))

    def autocast(self) -> contextlib.AbstractContextManager:
        """The autocast context for inference on this model's device (a no-op on CPU)."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)


class ImageTower(torch.nn.Module):
    """What image scoring needs of an OpenCLIP model: its image tower and logit scale (and bias).

    Holds the same parameter objects as the full model (no copy); the text tower is not kept.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.visual = model.visual
        self.logit_scale = model.logit_scale
        self.logit_bias = getattr(model, "logit_bias", None)
        self.output_dict = False

    def encode_image(self, image: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """As open_clip's ``CLIP.encode_image``."""
        features = self.visual(image)
        return torch.nn.functional.normalize(features, dim=-1) if normalize else features

    def encode_text(self, text: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        raise ModelError(
            "this model's text tower was released after its classifiers were built (images only)",
            hint="build every text classifier before calling LoadedModel.images_only",
        )


def resolve_device(name: str) -> torch.device:
    """`auto` is CUDA when available, else CPU; anything else must be a valid torch device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(f"model.device: {name!r} is not a device (use auto, cpu or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"model.device: {name!r} was asked for, but CUDA is not available here")
    return device


def load_model(config: ModelConfig) -> LoadedModel:
    """Load the model `config` names, in eval mode, on the configured device.

    Raises `ModelError` with a hint when the weights cannot be found or downloaded. For the
    CPU, the GPU libraries' pages are let go of first (`release_gpu_libraries`). Under a
    checkpoint the model's parameters are not randomly initialised before the checkpoint
    replaces them (`_parameters_left_uninitialised`).
    `pretrained: none` loads random weights (seeded, so runs repeat) and logs a loud
    warning: predictions are then meaningless, which is only useful for tests.
    """
    device = resolve_device(config.device)
    if device.type == "cpu":
        release_gpu_libraries()  # torch's CUDA build maps them; a CPU model never runs them
    random_weights = config.pretrained.lower() == "none"
    name = config.name
    is_schema = name.startswith(("hf-hub:", "local-dir:"))
    # What open_clip builds from: a cached `hf-hub:` model from its cached folder, so that
    # nothing asks the hub (`_cached_hub_model`); the identity keeps the name.
    source = (_cached_hub_model(name, config.cache_dir) if not random_weights else None) or name
    if random_weights:
        log.warning(
            "!!! pretrained: none -- the model has RANDOM weights; its tags are meaningless. "
            "Use this for tests and benchmarks only. !!!"
        )
        identity = f"{name}/random-seed{RANDOM_SEED}"
    else:
        identity = _identity_and_check(name, config.pretrained, is_schema)
    # A pretrained tag reaches open_clip as its preprocessing settings, not as the tag: given
    # the tag, open_clip looks its weights up on the hub again (see `_cached_weights`).
    tag = None if random_weights or is_schema or os.path.isfile(config.pretrained) else config.pretrained

    try:
        checkpoint = None if random_weights else _checkpoint_file(source, config.pretrained, config.cache_dir)
        with (
            torch.random.fork_rng(devices=[]),
            _no_random_init_warning(not random_weights),
            _parameters_left_uninitialised(checkpoint is not None and _replaces_every_parameter(checkpoint)),
        ):
            torch.manual_seed(RANDOM_SEED)
            # Built on the CPU, with random weights or none; a checkpoint is then loaded in place.
            model, _, preprocess = open_clip.create_model_and_transforms(
                source,
                pretrained=None if random_weights or is_schema or tag else config.pretrained,
                load_weights=False,
                pretrained_text=random_weights,  # no base text-tower download under a checkpoint
                cache_dir=config.cache_dir,
                **(_tag_preprocessing(name, tag) if tag else {}),
            )
        if checkpoint is not None:
            _load_in_place(model, checkpoint)
        model.to(device)
        tokenizer = open_clip.get_tokenizer(source, cache_dir=config.cache_dir)
    except ImportError as exc:  # e.g. SigLIP's tokenizer comes from `transformers`, an optional package
        package = (exc.name or "").partition(".")[0] if isinstance(exc, ModuleNotFoundError) else ""
        if not package:  # not a missing module (a name missing from one, say): say what it is
            raise ModelError(f"cannot load model {name!r}: {_first_line(exc)}") from exc
        raise ModelError(
            f"model {name!r} needs the Python package {package!r}, which is not installed",
            hint=f"pip install {package}",
        ) from exc
    except (RuntimeError, FileNotFoundError, ValueError, OSError) as exc:
        raise ModelError(
            f"cannot load model {name!r} with pretrained {config.pretrained!r}: {_first_line(exc)}",
            hint="check the name with `python -m open_clip.pretrained` or pass a local checkpoint "
            "with --pretrained PATH",
        ) from exc
    model.eval()
    if config.quantize == "int8":
        if device.type != "cpu":
            raise ConfigError("model.quantize: int8 runs on the CPU only; use autocast precision on CUDA")
        # The image tower only: it does the per-frame work, while the text tower runs once
        # per label set and open_clip's text path reads its float weight dtype.
        # In place: a copy would hold the fp32 image tower and its int8 twin at once.
        model.visual = torch.ao.quantization.quantize_dynamic(
            model.visual, {torch.nn.Linear}, dtype=torch.qint8, inplace=True
        )
        identity += "+int8"
    elif device.type == "cuda" and not isinstance(model.visual, open_clip.transformer.VisionTransformer):
        model = model.to(memory_format=torch.channels_last)  # helps convolutional towers
    return LoadedModel(
        model=model,
        preprocess=preprocess,
        tokenizer=tokenizer,
        identity=identity,
        device=device,
        autocast_dtype=_autocast_dtype(device, config.precision),
        image_size=_as_pair(model.visual.image_size),
    )


def _identity_and_check(name: str, pretrained: str, is_schema: bool) -> str:
    """Name the weights exactly, and fail fast when they are not there (no weights file, an
    unknown tag); `_checkpoint_file` fails fast when they cannot be downloaded."""
    if name.startswith("local-dir:"):
        folder = Path(name.removeprefix("local-dir:"))
        weights = _weights_in(folder)
        if weights is None:
            raise ModelError(
                f"no weights file in {folder} (open_clip looks for *.safetensors, *.bin or *.pth, "
                "open_clip_model.safetensors or open_clip_pytorch_model.bin first)",
                hint="add the weights, or pass --pretrained none for random weights (tests only)",
            )
        return f"{name}/{_file_stamp(weights)}"
    if is_schema:
        return name
    if os.path.isfile(pretrained):
        return f"{name}/{_file_stamp(Path(pretrained))}"
    if pretrained not in open_clip.list_pretrained_tags_by_model(name):
        tags = ", ".join(open_clip.list_pretrained_tags_by_model(name)) or "none known"
        raise ModelError(
            f"{pretrained!r} is neither a pretrained tag of {name!r} nor a checkpoint file",
            hint=f"tags for {name}: {tags}",
        )
    return f"{name}/{pretrained}"


def _checkpoint_file(name: str, pretrained: str, cache_dir: str | None) -> str:
    """The weights file open_clip loads for `name` and `pretrained`, downloaded if need be."""
    if name.startswith("local-dir:"):
        found = _weights_in(Path(name.removeprefix("local-dir:")))
        if found is None:
            raise FileNotFoundError(f"no weights file in {name.removeprefix('local-dir:')}")
        return str(found)
    if name.startswith("hf-hub:"):
        repo = name.removeprefix("hf-hub:")
        return open_clip.pretrained.download_pretrained_from_hf(repo, cache_dir=cache_dir)
    if os.path.isfile(pretrained):
        return pretrained
    cached = _cached_weights(name, pretrained, cache_dir)
    if cached is not None:
        return cached
    _check_downloadable(name, pretrained)
    return open_clip.download_pretrained(open_clip.get_pretrained_cfg(name, pretrained), cache_dir=cache_dir)


def _tag_preprocessing(name: str, tag: str) -> dict[str, object]:
    """The image preprocessing `name`'s `tag` was trained with, as arguments of open_clip's
    ``create_model_and_transforms`` (what open_clip itself takes from the tag)."""
    cfg = open_clip.get_pretrained_cfg(name, tag)
    if cfg.get("quick_gelu", False) != (open_clip.get_model_config(name) or {}).get("quick_gelu", False):
        log.warning(
            "%s/%s was trained with quick_gelu=%s, unlike %s's config (as open_clip warns): "
            "its embeddings will be off; use the model name with -quickgelu",
            name, tag, cfg.get("quick_gelu", False), name,
        )  # fmt: skip
    return {
        "image_mean": cfg.get("mean"),
        "image_std": cfg.get("std"),
        "image_interpolation": cfg.get("interpolation"),
        "image_resize_mode": cfg.get("resize_mode"),
    }


def _cached_weights(name: str, tag: str, cache_dir: str | None) -> str | None:
    """The Hugging Face cache's file of `name`'s pretrained `tag`, as open_clip would pick it
    (a ``.safetensors`` twin first); None if the tag is not on the hub or nothing is cached.

    Taken without asking the hub whether a newer file exists: a tag names fixed weights, and
    asking costs a request per candidate file on every start, and 20-25 s of retries per
    file where the hub cannot be reached (47 s for ViT-B-32's default tag).
    """
    hub_entry = open_clip.get_pretrained_cfg(name, tag).get("hf_hub") or ""
    if not hub_entry:
        return None
    # As open_clip.pretrained.download_pretrained reads it: "org/repo/" or "org/repo/file".
    repo, filename = os.path.split(hub_entry)
    filename = filename or "open_clip_pytorch_model.bin"
    candidates = [filename]  # after its .safetensors twin, as open_clip.pretrained._get_safe_alternatives
    if filename == "open_clip_pytorch_model.bin":
        candidates.insert(0, "open_clip_model.safetensors")
    elif filename.endswith((".bin", ".pth")):
        candidates.insert(0, filename[:-4] + ".safetensors")
    found = (_in_hub_cache(repo, candidate, cache_dir) for candidate in candidates)
    return next((path for path in found if path is not None), None)


def _cached_hub_model(name: str, cache_dir: str | None) -> str | None:
    """``local-dir:`` of the cached folder of an `hf-hub:` model that holds its config and
    weights, for open_clip to build from without asking the hub; None otherwise."""
    if not name.startswith("hf-hub:"):
        return None
    found = _in_hub_cache(name.removeprefix("hf-hub:").strip("/"), "open_clip_config.json", cache_dir)
    if found is None or _weights_in(Path(found).parent) is None:
        return None
    return f"local-dir:{Path(found).parent}"


def _in_hub_cache(repo: str, filename: str, cache_dir: str | None) -> str | None:
    """The path of `filename` of the hub's `repo` in the local cache (its ``main``), if there."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo, filename, cache_dir=cache_dir)
    return found if isinstance(found, str) else None


@contextlib.contextmanager
def _no_random_init_warning(active: bool) -> Iterator[None]:
    """Silence open_clip's "initialized randomly" warning while a model whose checkpoint is
    loaded next is built."""

    def keep(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No pretrained weights loaded for model")

    root = logging.getLogger()  # open_clip logs through the root logger
    if active:
        root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)


def _weights_in(folder: Path) -> Path | None:
    """The weights file of a `local-dir:` folder that open_clip loads, if any."""
    found = open_clip.factory._find_checkpoint_in_dir(folder)  # the same choice as open_clip's
    return Path(found) if found else None


_INITIALISERS = frozenset(
    {
        # torch.nn.init's initialisers that a torch function mode sees (the others call
        # these or the tensor methods below)
        torch.nn.init.uniform_,
        torch.nn.init.normal_,
        torch.nn.init.constant_,
        torch.nn.init.kaiming_uniform_,
        torch.Tensor.uniform_,
        torch.Tensor.normal_,
        torch.Tensor.random_,
        torch.Tensor.bernoulli_,
        torch.Tensor.exponential_,
        torch.Tensor.log_normal_,
        torch.Tensor.cauchy_,
        torch.Tensor.geometric_,
    }
)


class _SkipParameterInit(TorchFunctionMode):
    """Leaves new parameters as allocated: `_INITIALISERS` called on an
    ``nn.Parameter`` do nothing. Other tensors (buffers such as a causal mask) are built as usual."""

    def __torch_function__(
        self, func: Callable, types: tuple, args: tuple = (), kwargs: dict | None = None
    ) -> object:
        kwargs = kwargs or {}
        if func in _INITIALISERS:
            target = args[0] if args else kwargs.get("tensor")
            if isinstance(target, torch.nn.Parameter):
                return target
        return func(*args, **kwargs)


def _parameters_left_uninitialised(active: bool) -> contextlib.AbstractContextManager:
    """While a model whose every parameter a checkpoint replaces is built, skip the random
    initialisation of its parameters (ViT-B-32: 1.2 s, ViT-L-14: 2.5 s of a CPU core).

    Only on the calling thread (torch function modes are per thread). The checkpoint then
    replaces every parameter, and `_load_in_place` fails if one is left over.
    """
    return _SkipParameterInit() if active else contextlib.nullcontext()


def _replaces_every_parameter(checkpoint: str) -> bool:
    """Whether `_load_in_place` assigns `checkpoint`'s tensors (and checks that none is
    missing), rather than copying into the model's own (big_vision ``.npz`` weights)."""
    return Path(checkpoint).suffix not in (".npz", ".npy")


def _load_in_place(model: torch.nn.Module, checkpoint: str) -> None:
    """Load `checkpoint` into `model` (as `open_clip.load_checkpoint`, strict), holding one
    copy of the weights rather than two.

    open_clip copies a checkpoint into the model's own tensors, so for a moment the process
    holds the random weights and the file's: ViT-B-32 peaked at 1903 MiB against 1356 MiB
    with random weights alone. Here the model's own tensors are dropped first (their shapes
    stay, on the meta device) and the checkpoint's tensors become the model's
    (``load_state_dict(assign=True)``), cast to float32 where the file holds half precision.
    """
    if not _replaces_every_parameter(checkpoint):  # big_vision weights: open_clip copies them itself
        open_clip.load_checkpoint(model, checkpoint)
        return
    for module in model.modules():
        for key, parameter in list(module.named_parameters(recurse=False)):
            setattr(module, key, torch.nn.Parameter(parameter.to("meta"), parameter.requires_grad))
        for key, buffer in list(module.named_buffers(recurse=False)):
            if key not in module._non_persistent_buffers_set:  # those are not in a checkpoint
                setattr(module, key, buffer.to("meta"))
    # open_clip adapts the checkpoint (old formats, position embeddings) and then calls the
    # model's load_state_dict: for this one call, that assigns instead of copying.
    model.load_state_dict = functools.partial(model.load_state_dict, assign=True)
    try:
        open_clip.load_checkpoint(model, checkpoint, strict=True)
    finally:
        del model.load_state_dict
    model.float()
    missing = [key for key, tensor in model.state_dict().items() if tensor.is_meta]
    if missing:
        raise RuntimeError(f"the checkpoint left {len(missing)} weights unloaded (first: {missing[0]})")


def _check_downloadable(name: str, tag: str) -> None:
    """Fail in seconds, not minutes of retries, when weights that are not cached cannot be
    downloaded either."""
    hub_entry = open_clip.get_pretrained_cfg(name, tag).get("hf_hub") or ""
    if not hub_entry or os.environ.get("HF_HUB_OFFLINE") == "1":
        return
    endpoint = urlsplit(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=5).close()
    except OSError:
        raise ModelError(
            f"weights for {name}/{tag} are not cached and {endpoint.hostname} cannot be reached",
            hint="on a machine without internet pass a local checkpoint with --pretrained "
            "PATH (or --pretrained none to check the pipeline with random weights)",
        ) from None


def _autocast_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    if device.type != "cuda" or precision == "fp32":
        return None
    if precision == "fp16":
        return torch.float16
    if precision == "bf16" or torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


def _file_stamp(path: Path) -> str:
    stat = path.stat()
    return f"{path.name}@{stat.st_size}:{stat.st_mtime_ns}"


def _as_pair(size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return (size, size)
    return (int(size[0]), int(size[1]))


def _first_line(exc: BaseException, limit: int = 300) -> str:
    """The error's first line, and its second where the first only introduces it (ends in ':')."""
    text = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    if not text:
        return type(exc).__name__
    line = f"{text[0]} {text[1]}" if text[0].endswith(":") and len(text) > 1 else text[0]
    return line if len(line) <= limit else line[: limit - 3] + "..."


@contextlib.contextmanager
def inference(loaded: LoadedModel) -> Iterator[None]:
    """`torch.inference_mode()` plus the model's autocast."""
    with torch.inference_mode(), loaded.autocast():
        yield
