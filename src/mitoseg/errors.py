"""The exceptions every layer raises for bad input, in a leaf module (imports nothing).

:class:`DataError` is for bad data (images, stage files, manifests: the message names
the file, and the slice where relevant); :class:`ConfigError` for a missing or invalid
``params.yaml`` section. Both are :class:`ValueError` subclasses.
"""

from __future__ import annotations

__all__ = ["ConfigError", "DataError", "LabelStoreError"]


class DataError(ValueError):
    """Bad input data. The message always names the file (and slice where relevant)."""


class LabelStoreError(DataError):
    """A label store that cannot be read or written, or a slice that cannot go into it
    (the message names the store, the slice and the field)."""


class ConfigError(ValueError):
    """Raised when ``params.yaml`` (or a section of it) is missing or invalid."""
