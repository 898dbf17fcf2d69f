"""``mitoseg data fetch`` from a real S3 (SeaweedFS ``weed mini`` on loopback)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile

from mitoseg.data.fetch import fetch, sample_dir
from mitoseg.data.layout import read_split
from mitoseg.io import DataError
from servers import S3Server

pytestmark = pytest.mark.integration

BUCKET = "mitoseg-fetch"


def _upload(server: S3Server, files: dict[str, bytes]) -> None:
    client = server.client()
    for key, body in files.items():
        client.put_object(Bucket=BUCKET, Key=key, Body=body)


def _tiff(arr: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    tifffile.imwrite(buf, arr)
    return buf.getvalue()


@pytest.fixture()
def bucket(s3_env: S3Server) -> S3Server:
    s3_env.make_bucket(BUCKET)
    return s3_env


def test_s3_epfl_layout(bucket: S3Server, tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    arrays = {
        "training.tif": rng.integers(0, 65535, (3, 40, 48), dtype=np.uint16),
        "training_groundtruth.tif": (rng.random((3, 40, 48)) > 0.7).astype(np.uint8),
        "testing.tif": rng.integers(0, 65535, (2, 40, 48), dtype=np.uint16),
        "testing_groundtruth.tif": (rng.random((2, 40, 48)) > 0.7).astype(np.uint8) * 255,
    }
    _upload(bucket, {f"epfl/v1/{k}": _tiff(v) for k, v in arrays.items()})
    summary = fetch(f"s3://{BUCKET}/epfl/v1", tmp_path / "raw", progress=False)
    assert summary["kind"] == "s3"
    images, masks = read_split(tmp_path / "raw", "train")
    np.testing.assert_array_equal(images, arrays["training.tif"])
    np.testing.assert_array_equal(masks, arrays["training_groundtruth.tif"] * 255)
    meta = json.loads((tmp_path / "raw" / "dataset.json").read_text())
    assert meta["inputs"][0]["name"] == f"s3://{BUCKET}/epfl/v1/training.tif"
    assert [p.name for p in tmp_path.iterdir()] == ["raw"]  # staging folder removed


def test_s3_canonical_layout_matches_sample(bucket: S3Server, tmp_path: Path) -> None:
    src = sample_dir()
    _upload(
        bucket,
        {
            f"canon/{split}/{name}": (src / split / name).read_bytes()
            for split in ("train", "test")
            for name in ("images.tif", "masks.tif")
        },
    )
    fetch(f"s3://{BUCKET}/canon/", tmp_path / "raw", progress=False)
    for split in ("train", "test"):
        got_i, got_m = read_split(tmp_path / "raw", split)
        exp_i, exp_m = read_split(src, split)
        np.testing.assert_array_equal(got_i, exp_i)
        np.testing.assert_array_equal(got_m, exp_m)


def test_s3_manifest_entries(bucket: S3Server, tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    img = rng.integers(0, 256, (4, 32, 32), dtype=np.uint8)
    msk = (rng.random((4, 32, 32)) > 0.5).astype(np.uint8) * 255
    _upload(bucket, {"m/img.tif": _tiff(img), "m/msk.tif": _tiff(msk)})
    manifest = tmp_path / "s3.yaml"
    manifest.write_text(
        f"train:\n  - {{image: s3://{BUCKET}/m/img.tif, mask: s3://{BUCKET}/m/msk.tif}}\n"
        f"test:\n  - {{image: s3://{BUCKET}/m/img.tif, slices: [3, 4]}}\n"
    )
    fetch(str(manifest), tmp_path / "raw", progress=False)
    images, masks = read_split(tmp_path / "raw", "train")
    np.testing.assert_array_equal(images, img)
    np.testing.assert_array_equal(masks, msk)


def test_s3_errors(bucket: S3Server, tmp_path: Path) -> None:
    _upload(bucket, {"partial/training.tif": b"x", "other/readme.txt": b"hello"})
    with pytest.raises(
        DataError, match=rf"s3://{BUCKET}/partial/training_groundtruth\.tif: object not found"
    ):
        fetch(f"s3://{BUCKET}/partial", tmp_path / "raw", progress=False)
    with pytest.raises(
        DataError,
        match=rf"s3://{BUCKET}/other: no EPFL files \(training\.tif, \.\.\.\) or "
        r"train/images\.tif found; found: readme\.txt",
    ):
        fetch(f"s3://{BUCKET}/other", tmp_path / "raw", progress=False)
    with pytest.raises(DataError, match=r"s3://no-such-bucket-x/p: S3 error NoSuchBucket"):
        fetch("s3://no-such-bucket-x/p", tmp_path / "raw", progress=False)
    manifest = tmp_path / "m.yaml"
    manifest.write_text(
        f"train:\n  - {{image: s3://{BUCKET}/nope.tif, mask: s3://{BUCKET}/nope.tif}}\n"
        f"test:\n  - {{image: s3://{BUCKET}/nope.tif}}\n"
    )
    with pytest.raises(DataError, match=rf"s3://{BUCKET}/nope\.tif: S3 error 404"):
        fetch(str(manifest), tmp_path / "raw", progress=False)
    assert not (tmp_path / "raw").exists()


def test_s3_bad_credentials(
    bucket: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "nobody")
    with pytest.raises(DataError, match=rf"s3://{BUCKET}/epfl: S3 error InvalidAccessKeyId"):
        fetch(f"s3://{BUCKET}/epfl", tmp_path / "raw", progress=False)
