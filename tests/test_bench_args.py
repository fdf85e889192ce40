"""`make bench` options: a relative `local-dir:` model still names the folder once the CLI
runs in a temporary folder of its own; `--server-cpu` alone keeps its old meaning."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.throughput import parse_args


def test_a_relative_local_dir_model_is_made_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    args = parse_args(["--model", "local-dir:models/tiny"])
    assert args.model == f"local-dir:{tmp_path.resolve() / 'models' / 'tiny'}"
    assert parse_args(["--model", "ViT-B-32"]).model == "ViT-B-32"


def test_server_cpu_alone_still_means_the_chunk_builds_and_all_adds_every_call() -> None:
    picked = {
        flags: parse_args(list(flags)).server_cpu
        for flags in [(), ("--server-cpu",), ("--server-cpu", "all")]
    }
    assert picked == {(): None, ("--server-cpu",): "builds", ("--server-cpu", "all"): "all"}
    with pytest.raises(SystemExit):
        parse_args(["--server-cpu", "some"])
