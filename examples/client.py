"""Minimal Python client for the mitoseg service (``mitoseg serve`` or the Bento).

Usage::

    python examples/client.py IMAGE.tif [--url http://127.0.0.1:3000] [--out mask.png]

Set ``MITOSEG_API_TOKEN`` when the server requires a bearer token. Errors come back as
JSON ``{"error": code, "message": ..., "status": ...}`` with a 4xx status.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import requests


def headers() -> dict[str, str]:
    """The ``Authorization`` header when ``MITOSEG_API_TOKEN`` is set."""
    token = os.environ.get("MITOSEG_API_TOKEN")
    return {"Authorization": f"Bearer {token}"} if token else {}


def segment(url: str, image: Path, fmt: str = "png") -> bytes:
    """POST one image to ``/segment``; returns the mask file (PNG or TIFF bytes)."""
    with image.open("rb") as f:
        r = requests.post(
            f"{url}/segment",
            files={"image": (image.name, f)},
            data={"format": fmt},
            headers=headers(),
            timeout=600,
        )
    if r.status_code != 200:
        raise RuntimeError(f"/segment failed ({r.status_code}): {r.text}")
    return r.content


def stats(url: str, image: Path) -> dict:
    """POST one image to ``/stats``; returns count, area fraction and per-object data."""
    with image.open("rb") as f:
        r = requests.post(
            f"{url}/stats", files={"image": (image.name, f)}, headers=headers(), timeout=600
        )
    if r.status_code != 200:
        raise RuntimeError(f"/stats failed ({r.status_code}): {r.text}")
    return r.json()


def main() -> int:
    ap = argparse.ArgumentParser(description="Segment one EM image with a mitoseg server.")
    ap.add_argument("image", type=Path, help="TIFF or PNG, 8/16-bit, grayscale or RGB")
    ap.add_argument("--url", default="http://127.0.0.1:3000")
    ap.add_argument("--out", type=Path, default=Path("mask.png"))
    args = ap.parse_args()
    fmt = "tiff" if args.out.suffix.lower() in (".tif", ".tiff") else "png"
    try:
        args.out.write_bytes(segment(args.url, args.image, fmt))
        result = stats(args.url, args.image)
    except (RuntimeError, requests.RequestException) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    summary = {k: result[k] for k in ("count", "area_fraction", "foreground_pixels")}
    print(json.dumps({"mask": str(args.out), **summary}, indent=2))
    for obj in result["objects"][:5]:
        print(f"object {obj['id']}: area {obj['area']} px, centroid (y, x) {obj['centroid']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
