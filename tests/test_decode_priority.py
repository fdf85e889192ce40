"""decode.nice: the decode threads run at a lower CPU priority than the rest of the process."""

from __future__ import annotations

import contextlib
import sys
import threading

import pytest

from prelabel.assemble import build_pipeline
from prelabel.interface import Frame
from prelabel.pipeline.stream import RunPools, lowered_priority, ordered_map
from prelabel.pipeline.worker import predict
from tests.conftest import thread_nice, tiny_model_config, variants, write_jpegs

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="a thread's own nice value is Linux's")


def _decode_threads_nice() -> set[int]:
    """The nice values of the decode threads running now."""
    values = set()
    for thread in threading.enumerate():
        if thread.name.startswith("decode"):
            with contextlib.suppress(ProcessLookupError):  # it ended meanwhile
                values.add(thread_nice(thread))
    return values


def test_the_threads_of_an_ordered_map_are_lowered_and_its_caller_is_not():
    base = thread_nice()
    seen = list(
        ordered_map(lambda _: thread_nice(), range(8), workers=2, ahead=4, initializer=lowered_priority(3))
    )
    assert seen == [min(19, base + 3)] * 8
    assert thread_nice() == base
    assert list(ordered_map(lambda _: thread_nice(), range(4), workers=2, ahead=2)) == [base] * 4
    assert lowered_priority(0) is None


def test_a_runs_decode_threads_are_lowered_and_its_upload_threads_are_not():
    base = thread_nice()
    with RunPools(decode_workers=2, upload_workers=2, decode_nice=19) as pools:
        decoded = list(ordered_map(lambda _: thread_nice(), range(6), workers=2, ahead=3, pool=pools.decode))
        uploaded = [future.result() for future in [pools.upload.submit(thread_nice) for _ in range(4)]]
    assert decoded == [19] * 6
    assert uploaded == [base] * 4


def test_decode_nice_from_the_config_reaches_the_workers_decode_threads(tmp_path):
    config = tiny_model_config(
        {
            "model.batch_size": 2,
            "model.cache_dir": str(tmp_path / "cache"),
            "decode.workers": 2,
            "decode.nice": 7,
        }
    )
    pipeline = build_pipeline(config, ["cat", "coffee", "rocket"])
    paths = write_jpegs(tmp_path / "frames", variants(6, (64, 48)))
    frames = [Frame(ref=path.name, name=path.name, data=path.read_bytes()) for path in paths]
    base, lowered = thread_nice(), set()
    for prediction in predict(iter(frames), pipeline.loaded, pipeline.classifier, pipeline.options):
        assert prediction.error is None and prediction.scores
        lowered |= _decode_threads_nice()
    assert lowered == {min(19, base + 7)}
    assert thread_nice() == base
