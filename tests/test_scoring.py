"""The model, the text classifier and the worker against direct open_clip computations."""

from __future__ import annotations

import json
import time
from pathlib import Path

import open_clip
import pytest
import torch
from PIL import Image

from connectors.folder import FolderSource
from prelabel.assemble import build_pipeline
from prelabel.config import SIMPLE_TEMPLATES, Config, ModelConfig
from prelabel.errors import ModelError
from prelabel.interface import Decision
from prelabel.pipeline.classifier import build_classifier, label_prompts
from prelabel.pipeline.model import load_model
from prelabel.pipeline.runner import run
from tests.conftest import (
    LABELS,
    TINY_MODEL,
    tiny_model_config,
    tiny_open_clip_config,
    tiny_state,
    write_jpegs,
)


class ListSink:
    """Keeps decisions in memory (the sink is the pipeline's output boundary)."""

    def __init__(self) -> None:
        self.decisions: list[Decision] = []
        self.closed = False

    def write(self, decision: Decision) -> None:
        self.decisions.append(decision)

    def close(self) -> None:
        self.closed = True


def _tiny_config(tmp_path: Path, **routing) -> Config:
    return tiny_model_config(
        {
            "model.batch_size": 3,
            "model.cache_dir": str(tmp_path / "cache"),
            "decode.draft": False,
            "routing.multi_label": True,  # keep every label's probability in the prediction
            "routing.accept_threshold": 0.0,
            **{f"routing.{key}": value for key, value in routing.items()},
        },
    )


def test_pipeline_probabilities_equal_direct_unbatched_open_clip(tmp_path: Path, photo_dir: Path):
    config = _tiny_config(tmp_path)
    pipeline = build_pipeline(config, LABELS)
    sink = ListSink()
    run(FolderSource(photo_dir), sink, pipeline, progress=False)
    assert sink.closed and len(sink.decisions) == 12

    # The reference: open_clip used directly, one image at a time, fp32.
    model, _, preprocess = open_clip.create_model_and_transforms(TINY_MODEL, pretrained=None)
    model.load_state_dict(pipeline.loaded.model.state_dict())
    model.eval()
    tokenizer = open_clip.get_tokenizer(TINY_MODEL)
    with torch.no_grad():
        text_columns = []
        for label in LABELS:
            prompts = [template.format(label) for template in SIMPLE_TEMPLATES]
            embeddings = model.encode_text(tokenizer(prompts))
            embeddings = embeddings / embeddings.norm(dim=-1, keepdim=True)
            mean = embeddings.mean(dim=0)
            text_columns.append(mean / mean.norm())
        text = torch.stack(text_columns)
        for decision in sink.decisions:
            image = Image.open(photo_dir / decision.prediction.name)
            features = model.encode_image(preprocess(image).unsqueeze(0))
            features = features / features.norm(dim=-1, keepdim=True)
            expected = (model.logit_scale.exp() * features @ text.T).softmax(dim=-1)[0]
            got = dict(decision.prediction.scores)
            assert set(got) == set(LABELS)
            for index, label in enumerate(LABELS):
                assert got[label] == pytest.approx(expected[index].item(), abs=1e-5)


def test_prompt_ensembling_is_the_renormalised_mean_of_normalised_embeddings(tmp_path: Path):
    config = Config.model_validate(
        {
            "model": {"name": TINY_MODEL, "pretrained": "none"},
            "labels": [{"name": "coffee", "descriptions": ["a cup of coffee", "espresso in a glass"]}],
            "prompts": {"templates": ["a photo of a {}.", "a drawing of a {}."]},
        }
    )
    loaded = load_model(config.model)
    prompts = label_prompts(["coffee", "cat"], config)
    assert prompts == {
        "coffee": ["a cup of coffee", "espresso in a glass"],
        "cat": ["a photo of a cat.", "a drawing of a cat."],
    }
    classifier = build_classifier(loaded, prompts, tmp_path)
    with torch.no_grad():
        for column, label in enumerate(["coffee", "cat"]):
            embeddings = loaded.model.encode_text(loaded.tokenizer(prompts[label]))
            embeddings = embeddings / embeddings.norm(dim=-1, keepdim=True)
            mean = embeddings.mean(dim=0)
            expected = mean / mean.norm()
            assert torch.allclose(classifier.weights[:, column], expected, atol=1e-6)
    assert torch.allclose(classifier.weights.norm(dim=0), torch.ones(2), atol=1e-6)


def test_classifier_is_cached_on_disk_under_its_fingerprint(tmp_path: Path):
    config = _tiny_config(tmp_path)
    loaded = load_model(config.model)
    prompts = label_prompts(LABELS, config)
    first = build_classifier(loaded, prompts, tmp_path)
    cached = tmp_path / "classifiers" / f"{first.fingerprint}.pt"
    assert cached.is_file()
    second = build_classifier(loaded, prompts, tmp_path)
    assert torch.equal(first.weights, second.weights)
    other = build_classifier(loaded, label_prompts(["cat", "dog"], config), tmp_path)
    assert other.fingerprint != first.fingerprint


def test_local_checkpoint_file_and_local_dir_load_the_saved_weights(tmp_path: Path):
    state = tiny_state(0.01)  # weights that differ from the seeded random init
    tiny_json = tiny_open_clip_config()

    # An architecture registered with open_clip plus a checkpoint file as `pretrained`.
    (tmp_path / "prelabel-tiny.json").write_text(json.dumps(tiny_json["model_cfg"]))
    open_clip.add_model_config(tmp_path / "prelabel-tiny.json")
    checkpoint = tmp_path / "tiny.pt"
    torch.save(state, checkpoint)
    from_file = load_model(ModelConfig(name="prelabel-tiny", pretrained=str(checkpoint)))
    assert from_file.identity.startswith("prelabel-tiny/tiny.pt@")

    # A local-dir: folder holding open_clip_config.json and the weights.
    folder = tmp_path / "local"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps(tiny_json))
    torch.save(state, folder / "open_clip_pytorch_model.bin")
    from_dir = load_model(ModelConfig(name=f"local-dir:{folder}", pretrained="unused"))
    assert from_dir.identity.startswith(f"local-dir:{folder}/open_clip_pytorch_model.bin@")

    for loaded in (from_file, from_dir):
        assert not loaded.random_weights
        for name, tensor in state.items():
            assert torch.equal(tensor, loaded.model.state_dict()[name]), name


def test_local_dir_without_weights_is_an_error_unless_pretrained_none(tmp_path: Path):
    with pytest.raises(ModelError, match="no weights file"):
        load_model(ModelConfig(name=TINY_MODEL, pretrained="laion2b_s34b_b79k"))
    assert load_model(ModelConfig(name=TINY_MODEL, pretrained="none")).random_weights


def test_unknown_pretrained_tag_names_the_known_tags():
    with pytest.raises(ModelError) as info:
        load_model(ModelConfig(name="ViT-B-32", pretrained="no-such-tag"))
    assert "laion2b_s34b_b79k" in info.value.one_line()


def test_unreachable_hub_fails_fast_with_a_hint(tmp_path: Path, monkeypatch):
    # A closed loopback port stands in for a machine without internet.
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    start = time.monotonic()
    with pytest.raises(ModelError) as info:
        load_model(ModelConfig(name="ViT-B-32", pretrained="laion2b_s34b_b79k", cache_dir=str(tmp_path)))
    assert time.monotonic() - start < 10
    assert "--pretrained PATH" in info.value.one_line()


def test_random_weights_are_reproducible(tmp_path: Path):
    first = load_model(ModelConfig(name=TINY_MODEL, pretrained="none"))
    second = load_model(ModelConfig(name=TINY_MODEL, pretrained="none"))
    for name, tensor in first.model.state_dict().items():
        assert torch.equal(tensor, second.model.state_dict()[name]), name


def test_draft_decoding_keeps_top1_and_probabilities_close(tmp_path: Path):
    from tests.conftest import variants

    folder = tmp_path / "large"
    write_jpegs(folder, variants(10, size=(1280, 720)))
    results = {}
    for draft in (False, True):
        config = _tiny_config(tmp_path, multi_label=True).model_copy(
            update={"decode": Config().decode.model_copy(update={"draft": draft})}
        )
        sink = ListSink()
        run(FolderSource(folder), sink, build_pipeline(config, LABELS), progress=False)
        results[draft] = {d.prediction.name: dict(d.prediction.scores) for d in sink.decisions}
    for name, exact in results[False].items():
        fast = results[True][name]
        assert max(fast, key=fast.get) == max(exact, key=exact.get), name
        assert max(abs(fast[label] - exact[label]) for label in exact) <= 0.02, name


def test_int8_quantization_runs_on_cpu_and_is_named(tmp_path: Path, photo_dir: Path):
    config = _tiny_config(tmp_path)
    quantized = config.model_copy(update={"model": config.model.model_copy(update={"quantize": "int8"})})
    results = {}
    for name, cfg in (("fp32", config), ("int8", quantized)):
        pipeline = build_pipeline(cfg, LABELS)
        sink = ListSink()
        run(FolderSource(photo_dir), sink, pipeline, progress=False)
        results[name] = {d.prediction.name: dict(d.prediction.scores) for d in sink.decisions}
        assert pipeline.loaded.identity.endswith("+int8") == (name == "int8")
    assert results["fp32"].keys() == results["int8"].keys()
    assert results["fp32"] != results["int8"], "quantization changes the arithmetic"
    for name, exact in results["fp32"].items():
        assert sum(results["int8"][name].values()) == pytest.approx(1.0, abs=1e-4)
        assert max(abs(results["int8"][name][label] - exact[label]) for label in exact) < 0.2
