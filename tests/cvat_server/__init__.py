"""A CVAT 2.73-compatible REST server for tests (real HTTP, in-memory state)."""

from .app import LoggedRequest
from .faults import Fault, FaultInjector
from .samples import sample_frames, sample_jpegs
from .schema import SchemaViolation
from .server import CvatTestServer

__all__ = [
    "CvatTestServer",
    "Fault",
    "FaultInjector",
    "LoggedRequest",
    "SchemaViolation",
    "sample_frames",
    "sample_jpegs",
]
