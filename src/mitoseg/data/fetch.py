"""``mitoseg data fetch``: bring raw EM data into the canonical layout.

Sources (the ``source`` argument):

- ``sample`` (or ``sample:vnc``): the bundled Drosophila VNC crop, copied byte for byte
  with a deterministic ``dataset.json`` (no timestamps, no absolute paths), so a fresh
  clone reproduces the exact bytes tracked by ``data.dvc``; ``NOTICE.md`` (licence) is
  copied beside it.
- ``epfl``: the four EPFL / Lucchi hippocampus files downloaded from
  :data:`EPFL_BASE_URL` (override with ``base_url`` or ``$MITOSEG_EPFL_BASE_URL``).
- ``manifest:NAME``: a manifest bundled in ``mitoseg/sample_data/manifests/``.
- ``s3://bucket/prefix``: an EPFL-layout or canonical-layout prefix (boto3; endpoint from
  ``$AWS_ENDPOINT_URL_S3`` / ``$AWS_ENDPOINT_URL``).
- ``path/to/manifest.yaml``: image/mask stack pairs per split, see
  :func:`mitoseg.data.sources.parse_manifest`.
- a local folder: EPFL layout, canonical layout, or ``{train,test}/{images,masks}/``
  2D slice folders paired by file stem.

Output (see :mod:`mitoseg.data.layout`): ``OUT/{train,test}/images.tif`` ``(Z, H, W)``
uint8|uint16 and ``masks.tif`` (``uint8`` 0/255 for ``mask_kind="binary"``, raw label
values for ``"labels"``) as zlib multi-page TIFF, plus ``OUT/dataset.json``::

    {"source": str, "kind": str, "mask_kind": "binary"|"labels",
     "splits": {"train": {"n_slices", "height", "width", "dtype", "mask_dtype",
                          "sha256": {"images.tif": hex, "masks.tif": hex}}, "test": {...}},
     "license": str | null,
     "voxel_size_nm": [z, y, x] | null,
     "inputs": [{"name": path or URL, "sha256": hex, "bytes": int}, ...]}

Voxel size: read from the source - the sample's ``voxel_size.json``, the TIFF tags of
the input stacks (:func:`mitoseg.io.read_voxel_size`: ImageJ spacing/unit, resolution
tags; every stack that has one must agree), else for ``epfl`` the dataset's published
:data:`EPFL_VOXEL_SIZE_NM` - and recorded in ``dataset.json`` and the written TIFF tags;
the evaluate stage puts it into the inference plan, from where ``mitoseg predict``, the
service and the bioimage.io export read it. None when the source does not say.

Checksums: the published EPFL files have no official checksums, and the maintainers could
not download them to pin any, so :data:`EPFL_SHA256` starts empty (``None`` = not
verified). Pass ``checksums={"training.tif": "<hex>", ...}`` (CLI: ``--sha256
training.tif=<hex>``) to verify a download; every fetch records the SHA-256 of each
input in ``dataset.json["inputs"]``, which is what to copy into :data:`EPFL_SHA256` (or
``--sha256``) to pin a release. A file whose checksum does not match fails the fetch with
an error naming the file and is deleted from the download cache.

Safety: the output folder is built beside ``OUT`` and swapped in only when complete, so
a failed fetch leaves no half-written folder and an existing ``OUT`` untouched. An
existing ``OUT`` is replaced only with ``force=True``, except that re-fetching identical
data (e.g. the sample again) succeeds as a no-op (``status="unchanged"``).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from mitoseg.data.layout import DATASET_FILE, IMAGES, MASKS, SPLITS, split_info
from mitoseg.data.sources import (
    EPFL_FILES,
    MASK_KINDS,
    StackRef,
    detect_folder,
    load_split,
    parse_manifest,
)
from mitoseg.data.sources_remote import (
    default_cache_dir,
    download_s3,
    download_url,
    is_s3_url,
    is_url,
    list_s3,
    sha256_file,
)
from mitoseg.errors import DataError
from mitoseg.io import (
    atomic_dir,
    check_voxel_size,
    read_json_object,
    read_voxel_size,
    write_json,
    write_stack,
)

__all__ = [
    "EPFL_BASE_URL",
    "EPFL_SHA256",
    "EPFL_VOXEL_SIZE_NM",
    "SAMPLE_LICENSE",
    "bundled_manifest",
    "fetch",
    "sample_dir",
]

#: Official location of the EPFL / Lucchi CA1 hippocampus files.
EPFL_BASE_URL = (
    "https://documents.epfl.ch/groups/c/cv/cvlab-unit/www/data/%20ElectronMicroscopy_Hippocampus/"
)
#: Pinned SHA-256 of the EPFL files; ``None`` = not pinned yet (see the module docstring).
EPFL_SHA256: dict[str, str | None] = {name: None for pair in EPFL_FILES.values() for name in pair}
#: ``(z, y, x)`` nm of the EPFL hippocampus volume ("approximately 5x5x5 nm" per voxel,
#: the dataset's page), used when its TIFFs carry no calibration.
EPFL_VOXEL_SIZE_NM = (5.0, 5.0, 5.0)
#: Licence of the bundled sample (see ``sample_data/vnc/NOTICE.md``).
SAMPLE_LICENSE = "CC BY-NC-SA 3.0 (Gerhard et al. 2013, doi:10.6084/m9.figshare.856713)"
_SAMPLE_NAMES = ("vnc",)
_NOTICE = "NOTICE.md"
#: File of a bundled sample holding its ``voxel_size_nm`` (z, y, x).
_VOXEL_FILE = "voxel_size.json"


class _Unchanged(Exception):
    """Internal: the freshly built folder equals the existing one."""


def sample_dir(name: str = "vnc") -> Path:
    """Folder of a bundled sample inside the installed package.

    Raises:
        DataError: unknown sample name.
    """
    if name not in _SAMPLE_NAMES:
        raise DataError(f"sample:{name}: unknown sample; available: {', '.join(_SAMPLE_NAMES)}")
    return Path(str(resources.files("mitoseg") / "sample_data" / name))


def bundled_manifest(name: str) -> Path:
    """Path of ``mitoseg/sample_data/manifests/<name>.yaml``.

    Raises:
        DataError: no such bundled manifest (the message lists the available ones).
    """
    folder = Path(str(resources.files("mitoseg") / "sample_data" / "manifests"))
    path = folder / f"{name}.yaml"
    if not path.is_file():
        names = sorted(p.stem for p in folder.glob("*.yaml"))
        raise DataError(f"manifest:{name}: no bundled manifest; available: {', '.join(names)}")
    return path


def fetch(
    source: str,
    out: str | Path,
    *,
    mask_kind: str = "binary",
    progress: bool = True,
    force: bool = False,
    base_url: str | None = None,
    checksums: dict[str, str] | None = None,
    cache_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Fetch ``source`` into ``out`` in the canonical raw layout.

    Args:
        source: ``"sample"``, ``"epfl"``, ``"manifest:NAME"``, ``"s3://bucket/prefix"``,
            a manifest ``*.yaml``/``*.yml`` path, or a local folder (see module docstring).
        out: output folder (e.g. ``data/raw``).
        mask_kind: ``"binary"`` (masks 0/1 or 0/255 -> ``uint8`` 0/255) or ``"labels"``
            (label maps kept as-is; for the sample, ``labels.tif`` becomes ``masks.tif``).
        progress: show progress bars.
        force: replace an existing ``out`` that holds different data.
        base_url: base URL of the EPFL files (default ``$MITOSEG_EPFL_BASE_URL`` or
            :data:`EPFL_BASE_URL`).
        checksums: expected SHA-256 by file name (``"training.tif"``) or full URL/path;
            merged over :data:`EPFL_SHA256` for ``epfl``.
        cache_dir: download cache for HTTP files (default
            :func:`mitoseg.data.sources_remote.default_cache_dir`).

    Returns:
        Summary ``{"out", "source", "kind", "mask_kind", "status": "written"|"unchanged",
        "splits": {split: {"n_slices", "height", "width", "dtype", "mask_dtype"}}}``.

    Raises:
        ValueError: unknown ``mask_kind``.
        DataError: unknown source, missing/broken/truncated input, shape or dtype
            mismatch, non-binary mask in binary mode, HTTP/S3 errors, checksum mismatch,
            or ``out`` exists with other data and ``force`` is false. Messages name the
            file, URL or folder concerned; ``out`` is unchanged after any error.
    """
    if mask_kind not in MASK_KINDS:
        raise ValueError(f"mask_kind must be one of {MASK_KINDS}, got {mask_kind!r}")
    out = Path(out)
    kind, resolved, source = _classify(str(source))
    _check_existing(out, source, mask_kind, force)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    sums = dict(checksums or {})
    if kind == "epfl":
        sums = {**{k: v for k, v in EPFL_SHA256.items() if v}, **sums}
    out.parent.mkdir(parents=True, exist_ok=True)
    status = "written"
    try:
        with (
            tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.dl-") as staging,
            atomic_dir(out) as tmp,
        ):
            if kind == "sample":
                info = _build_sample(resolved, tmp, mask_kind, source)
            else:
                refs, license_ = _refs(kind, resolved, base_url, Path(staging))
                inputs: list[dict[str, Any]] = []
                resolve = _resolver(cache, Path(staging), sums, progress, inputs)
                default = EPFL_VOXEL_SIZE_NM if kind == "epfl" else None
                info, voxel = _build_arrays(refs, tmp, mask_kind, resolve, default)
                info = {
                    "source": source,
                    "kind": kind,
                    "mask_kind": mask_kind,
                    "splits": info,
                    "license": license_,
                    "voxel_size_nm": voxel,
                    "inputs": inputs,
                }
                if kind == "epfl":
                    info["base_url"] = _epfl_base(base_url)
            write_json(tmp / DATASET_FILE, info)
            tmp.chmod(0o755)  # mkdtemp creates 0700; the data folder is meant to be shared
            if out.exists() and not force:
                if _same_tree(out, tmp):
                    raise _Unchanged
                raise DataError(
                    f"{out}: already exists and differs from the data fetched from {source}; "
                    "pass --force (force=True) to replace it"
                )
    except _Unchanged:
        status = "unchanged"
    return _summary(out, source, status)


# ---------------------------------------------------------------- classification


def _classify(text: str) -> tuple[str, Any, str]:
    """Return ``(kind, resolved location, canonical source text)``."""
    if text == "sample" or text.startswith("sample:"):
        name = text.split(":", 1)[1] if ":" in text else "vnc"
        return "sample", sample_dir(name), f"sample:{name}"
    if text == "epfl":
        return "epfl", None, text
    if text.startswith("manifest:"):
        return "manifest", bundled_manifest(text.split(":", 1)[1]), text
    if is_s3_url(text):
        return "s3", text, text
    if is_url(text):
        raise DataError(
            f"{text}: a URL is not a source by itself; use 'epfl' with --base-url, or list "
            "URLs in a manifest"
        )
    path = Path(text).expanduser()
    if path.suffix.lower() in (".yaml", ".yml"):
        if not path.is_file():
            raise DataError(f"{path}: manifest not found")
        return "manifest", path, text
    if path.is_dir():
        return "folder", path, text
    raise DataError(
        f"{text}: source not found; expected 'sample', 'epfl', 'manifest:NAME', "
        "s3://bucket/prefix, a manifest .yaml or a data folder"
    )


def _check_existing(out: Path, source: str, mask_kind: str, force: bool) -> None:
    if not out.exists() or force:
        return
    if not out.is_dir():
        raise DataError(f"{out}: exists and is not a folder; pass --force to replace it")
    meta = out / DATASET_FILE
    try:
        old = json.loads(meta.read_text())
        same = old.get("source") == source and old.get("mask_kind") == mask_kind
    except (OSError, ValueError, AttributeError):
        same = False
    if not same:
        raise DataError(
            f"{out}: already exists and holds other data (not a fetch of {source!r} with "
            f"mask kind {mask_kind!r}); pass --force (force=True) to replace it"
        )


def _epfl_base(base_url: str | None) -> str:
    base = base_url or os.environ.get("MITOSEG_EPFL_BASE_URL") or EPFL_BASE_URL
    return base if base.endswith("/") else base + "/"


def _refs(
    kind: str, resolved: Any, base_url: str | None, staging: Path
) -> tuple[dict[str, list[StackRef]], str | None]:
    if kind == "epfl":
        base = _epfl_base(base_url)
        return {
            split: [StackRef(base + img, base + gt)] for split, (img, gt) in EPFL_FILES.items()
        }, None
    if kind == "manifest":
        return parse_manifest(resolved)
    if kind == "folder":
        return detect_folder(resolved)[1], None
    return _s3_refs(resolved), None


def _s3_refs(url: str) -> dict[str, list[StackRef]]:
    keys = set(list_s3(url))
    base = url.rstrip("/") + "/"
    epfl = [n for pair in EPFL_FILES.values() for n in pair]
    if EPFL_FILES["train"][0] in keys:
        for name in epfl:
            if name not in keys:
                raise DataError(f"{base}{name}: object not found (EPFL layout)")
        return {split: [StackRef(base + i, base + g)] for split, (i, g) in EPFL_FILES.items()}
    if f"train/{IMAGES}" in keys:
        refs: dict[str, list[StackRef]] = {}
        for split in SPLITS:
            img, msk = f"{split}/{IMAGES}", f"{split}/{MASKS}"
            if img not in keys or (split == "train" and msk not in keys):
                missing = img if img not in keys else msk
                raise DataError(f"{base}{missing}: object not found (canonical layout)")
            refs[split] = [StackRef(base + img, base + msk if msk in keys else None)]
        return refs
    found = ", ".join(sorted(keys)[:10]) or "nothing"
    raise DataError(
        f"{url}: no EPFL files (training.tif, ...) or train/images.tif found; found: {found}"
    )


def _resolver(
    cache: Path,
    staging: Path,
    sums: dict[str, str],
    progress: bool,
    inputs: list[dict[str, Any]],
) -> Callable[[str], tuple[Path, str]]:
    counter = iter(range(1 << 30))

    def resolve(loc: str) -> tuple[Path, str]:
        name = loc.rstrip("/").rsplit("/", 1)[-1]
        expected = sums.get(loc) or sums.get(name)
        if is_url(loc):
            path = download_url(loc, cache, sha256=expected, progress=progress)
        elif is_s3_url(loc):
            path = download_s3(loc, staging / f"{next(counter)}-{name}")
        else:
            path = Path(loc)
        if not path.is_file():
            return path, loc  # read_stack reports "file not found" with the name
        digest = sha256_file(path)
        if expected is not None and digest != expected.lower():
            raise DataError(f"{loc}: sha256 mismatch for {name}: expected {expected}, got {digest}")
        inputs.append({"name": loc, "sha256": digest, "bytes": path.stat().st_size})
        return path, loc

    return resolve


# ---------------------------------------------------------------- building


def _build_arrays(
    refs: dict[str, list[StackRef]],
    tmp: Path,
    mask_kind: str,
    resolve: Callable[[str], tuple[Path, str]],
    default_voxel: tuple[float, float, float] | None = None,
) -> tuple[dict[str, Any], list[float] | None]:
    """Write the splits of ``refs``; returns their ``dataset.json`` entries and the
    voxel size (the image stacks' TIFF calibration, else ``default_voxel``)."""
    splits: dict[str, Any] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    found: dict[str, tuple[float, float, float]] = {}  # image location -> voxel size
    image_locs = {ref.image for split in SPLITS for ref in refs[split]}

    def resolve_and_measure(loc: str) -> tuple[Path, str]:
        path, name = resolve(loc)
        if loc in image_locs and path.is_file():
            vs = read_voxel_size(path)
            if vs is not None:
                found[name] = vs
        return path, name

    for split in SPLITS:
        images, masks = load_split(split, refs[split], mask_kind, resolve_and_measure)
        if shapes and images.shape[1:] != next(iter(shapes.values()))[1:]:
            first = next(iter(shapes))
            raise DataError(
                f"{refs[split][0].image}: {split} slices {images.shape[1:]} differ from "
                f"{first} slices {shapes[first][1:]}"
            )
        shapes[split] = images.shape
        splits[split] = (images, masks)
    voxel = _agreed_voxel_size(found) or default_voxel
    for split, (images, masks) in splits.items():
        write_stack(tmp / split / IMAGES, images, voxel)
        if masks is not None:
            write_stack(tmp / split / MASKS, masks, voxel)
        splits[split] = split_info(tmp / split, images, masks)
    return splits, None if voxel is None else [float(v) for v in voxel]


def _agreed_voxel_size(
    found: dict[str, tuple[float, float, float]],
) -> tuple[float, float, float] | None:
    """The one voxel size of the input stacks that have one, or None.

    Raises:
        DataError: two stacks disagree (names both and their sizes).
    """
    items = list(found.items())
    for name, vs in items[1:]:
        if not np.allclose(vs, items[0][1], rtol=1e-3):
            raise DataError(
                f"{name}: voxel size {list(vs)} nm differs from {items[0][0]}: "
                f"{list(items[0][1])} nm (one dataset, one voxel size)"
            )
    return items[0][1] if items else None


def _build_sample(folder: Path, tmp: Path, mask_kind: str, source: str) -> dict[str, Any]:
    import tifffile

    splits: dict[str, Any] = {}
    inputs: list[dict[str, Any]] = []
    mask_name = "labels.tif" if mask_kind == "labels" else MASKS
    for split in SPLITS:
        (tmp / split).mkdir(parents=True, exist_ok=True)
        info: dict[str, Any] = {}
        for src_name, dst_name in ((IMAGES, IMAGES), (mask_name, MASKS)):
            src = folder / split / src_name
            shutil.copyfile(src, tmp / split / dst_name)
            with tifffile.TiffFile(tmp / split / dst_name) as tif:
                series = tif.series[0]
                shape, dtype = tuple(series.shape), str(series.dtype)
            if dst_name == IMAGES:
                info.update(n_slices=shape[0], height=shape[1], width=shape[2], dtype=dtype)
            else:
                info["mask_dtype"] = dtype
            digest = sha256_file(tmp / split / dst_name)
            info.setdefault("sha256", {})[dst_name] = digest
            inputs.append(
                {"name": f"{split}/{src_name}", "sha256": digest, "bytes": src.stat().st_size}
            )
        splits[split] = {
            k: info[k] for k in ("n_slices", "height", "width", "dtype", "mask_dtype", "sha256")
        }
    shutil.copyfile(folder / _NOTICE, tmp / _NOTICE)
    return {
        "source": source,
        "kind": "sample",
        "mask_kind": mask_kind,
        "splits": splits,
        "license": SAMPLE_LICENSE,
        "voxel_size_nm": sample_voxel_size(folder),
        "inputs": inputs,
    }


def sample_voxel_size(folder: str | Path) -> list[float]:
    """``[z, y, x]`` nm of a bundled sample, from its ``voxel_size.json``.

    Raises:
        DataError: the file is missing or does not hold 3 positive numbers (named).
    """
    path = Path(folder) / _VOXEL_FILE
    data = read_json_object(path, "sample voxel size")
    try:
        return list(check_voxel_size(data.get("voxel_size_nm"), f"{path} voxel_size_nm"))
    except ValueError as exc:
        raise DataError(str(exc)) from None


def _tree_digest(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): sha256_file(p)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _same_tree(a: Path, b: Path) -> bool:
    return _tree_digest(a) == _tree_digest(b)


def _summary(out: Path, source: str, status: str) -> dict[str, Any]:
    info = json.loads((out / DATASET_FILE).read_text())
    return {
        "out": str(out),
        "source": source,
        "kind": info["kind"],
        "mask_kind": info["mask_kind"],
        "status": status,
        "voxel_size_nm": info.get("voxel_size_nm"),
        "splits": {
            split: {k: v for k, v in meta.items() if k != "sha256"}
            for split, meta in info["splits"].items()
        },
    }
