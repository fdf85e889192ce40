"""Weights in the Hugging Face cache load without asking the hub.

Asking costs a request per candidate file on every start where the hub answers, and 20-25 s
of retries per file where it cannot be reached (a firewalled CVAT site). Here the hub is
a loopback server that records every request and answers 404: asking it would show in its
record and fail the load. The cached repositories are laid out as huggingface_hub keeps
them (``models--org--name/refs/main`` and ``snapshots/<revision>/<file>``), holding the tiny
test model.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import huggingface_hub.constants
import open_clip
import pytest
import torch

from prelabel.config import ModelConfig
from prelabel.errors import ModelError
from prelabel.pipeline.model import load_model
from tests.conftest import tiny_open_clip_config, tiny_state

TINY_CONFIG = tiny_open_clip_config()
REPO_ID = "prelabel-tests/tiny-clip"
REVISION = "0123456789abcdef0123456789abcdef01234567"
# Preprocessing unlike open_clip's defaults, so that it shows whether it was taken.
PREPROCESS = {
    "mean": (0.5, 0.5, 0.5),
    "std": (0.25, 0.25, 0.25),
    "interpolation": "bilinear",
    "resize_mode": "squash",
}


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """The hub's address points at a loopback server; yields the requests it received."""
    received: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def _not_found(self) -> None:
            received.append(f"{self.command} {self.path}")
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_GET = do_HEAD = _not_found

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    # huggingface_hub reads its endpoint at import, into these two
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", url)
    template = url + "/{repo_id}/resolve/{revision}/{filename}"
    monkeypatch.setattr(huggingface_hub.constants, "HUGGINGFACE_CO_URL_TEMPLATE", template)
    monkeypatch.setenv("HF_ENDPOINT", url)  # read by load_model's reachability check
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    try:
        yield received
    finally:
        server.shutdown()
        server.server_close()


def _cache(root: Path, files: dict[str, str | dict[str, torch.Tensor]]) -> None:
    """`files` (text, or a state dict saved with torch.save) as the cached `REPO_ID`."""
    repo = root / f"models--{REPO_ID.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(REVISION)
    snapshot = repo / "snapshots" / REVISION
    snapshot.mkdir(parents=True)
    for name, content in files.items():
        if isinstance(content, str):
            (snapshot / name).write_text(content)
        else:
            torch.save(content, snapshot / name)


@pytest.fixture
def tiny_tag(monkeypatch: pytest.MonkeyPatch) -> str:
    """The tiny model as a named open_clip model with a pretrained tag ``cached`` on the hub."""
    monkeypatch.setitem(open_clip.factory._MODEL_CONFIGS, "prelabel-tiny", TINY_CONFIG["model_cfg"])
    tag = {"url": "", "hf_hub": f"{REPO_ID}/", **PREPROCESS}
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, "prelabel-tiny", {"cached": tag})
    return "prelabel-tiny"


def _assert_weights(loaded, state: dict[str, torch.Tensor]) -> None:
    weights = loaded.model.state_dict()
    assert weights.keys() == state.keys()
    assert all(torch.equal(weights[key], tensor) for key, tensor in state.items())


def _assert_preprocessing(loaded) -> None:
    got = loaded.model.visual.preprocess_cfg
    assert tuple(got["mean"]) == PREPROCESS["mean"] and tuple(got["std"]) == PREPROCESS["std"]
    assert (got["interpolation"], got["resize_mode"]) == ("bilinear", "squash")


def test_a_pretrained_tags_cached_weights_load_without_asking_the_hub(tmp_path: Path, hub, tiny_tag):
    state = tiny_state(0.01)
    _cache(tmp_path, {"open_clip_pytorch_model.bin": state})
    loaded = load_model(ModelConfig(name=tiny_tag, pretrained="cached", cache_dir=str(tmp_path)))
    assert hub == []
    assert loaded.identity == "prelabel-tiny/cached"
    _assert_weights(loaded, state)
    _assert_preprocessing(loaded)  # the tag's, as open_clip takes it when given the tag


def test_a_pretrained_tag_that_is_not_cached_is_asked_of_the_hub(tmp_path: Path, hub, tiny_tag):
    with pytest.raises(ModelError, match="cannot load model 'prelabel-tiny'"):
        load_model(ModelConfig(name=tiny_tag, pretrained="cached", cache_dir=str(tmp_path)))
    assert any(f"/{REPO_ID}/resolve/" in request for request in hub), hub


def test_a_cached_hf_hub_model_loads_without_asking_the_hub(tmp_path: Path, hub):
    state = tiny_state(0.01)
    config = {**TINY_CONFIG, "preprocess_cfg": PREPROCESS}
    _cache(tmp_path, {"open_clip_config.json": json.dumps(config), "open_clip_pytorch_model.bin": state})
    loaded = load_model(ModelConfig(name=f"hf-hub:{REPO_ID}", cache_dir=str(tmp_path)))
    assert hub == []
    assert loaded.identity == f"hf-hub:{REPO_ID}"
    _assert_weights(loaded, state)
    _assert_preprocessing(loaded)
    assert loaded.model.encode_text(loaded.tokenizer(["a cat"])).isfinite().all()
