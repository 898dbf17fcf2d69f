"""Serving constants shared by the service, the benchmark and the tests (pure Python)."""

from __future__ import annotations

__all__ = ["tile_batch"]


def tile_batch(max_batch_size: int) -> int:
    """Tiles per call from one request to the batched model API.

    A quarter of the adaptive batcher's ``max_batch_size`` (at least 1): small enough
    that the tile batches of about four concurrent requests share one model call, large
    enough to keep a single request efficient.

    Raises:
        ValueError: ``max_batch_size`` below 1.
    """
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
    return max(1, max_batch_size // 4)
