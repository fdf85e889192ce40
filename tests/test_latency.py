"""The test server's latency model (tests/cvat_server/latency.py), over real HTTP where it matters."""

from __future__ import annotations

import json
import threading
import time
import urllib.request

import pytest

from tests.cvat_server import CvatTestServer, sample_jpegs
from tests.cvat_server.latency import PROFILES, Latency, LatencyProfile, profile
from tests.cvat_server.pytest_fixtures import seed_capture_setup

SCALE = 0.25
"""A quarter of the real server's times keeps the tests fast and the delays well above noise."""


def _timed(
    server: CvatTestServer, token: str, path: str, *, method: str = "GET", body: object = None
) -> float:
    """Seconds for one request with a personal access token (no password hashing)."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(server.url + path, data=data, method=method)
    request.add_header("Authorization", f"Bearer {token}")
    if data is not None:
        request.add_header("Content-Type", "application/json")
    start = time.perf_counter()
    with urllib.request.urlopen(request, timeout=30) as response:
        response.read()
        assert response.status == 200
    return time.perf_counter() - start


def test_first_chunk_request_builds_it_and_later_ones_are_served_from_cache() -> None:
    model = profile(f"cvat-2.73-2core*{SCALE}")
    with CvatTestServer(latency=model) as server:
        seeded = seed_capture_setup(server)
        frames = 16
        task_id = server.add_image_task(
            seeded.project_id, sample_jpegs(frames), name="latency", segment_size=frames
        )
        job_id = server.jobs(task_id)[0]["id"]
        chunk = f"/api/jobs/{job_id}/data?type=chunk&index=0&quality=compressed"
        first = _timed(server, seeded.token, chunk)
        second = _timed(server, seeded.token, chunk)
        original = _timed(server, seeded.token, chunk.replace("compressed", "original"))

    first_model = model.chunk_seconds(frames, built=False, compressed=True)
    cached_model = model.chunk_seconds(frames, built=True, compressed=True)
    original_model = model.chunk_seconds(frames, built=False, compressed=False)
    assert first_model == pytest.approx(SCALE * (0.05 + 16 * (0.0046 + 0.0141)))
    assert first >= first_model
    assert first < first_model + 0.5  # the real build time is taken off the modelled time
    assert cached_model <= second < first
    assert cached_model < original_model <= original  # the other quality is a chunk of its own


def test_a_write_takes_its_modelled_time_and_profile_none_adds_nothing() -> None:
    timings = {}
    for name in ("none", "cvat-2.73-2core"):  # one request: the real server's 50 ms
        with CvatTestServer(latency=name) as server:
            seeded = seed_capture_setup(server)
            job_id = seeded.job_ids[0]
            label_id = server.label(seeded.task_id, "dog")["id"]
            tag = {"frame": 0, "label_id": label_id, "source": "auto", "attributes": []}
            for _ in range(2):  # the second one is timed: the first pays for one-off set-up
                timings[name] = _timed(
                    server,
                    seeded.token,
                    f"/api/jobs/{job_id}/annotations?action=create",
                    method="PATCH",
                    body={"tags": [tag], "shapes": [], "tracks": []},
                )
            assert len(server.annotations(job_id)["tags"]) == 2
    write = PROFILES["cvat-2.73-2core"].annotations_write
    assert timings["cvat-2.73-2core"] >= write
    assert timings["none"] < write  # loopback and a small PATCH

    off = Latency("none")
    assert off.profile.is_off
    start = time.perf_counter()
    with off.request("POST", "/api/issues", {}, {}):
        pass
    data = off.chunk("key", 64, True, lambda: b"zip")
    assert data == b"zip" and time.perf_counter() - start < 0.005


@pytest.mark.parametrize("builders", [1, 2])
def test_at_most_chunk_builders_chunks_are_built_at_once(builders: int) -> None:
    """Two different chunks asked for together: one builder builds them one after the other."""
    latency = Latency(profile("cvat-2.73-2core*0.5"), chunk_builders=builders)
    build = latency.profile.chunk_seconds(16, built=False, compressed=True) - latency.profile.chunk_seconds(
        16, built=True, compressed=True
    )
    builds: list[str] = []

    def fetch(key: str) -> None:
        latency.chunk(key, 16, True, lambda: builds.append(key) or key.encode())

    start = time.perf_counter()
    threads = [threading.Thread(target=fetch, args=(key,)) for key in ("a", "b", "a")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - start
    assert sorted(builds) == ["a", "b"]  # "a" asked for twice at once is built once
    if builders == 1:
        assert seconds >= 2 * build
    else:
        assert build <= seconds < 2 * build


def test_unknown_profile_and_bad_scale_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown latency profile"):
        profile("cvat-9")
    with pytest.raises(ValueError, match="scale factor"):
        profile("cvat-2.73-2core*fast")
    assert profile("cvat-2.73-2core*0").is_off


def test_a_build_on_the_cpu_spends_its_modelled_time_computing_instead_of_sleeping() -> None:
    model = LatencyProfile("cpu-test", build_per_frame_original=0.05)  # 4 frames: 0.2 s to build
    used = {}
    for on_cpu in (True, False):
        latency = Latency(model, builds_use_cpu=on_cpu)
        cpu, wall = time.thread_time(), time.perf_counter()
        assert latency.chunk(("task", 1), 4, False, lambda: b"the chunk") == b"the chunk"
        cpu, wall = time.thread_time() - cpu, time.perf_counter() - wall
        assert wall >= 0.2
        used[on_cpu] = cpu
    assert used[True] >= 0.2  # this thread's own CPU time: the build ran here
    assert used[False] < 0.05


def test_with_calls_on_the_cpu_a_write_and_serving_a_built_chunk_spend_their_time_computing() -> None:
    """`calls_use_cpu` (`make bench --server-cpu all`): a call's modelled time, and the serving
    time of a chunk already built, are this thread's CPU time instead of a sleep."""
    model = LatencyProfile("cpu-test", issue_create=0.15, chunk_serve_per_frame=0.05)
    used = {}
    for on_cpu in (True, False):
        latency = Latency(model, calls_use_cpu=on_cpu)
        latency.chunk(("task", 1), 4, False, lambda: b"the chunk")  # built (no build cost here)
        cpu, wall = time.thread_time(), time.perf_counter()
        with latency.request("POST", "/api/issues", {}, {}):
            pass
        assert latency.chunk(("task", 1), 4, False, lambda: b"not again") == b"the chunk"
        cpu, wall = time.thread_time() - cpu, time.perf_counter() - wall
        assert wall >= 0.35  # 0.15 s for the issue, 4 x 0.05 s to serve the chunk
        used[on_cpu] = cpu
    assert used[True] >= 0.35
    assert used[False] < 0.05
