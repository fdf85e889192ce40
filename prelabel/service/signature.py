"""Webhook signatures: ``sha256=`` and the hex HMAC-SHA256 of the raw request body.

This is the rule CVAT signs its deliveries by (the `X-Signature-256` header); it is kept
free of CVAT specifics so that any sender using the same rule can be checked with it.
"""

from __future__ import annotations

import hashlib
import hmac

PREFIX = "sha256="


def sign(secret: str, body: bytes) -> str:
    """The `X-Signature-256` value for `body` under `secret`."""
    return PREFIX + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def verify(secret: str, body: bytes, header: str | None) -> bool:
    """Whether `header` is the signature of exactly these bytes under `secret`.

    The comparison takes the same time wherever the header differs, and a missing or
    malformed header is simply not valid. An empty secret verifies nothing.
    """
    if not secret or not header:
        return False
    return hmac.compare_digest(sign(secret, body).encode(), header.strip().encode())
