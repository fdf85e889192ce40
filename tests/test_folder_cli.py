"""`prelabel folder` end to end, as a user runs it: real photos, real model, real files."""

from __future__ import annotations

import importlib.util
import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from tests.conftest import SAMPLES, TINY_MODEL, run_cli, run_cli_process, tiny_open_clip_config


def assert_one_line_error(result, fragment: str) -> None:
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert fragment in errors[0], errors[0]


def read_outputs(out: Path) -> tuple[ET.Element, list[dict]]:
    root = ET.parse(out / "annotations.xml").getroot()
    review = [json.loads(line) for line in (out / "review.jsonl").read_text().splitlines()]
    return root, review


def test_every_image_is_tagged_or_listed_for_review_exactly_once(tmp_path, photo_dir, tiny_config):
    (photo_dir / "notes.txt").write_text("not an image, and not an image suffix")
    good = sorted(path.name for path in photo_dir.glob("*.jpg"))
    (photo_dir / "zero.jpg").write_bytes(b"")
    (photo_dir / "text.jpg").write_text("this is not a JPEG")
    truncated = (SAMPLES / "cat.jpg").read_bytes()
    (photo_dir / "truncated.jpg").write_bytes(truncated[: len(truncated) // 3])
    out = tmp_path / "out"

    result = run_cli(
        "folder", str(photo_dir), "--config", str(tiny_config), "--out", str(out), "--no-progress"
    )
    assert result.returncode == 0, result.stderr
    assert "images/s" in result.stdout and "skipped 1 files" in result.stdout

    root, review = read_outputs(out)
    assert root.findtext("version") == "1.1"
    tagged = [image.get("name") for image in root.iter("image")]
    reviewed = [item["image"] for item in review]
    everything = sorted([*good, "zero.jpg", "text.jpg", "truncated.jpg"])
    assert sorted(tagged + reviewed) == everything  # each exactly once
    assert tagged, "the config's low threshold should accept some photos"

    reasons = {item["image"]: item["reason"] for item in review}
    assert reasons["zero.jpg"] == "unreadable: empty file (0 bytes)"
    assert reasons["text.jpg"].startswith("unreadable: not an image")
    assert reasons["truncated.jpg"].startswith("unreadable: corrupt or truncated image")

    # Frame ids follow the sorted folder listing, as a CVAT task made from it numbers them.
    ids = {image.get("name"): int(image.get("id")) for image in root.iter("image")}
    for name, frame in ids.items():
        assert everything.index(name) == frame

    # Labels and attributes in the meta section match what the tags use.
    meta_labels = {
        label.findtext("name"): {attr.findtext("name") for attr in label.iter("attribute")}
        for label in root.find("meta/task/labels")
    }
    assert set(meta_labels) == {"cat", "coffee", "rocket", "astronaut", "galaxy"}
    for image in root.iter("image"):
        for tag in image.iter("tag"):
            assert tag.get("label") in meta_labels
            assert tag.get("source") == "auto"
            attributes = {attr.get("name"): attr.text for attr in tag.iter("attribute")}
            assert set(attributes) == meta_labels[tag.get("label")] == {"confidence", "model"}
            assert 0 <= int(attributes["confidence"]) <= 100
            assert attributes["model"] == f"{TINY_MODEL}/random-seed0"
    spec = json.loads((out / "labels.json").read_text())
    assert {label["name"] for label in spec} == set(meta_labels)


def test_review_items_carry_top_k_candidates(tmp_path, photo_dir, tiny_config):
    out = tmp_path / "out"
    result = run_cli(
        "folder",
        str(photo_dir),
        "--config",
        str(tiny_config),
        "--out",
        str(out),
        "--accept-threshold",
        "1.0",
        "--no-progress",
    )
    assert result.returncode == 0, result.stderr
    root, review = read_outputs(out)
    assert not list(root.iter("image"))
    assert len(review) == 12
    for item in review:
        scores = [candidate["score"] for candidate in item["candidates"]]
        assert len(scores) == 5 and scores == sorted(scores, reverse=True)
        assert item["reason"].startswith("low confidence")


@pytest.mark.parametrize(
    ("setup", "fragment"),
    [
        ("missing", "folder not found"),
        ("empty", "no images in"),
        ("file", "not a folder"),
        ("malformed", "malformed YAML at line"),
        ("unknown_key", "model.batchsize: unknown key"),
        ("no_labels", "no labels"),
    ],
)
def test_bad_input_is_one_line_and_non_zero(tmp_path, photo_dir, tiny_config, setup, fragment):
    images, config = photo_dir, tiny_config
    labels: list[str] = []
    if setup == "missing":
        images = tmp_path / "does-not-exist"
    elif setup == "empty":
        images = tmp_path / "empty"
        images.mkdir()
        (images / "readme.txt").write_text("no pictures here")
    elif setup == "file":
        images = SAMPLES / "cat.jpg"
    elif setup == "malformed":
        config = tmp_path / "bad.yaml"
        config.write_text("model:\n  name: [unclosed\n")
    elif setup == "unknown_key":
        config = tmp_path / "bad.yaml"
        config.write_text("model:\n  batchsize: 4\n")
    elif setup == "no_labels":
        config = tmp_path / "nolabels.yaml"
        config.write_text(f'model:\n  name: "{TINY_MODEL}"\n  pretrained: none\n')
    result = run_cli("folder", str(images), "--config", str(config), "--out", str(tmp_path / "o"), *labels)
    assert_one_line_error(result, fragment)


@pytest.mark.skipif(importlib.util.find_spec("transformers") is not None, reason="transformers is installed")
def test_a_model_whose_tokenizer_needs_a_missing_package_says_which(tmp_path, photo_dir):
    """SigLIP-style models take their tokenizer from `transformers`, which open_clip does not
    install: the user is told what to install, in one line, and nothing is written."""
    config = tiny_open_clip_config()
    config["model_cfg"]["text_cfg"]["hf_tokenizer_name"] = "timm/ViT-B-16-SigLIP"
    (tmp_path / "open_clip_config.json").write_text(json.dumps(config))
    out = tmp_path / "o"
    args = ["folder", str(photo_dir), "--labels", "cat,dog", "--out", str(out), "--no-progress"]
    result = run_cli(*args, "--model", f"local-dir:{tmp_path}", "--pretrained", "none")
    assert_one_line_error(result, "needs the Python package 'transformers', which is not installed")
    assert "hint: pip install transformers" in result.stderr
    assert result.returncode == 3
    assert not out.exists()


def test_debug_shows_the_traceback(tmp_path):
    result = run_cli("--debug", "folder", str(tmp_path / "nope"), "--labels", "cat", "--out", str(tmp_path))
    assert result.returncode != 0
    assert "Traceback" in result.stderr


def test_the_console_entry_point_as_a_real_process(tmp_path, photo_dir):
    """`python -m prelabel` itself: a user error is one line and its exit code (3 for the
    model), as the in-process runner the other tests use reports it; --debug a traceback."""
    args = ["folder", str(photo_dir), "--labels", "cat,dog", "--out", str(tmp_path / "o"),
            "--model", f"local-dir:{tmp_path}", "--pretrained", "unused", "--no-progress"]  # fmt: skip
    real = run_cli_process(*args)
    assert_one_line_error(real, "no weights file in")
    assert real.returncode == 3
    here = run_cli(*args)
    assert (here.returncode, here.stdout) == (real.returncode, real.stdout)
    assert [line for line in here.stderr.splitlines() if line.startswith("error:")] == [
        line for line in real.stderr.splitlines() if line.startswith("error:")
    ]
    assert not (tmp_path / "o").exists()

    missing = str(tmp_path / "nope")
    debug = run_cli_process("--debug", "folder", missing, "--labels", "cat", "--out", str(tmp_path))
    assert debug.returncode == 1
    assert "Traceback" in debug.stderr and "InputError: folder not found" in debug.stderr


def test_help_is_useful():
    result = run_cli("folder", "--help")
    assert result.returncode == 0
    for flag in (
        "--labels",
        "--config",
        "--model",
        "--pretrained",
        "--device",
        "--batch-size",
        "--accept-threshold",
        "--multi-label",
    ):
        assert flag in result.stdout
