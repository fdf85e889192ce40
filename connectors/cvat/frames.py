"""Streaming a job's frames from CVAT, chunk by chunk.

`GET /api/jobs/{id}/data?type=chunk&index=N` returns the job's frames
``[N * chunk_size, (N + 1) * chunk_size)`` counted from the job's first frame, after the
frame filter (`numbering.chunk_position`): a zip of images named ``000000.jpeg``,
``000001.jpeg``, ... for image tasks, an mp4 segment for video tasks. Only chunks that hold
wanted frames are downloaded, by a few I/O threads a bounded
number of chunks ahead of the consumer, so downloads overlap the model and memory stays
bounded whatever the task size. In a run of several jobs the threads are shared
(`ChunkDownloads`) and the next job's first chunks are asked for while the current job
finishes. A chunk that fails to decode turns each of its wanted
frames into an unreadable frame; the rest of the job goes on.
"""

from __future__ import annotations

import io
import threading
import time
import zipfile
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from connectors.cvat.jobs import JobPlan
from connectors.cvat.numbering import chunk_position
from connectors.cvat.session import CvatSession
from prelabel.interface import Frame
from prelabel.pipeline.timing import StageTimer

DEFAULT_QUALITY = "original"
"""The chunks read unless asked otherwise: the uploaded files, as cvat-sdk's `annotate_task`
reads them (CVAT builds them in about half the time of its re-encoded ``compressed`` JPEGs)."""


@dataclass(frozen=True)
class CvatFrameRef:
    """Where a CVAT frame came from: the job and the task's relative frame number."""

    job_id: int
    frame: int


@dataclass(frozen=True)
class _Chunk:
    """A downloaded chunk's frames in order, or why it cannot be decoded."""

    index: int
    frames: list
    error: str | None = None


def chunk_indexes(plan: JobPlan, frames: Iterable[int]) -> dict[int, list[int]]:
    """Chunk index -> the given task frames of the job in that chunk, in chunk order."""
    by_chunk: dict[int, list[int]] = {}
    for frame in frames:
        index, _ = chunk_position(plan.start_frame, frame, plan.chunk_size)
        by_chunk.setdefault(index, []).append(frame)
    return dict(sorted(by_chunk.items()))


class ChunkDownloads:
    """Data chunks downloaded and unpacked on a few threads shared by every job of a run.

    `prefetch` asks for a job's first chunks before the job starts, so that it does not
    start cold (CVAT builds a chunk on its first request, ~1.2 s); the job's source then
    takes them (`fetch`). A job's chunks that were fetched early but never taken are dropped
    by `discard`. Downloads run in the order they were asked for.
    """

    def __init__(self, session: CvatSession, *, quality: str = DEFAULT_QUALITY, threads: int = 2) -> None:
        self.session = session
        self.quality = quality
        self._pool = ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="download")
        self._lock = threading.Lock()
        self._early: dict[tuple[int, int], Future[_Chunk]] = {}

    def __enter__(self) -> ChunkDownloads:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def fetch(self, plan: JobPlan, index: int, timer: StageTimer) -> Future[_Chunk]:
        """Chunk `index` of the job: the one fetched early, or a new download."""
        with self._lock:
            early = self._early.pop((plan.job_id, index), None)
        return early or self._pool.submit(self._download, plan, index, timer)

    def prefetch(self, plan: JobPlan, frames: list[int], chunks: int, timer: StageTimer) -> None:
        """Start downloading the first `chunks` chunks that hold any of `frames` (the frames
        the job is expected to score), unless they were asked for already."""
        for index in list(chunk_indexes(plan, frames))[:chunks]:
            with self._lock:
                if (plan.job_id, index) not in self._early:
                    self._early[plan.job_id, index] = self._pool.submit(self._download, plan, index, timer)

    def discard(self, job_id: int) -> None:
        """Drop the job's early chunks that were never taken."""
        with self._lock:
            for key in [key for key in self._early if key[0] == job_id]:
                self._early.pop(key).cancel()

    def close(self) -> None:
        with self._lock:
            for future in self._early.values():
                future.cancel()
            self._early.clear()
        self._pool.shutdown(wait=True, cancel_futures=True)

    def _download(self, plan: JobPlan, index: int, timer: StageTimer) -> _Chunk:
        def download() -> bytes:
            _, response = self.session.client.api_client.jobs_api.retrieve_data(
                plan.job_id, type="chunk", index=index, quality=self.quality, _parse_response=False
            )
            return response.data

        with timer.stage("download"):
            payload = self.session.call(f"downloading chunk {index} of job {plan.job_id}", download)
        try:
            with timer.stage("unpack"):
                return _Chunk(index, _decode_chunk(payload, plan.chunk_type_of(self.quality)))
        except Exception as exc:  # a bad chunk fails its frames, not the job
            return _Chunk(index, [], f"chunk {index} cannot be decoded: {' '.join(str(exc).split())[:200]}")


class JobFrameSource:
    """The frames of one job that its plan wants, in frame order.

    With `downloads` (shared by the jobs of a run) it takes the chunks fetched for it ahead
    of time; `on_last_chunk` is called once every chunk of the job has been asked for (the
    moment to ask for the next job's first chunks). The seconds from `started` (default: the
    first frame asked for) to the first frame handed out are the stage ``wait_job``.
    """

    def __init__(
        self,
        session: CvatSession,
        plan: JobPlan,
        *,
        quality: str = DEFAULT_QUALITY,
        io_threads: int = 2,
        prefetch_chunks: int = 2,
        timer: StageTimer | None = None,
        downloads: ChunkDownloads | None = None,
        on_last_chunk: Callable[[], None] | None = None,
        started: float | None = None,
    ) -> None:
        self.session = session
        self.plan = plan
        self.quality = quality
        self.io_threads = io_threads
        self.prefetch_chunks = prefetch_chunks
        self.timer = timer or StageTimer()
        self.downloads = downloads
        self.on_last_chunk = on_last_chunk
        self.started = started

    def __len__(self) -> int:
        return len(self.plan.frames)

    def frames(self) -> Iterator[Frame]:
        started = self.started if self.started is not None else time.perf_counter()
        own = self.downloads is None
        downloads = self.downloads or ChunkDownloads(
            self.session, quality=self.quality, threads=self.io_threads
        )
        chunks = iter(chunk_indexes(self.plan, self.plan.frames).items())
        pending: deque[tuple[list[int], Future[_Chunk]]] = deque()
        told, waited = False, False

        def top_up() -> None:  # at most `prefetch_chunks` chunks asked for ahead of the one handed out
            nonlocal told
            while len(pending) < max(1, self.prefetch_chunks):
                item = next(chunks, None)
                if item is None:
                    if not told and self.on_last_chunk is not None:
                        self.on_last_chunk()
                    told = True
                    return
                pending.append((item[1], downloads.fetch(self.plan, item[0], self.timer)))

        try:
            top_up()
            while pending:
                wanted, future = pending.popleft()
                chunk = future.result()
                top_up()
                if not waited:
                    self.timer.add("wait_job", time.perf_counter() - started)
                    waited = True
                yield from self._chunk_frames(chunk, wanted)
        finally:
            for _, future in pending:
                future.cancel()
            if own:
                downloads.close()
            else:
                downloads.discard(self.plan.job_id)

    def _chunk_frames(self, chunk: _Chunk, wanted: list[int]) -> Iterator[Frame]:
        for frame in wanted:
            _, offset = chunk_position(self.plan.start_frame, frame, self.plan.chunk_size)
            if chunk.error is not None:
                yield self._frame(frame, None, chunk.error)
            elif offset >= len(chunk.frames):
                yield self._frame(frame, None, f"frame missing from chunk {chunk.index}")
            else:
                yield self._frame(frame, chunk.frames[offset], None)

    def _frame(self, frame: int, data, error: str | None) -> Frame:
        name = self.plan.names.get(frame, f"frame {frame}")
        return Frame(ref=CvatFrameRef(self.plan.job_id, frame), name=name, data=data, error=error)


def _decode_chunk(payload: bytes, chunk_type: str) -> list:
    """A chunk's frames in order: encoded image bytes (imageset) or PIL images (video)."""
    if chunk_type == "video":
        import av  # only video tasks need it (slow to import)

        with av.open(io.BytesIO(payload)) as container:
            return [frame.to_image() for frame in container.decode(video=0)]
    with zipfile.ZipFile(io.BytesIO(payload)) as archive:
        members = sorted(info.filename for info in archive.infolist() if not info.is_dir())
        return [archive.read(member) for member in members]
