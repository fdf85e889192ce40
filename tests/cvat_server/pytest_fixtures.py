"""Pytest fixtures; import them in tests/conftest.py:

from tests.cvat_server.pytest_fixtures import cvat_server, cvat_seeded  # noqa: F401
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from .samples import sample_jpegs
from .server import CvatTestServer

ADMIN = ("admin", "admin-password")
ADMIN_TOKEN = "admin-pat-0123456789"
CAPTURE_LABELS = [
    {
        "name": "cat",
        "type": "tag",
        "attributes": [
            {
                "name": "confidence",
                "mutable": True,
                "input_type": "number",
                "default_value": "0",
                "values": ["0", "100", "1"],
            },
            {
                "name": "model",
                "mutable": True,
                "input_type": "text",
                "default_value": "",
                "values": [""],
            },
            {
                "name": "needs_review",
                "mutable": True,
                "input_type": "checkbox",
                "default_value": "false",
                "values": ["false"],
            },
        ],
    },
    {"name": "dog", "type": "tag", "attributes": []},
    {"name": "car", "type": "any", "attributes": []},
]


@dataclass
class Seeded:
    """The capture setup: admin, a project with cat/dog/car, a 5-image task in 2 jobs."""

    server: CvatTestServer
    username: str
    password: str
    token: str
    project_id: int
    task_id: int
    job_ids: list[int]


@pytest.fixture
def cvat_server() -> Iterator[CvatTestServer]:
    """A started, empty server, stopped after the test."""
    with CvatTestServer() as server:
        yield server


@pytest.fixture
def cvat_seeded(cvat_server: CvatTestServer) -> Seeded:
    """The setup the captured responses were made with (see tests/assets/cvat-2.73/README.md)."""
    return seed_capture_setup(cvat_server)


def seed_capture_setup(server: CvatTestServer) -> Seeded:
    """Seed an admin (password + PAT), a project with cat/dog/car and a 5-image task.

    Images are 320..384 wide, named img_0.jpg..img_4.jpg; segment size 3 gives 2 jobs.
    """
    server.add_user(*ADMIN, is_superuser=True)
    server.add_token(ADMIN[0], ADMIN_TOKEN)
    project_id = server.add_project("capture", owner=ADMIN[0], labels=CAPTURE_LABELS)
    task_id = server.add_image_task(
        project_id,
        sample_jpegs(5, widths=[320, 336, 352, 368, 384]),
        name="capture-images",
        segment_size=3,
    )
    return Seeded(
        server=server,
        username=ADMIN[0],
        password=ADMIN[1],
        token=ADMIN_TOKEN,
        project_id=project_id,
        task_id=task_id,
        job_ids=[j["id"] for j in server.jobs(task_id)],
    )
