"""The smoke test of a live endpoint after a deploy: ``GET /readyz``, then ``POST
/segment`` with a tiny synthetic TIFF (plain HTTP, no AWS call)."""

from __future__ import annotations

import io
import re
import time
from collections.abc import Callable, Mapping
from typing import Any

from mitoseg.deploy.config import SmokeTestError

__all__ = ["SmokeTest", "http_smoke_test", "tiny_test_image"]

SmokeTest = Callable[[str], Mapping[str, Any]]
"""``smoke_test(base_url) -> details``; raises ``SmokeTestError`` on failure."""


def tiny_test_image(size: int = 64) -> bytes:
    """A small synthetic EM-like slice as TIFF bytes: ``(size, size)`` uint8.

    Textured background with a few bright ellipses, so the service runs the whole
    preprocessing path (a constant image could be rejected by input checks).
    """
    import numpy as np
    import tifffile

    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    img = 90 + 30 * np.sin(xx / 5.0) * np.cos(yy / 7.0)
    for cy, cx, r in ((size * 0.3, size * 0.3, size * 0.12), (size * 0.7, size * 0.6, size * 0.15)):
        img[((yy - cy) ** 2 + ((xx - cx) / 1.5) ** 2) < r**2] = 200
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, np.clip(img, 0, 255).astype(np.uint8))
    return buffer.getvalue()


def http_smoke_test(
    base_url: str,
    *,
    health_path: str = "/readyz",
    segment_path: str = "/segment",
    image_field: str = "image",
    token: str | None = None,
    timeout_s: float = 60.0,
    attempts: int = 5,
    retry_delay_s: float = 6.0,
    sleep: Callable[[float], None] | None = None,
) -> dict[str, Any]:
    """Check a live endpoint: ``GET <health_path>`` then ``POST <segment_path>``.

    The readiness probe is retried ``attempts`` times (``retry_delay_s`` apart) because
    load balancer health checks lag the ECS deployment. The segment request sends
    ``tiny_test_image()`` as multipart field ``image_field`` (``smoke.tif``) with
    ``Authorization: Bearer <token>`` when a token is given, and must answer 200 with
    a non-empty body.

    Args:
        base_url: ``http(s)://host[:port]`` of the service.
        health_path: Readiness path.
        segment_path: Segmentation path.
        image_field: Multipart field name of the image.
        token: API token for the segment request.
        timeout_s: Per-request timeout.
        attempts: Readiness attempts (>= 1).
        retry_delay_s: Seconds between readiness attempts.
        sleep: Sleep function (default ``time.sleep``).

    Returns:
        ``{"url", "readyz_status", "segment_status", "segment_bytes", "segment_seconds"}``.

    Raises:
        SmokeTestError: On a bad URL, connection error, non-200 status or empty body.
    """
    import requests

    if not re.match(r"^https?://[^/\s]+", base_url or ""):
        raise SmokeTestError(f"smoke URL {base_url!r} must start with http:// or https://")
    if attempts < 1:
        raise ValueError(f"attempts must be >= 1, got {attempts}")
    sleep = sleep or time.sleep
    base = base_url.rstrip("/")
    ready_url = base + health_path
    last = ""
    ready_status = None
    for attempt in range(1, attempts + 1):
        try:
            response = requests.get(ready_url, timeout=timeout_s)
            ready_status = response.status_code
            if ready_status == 200:
                break
            last = f"status {ready_status}"
        except requests.RequestException as exc:
            last = f"{type(exc).__name__}: {exc}"
        if attempt < attempts:
            sleep(retry_delay_s)
    else:
        raise SmokeTestError(f"GET {ready_url} not ready after {attempts} attempt(s): {last}")

    segment_url = base + segment_path
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    files = {image_field: ("smoke.tif", tiny_test_image(), "image/tiff")}
    started = time.perf_counter()
    try:
        response = requests.post(segment_url, files=files, headers=headers, timeout=timeout_s)
    except requests.RequestException as exc:
        raise SmokeTestError(f"POST {segment_url} failed: {type(exc).__name__}: {exc}") from exc
    seconds = time.perf_counter() - started
    if response.status_code != 200:
        raise SmokeTestError(
            f"POST {segment_url} returned {response.status_code}: {response.text[:200]}"
        )
    if not response.content:
        raise SmokeTestError(f"POST {segment_url} returned an empty body")
    return {
        "url": base,
        "readyz_status": ready_status,
        "segment_status": response.status_code,
        "segment_bytes": len(response.content),
        "segment_seconds": round(seconds, 3),
    }
