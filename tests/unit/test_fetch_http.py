"""``mitoseg data fetch`` over HTTP: EPFL layout on a loopback server, resume, checksums."""

from __future__ import annotations

import hashlib
import json
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile

from mitoseg.data.fetch import EPFL_VOXEL_SIZE_NM, fetch
from mitoseg.data.layout import read_split
from mitoseg.data.sources_remote import _cache_name, download_url
from mitoseg.io import DataError, read_voxel_size
from servers import HttpServer

EPFL = ("training.tif", "training_groundtruth.tif", "testing.tif", "testing_groundtruth.tif")


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture()
def epfl_site(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    """A folder laid out like the EPFL download page, with synthetic stacks.

    Stacks are ``(Z, 48, 64)`` uint8 images and 0/255 masks, uncompressed TIFF.
    """
    rng = np.random.default_rng(1)
    site = tmp_path / "site" / " ElectronMicroscopy_Hippocampus"
    site.mkdir(parents=True)
    arrays = {
        "training.tif": rng.integers(0, 256, (6, 48, 64), dtype=np.uint8),
        "training_groundtruth.tif": (rng.random((6, 48, 64)) > 0.8).astype(np.uint8) * 255,
        "testing.tif": rng.integers(0, 256, (3, 48, 64), dtype=np.uint8),
        "testing_groundtruth.tif": (rng.random((3, 48, 64)) > 0.8).astype(np.uint8) * 255,
    }
    for name, arr in arrays.items():
        tifffile.imwrite(site / name, arr)
    return site, arrays


def _base(server: HttpServer) -> str:
    # the real base URL has an encoded space: keep that quirk in the tests
    return server.url + "%20ElectronMicroscopy_Hippocampus/"


@dataclass
class Site:
    """The EPFL-like site on a loopback HTTP server, and an empty download cache."""

    folder: Path
    arrays: dict[str, np.ndarray]
    server: HttpServer
    cache: Path

    @property
    def base(self) -> str:
        return _base(self.server)

    def url(self, name: str) -> str:
        return self.base + name

    def part(self, name: str) -> Path:
        """The partial download of ``name`` in the cache."""
        return self.cache / (_cache_name(self.url(name)) + ".part")

    def body(self, name: str) -> bytes:
        return (self.folder / name).read_bytes()

    def fetch_epfl(self, out: Path, **kwargs: Any) -> dict[str, Any]:
        """``fetch("epfl", out)`` from this site into this cache."""
        return fetch(
            "epfl", out, base_url=self.base, cache_dir=self.cache, progress=False, **kwargs
        )


@pytest.fixture()
def served(
    tmp_path: Path, epfl_site: tuple[Path, dict], http_server: Callable[[Path], HttpServer]
) -> Site:
    folder, arrays = epfl_site
    cache = tmp_path / "cache"
    cache.mkdir()
    return Site(folder, arrays, http_server(folder.parent), cache)


def test_epfl_download_with_checksums(tmp_path: Path, served: Site) -> None:
    sums = {name: _sha(served.folder / name) for name in EPFL}
    summary = fetch(
        "epfl",
        tmp_path / "raw",
        base_url=served.base,
        checksums=sums,
        cache_dir=served.cache,
        progress=True,
    )
    assert summary["kind"] == "epfl"
    images, masks = read_split(tmp_path / "raw", "train")
    np.testing.assert_array_equal(images, served.arrays["training.tif"])
    np.testing.assert_array_equal(masks, served.arrays["training_groundtruth.tif"])
    meta = json.loads((tmp_path / "raw" / "dataset.json").read_text())
    assert meta["base_url"] == served.base
    assert {i["name"].rsplit("/", 1)[1]: i["sha256"] for i in meta["inputs"]} == sums
    assert meta["license"] is None
    # untagged EPFL files: the dataset's published 5 nm voxels, also in the TIFF tags
    assert meta["voxel_size_nm"] == summary["voxel_size_nm"] == list(EPFL_VOXEL_SIZE_NM)
    assert read_voxel_size(tmp_path / "raw" / "train" / "images.tif") == pytest.approx(
        EPFL_VOXEL_SIZE_NM
    )
    assert sorted(p for p, _ in served.server.requests) == sorted(
        f"/%20ElectronMicroscopy_Hippocampus/{n}" for n in EPFL
    )
    # a second fetch reuses the download cache: no new requests
    served.fetch_epfl(tmp_path / "raw2")
    assert len(served.server.requests) == 4


def test_epfl_base_url_from_environment(
    tmp_path: Path, served: Site, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MITOSEG_EPFL_BASE_URL", served.base.rstrip("/"))
    monkeypatch.setenv("MITOSEG_CACHE_DIR", str(tmp_path / "envcache"))
    fetch("epfl", tmp_path / "raw", progress=False)
    assert len(list((tmp_path / "envcache").iterdir())) == 4
    assert (tmp_path / "raw" / "test" / "masks.tif").exists()


def test_resume_partial_download(served: Site) -> None:
    full = served.body("training.tif")
    served.part("training.tif").write_bytes(full[:10000])
    path = download_url(
        served.url("training.tif"), served.cache, sha256=_sha(served.folder / "training.tif"),
        progress=False,
    )  # fmt: skip
    assert path.read_bytes() == full
    assert served.server.requests == [
        ("/%20ElectronMicroscopy_Hippocampus/training.tif", "bytes=10000-")
    ]
    assert not served.part("training.tif").exists()


def test_interrupted_download_then_resume(served: Site) -> None:
    url = served.url("training.tif")
    big = np.random.default_rng(2).integers(0, 256, (6, 256, 256), dtype=np.uint8)
    tifffile.imwrite(served.folder / "training.tif", big)
    served.server.fail_after = 200_000
    with pytest.raises(DataError, match=r"training\.tif: download failed \("):
        download_url(url, served.cache, progress=False)
    part = served.part("training.tif")
    assert 0 < part.stat().st_size < len(served.body("training.tif"))
    kept = part.stat().st_size
    path = download_url(url, served.cache, progress=False)
    assert path.read_bytes() == served.body("training.tif")
    assert served.server.requests[-1][1] == f"bytes={kept}-"


def test_server_without_range_support_restarts(served: Site) -> None:
    served.server.support_range = False
    served.part("testing.tif").write_bytes(b"garbage")
    path = download_url(served.url("testing.tif"), served.cache, progress=False)
    assert path.read_bytes() == served.body("testing.tif")


def test_range_not_satisfiable_restarts(served: Site) -> None:
    size = len(served.body("testing.tif"))
    served.part("testing.tif").write_bytes(b"x" * (size + 10))
    path = download_url(served.url("testing.tif"), served.cache, progress=False)
    assert path.read_bytes() == served.body("testing.tif")
    assert [r for _, r in served.server.requests] == [f"bytes={size + 10}-", None]


def test_checksum_mismatch_names_file(tmp_path: Path, served: Site) -> None:
    with pytest.raises(
        DataError,
        match=r"testing_groundtruth\.tif: sha256 mismatch for testing_groundtruth\.tif: "
        r"expected f{64}, got [0-9a-f]{64}",
    ):
        served.fetch_epfl(tmp_path / "raw", checksums={"testing_groundtruth.tif": "f" * 64})
    assert not (tmp_path / "raw").exists()
    names = sorted(p.name.split("-", 1)[1] for p in served.cache.iterdir())
    assert names == ["testing.tif", "training.tif", "training_groundtruth.tif"]


def test_cached_file_with_wrong_checksum_is_downloaded_again(served: Site) -> None:
    url = served.url("testing.tif")
    (served.cache / _cache_name(url)).write_bytes(b"stale")
    path = download_url(
        url, served.cache, sha256=_sha(served.folder / "testing.tif"), progress=False
    )
    assert path.read_bytes() == served.body("testing.tif")
    assert len(served.server.requests) == 1


def test_404_names_url(tmp_path: Path, served: Site) -> None:
    (served.folder / "testing.tif").unlink()
    with pytest.raises(DataError, match=r"Hippocampus/testing\.tif: HTTP 404 Not Found"):
        served.fetch_epfl(tmp_path / "raw")
    assert not (tmp_path / "raw").exists()


def test_connection_refused_names_url(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/training.tif"
    with pytest.raises(DataError, match=rf"{url}: download failed \(ConnectionError"):
        download_url(url, tmp_path / "cache", progress=False, timeout=5)


def test_manifest_with_http_urls(tmp_path: Path, served: Site) -> None:
    base, arrays = served.base, served.arrays
    manifest = tmp_path / "remote.yaml"
    manifest.write_text(
        f"train:\n"
        f"  - {{image: '{base}training.tif', mask: '{base}training_groundtruth.tif'}}\n"
        f"  - {{image: '{base}testing.tif', mask: '{base}testing_groundtruth.tif'}}\n"
        f"test:\n"
        f"  - {{image: '{base}testing.tif', slices: [0, 2]}}\n"
    )
    fetch(str(manifest), tmp_path / "raw", cache_dir=served.cache, progress=False)
    images, masks = read_split(tmp_path / "raw", "train")
    np.testing.assert_array_equal(
        images, np.concatenate([arrays["training.tif"], arrays["testing.tif"]])
    )
    assert masks.shape == (9, 48, 64)
    images, masks = read_split(tmp_path / "raw", "test", require_masks=False)
    np.testing.assert_array_equal(images, arrays["testing.tif"][:2])
    assert masks is None


def test_truncated_remote_tiff_names_url(tmp_path: Path, served: Site) -> None:
    (served.folder / "testing.tif").write_bytes(served.body("testing.tif")[:200])
    with pytest.raises(
        DataError, match=r"^http://127\.0\.0\.1:\d+/.*testing\.tif: page 0: cannot decode the pixel"
    ):
        served.fetch_epfl(tmp_path / "raw")
