"""``mitoseg data fetch`` over HTTP: EPFL layout on a loopback server, resume, checksums."""

from __future__ import annotations

import hashlib
import json
import socket
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import tifffile

from mitoseg.data.fetch import fetch
from mitoseg.data.layout import read_split
from mitoseg.data.sources_remote import _cache_name, download_url
from mitoseg.io import DataError
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


def test_epfl_download_with_checksums(
    tmp_path: Path, epfl_site: tuple[Path, dict], http_server: Callable[[Path], HttpServer]
) -> None:
    site, arrays = epfl_site
    server = http_server(site.parent)
    sums = {name: _sha(site / name) for name in EPFL}
    summary = fetch(
        "epfl",
        tmp_path / "raw",
        base_url=_base(server),
        checksums=sums,
        cache_dir=tmp_path / "cache",
        progress=True,
    )
    assert summary["kind"] == "epfl"
    images, masks = read_split(tmp_path / "raw", "train")
    np.testing.assert_array_equal(images, arrays["training.tif"])
    np.testing.assert_array_equal(masks, arrays["training_groundtruth.tif"])
    meta = json.loads((tmp_path / "raw" / "dataset.json").read_text())
    assert meta["base_url"] == _base(server)
    assert {i["name"].rsplit("/", 1)[1]: i["sha256"] for i in meta["inputs"]} == sums
    assert meta["license"] is None
    assert sorted(p for p, _ in server.requests) == sorted(
        f"/%20ElectronMicroscopy_Hippocampus/{n}" for n in EPFL
    )
    # a second fetch reuses the download cache: no new requests
    fetch(
        "epfl",
        tmp_path / "raw2",
        base_url=_base(server),
        cache_dir=tmp_path / "cache",
        progress=False,
    )
    assert len(server.requests) == 4


def test_epfl_base_url_from_environment(
    tmp_path: Path,
    epfl_site: tuple[Path, dict],
    http_server: Callable[[Path], HttpServer],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    site, _ = epfl_site
    server = http_server(site.parent)
    monkeypatch.setenv("MITOSEG_EPFL_BASE_URL", _base(server).rstrip("/"))
    monkeypatch.setenv("MITOSEG_CACHE_DIR", str(tmp_path / "envcache"))
    fetch("epfl", tmp_path / "raw", progress=False)
    assert len(list((tmp_path / "envcache").iterdir())) == 4
    assert (tmp_path / "raw" / "test" / "masks.tif").exists()


def test_resume_partial_download(
    tmp_path: Path, epfl_site: tuple[Path, dict], http_server: Callable[[Path], HttpServer]
) -> None:
    site, _ = epfl_site
    server = http_server(site.parent)
    url = _base(server) + "training.tif"
    full = (site / "training.tif").read_bytes()
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / (_cache_name(url) + ".part")).write_bytes(full[:10000])
    path = download_url(url, cache, sha256=_sha(site / "training.tif"), progress=False)
    assert path.read_bytes() == full
    assert server.requests == [("/%20ElectronMicroscopy_Hippocampus/training.tif", "bytes=10000-")]
    assert not (cache / (_cache_name(url) + ".part")).exists()


def test_interrupted_download_then_resume(
    tmp_path: Path, epfl_site: tuple[Path, dict], http_server: Callable[[Path], HttpServer]
) -> None:
    site, _ = epfl_site
    server = http_server(site.parent)
    url = _base(server) + "training.tif"
    big = np.random.default_rng(2).integers(0, 256, (6, 256, 256), dtype=np.uint8)
    tifffile.imwrite(site / "training.tif", big)
    server.fail_after = 200_000
    with pytest.raises(DataError, match=r"training\.tif: download failed \("):
        download_url(url, tmp_path / "cache", progress=False)
    part = tmp_path / "cache" / (_cache_name(url) + ".part")
    assert 0 < part.stat().st_size < (site / "training.tif").stat().st_size
    kept = part.stat().st_size
    path = download_url(url, tmp_path / "cache", progress=False)
    assert path.read_bytes() == (site / "training.tif").read_bytes()
    assert server.requests[-1][1] == f"bytes={kept}-"


def test_server_without_range_support_restarts(
    tmp_path: Path, epfl_site: tuple[Path, dict], http_server: Callable[[Path], HttpServer]
) -> None:
    site, _ = epfl_site
    server = http_server(site.parent)
    server.support_range = False
    url = _base(server) + "testing.tif"
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / (_cache_name(url) + ".part")).write_bytes(b"garbage")
    path = download_url(url, cache, progress=False)
    assert path.read_bytes() == (site / "testing.tif").read_bytes()


def test_range_not_satisfiable_restarts(
    tmp_path: Path, epfl_site: tuple[Path, dict], http_server: Callable[[Path], HttpServer]
) -> None:
    site, _ = epfl_site
    server = http_server(site.parent)
    url = _base(server) + "testing.tif"
    cache = tmp_path / "cache"
    cache.mkdir()
    size = (site / "testing.tif").stat().st_size
    (cache / (_cache_name(url) + ".part")).write_bytes(b"x" * (size + 10))
    path = download_url(url, cache, progress=False)
    assert path.read_bytes() == (site / "testing.tif").read_bytes()
    assert [r for _, r in server.requests] == [f"bytes={size + 10}-", None]


def test_checksum_mismatch_names_file(
    tmp_path: Path, epfl_site: tuple[Path, dict], http_server: Callable[[Path], HttpServer]
) -> None:
    site, _ = epfl_site
    server = http_server(site.parent)
    with pytest.raises(
        DataError,
        match=r"testing_groundtruth\.tif: sha256 mismatch for testing_groundtruth\.tif: "
        r"expected f{64}, got [0-9a-f]{64}",
    ):
        fetch(
            "epfl",
            tmp_path / "raw",
            base_url=_base(server),
            checksums={"testing_groundtruth.tif": "f" * 64},
            cache_dir=tmp_path / "cache",
            progress=False,
        )
    assert not (tmp_path / "raw").exists()
    names = sorted(p.name.split("-", 1)[1] for p in (tmp_path / "cache").iterdir())
    assert names == ["testing.tif", "training.tif", "training_groundtruth.tif"]


def test_cached_file_with_wrong_checksum_is_downloaded_again(
    tmp_path: Path, epfl_site: tuple[Path, dict], http_server: Callable[[Path], HttpServer]
) -> None:
    site, _ = epfl_site
    server = http_server(site.parent)
    url = _base(server) + "testing.tif"
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / _cache_name(url)).write_bytes(b"stale")
    path = download_url(url, cache, sha256=_sha(site / "testing.tif"), progress=False)
    assert path.read_bytes() == (site / "testing.tif").read_bytes()
    assert len(server.requests) == 1


def test_404_names_url(
    tmp_path: Path, epfl_site: tuple[Path, dict], http_server: Callable[[Path], HttpServer]
) -> None:
    site, _ = epfl_site
    (site / "testing.tif").unlink()
    server = http_server(site.parent)
    with pytest.raises(DataError, match=r"Hippocampus/testing\.tif: HTTP 404 Not Found"):
        fetch(
            "epfl",
            tmp_path / "raw",
            base_url=_base(server),
            cache_dir=tmp_path / "cache",
            progress=False,
        )
    assert not (tmp_path / "raw").exists()


def test_connection_refused_names_url(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/training.tif"
    with pytest.raises(DataError, match=rf"{url}: download failed \(ConnectionError"):
        download_url(url, tmp_path / "cache", progress=False, timeout=5)


def test_manifest_with_http_urls(
    tmp_path: Path, epfl_site: tuple[Path, dict], http_server: Callable[[Path], HttpServer]
) -> None:
    site, arrays = epfl_site
    server = http_server(site.parent)
    base = _base(server)
    manifest = tmp_path / "remote.yaml"
    manifest.write_text(
        f"train:\n"
        f"  - {{image: '{base}training.tif', mask: '{base}training_groundtruth.tif'}}\n"
        f"  - {{image: '{base}testing.tif', mask: '{base}testing_groundtruth.tif'}}\n"
        f"test:\n"
        f"  - {{image: '{base}testing.tif', slices: [0, 2]}}\n"
    )
    fetch(str(manifest), tmp_path / "raw", cache_dir=tmp_path / "cache", progress=False)
    images, masks = read_split(tmp_path / "raw", "train")
    np.testing.assert_array_equal(
        images, np.concatenate([arrays["training.tif"], arrays["testing.tif"]])
    )
    assert masks.shape == (9, 48, 64)
    images, masks = read_split(tmp_path / "raw", "test", require_masks=False)
    np.testing.assert_array_equal(images, arrays["testing.tif"][:2])
    assert masks is None


def test_truncated_remote_tiff_names_url(
    tmp_path: Path, epfl_site: tuple[Path, dict], http_server: Callable[[Path], HttpServer]
) -> None:
    site, _ = epfl_site
    data = (site / "testing.tif").read_bytes()
    (site / "testing.tif").write_bytes(data[:200])
    server = http_server(site.parent)
    with pytest.raises(
        DataError, match=r"^http://127\.0\.0\.1:\d+/.*testing\.tif: page 0: cannot decode the pixel"
    ):
        fetch(
            "epfl",
            tmp_path / "raw",
            base_url=_base(server),
            cache_dir=tmp_path / "cache",
            progress=False,
        )
