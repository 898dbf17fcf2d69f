"""UNet model, losses and metrics.

Attributes are loaded lazily so ``import mitoseg.model`` does not import keras/tensorflow;
``from mitoseg.model import build_unet`` imports :mod:`mitoseg.model.unet` on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["build_unet", "get_loss", "get_metrics", "output_channels"]

_LAZY = {
    "build_unet": "mitoseg.model.unet",
    "output_channels": "mitoseg.model.unet",
    "get_loss": "mitoseg.model.losses",
    "get_metrics": "mitoseg.model.losses",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mitoseg.model' has no attribute {name!r}")
