"""Config validation: every mistake names its key."""

from __future__ import annotations

from pathlib import Path

import pytest

from prelabel.config import SIMPLE_TEMPLATES, load_config
from prelabel.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_example_config_is_valid_and_documents_every_key():
    config = load_config(REPO / "configs" / "example.yaml")
    assert config.model.name == "ViT-B-32"
    text = (REPO / "configs" / "example.yaml").read_text()
    for section in ("model", "prompts", "routing", "decode", "cvat", "review", "state", "retry"):
        for key in type(getattr(config, section)).model_fields:
            assert f"{key}:" in text, f"configs/example.yaml does not document {section}.{key}"
    for key in ("name", "descriptions", "accept_threshold", "min_margin"):
        assert f"{key}:" in text


def test_defaults_without_a_file():
    config = load_config(None)
    assert config.prompts.templates == list(SIMPLE_TEMPLATES)
    assert config.model.pretrained == "laion2b_s34b_b79k"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("model:\n  nmae: x\n", "model.nmae: unknown key"),
        ("colour: red\n", "colour: unknown key"),
        ("model:\n  batch_size: many\n", "model.batch_size"),
        ("routing:\n  accept_threshold: 1.5\n", "routing.accept_threshold"),
        ("labels:\n  - descriptions: [a cat]\n", "labels[0].name: required key is missing"),
        ("labels:\n  - name: '  '\n", "labels[0].name: a label name cannot be blank"),
        ("labels:\n  - name: cat\n  - name: cat\n", "label 'cat' is listed twice"),
        ("prompts:\n  templates: ['a photo']\n", "has no '{}'"),
        ("model: [1, 2\n", "malformed YAML at line"),
        ("- just\n- a list\n", "the top level must be a mapping"),
    ],
)
def test_bad_configs_name_the_key(tmp_path: Path, text: str, message: str):
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    assert message in info.value.one_line()
    assert "\n" not in info.value.one_line()


def test_overrides_apply_on_top_of_the_file(tmp_path: Path):
    path = write(tmp_path, "model:\n  batch_size: 8\nrouting:\n  accept_threshold: 0.7\n")
    config = load_config(path, {"model.batch_size": 16, "routing.accept_threshold": None})
    assert config.model.batch_size == 16
    assert config.routing.accept_threshold == 0.7


def test_missing_file(tmp_path: Path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
