"""A connection to one CVAT server: the logged-in client and how its calls are retried.

Every function in `connectors.cvat` that talks to the server takes a `CvatSession`, so the
retry policy travels with the client instead of living in a process-wide setting. TLS and
timeouts are fixed when the client is built (`connectors.cvat.connect`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import tenacity
from cvat_sdk import Client
from cvat_sdk.core.helpers import get_paginated_collection

from connectors.cvat import retry
from prelabel.config import RetryConfig

T = TypeVar("T")

LIST_PAGE_SIZE = 1000
"""Items per page when reading a list. CVAT sets no maximum (its `CustomPagination` honours any
positive ``page_size``), so this only bounds one response's size: a project of 2,000 jobs is
listed in 2 requests instead of 200 at CVAT's default of 10."""


@dataclass(frozen=True)
class CvatSession:
    """A logged-in cvat-sdk client and the retry policy for its calls."""

    client: Client
    retry: RetryConfig = field(default_factory=RetryConfig)
    on_retry: Callable[[str], None] | None = field(default=None, compare=False, repr=False)
    """Hears each retried call's failure kind (`retry.failure_kind`), e.g. to count it."""

    @property
    def host(self) -> str:
        """The server's URL (``http://cvat.example:8080``)."""
        return self.client.api_map.host

    @property
    def organization(self) -> str | None:
        return self.client.organization_slug

    def call(self, doing: str, func: Callable[[], T]) -> T:
        """Run an idempotent server call with retries; a failure is one `CvatError` naming `doing`."""
        return retry.call(doing, func, self.retry, self.on_retry)

    def list_all(self, doing: str, endpoint, **filters: object) -> list:
        """Every item of a paginated list endpoint (`LIST_PAGE_SIZE` a page), with retries."""
        return self.call(
            doing, lambda: get_paginated_collection(endpoint, page_size=LIST_PAGE_SIZE, **filters)
        )

    def retrying(self, doing: str) -> tenacity.Retrying:
        """A retry loop for an operation that checks the server itself before repeating a write."""
        return retry.retrying(doing, self.retry, on_retry=self.on_retry)
