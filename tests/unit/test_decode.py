"""One decoder for files and uploads: ``mitoseg.io.read_stack(path)`` and
``mitoseg.serving.codec.decode_upload(bytes)`` give the same array and the same error."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_serving_codec import pages_tiff as _pages
from test_serving_codec import tiff_bytes as _tiff

from mitoseg.decode import ImageError
from mitoseg.io import read_stack
from mitoseg.serving.codec import Limits, decode_upload

RNG = np.random.default_rng(1)
GRAY8 = RNG.integers(0, 256, (12, 10), dtype=np.uint8)
STACK16 = RNG.integers(0, 65536, (3, 12, 10), dtype=np.uint16)
RGB8 = RNG.integers(0, 256, (12, 10, 3), dtype=np.uint8)


def _png(arr: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    img = Image.fromarray(arr)
    (img.convert(mode) if mode else img).save(buf, format="PNG")
    return buf.getvalue()


NAN = np.ones((4, 4), np.float32)
NAN[1, 1] = np.nan
CASES = {
    "gray8_tiff": _tiff(GRAY8),
    "stack16_tiff": _tiff(STACK16),
    "rgb_tiff": _tiff(RGB8, photometric="rgb"),
    "tiny_rgb_tiff": _tiff(RGB8[:4, :4], photometric="rgb"),  # (4, 4, 3) is one RGB page
    "planar_stack": _tiff(STACK16.astype(np.uint8)),
    "float32_tiff": _tiff(GRAY8.astype(np.float32) / 255),
    "gray16_png": _png(STACK16[0]),
    "rgba_png": _png(np.dstack([RGB8, GRAY8])),
    "palette_png": _png(RGB8, "P"),
    "truncated_tiff": _tiff(GRAY8)[:200],
    "truncated_png": _png(GRAY8)[:60],
    "tiff_magic_only": b"II*\x00",
    "two_sizes": _pages(np.zeros((8, 8), np.uint8), np.zeros((8, 9), np.uint8)),
    "zero_size": _tiff(np.zeros((0, 5), np.uint8)),
    "two_channels": _tiff(np.zeros((8, 8, 2), np.uint8), photometric="minisblack"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_file_and_upload_decode_alike(tmp_path: Path, name: str) -> None:
    data = CASES[name]
    path = tmp_path / "image.bin"  # the suffix is not what decides
    path.write_bytes(data)
    try:
        expected = decode_upload(data, Limits())
    except ImageError as exc:
        with pytest.raises(ImageError) as info:
            read_stack(path)
        assert (info.value.code, info.value.status) == (exc.code, exc.status)
        assert str(info.value) == f"{path}: {exc.message}"
        return
    got = read_stack(path)
    assert got.dtype == expected.dtype and got.ndim == 3
    np.testing.assert_array_equal(got, expected)


def test_files_accept_more_than_uploads(tmp_path: Path) -> None:
    (tmp_path / "nan.tif").write_bytes(_tiff(NAN))  # validate names the bad slice
    np.testing.assert_array_equal(read_stack(tmp_path / "nan.tif")[0], NAN)
    with pytest.raises(ImageError, match=r"^the image contains NaN or infinite values$"):
        decode_upload(_tiff(NAN), Limits())
    labels = RNG.integers(0, 1 << 20, (2, 6, 7), dtype=np.uint32)
    (tmp_path / "labels.tif").write_bytes(_tiff(labels))
    np.testing.assert_array_equal(read_stack(tmp_path / "labels.tif"), labels)
    with pytest.raises(ImageError, match=r"pixel type uint32 is not supported; send one of"):
        decode_upload(_tiff(labels), Limits())
    buf = io.BytesIO()
    Image.fromarray(GRAY8).save(buf, format="JPEG", quality=95)
    (tmp_path / "x.jpg").write_bytes(buf.getvalue())
    assert read_stack(tmp_path / "x.jpg").shape == (1, 12, 10)
    with pytest.raises(ImageError, match=r"^the upload is not a TIFF or PNG image"):
        decode_upload(buf.getvalue(), Limits())


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", r"image.tif: the file is empty \(0 bytes\)$"),
        (b"GIF89a", r"image.tif: the file is not a TIFF, PNG or JPEG image \(first bytes b'GIF"),
        (_tiff(np.zeros((2, 2), np.complex64)), r"pixel type complex64 is not supported; send a"),
    ],
)
def test_read_stack_errors_name_the_file(tmp_path: Path, data: bytes, message: str) -> None:
    (tmp_path / "image.tif").write_bytes(data)
    with pytest.raises(ImageError, match=message):
        read_stack(tmp_path / "image.tif")
