"""Loading a checkpoint: the file's weights, in float32, with one copy of them in memory."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode

from prelabel.config import ModelConfig
from prelabel.errors import ModelError
from prelabel.pipeline.model import load_model
from tests.conftest import REPO, tiny_open_clip_config, tiny_state


def _local_dir(folder: Path, model_cfg: dict, state: dict[str, torch.Tensor]) -> str:
    """A `local-dir:` model folder holding `model_cfg` and the weights `state`."""
    folder.mkdir()
    tiny = tiny_open_clip_config()
    (folder / "open_clip_config.json").write_text(json.dumps({**tiny, "model_cfg": model_cfg}))
    torch.save(state, folder / "open_clip_pytorch_model.bin")
    return f"local-dir:{folder}"


def test_a_half_precision_checkpoint_loads_as_its_values_in_float32(tmp_path: Path, caplog):
    state = {key: tensor.half() for key, tensor in tiny_state(0.01).items()}
    model_cfg = tiny_open_clip_config()["model_cfg"]
    caplog.clear()
    loaded = load_model(ModelConfig(name=_local_dir(tmp_path / "half", model_cfg, state), pretrained="x"))
    assert not [r for r in caplog.records if "randomly" in r.getMessage()]  # it is not random
    weights = loaded.model.state_dict()
    assert weights.keys() == state.keys()
    for key, tensor in state.items():
        assert weights[key].dtype == torch.float32, key
        assert torch.equal(weights[key], tensor.float()), key
    # What the checkpoint leaves out is still built: the text tower's causal mask.
    assert not loaded.model.attn_mask.is_meta and torch.isinf(loaded.model.attn_mask).any()
    assert loaded.model.encode_text(loaded.tokenizer(["a cat"])).isfinite().all()


def test_a_checkpoint_missing_weights_is_an_error_not_a_half_built_model(tmp_path: Path):
    state = tiny_state(0.0)
    del state["visual.proj"]
    model_cfg = tiny_open_clip_config()["model_cfg"]
    with pytest.raises(ModelError, match=r"cannot load model .*visual\.proj"):
        load_model(ModelConfig(name=_local_dir(tmp_path / "partial", model_cfg, state), pretrained="x"))


class _InitialisersSeen(TorchFunctionMode):
    """Counts the random initialisations of parameters that reach torch on this thread."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        target = args[0] if args else kwargs.get("tensor")
        random_init = getattr(func, "__name__", "") in ("uniform_", "normal_", "kaiming_uniform_")
        if random_init and isinstance(target, torch.nn.Parameter):
            self.calls += 1
        return func(*args, **kwargs)


def test_under_a_checkpoint_the_parameters_are_not_randomly_initialised_first(tmp_path: Path):
    model_cfg = tiny_open_clip_config()["model_cfg"]
    state = tiny_state(0.01)
    checkpoint_dir = _local_dir(tmp_path / "tiny", model_cfg, state)
    with _InitialisersSeen() as random_build:
        random_model = load_model(ModelConfig(name=checkpoint_dir, pretrained="none")).model
    with _InitialisersSeen() as checkpoint_build:
        loaded = load_model(ModelConfig(name=checkpoint_dir, pretrained="x"))
    assert random_build.calls > 20  # every Linear, embedding and norm of the tiny model
    assert checkpoint_build.calls == 0
    weights = loaded.model.state_dict()
    assert all(torch.equal(weights[key], tensor) for key, tensor in state.items())
    # Buffers the checkpoint does not hold are built as with random weights.
    assert torch.equal(loaded.model.attn_mask, random_model.attn_mask)
    pixels = torch.rand(2, 3, *loaded.image_size, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        features = loaded.model.encode_image(pixels)
    assert features.isfinite().all()


_PEAK = textwrap.dedent(
    """
    import sys
    from prelabel.config import ModelConfig
    from prelabel.pipeline.memory import tune_allocator
    from prelabel.pipeline.model import load_model

    tune_allocator()
    loaded = load_model(ModelConfig(name=sys.argv[1], pretrained=sys.argv[2]))
    # VmHWM, not ru_maxrss: a child's ru_maxrss starts at its parent's (the test worker's) peak.
    status = open("/proc/self/status").read()
    print(int(status.split("VmHWM:")[1].split()[0]) * 1024)
    """
)


def _peak_rss(name: str, pretrained: str, *, tries: int = 2) -> int:
    """The lowest peak of `tries` fresh processes loading the model: one load in a full test
    run once peaked 100-200 MB above its usual (the old code's excess is 177 MB every time)."""
    peaks = []
    for _ in range(tries):
        done = subprocess.run(
            [sys.executable, "-c", _PEAK, name, pretrained],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=300,
            check=True,
        )
        peaks.append(int(done.stdout.split()[-1]))
    return min(peaks)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/status")
def test_loading_a_checkpoint_peaks_near_random_weights_not_at_twice_the_weights(tmp_path: Path):
    # Large enough that one copy of its weights (about 200 MB) stands out of the process's
    # noise, in many tensors of a few MB (as a real model's are, but for its token embedding):
    # a load may hold one tensor twice for a moment.
    model_cfg = {
        "embed_dim": 256,
        "vision_cfg": {"image_size": 64, "layers": 5, "width": 640, "patch_size": 32},
        "text_cfg": {"context_length": 77, "vocab_size": 1000, "width": 640, "heads": 8, "layers": 5},
    }
    folder = tmp_path / "wide"
    random_dir = _local_dir(folder, model_cfg, {})
    (folder / "open_clip_pytorch_model.bin").unlink()
    random_peak = _peak_rss(random_dir, "none")
    import open_clip

    model = open_clip.CLIP(**model_cfg)
    weights = sum(tensor.numel() * tensor.element_size() for tensor in model.state_dict().values())
    torch.save(model.state_dict(), folder / "open_clip_pytorch_model.bin")
    del model
    assert weights > 180e6
    checkpoint_peak = _peak_rss(random_dir, "unused")
    # open_clip's own load copies the file into the random weights: one more copy at its peak.
    assert checkpoint_peak - random_peak < 0.25 * weights, (checkpoint_peak, random_peak, weights)
