"""Overlapping pipeline stages with bounded buffers, so memory stays flat under backpressure.

- `ordered_map` runs a function over a stream in a thread pool, a bounded number of items
  ahead of the consumer, and yields the results in input order (chunk downloads, decoding).
- `BackgroundWriter` runs writes one after another in a thread of its own behind a bounded
  queue; a full queue blocks the producer instead of growing.
- `ConcurrentWriter` runs up to N writes at once behind a bounded queue (uploads), keeping
  the writes that share a key (a frame) in the order they were submitted.
- `RunPools` holds the decode and upload threads of a run of several jobs: each job's
  `ordered_map` and `ConcurrentWriter` run on them instead of starting threads of their own,
  with their own order, bounds and failures, so no job starts or ends its threads.
- `lowered_priority` lowers the CPU priority of a pool's threads (``decode.nice``).
"""

from __future__ import annotations

import contextlib
import os
import queue
import sys
import threading
from collections import deque
from collections.abc import Callable, Hashable, Iterable, Iterator
from concurrent.futures import Executor, Future, ThreadPoolExecutor, wait
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def ordered_map(
    func: Callable[[T], R],
    items: Iterable[T],
    *,
    workers: int,
    ahead: int,
    name: str = "stage",
    pool: Executor | None = None,
    initializer: Callable[[], None] | None = None,
    started: Iterable[Future[R]] = (),
) -> Iterator[R]:
    """``map(func, items)`` on `workers` threads, at most `ahead` results in flight or waiting.

    Results come in input order. An exception from `func` is raised where its result is
    consumed. Closing the iterator early cancels what has not started and waits for what has.
    With `pool` (shared, e.g. `RunPools.decode`) the calls run on its threads, which are left
    running at the end; otherwise on `workers` threads of its own, stopped at the end, each of
    which first calls `initializer`. `started` are the results of items before `items`,
    submitted earlier (on `pool`): they come first, and count towards `ahead`.
    """
    ahead = max(1, ahead)
    with contextlib.ExitStack() as stack:
        if pool is None:
            own = ThreadPoolExecutor(
                max_workers=max(1, workers), thread_name_prefix=name, initializer=initializer
            )
            pool = stack.enter_context(own)
        pending: deque[Future[R]] = deque(started)
        try:
            for item in items:
                pending.append(pool.submit(func, item))
                if len(pending) >= ahead:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()
            wait(pending)  # none of its calls still runs once the stream is closed


class BackgroundWriter:
    """Runs submitted calls in order on one background thread, behind a bounded queue.

    `submit` blocks while `depth` calls are waiting. The first failure is re-raised by the
    next `submit` or by `close`, and every call after it is dropped, so that nothing is
    written out of order after an error.
    """

    def __init__(self, depth: int = 2, name: str = "writer") -> None:
        self._queue: queue.Queue[Callable[[], None] | None] = queue.Queue(maxsize=max(1, depth))
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def submit(self, call: Callable[[], None]) -> None:
        self._raise_if_failed()
        self._queue.put(call)

    def close(self) -> None:
        """Wait for every submitted call; re-raise the first failure."""
        self._queue.put(None)
        self._thread.join()
        self._raise_if_failed()

    def _loop(self) -> None:
        while True:
            call = self._queue.get()
            if call is None:
                return
            if self._error is not None:
                continue
            try:
                call()
            except BaseException as exc:
                self._error = exc

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error


class ConcurrentWriter:
    """Runs submitted calls on up to `workers` threads at once, behind a bounded queue.

    A call starts only after every earlier call that shares one of its `keys` has finished,
    so the writes to one frame keep their order; calls without a shared key overlap.
    `submit` blocks while `workers + depth` calls are running or waiting. The first failure
    is re-raised by the next `submit` or by `close`, and every call that has not started by
    then is dropped (calls already running finish). With one worker this is `BackgroundWriter`.

    With `pool` (shared by several writers, e.g. `RunPools.upload`; it must run calls in the
    order they were submitted, as `ThreadPoolExecutor` does) the calls run on its threads and
    `close` waits for this writer's calls only, leaving the pool running; otherwise the
    writer has `workers` threads of its own, stopped by `close`.
    """

    def __init__(
        self, workers: int = 4, depth: int = 2, name: str = "writer", pool: ThreadPoolExecutor | None = None
    ) -> None:
        workers = max(1, workers)
        self._own = pool is None
        self._pool = pool or ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name)
        self._slots = threading.Semaphore(workers + max(1, depth))
        self._lock = threading.Lock()
        self._last: dict[Hashable, Future[None]] = {}
        self._running: set[Future[None]] = set()
        """This writer's calls that have not finished."""
        self._error: BaseException | None = None

    def submit(self, call: Callable[[], None], keys: Iterable[Hashable] = ()) -> None:
        self._raise_if_failed()
        self._slots.acquire()
        keys = tuple(keys)
        with self._lock:
            after = {self._last[key] for key in keys if key in self._last}
            # FIFO pool: every call in `after` was taken by a thread before this one, so no deadlock.
            future = self._pool.submit(self._run, call, after)
            self._running.add(future)
            for key in keys:
                self._last[key] = future
        future.add_done_callback(lambda done: self._finished(done, keys))

    def close(self) -> None:
        """Wait for every submitted call; re-raise the first failure."""
        if self._own:
            self._pool.shutdown(wait=True)
        else:
            with self._lock:
                running = list(self._running)
            wait(running)
        self._raise_if_failed()

    def _run(self, call: Callable[[], None], after: set[Future[None]]) -> None:
        wait(after)
        if self._error is not None:
            return
        try:
            call()
        except BaseException as exc:
            with self._lock:
                self._error = self._error or exc

    def _finished(self, future: Future[None], keys: tuple[Hashable, ...]) -> None:
        with self._lock:
            self._running.discard(future)
            for key in keys:
                if self._last.get(key) is future:
                    del self._last[key]
        self._slots.release()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error


def lowered_priority(nice: int) -> Callable[[], None] | None:
    """A thread-pool initializer that lowers the CPU priority of each of the pool's threads by
    `nice` (to at most 19), or None where there is nothing to do: `nice` 0, or not Linux.

    On Linux a thread has a nice value of its own (``setpriority`` on its thread id), so the
    rest of the process keeps its priority. A lower priority cannot be raised again without
    privileges; it ends with the threads. If the kernel refuses, the threads run as they are.
    """
    if nice <= 0 or sys.platform != "linux":
        return None

    def lower() -> None:
        thread = threading.get_native_id()
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, thread, min(19, os.getpriority(os.PRIO_PROCESS, thread) + nice))

    return lower


class RunPools:
    """The decode and upload threads of one run, shared by all of its jobs.

    Created once per run and closed at its end (a context manager; also on an error or an
    interrupt). Jobs pass `decode` to `ordered_map` and `upload` to `ConcurrentWriter`; each
    job keeps its own order, bounds, failures and its own "all my writes are done" (the
    writer's `close`). `prime` is one thread that takes the next job's first frames from its
    source, which may mean waiting for their download, so that no decode thread waits
    (`prelabel.pipeline.worker.prime`). Closing waits for the calls that are running and
    cancels the others.
    """

    def __init__(self, *, decode_workers: int, upload_workers: int, decode_nice: int = 0) -> None:
        self.prime = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prime")
        self.decode = ThreadPoolExecutor(
            max_workers=max(1, decode_workers),
            thread_name_prefix="decode",
            initializer=lowered_priority(decode_nice),
        )
        self.upload = ThreadPoolExecutor(max_workers=max(1, upload_workers), thread_name_prefix="upload")

    def __enter__(self) -> RunPools:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        try:
            self.prime.shutdown(wait=True, cancel_futures=True)
            self.decode.shutdown(wait=True, cancel_futures=True)
        finally:
            self.upload.shutdown(wait=True, cancel_futures=True)
