"""Upload decoding/validation, mask statistics and the guard-rail middleware (no server)."""

from __future__ import annotations

import asyncio
import io
import json
import logging

import numpy as np
import pytest
import tifffile
from PIL import Image

from encoded import png_bytes, tiff_bytes
from mitoseg.config import ServeConfig
from mitoseg.serving.analysis import mask_stats
from mitoseg.serving.codec import (
    Limits,
    UploadError,
    UploadInfo,
    decode_upload,
    encode_png,
    encode_tiff,
    probe_upload,
    sniff_format,
)
from mitoseg.serving.middleware import (
    FRAMEWORK_ERROR_LOGGER,
    GuardMiddleware,
    install_client_error_filter,
    json_error,
    normalize_client_error,
)

LIMITS = Limits()


def patched_tiff(width: int, height: int) -> bytes:
    """A valid 16x16 TIFF whose header then claims ``height x width`` pixels."""
    buf = io.BytesIO(tiff_bytes(np.zeros((16, 16), np.uint8)))
    with tifffile.TiffFile(buf, mode="r+") as tif:
        tif.pages[0].tags["ImageWidth"].overwrite(width)
        tif.pages[0].tags["ImageLength"].overwrite(height)
    return buf.getvalue()


def pages_tiff(*pages: np.ndarray) -> bytes:
    """One TIFF page per array."""
    buf = io.BytesIO()
    with tifffile.TiffWriter(buf) as tw:
        for page in pages:
            tw.write(page, photometric="minisblack")
    return buf.getvalue()


def two_shapes_tiff() -> bytes:
    return pages_tiff(np.zeros((8, 8), np.uint8), np.zeros((8, 9), np.uint8))


RNG = np.random.default_rng(0)
IMG8 = RNG.integers(0, 256, (40, 50), dtype=np.uint8)
IMG16 = RNG.integers(0, 65536, (40, 50), dtype=np.uint16)
NAN32 = np.ones((8, 8), np.float32)
NAN32[3, 3] = np.nan
INF32 = np.ones((8, 8), np.float32)
INF32[0, 0] = np.inf
UNCOMPRESSED = tiff_bytes(IMG8)

# (id, bytes, decode kwargs, status, code, message regex)
MALFORMED = [
    ("empty", b"", {}, 400, "empty_upload", r"^the uploaded file is empty \(0 bytes\)$"),
    ("text", b"hello world", {}, 415, "unsupported_format", r"^the upload is not a TIFF or PNG"),
    ("jpeg", b"\xff\xd8\xff\xe0\x00\x10JFIF", {}, 415, "unsupported_format", r"not a TIFF or PNG"),
    ("tiff_magic_only", b"II*\x00", {}, 400, "corrupt_image", r"^cannot read the TIFF header"),
    (
        "truncated_tiff",
        UNCOMPRESSED[: len(UNCOMPRESSED) // 2],
        {},
        400,
        "corrupt_image",
        r"^page 0: cannot decode the pixel data, the file may be truncated",
    ),
    (
        "truncated_png",
        png_bytes(Image.fromarray(IMG8))[:60],
        {},
        400,
        "corrupt_image",
        r"^PNG: cannot decode the pixel data, the file may be truncated",
    ),
    (
        "zero_size",
        tiff_bytes(np.zeros((0, 5), np.uint8)),
        {},
        400,
        "empty_image",
        r"^page 0: the image has zero size \(shape \(0, \d+\)\)$",
    ),
    (
        "float64",
        tiff_bytes(np.zeros((8, 8), np.float64)),
        {},
        422,
        "unsupported_dtype",
        r"^page 0: pixel type float64 is not supported; send one of uint8, uint16, float32$",
    ),
    (
        "complex64",
        tiff_bytes(np.zeros((8, 8), np.complex64)),
        {},
        422,
        "unsupported_dtype",
        r"^page 0: pixel type complex64 is not supported",
    ),
    (
        "int32",
        tiff_bytes(np.zeros((8, 8), np.int32)),
        {},
        422,
        "unsupported_dtype",
        r"^page 0: pixel type int32 is not supported",
    ),
    (
        "nan_float32",
        tiff_bytes(NAN32),
        {},
        422,
        "non_finite",
        r"^the image contains NaN or infinite values$",
    ),
    (
        "inf_float32",
        tiff_bytes(INF32),
        {},
        422,
        "non_finite",
        r"^the image contains NaN or infinite values$",
    ),
    (
        "absurd_side",
        patched_tiff(100_000, 100_000),
        {},
        413,
        "too_large",
        r"^page 0: 100000x100000 pixels exceeds the side limit of 32768$",
    ),
    (
        "two_channels",
        tiff_bytes(np.zeros((8, 8, 2), np.uint8), photometric="minisblack", planarconfig="contig"),
        {},
        422,
        "unsupported_layout",
        r"^page 0: unsupported page shape \(8, 8, 2\); expected \(H, W\) grayscale or "
        r"\(H, W, 3\|4\) RGB\(A\)$",
    ),
    (
        "two_sizes",
        two_shapes_tiff(),
        {},
        422,
        "inconsistent_pages",
        r"^page 1: 8x9 differs from page 0 \(8x8\); all pages of a stack must have the same size$",
    ),
    (
        "stack_on_single_endpoint",
        tiff_bytes(np.zeros((2, 8, 8), np.uint8)),
        {"max_pages": 1},
        422,
        "too_many_pages",
        r"^the TIFF has 2 pages; at most 1 accepted here; use /segment_stack for stacks$",
    ),
]


@pytest.mark.parametrize(
    ("data", "kwargs", "status", "code", "message"),
    [case[1:] for case in MALFORMED],
    ids=[case[0] for case in MALFORMED],
)
def test_malformed_uploads_are_rejected_with_status_code_and_message(
    data: bytes, kwargs: dict, status: int, code: str, message: str
) -> None:
    with pytest.raises(UploadError, match=message) as info:
        decode_upload(data, LIMITS, **kwargs)
    assert info.value.status == status
    assert info.value.code == code
    body = info.value.to_json()
    assert body == {"error": code, "message": info.value.message, "status": status}


def test_limits_bytes_pixels_pages_and_side() -> None:
    small = Limits(max_bytes=10_000, max_pixels=1000, max_pages=2, max_side=30)
    with pytest.raises(UploadError, match=r"^the upload is 20000 bytes; the limit is 10000 bytes$"):
        decode_upload(b"II*\x00" + b"\x00" * 19_996, small)
    with pytest.raises(UploadError, match=r"^page 0: 31x10 pixels exceeds the side limit of 30$"):
        decode_upload(tiff_bytes(np.zeros((31, 10), np.uint8)), small)
    with pytest.raises(
        UploadError,
        match=r"^page 0: 30x34 = 1020 pixels exceeds the limit of 1000 pixels per page$",
    ) as info:
        decode_upload(tiff_bytes(np.zeros((30, 34), np.uint8)), Limits(max_pixels=1000))
    assert info.value.status == 413
    with pytest.raises(
        UploadError, match=r"^PNG: 25x25 = 625 pixels exceeds the limit of 600 pixels per page$"
    ):
        decode_upload(
            png_bytes(Image.fromarray(np.zeros((25, 25), np.uint8))),
            Limits(max_pixels=600),
        )
    with pytest.raises(
        UploadError, match=r"^the TIFF has 3 pages; at most 2 accepted here$"
    ) as info:
        decode_upload(pages_tiff(*np.zeros((3, 8, 8), np.uint8)), small)
    assert info.value.status == 413
    planar = tiff_bytes(np.zeros((3, 8, 8), np.uint8))  # one page, 3 separate planes
    with pytest.raises(
        UploadError,
        match=r"^the TIFF holds more than 2 images \(page 0 stores 3 planes\); "
        r"at most 2 accepted here$",
    ):
        decode_upload(planar, small)


def test_limits_from_serve_config() -> None:
    cfg = ServeConfig(max_bytes=5, max_pixels=6, max_pages=7, max_side=8)
    assert Limits.from_config(cfg) == Limits(max_bytes=5, max_pixels=6, max_pages=7, max_side=8)


@pytest.mark.parametrize(
    ("data", "kwargs", "expected"),
    [
        (tiff_bytes(IMG16), {}, UploadInfo("tiff", (1, 40, 50), "uint16")),
        (pages_tiff(*np.zeros((3, 8, 9), np.uint8)), {}, UploadInfo("tiff", (3, 8, 9), "uint8")),
        (tiff_bytes(np.zeros((3, 8, 9), np.float32)), {}, UploadInfo("tiff", (3, 8, 9), "float32")),
        (
            tiff_bytes(np.zeros((8, 9, 3), np.uint8), photometric="rgb"),
            {"max_pages": 1},
            UploadInfo("tiff", (1, 8, 9), "uint8"),
        ),
        (png_bytes(Image.fromarray(IMG8)), {}, UploadInfo("png", (1, 40, 50), "uint8")),
        (png_bytes(Image.fromarray(IMG16)), {}, UploadInfo("png", (1, 40, 50), "uint16")),
    ],
    ids=["tiff16", "pages", "planar", "rgb", "png8", "png16"],
)
def test_probe_reads_the_shape_from_headers(
    data: bytes, kwargs: dict, expected: UploadInfo
) -> None:
    assert probe_upload(data, LIMITS, **kwargs) == expected
    assert decode_upload(data, LIMITS, **kwargs).shape == expected.shape


def test_probe_does_not_decode_pixels_but_checks_every_header() -> None:
    truncated = UNCOMPRESSED[: len(UNCOMPRESSED) // 2]
    assert probe_upload(truncated, LIMITS) == UploadInfo("tiff", (1, 40, 50), "uint8")
    with pytest.raises(UploadError, match=r"^page 0: cannot decode the pixel data"):
        decode_upload(truncated, LIMITS)
    with pytest.raises(UploadError, match=r"^page 1: 8x9 differs from page 0"):
        probe_upload(two_shapes_tiff(), LIMITS)
    with pytest.raises(UploadError, match=r"^page 0: 100000x100000 pixels exceeds the side"):
        probe_upload(patched_tiff(100_000, 100_000), LIMITS)
    with pytest.raises(UploadError, match=r"^the upload is not a TIFF or PNG image"):
        probe_upload(b"GIF89a....", LIMITS)


def test_sniff_format() -> None:
    assert sniff_format(b"MM\x00*rest") == "tiff"
    assert sniff_format(b"II+\x00bigtiff") == "tiff"
    assert sniff_format(png_bytes(Image.fromarray(IMG8))) == "png"


@pytest.mark.parametrize("dtype_img", [IMG8, IMG16], ids=["uint8", "uint16"])
def test_tiff_and_png_round_trip_keep_values_and_dtype(dtype_img: np.ndarray) -> None:
    out = decode_upload(tiff_bytes(dtype_img, compression="zlib"), LIMITS)
    assert out.dtype == dtype_img.dtype
    np.testing.assert_array_equal(out, dtype_img[None])
    out = decode_upload(png_bytes(Image.fromarray(dtype_img)), LIMITS)
    assert out.dtype == dtype_img.dtype
    np.testing.assert_array_equal(out, dtype_img[None])


@pytest.mark.parametrize("layout", ["planar", "pages"])
def test_float32_stack_and_multi_page(layout: str) -> None:
    stack = RNG.random((3, 16, 20)).astype(np.float32)
    data = tiff_bytes(stack) if layout == "planar" else pages_tiff(*stack)
    out = decode_upload(data, LIMITS)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, stack)


def test_rgb_inputs_are_converted_to_luma() -> None:
    rgb = RNG.integers(0, 256, (12, 14, 3), dtype=np.uint8)
    expected = np.clip(np.rint(rgb.astype(np.float64) @ [0.299, 0.587, 0.114]), 0, 255)
    for data in (tiff_bytes(rgb, photometric="rgb"), png_bytes(Image.fromarray(rgb))):
        out = decode_upload(data, LIMITS)
        assert out.shape == (1, 12, 14)
        assert out.dtype == np.uint8
        np.testing.assert_array_equal(out[0], expected.astype(np.uint8))
    rgba = png_bytes(Image.fromarray(np.dstack([rgb, np.full((12, 14), 255, np.uint8)])))
    np.testing.assert_array_equal(decode_upload(rgba, LIMITS)[0], expected.astype(np.uint8))


def test_palette_and_bilevel_png() -> None:
    gray = Image.fromarray(IMG8)
    pal = decode_upload(png_bytes(gray.convert("P")), LIMITS)
    assert pal.shape == (1, 40, 50)
    assert pal.dtype == np.uint8
    bilevel = decode_upload(png_bytes(gray.convert("1")), LIMITS)
    assert set(np.unique(bilevel)) <= {0, 255}


def test_encoders_round_trip_and_reject_bad_masks() -> None:
    mask = (RNG.random((9, 11)) > 0.5).astype(np.uint8) * 255
    png = encode_png(mask)
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(png))), mask)
    stack = np.stack([mask, 255 - mask])
    np.testing.assert_array_equal(tifffile.imread(io.BytesIO(encode_tiff(stack))), stack)
    with pytest.raises(ValueError, match=r"^encode_png: expected \(H, W\), got shape"):
        encode_png(stack)
    with pytest.raises(ValueError, match=r"^encode_png: expected uint8 or uint16, got float32$"):
        encode_png(mask.astype(np.float32))
    with pytest.raises(ValueError, match=r"^encode_tiff: expected \(Z, H, W\) or \(H, W\)"):
        encode_tiff(np.zeros((1, 2, 3, 4), np.uint8))
    with pytest.raises(ValueError, match=r"^encode_tiff: expected uint8 or uint16, got int64$"):
        encode_tiff(np.zeros((2, 2), np.int64))


def test_mask_stats_counts_areas_centroids() -> None:
    mask = np.zeros((10, 12), np.uint8)
    mask[1:3, 1:4] = 1  # 6 px, centroid (1.5, 2)
    mask[6:9, 8:9] = 1  # 3 px, centroid (7, 8)
    mask[0, 11] = 1  # 1 px, dropped with min_object_size=2
    mask[5, 5] = 2  # another class, ignored
    out = mask_stats(mask, foreground=1, min_object_size=2)
    assert out["count"] == 2
    assert out["foreground_pixels"] == 10
    assert out["area_fraction"] == pytest.approx(10 / 120)
    assert out["pixel_size_nm"] is None
    assert [{k: o[k] for k in ("id", "area", "centroid", "bbox")} for o in out["objects"]] == [
        {"id": 1, "area": 6, "centroid": [1.5, 2.0], "bbox": [1, 1, 3, 4]},
        {"id": 2, "area": 3, "centroid": [7.0, 8.0], "bbox": [6, 8, 9, 9]},
    ]
    assert [(o["area_nm2"], o["mean_intensity"]) for o in out["objects"]] == [(None, None)] * 2
    # with the raw image and a pixel size: physical area and mean intensity per object
    image = np.arange(120, dtype=np.uint16).reshape(10, 12)
    measured = mask_stats(mask, 1, 2, image=image, pixel_size_nm=(4.0, 5.0))
    assert measured["pixel_size_nm"] == [4.0, 5.0]
    first, second = measured["objects"]
    assert first["area_nm2"] == pytest.approx(6 * 20.0) and second["area_nm2"] == 60.0
    assert first["mean_intensity"] == pytest.approx(image[1:3, 1:4].mean())
    assert second["mean_intensity"] == pytest.approx(image[6:9, 8].mean())
    # a 2 x 3 block is longer than wide; elongation is 1 for a round object or better
    assert first["elongation"] > 1.0 and second["elongation"] >= 1.0
    empty = mask_stats(np.zeros((4, 4), np.uint8))
    assert (empty["count"], empty["objects"], empty["area_fraction"]) == (0, [], 0.0)
    with pytest.raises(ValueError, match=r"^mask_stats: expected \(H, W\), got shape \(1, 4, 4\)$"):
        mask_stats(np.zeros((1, 4, 4), np.uint8))


# ---------------------------------------------------------------- middleware


def run_asgi(
    mw: GuardMiddleware,
    path: str,
    headers: dict[str, str],
    body_chunks: list[bytes],
    method: str = "POST",
) -> tuple[int, dict[str, str], bytes, list[bytes]]:
    """Drive one HTTP request through the middleware; returns status, headers, body and
    the body chunks the inner app received."""
    sent: list[dict] = []
    received: list[bytes] = []
    chunks = list(body_chunks)

    async def receive() -> dict:
        body = chunks.pop(0) if chunks else b""
        return {"type": "http.request", "body": body, "more_body": bool(chunks)}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "method": method,
        "path": path,
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
    }
    asyncio.run(mw(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    hdrs = {k.decode(): v.decode() for k, v in start["headers"]}
    return start["status"], hdrs, body, received


def make_inner(received: list[bytes] | None = None):
    async def inner(scope, receive, send) -> None:
        while True:
            message = await receive()
            if received is not None:
                received.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    return inner


MP = {"content-type": "multipart/form-data; boundary=x"}
GOOD_FORM = (
    b'--x\r\nContent-Disposition: form-data; name="image"; filename="a.tif"\r\n'
    b"Content-Type: image/tiff\r\n\r\nII*\x00data\r\n--x--\r\n"
)


def test_auth_required_only_when_token_set(monkeypatch: pytest.MonkeyPatch) -> None:
    mw = GuardMiddleware(make_inner(), token_env="TEST_TOKEN", upload_paths=("/segment",))
    monkeypatch.delenv("TEST_TOKEN", raising=False)
    assert run_asgi(mw, "/metadata", {}, [b""])[0] == 200
    monkeypatch.setenv("TEST_TOKEN", "s3cret")
    status, headers, body, _ = run_asgi(mw, "/metadata", {}, [b""])
    assert status == 401
    assert headers["content-type"] == "application/json"
    assert headers["www-authenticate"] == 'Bearer realm="mitoseg"'
    assert json.loads(body) == {
        "error": "unauthorized",
        "message": "missing or invalid bearer token",
        "status": 401,
    }
    assert "s3cret" not in body.decode()
    for bad in ("Bearer wrong", "Basic s3cret", "s3cret", "Bearer "):
        assert run_asgi(mw, "/metadata", {"authorization": bad}, [b""])[0] == 401
    assert run_asgi(mw, "/metadata", {"Authorization": "Bearer s3cret"}, [b""])[0] == 200
    assert run_asgi(mw, "/metadata", {"authorization": "bearer s3cret"}, [b""])[0] == 200
    for open_path in ("/readyz", "/livez", "/healthz", "/docs.json", "/", "/static_content/x.js"):
        assert run_asgi(mw, open_path, {}, [b""])[0] == 200, open_path


def test_size_limit_by_header_and_by_stream() -> None:
    received: list[bytes] = []
    mw = GuardMiddleware(make_inner(received), max_bytes=10)
    status, _, body, _ = run_asgi(mw, "/segment", {"content-length": "11"}, [b"x" * 11])
    assert status == 413
    assert json.loads(body)["message"] == "the request body is 11 bytes; the limit is 10 bytes"
    assert received == []  # refused before the body was read
    status, _, body, _ = run_asgi(mw, "/segment", {}, [b"x" * 6, b"x" * 6])
    assert status == 413
    assert json.loads(body)["message"] == ("the request body is larger than the limit of 10 bytes")
    assert run_asgi(mw, "/segment", {"content-length": "10"}, [b"x" * 10])[0] == 200


def test_uploads_must_be_multipart() -> None:
    mw = GuardMiddleware(make_inner(), upload_paths=("/segment",))
    status, _, body, _ = run_asgi(mw, "/segment", {"content-type": "application/json"}, [b"{}"])
    assert status == 415
    assert json.loads(body) == {
        "error": "unsupported_media_type",
        "message": "send the image as a multipart/form-data file field named 'image' "
        "(got content-type 'application/json')",
        "status": 415,
    }
    assert run_asgi(mw, "/metadata", {"content-type": "application/json"}, [b"{}"])[0] == 200


def test_multipart_is_checked_then_replayed_unchanged() -> None:
    received: list[bytes] = []
    mw = GuardMiddleware(make_inner(received), max_bytes=1000, upload_paths=("/segment",))
    half = len(GOOD_FORM) // 2
    status, _, _, _ = run_asgi(mw, "/segment", MP, [GOOD_FORM[:half], GOOD_FORM[half:]])
    assert status == 200
    assert b"".join(received) == GOOD_FORM
    received.clear()
    no_boundary = {"content-type": "multipart/form-data"}
    status, _, body, _ = run_asgi(mw, "/segment", no_boundary, [GOOD_FORM])
    assert status == 400
    assert json.loads(body) == {
        "error": "malformed_multipart",
        "message": "multipart/form-data content-type without a boundary parameter",
        "status": 400,
    }
    status, _, body, _ = run_asgi(mw, "/segment", MP, [b"--x\r\n7.3e-25--x--\r\n"])
    assert status == 400
    assert json.loads(body)["message"].startswith("malformed multipart body: ")
    status, _, body, _ = run_asgi(mw, "/segment", MP, [GOOD_FORM, b"x" * 1000])
    assert status == 413
    assert received == []


def test_middleware_argument_and_json_error() -> None:
    with pytest.raises(ValueError, match=r"^GuardMiddleware: max_bytes must be >= 0, got -1$"):
        GuardMiddleware(make_inner(), max_bytes=-1)
    status, headers, body = json_error(418, "teapot", "short and stout")
    assert status == 418
    assert dict(headers)[b"content-length"] == str(len(body)).encode()
    assert json.loads(body) == {"error": "teapot", "message": "short and stout", "status": 418}


def form(*parts: tuple[str, str | None, bytes]) -> bytes:
    """A multipart body with boundary ``x``: ``(name, filename or None, content)``."""
    out = b""
    for name, filename, content in parts:
        disposition = f'form-data; name="{name}"'
        if filename is not None:
            disposition += f'; filename="{filename}"'
        out += f"--x\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + content + b"\r\n"
    return out + b"--x--\r\n"


@pytest.mark.parametrize(
    ("body", "code", "message"),
    [
        (
            form(("format", None, b"png")),
            "missing_image",
            "the form has no file field named 'image'; send the image as a "
            "multipart/form-data file field named 'image'",
        ),
        (
            form(("image", None, b"http://169.254.169.254/latest")),
            "image_not_a_file",
            "the 'image' field is a text value, not a file: upload the image bytes as a file "
            "part (the server does not fetch URLs)",
        ),
        (
            form(("image", "a.tif", b"II*\x00"), ("image", "b.tif", b"II*\x00")),
            "too_many_images",
            "the form has 2 fields named 'image'; send exactly one image",
        ),
    ],
    ids=["missing", "text_value", "two_files"],
)
def test_upload_needs_one_file_field(body: bytes, code: str, message: str) -> None:
    received: list[bytes] = []
    mw = GuardMiddleware(make_inner(received), upload_paths=("/segment",))
    status, _, out, _ = run_asgi(mw, "/segment", MP, [body])
    assert (status, json.loads(out)) == (400, {"error": code, "message": message, "status": 400})
    assert received == []
    # any declared part content type is fine: the service sniffs the bytes
    for ctype in (b"application/octet-stream", b"image/tif", b"image/png", b""):
        part = b"Content-Type: " + ctype + b"\r\n" if ctype else b""
        ok = (
            b'--x\r\nContent-Disposition: form-data; name="image"; filename="s.tif"\r\n'
            + part
            + b"\r\nII*\x00\r\n--x--\r\n"
        )
        assert run_asgi(mw, "/segment", MP, [ok])[0] == 200, ctype
    # other paths do not need an image
    assert run_asgi(mw, "/metadata", MP, [form(("format", None, b"png"))])[0] == 200


def test_docs_serves_the_openapi_page() -> None:
    seen: list[str] = []

    async def inner(scope, receive, send) -> None:
        seen.append(scope["path"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"<html>"})

    mw = GuardMiddleware(inner)
    assert run_asgi(mw, "/docs", {}, [b""], method="GET")[0] == 200
    assert run_asgi(mw, "/docs.json", {}, [b""], method="GET")[0] == 200
    assert run_asgi(mw, "/docs", {}, [b""], method="POST")[0] == 200
    assert seen == ["/", "/docs.json", "/docs"]


def responder(status: int, body: bytes, headers: list[tuple[bytes, bytes]] | None = None):
    """An inner ASGI app answering every request with ``status`` and ``body``."""

    async def inner(scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": status, "headers": headers or []})
        await send({"type": "http.response.body", "body": body[:3], "more_body": True})
        await send({"type": "http.response.body", "body": body[3:]})

    return inner


PYDANTIC_BODY = json.dumps(
    {
        "error": "1 validation error for Input",
        "detail": [{"type": "literal_error", "loc": ["format"], "msg": "Input should be 'png'"}],
    }
).encode()


@pytest.mark.parametrize(
    ("status", "body", "code", "message"),
    [
        (400, PYDANTIC_BODY, "invalid_request", "format: Input should be 'png'"),
        (
            422,
            json.dumps({"error": "c", "message": "m", "status": 422}).encode(),
            "c",
            "m",
        ),
        (404, b"Not Found", "not_found", "Not Found"),
        (413, json.dumps([{"error": "too big"}]).encode(), "too_large", "too big"),
        (405, b"", "method_not_allowed", "Method Not Allowed"),
        (429, json.dumps({"detail": "slow down"}).encode(), "busy", "slow down"),
        (418, b"{}", "client_error", "I'm a Teapot"),
    ],
    ids=["pydantic", "ours", "text", "bentoml_list", "empty", "detail_str", "unknown"],
)
def test_client_errors_get_the_json_body_and_one_warning_line(
    status: int, body: bytes, code: str, message: str, caplog: pytest.LogCaptureFixture
) -> None:
    assert normalize_client_error(status, body) == (code, message)
    mw = GuardMiddleware(responder(status, body, [(b"retry-after", b"3")]))
    with caplog.at_level(logging.INFO, logger="mitoseg.serving"):
        got, headers, out, _ = run_asgi(mw, "/segment", {}, [b""])
    assert got == status
    assert json.loads(out) == {"error": code, "message": message, "status": status}
    assert headers["content-type"] == "application/json"
    assert headers["content-length"] == str(len(out))
    assert headers["retry-after"] == "3"
    records = [r for r in caplog.records if r.name == "mitoseg.serving"]
    assert [(r.levelno, r.getMessage(), r.exc_info) for r in records] == [
        (logging.WARNING, f"POST /segment -> {status} {code}: {message}", None)
    ]


def test_success_passes_through_and_server_errors_get_the_json_body(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.INFO, logger="mitoseg.serving"):
        got, _, out, _ = run_asgi(GuardMiddleware(responder(200, b"fine")), "/x", {}, [b""])
    assert (got, out) == (200, b"fine")
    assert not [r for r in caplog.records if r.name == "mitoseg.serving"]
    cases = [
        ("/x", 500, b"boom", "internal_error", "boom", True),
        ("/readyz", 503, b"Runners are not ready.", "unavailable", "Runners are not ready.", False),
        ("/x", 504, b'{"error": "late"}', "timeout", "late", True),
    ]
    for path, status, body, code, message, logged in cases:
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="mitoseg.serving"):
            got, _, out, _ = run_asgi(GuardMiddleware(responder(status, body)), path, {}, [b""])
        assert got == status
        assert json.loads(out) == {"error": code, "message": message, "status": status}
        lines = [r.getMessage() for r in caplog.records if r.name == "mitoseg.serving"]
        # a probe's 503 is polled while the server starts: not logged
        assert lines == ([f"POST {path} -> {status} {code}: {message}"] if logged else [])


def test_framework_client_error_tracebacks_are_filtered(caplog: pytest.LogCaptureFixture) -> None:
    from http import HTTPStatus

    from bentoml.exceptions import BentoMLException
    from pydantic import BaseModel, ValidationError

    class Form(BaseModel):
        n: int

    framework = logging.getLogger(FRAMEWORK_ERROR_LOGGER)
    before = list(framework.filters)
    install_client_error_filter()
    install_client_error_filter()  # idempotent

    def log(exc: BaseException) -> None:
        try:
            raise exc
        except BaseException:
            framework.error("Exception on /segment [POST]", exc_info=True)

    try:
        Form(n="x")  # type: ignore[arg-type]
    except ValidationError as exc:
        invalid = exc
    try:
        assert len(framework.filters) == len(before) + 1
        with caplog.at_level(logging.INFO, logger=FRAMEWORK_ERROR_LOGGER):
            log(invalid)
            log(BentoMLException("bad", error_code=HTTPStatus.UNSUPPORTED_MEDIA_TYPE))
            log(BentoMLException("down", error_code=HTTPStatus.SERVICE_UNAVAILABLE))
            log(RuntimeError("bug"))
    finally:
        framework.filters[:] = before
    kept = [r.exc_info[1] for r in caplog.records if r.name == FRAMEWORK_ERROR_LOGGER]
    assert [str(e) for e in kept] == ["down", "bug"]
