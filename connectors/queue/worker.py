"""The worker: takes entries off the queue one at a time and labels each CVAT job.

It is an RQ `SimpleWorker` (the job runs in the worker process, so the model stays loaded
and a GPU context is never forked) with a lease: while an entry runs, a background thread
renews it every `lease / 4` seconds. A worker that dies (SIGKILL, a lost machine) stops
renewing; once its lease has run out, the next maintenance pass of any live worker (every
`lease` seconds) hands the entry back to the queue, or to the failed list when its
attempts are spent. So a dead worker's job is retried within about three leases.

The job function gets the worker's context (``FUNCTION(payload, worker=context)``): what the
process built for its entries (sessions, the model) lives in that object, not in module
globals. The queue package knows the context only as an object to pass on.

SIGTERM (or Ctrl+C) finishes the current entry and exits; a second one stops at once and
the entry goes back to the queue as a failed attempt.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from typing import Any

from redis import Redis
from rq import SimpleWorker
from rq.job import Job
from rq.queue import Queue
from rq.registry import ScheduledJobRegistry, StartedJobRegistry
from rq.worker import WorkerStatus

from connectors.queue.entries import SERIALIZER, open_queue

log = logging.getLogger(__name__)

DEFAULT_LEASE = 60
"""Seconds; a dead worker's entry is retried after at most about 3 x this."""


def worker_name(device: str | None = None) -> str:
    """``host-pid`` (and the device): unique among live workers, readable in `status`."""
    suffix = f"-{device.replace(':', '')}" if device else ""
    return f"{socket.gethostname()}-{os.getpid()}{suffix}"


class ContextJob(Job):
    """A job whose function is called with the running worker's context as ``worker=``."""

    context: object = None

    def _execute(self) -> Any:
        return self.func(*self.args, **self.kwargs, worker=self.context)


def job_class_for(context: object) -> type[Job]:
    """A `ContextJob` class bound to `context` (one per worker, nothing shared)."""
    return type("BoundContextJob", (ContextJob,), {"context": context})


class LeasedWorker(SimpleWorker):
    """A SimpleWorker whose running entry is held by a short, renewed lease.

    In burst mode it leaves only when no entry is queued and none is running anywhere:
    an entry running on a worker that dies comes back to the queue, and a burst worker
    stays to take it.
    """

    def __init__(self, *args, lease: int = DEFAULT_LEASE, poll: float = 0.5, **kwargs) -> None:
        self.lease = max(2, int(lease))
        self.poll = poll
        super().__init__(
            *args,
            maintenance_interval=self.lease,
            default_worker_ttl=None,
            worker_ttl=self.lease + 15,  # blocks for at most `lease` seconds between maintenance passes
            serializer=SERIALIZER,
            **kwargs,
        )

    def get_heartbeat_ttl(self, job: Job, working_time: float = 0.0) -> int:
        return self.lease

    def execute_job(self, job: Job, queue: Queue) -> None:
        execution = self.prepare_execution(job)
        done = threading.Event()
        renewer = threading.Thread(target=self._renew, args=(job, execution, done), name="lease", daemon=True)
        renewer.start()
        try:
            self.perform_job(job, queue, execution)
        finally:
            done.set()
            renewer.join()
        self.set_state(WorkerStatus.IDLE)

    def _renew(self, job: Job, execution, done: threading.Event) -> None:
        while not done.wait(self.lease / 4):
            try:
                self.maintain_heartbeats(job, execution)
            except Exception as exc:  # Redis briefly gone: try again at the next tick
                log.warning("worker %s: could not renew the lease of %s: %s", self.name, job.id, exc)

    def dequeue_job_and_maintain_ttl(self, timeout, max_idle_time=None):
        while True:
            result = super().dequeue_job_and_maintain_ttl(timeout, max_idle_time)
            if result is not None or timeout is not None or self._stop_requested:
                return result
            if not self._in_flight():
                return None
            time.sleep(self.poll)

    def _in_flight(self) -> bool:
        """Entries queued, running or waiting to retry; counting also reclaims expired leases."""
        queue = self.queues[0]
        started = StartedJobRegistry(queue=queue)
        scheduled = ScheduledJobRegistry(queue=queue)
        return bool(started.count or scheduled.count or queue.count)


def run_worker(
    connection: Redis,
    name: str,
    context: object,
    *,
    burst: bool,
    lease: int = DEFAULT_LEASE,
    level: int = logging.INFO,
) -> bool:
    """Work the queue until stopped (or, with `burst`, until no entry is left); True if any ran.

    Each entry's function is called with `context` as its ``worker`` argument.
    """
    queue = open_queue(connection)
    worker = LeasedWorker(
        [queue], connection=connection, name=name, lease=lease, job_class=job_class_for(context)
    )
    return worker.work(burst=burst, logging_level=level)
