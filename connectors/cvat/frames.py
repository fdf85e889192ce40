"""Streaming a job's frames from CVAT, chunk by chunk.

`GET /api/jobs/{id}/data?type=chunk&index=N` returns the job's frames
``[N * chunk_size, (N + 1) * chunk_size)`` counted from the job's first frame, after the
frame filter (`numbering.chunk_position`): a zip of images named ``000000.jpeg``,
``000001.jpeg``, ... for image tasks, an mp4 segment for video tasks. Only chunks that hold
wanted frames are downloaded, by a few I/O threads a bounded
number of chunks ahead of the consumer, so downloads overlap the model and memory stays
bounded whatever the task size. A chunk that fails to decode turns each of its wanted
frames into an unreadable frame; the rest of the job goes on.
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass

import av

from connectors.cvat.jobs import JobPlan
from connectors.cvat.numbering import chunk_position
from connectors.cvat.session import CvatSession
from prelabel.interface import Frame
from prelabel.pipeline.stream import ordered_map
from prelabel.pipeline.timing import StageTimer


@dataclass(frozen=True)
class CvatFrameRef:
    """Where a CVAT frame came from: the job and the task's relative frame number."""

    job_id: int
    frame: int


class JobFrameSource:
    """The frames of one job that its plan wants, in frame order."""

    def __init__(
        self,
        session: CvatSession,
        plan: JobPlan,
        *,
        quality: str = "compressed",
        io_threads: int = 2,
        prefetch_chunks: int = 2,
        timer: StageTimer | None = None,
    ) -> None:
        self.session = session
        self.plan = plan
        self.quality = quality
        self.io_threads = io_threads
        self.prefetch_chunks = prefetch_chunks
        self.timer = timer or StageTimer()

    def __len__(self) -> int:
        return len(self.plan.frames)

    def frames(self) -> Iterator[Frame]:
        chunks = ordered_map(
            lambda chunk: list(self._chunk_frames(*chunk)),
            self._chunks(),
            workers=self.io_threads,
            ahead=self.prefetch_chunks,
            name="download",
        )
        for frames in chunks:
            yield from frames

    def _chunks(self) -> Iterator[tuple[int, list[int]]]:
        """(chunk index, wanted task frames in it) for every chunk holding a wanted frame."""
        by_chunk: dict[int, list[int]] = {}
        for frame in self.plan.frames:
            index, _ = chunk_position(self.plan.start_frame, frame, self.plan.chunk_size)
            by_chunk.setdefault(index, []).append(frame)
        yield from sorted(by_chunk.items())

    def _chunk_frames(self, index: int, wanted: list[int]) -> Iterator[Frame]:
        plan = self.plan

        def download() -> bytes:
            _, response = self.session.client.api_client.jobs_api.retrieve_data(
                plan.job_id, type="chunk", index=index, quality=self.quality, _parse_response=False
            )
            return response.data

        with self.timer.stage("download"):
            payload = self.session.call(f"downloading chunk {index} of job {plan.job_id}", download)
        try:
            with self.timer.stage("unpack"):
                decoded = _decode_chunk(payload, plan.chunk_type)
        except Exception as exc:  # a bad chunk fails its frames, not the job
            reason = f"chunk {index} cannot be decoded: {' '.join(str(exc).split())[:200]}"
            for frame in wanted:
                yield self._frame(frame, None, reason)
            return
        for frame in wanted:
            _, offset = chunk_position(plan.start_frame, frame, plan.chunk_size)
            if offset >= len(decoded):
                yield self._frame(frame, None, f"frame missing from chunk {index}")
            else:
                yield self._frame(frame, decoded[offset], None)

    def _frame(self, frame: int, data, error: str | None) -> Frame:
        name = self.plan.names.get(frame, f"frame {frame}")
        return Frame(ref=CvatFrameRef(self.plan.job_id, frame), name=name, data=data, error=error)


def _decode_chunk(payload: bytes, chunk_type: str) -> list:
    """A chunk's frames in order: encoded image bytes (imageset) or PIL images (video)."""
    if chunk_type == "video":
        with av.open(io.BytesIO(payload)) as container:
            return [frame.to_image() for frame in container.decode(video=0)]
    with zipfile.ZipFile(io.BytesIO(payload)) as archive:
        members = sorted(info.filename for info in archive.infolist() if not info.is_dir())
        return [archive.read(member) for member in members]
