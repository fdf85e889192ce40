"""A latency model of a real CVAT server, so that the test server can be as slow as one.

Off by default (profile ``none``): functional tests only get slower with it. Benchmarks turn
it on with a named profile and a scale factor.

The profile ``cvat-2.73-2core`` is fitted to the medians measured on a native CVAT 2.73.0 on
a 2-core machine (tests/assets/cvat-2.73/README.md, "Latencies of a real CVAT 2.73.0 server"):

- a data chunk costs ``chunk_fixed + frames * chunk_serve_per_frame`` every time it is
  requested (0.05 + 64 x 4.6 ms = 345 ms, the measured 340-350 ms of a cached chunk), and
  its **first** request also builds it: ``frames * build_per_frame`` (compressed 14.1 ms,
  original 7.1 ms per frame), which gives 1.25 s (measured 1.1-1.4 s) and 0.80 s (measured
  0.8 s) for 64 frames, i.e. about 19 and 12 ms per frame in all;
- the other calls a fixed time each (see `LatencyProfile`).

Concurrency: the server is threaded, so requests are answered concurrently and their delays
overlap, as on CVAT's thread pool. Building a chunk is CPU work of the server's 2 cores, so
at most `chunk_builders` chunks (default 2) are built at once; a further first request waits
for a free builder before its build time starts. Concurrent first requests of the same chunk
build it once: the later ones wait for that build, then pay the cached cost. Serving a built
chunk (and every other call) is not limited.

A modelled delay is the total time of the request: the time the test server really spent
answering (encoding a chunk, serialising JSON) is taken off it, so the server is never
slower than the model says on an idle machine.

Where the server shares the client's cores: a real CVAT builds a chunk with the CPU (Pillow
opens every image, and a ``compressed`` chunk re-encodes each one as JPEG; CVAT's
``ZipChunkWriter`` and ``ZipCompressedChunkWriter``), so its builds take CPU time from a
client on the same machine. With ``builds_use_cpu`` the test server spends a build's
modelled time computing (hashing, which releases the GIL) instead of sleeping, until its
thread has used that much CPU time: on a busy machine a build then takes longer, as a real
one does. Off by default. How much of the other calls' time is CPU work on a real server is
not measured; ``calls_use_cpu`` takes all of it as CPU work (serving a built chunk, every
read and write), an upper bound for a CVAT on the client's machine.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import re
import threading
import time
from collections.abc import Callable, Hashable, Iterator, Mapping
from dataclasses import dataclass

_ID = r"/\d+"


@dataclass(frozen=True)
class LatencyProfile:
    """Seconds per kind of request (see the module docstring for the chunk formula)."""

    name: str
    chunk_fixed: float = 0.0
    chunk_serve_per_frame: float = 0.0
    build_per_frame_compressed: float = 0.0
    build_per_frame_original: float = 0.0
    data_meta: float = 0.0
    annotations_get: float = 0.0
    annotations_write: float = 0.0
    """PATCH or PUT of a job's or task's annotations, whatever the number of tags."""
    issue_create: float = 0.0
    """POST /api/issues (one issue with its message) and POST /api/comments."""
    issues_list: float = 0.0
    """GET /api/issues and GET /api/comments."""
    job_update: float = 0.0
    """PATCH /api/jobs/{id} (stage, state, assignee)."""
    login: float = 0.0
    """POST /api/auth/login, and every request with HTTP basic auth: the password is hashed."""
    default: float = 0.0
    """Every other call."""

    def scaled(self, factor: float) -> LatencyProfile:
        """The same profile with every time multiplied by `factor` (the name says so)."""
        if factor < 0:
            raise ValueError("a latency scale factor cannot be negative")
        if factor == 1:
            return self
        times = {f.name: getattr(self, f.name) * factor for f in dataclasses.fields(self) if f.name != "name"}
        return LatencyProfile(name=f"{self.name}x{factor:g}", **times)

    @property
    def is_off(self) -> bool:
        """Whether the profile adds no delay at all."""
        return all(getattr(self, f.name) == 0 for f in dataclasses.fields(self) if f.name != "name")

    def chunk_seconds(self, frames: int, *, built: bool, compressed: bool) -> float:
        """Modelled time of a chunk request: serving, plus building on its first request."""
        seconds = self.chunk_fixed + frames * self.chunk_serve_per_frame
        if not built:
            per_frame = self.build_per_frame_compressed if compressed else self.build_per_frame_original
            seconds += frames * per_frame
        return seconds

    def request_seconds(self, method: str, path: str, query: Mapping[str, str], *, basic_auth: bool) -> float:
        """Modelled time of a request that is not a data chunk (chunks: `chunk_seconds`)."""
        extra = self.login if basic_auth else 0.0
        path = path.rstrip("/")
        if method == "GET" and re.fullmatch(rf"/api/(jobs|tasks){_ID}/data", path):
            return extra if query.get("type") == "chunk" else extra + self.default
        table: tuple[tuple[str, str, float], ...] = (
            ("POST", r"/api/auth/login", self.login),
            ("GET", rf"/api/(jobs|tasks){_ID}/data/meta", self.data_meta),
            ("GET", rf"/api/(jobs|tasks){_ID}/annotations", self.annotations_get),
            ("PATCH", rf"/api/(jobs|tasks){_ID}/annotations", self.annotations_write),
            ("PUT", rf"/api/(jobs|tasks){_ID}/annotations", self.annotations_write),
            ("POST", r"/api/(issues|comments)", self.issue_create),
            ("GET", r"/api/(issues|comments)", self.issues_list),
            ("PATCH", rf"/api/jobs{_ID}", self.job_update),
        )
        for want_method, pattern, seconds in table:
            if method == want_method and re.fullmatch(pattern, path):
                return extra + seconds
        return extra + self.default


PROFILES: dict[str, LatencyProfile] = {
    "none": LatencyProfile("none"),
    "cvat-2.73-2core": LatencyProfile(
        "cvat-2.73-2core",
        chunk_fixed=0.050,
        chunk_serve_per_frame=0.0046,
        build_per_frame_compressed=0.0141,
        build_per_frame_original=0.0071,
        data_meta=0.045,
        annotations_get=0.050,
        annotations_write=0.050,
        issue_create=0.0475,
        issues_list=0.070,
        job_update=0.070,
        login=0.350,
        default=0.045,
    ),
}
"""Named profiles: ``none`` (no delay) and the measured CVAT 2.73.0 on 2 cores."""


def profile(spec: str) -> LatencyProfile:
    """A profile from ``NAME`` or ``NAME*FACTOR`` (e.g. ``cvat-2.73-2core*0.1``)."""
    name, _, factor = spec.partition("*")
    if name not in PROFILES:
        raise ValueError(f"unknown latency profile {name!r}; known: {', '.join(PROFILES)}")
    try:
        scale = float(factor) if factor else 1.0
    except ValueError:
        raise ValueError(f"bad latency scale factor {factor!r} in {spec!r}") from None
    return PROFILES[name].scaled(scale)


class Latency:
    """Applies a `LatencyProfile` to the test server's requests and chunk builds (thread-safe)."""

    def __init__(
        self,
        latency: LatencyProfile | str = "none",
        *,
        chunk_builders: int = 2,
        builds_use_cpu: bool = False,
        calls_use_cpu: bool = False,
    ) -> None:
        if chunk_builders < 1:
            raise ValueError("chunk_builders must be at least 1")
        self.profile = profile(latency) if isinstance(latency, str) else latency
        self.chunk_builders = chunk_builders
        self.builds_use_cpu = builds_use_cpu
        self.calls_use_cpu = calls_use_cpu
        self._builders = threading.BoundedSemaphore(chunk_builders)
        self._lock = threading.Lock()
        self._built: dict[Hashable, bytes] = {}
        self._building: dict[Hashable, threading.Event] = {}

    def describe(self) -> str:
        """E.g. ``cvat-2.73-2core (at most 2 chunk builds at once)``."""
        if self.profile.is_off:
            return f"{self.profile.name} (no added latency)"
        cpu = ", chunk builds use the CPU" if self.builds_use_cpu else ""
        cpu += ", every call's time is CPU work" if self.calls_use_cpu else ""
        return f"{self.profile.name} (at most {self.chunk_builders} chunk builds at once{cpu})"

    @contextlib.contextmanager
    def request(
        self, method: str, path: str, query: Mapping[str, str], headers: Mapping[str, str]
    ) -> Iterator[None]:
        """Around answering one request: pads its time up to the modelled time."""
        auth = headers.get("Authorization") or ""
        seconds = self.profile.request_seconds(method, path, query, basic_auth=auth.startswith("Basic "))
        with _spending(seconds, on_cpu=self.calls_use_cpu):
            yield

    def chunk(self, key: Hashable, frames: int, compressed: bool, build: Callable[[], bytes]) -> bytes:
        """The chunk for `key`, built by `build` on its first request and kept after that.

        Takes the modelled time of the request: the build (waiting for one of the
        `chunk_builders`) on the first request, the serving cost on every request.
        """
        serve = self.profile.chunk_seconds(frames, built=True, compressed=compressed)
        build_time = self.profile.chunk_seconds(frames, built=False, compressed=compressed) - serve
        while True:
            with self._lock:
                data = self._built.get(key)
                waiting = self._building.get(key)
                if data is None and waiting is None:
                    done = self._building[key] = threading.Event()
                    break
            if data is not None:
                break
            waiting.wait()  # the same chunk is being built for another request
        if data is None:  # this request builds it
            try:
                with self._builders, _spending(build_time, on_cpu=self.builds_use_cpu):
                    data = build()
                with self._lock:
                    self._built[key] = data
            finally:
                with self._lock:
                    del self._building[key]
                done.set()
        with _spending(serve, on_cpu=self.calls_use_cpu):  # sending the chunk
            return data


def _spending(seconds: float, *, on_cpu: bool) -> contextlib.AbstractContextManager[None]:
    """Around a block that takes `seconds` in all: computing them (`_computing`) or sleeping
    what the block left of them (`_at_least`)."""
    return _computing(seconds) if on_cpu else _at_least(seconds)


_BLOCK = bytes(1 << 18)
"""What `_computing` hashes: 256 KiB, a fraction of a millisecond each (hashlib releases the
GIL for it, so the server's other threads go on)."""


@contextlib.contextmanager
def _computing(seconds: float) -> Iterator[None]:
    """Run the block, then compute until this thread has used `seconds` of CPU time in all."""
    start = time.thread_time()
    yield
    while time.thread_time() - start < seconds:
        hashlib.sha256(_BLOCK)


@contextlib.contextmanager
def _at_least(seconds: float) -> Iterator[None]:
    """Run the block, then sleep what is left of `seconds` (nothing if it took longer)."""
    start = time.perf_counter()
    yield
    left = seconds - (time.perf_counter() - start)
    if left > 0:
        time.sleep(left)
