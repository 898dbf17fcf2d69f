"""Hyperstacks: the ImageJ / OME axes of a multi-dimensional TIFF decide what it is.

Pages along Z (or an unnamed / sequence axis) are the slices of a ``(Z, Y, X)`` stack;
channels, time points or a second stacking axis are refused with a 422 naming the
axis, the same for an upload (:func:`mitoseg.decode.decode_image`) and for a file
(:func:`mitoseg.io.read_stack`, what ``mitoseg predict`` reads), never flattened into
slices.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from encoded import tiff_bytes
from mitoseg.decode import ImageError, Limits, decode_image
from mitoseg.io import read_stack


def _stack(shape: tuple[int, ...]) -> np.ndarray:
    """Distinct planes: plane ``i`` (in C order over the non-YX axes) holds ``i``."""
    planes = int(np.prod(shape[:-2]))
    return np.repeat(np.arange(planes, dtype=np.uint8), shape[-2] * shape[-1]).reshape(shape)


REFUSED: dict[str, tuple[tuple[int, ...], dict[str, Any], str]] = {
    "imagej-TZCYX": (
        (2, 2, 2, 32, 32),
        {"imagej": True, "metadata": {"axes": "TZCYX"}},
        "the TIFF is a hyperstack with axes TZCYX (shape 2 x 2 x 2 x 32 x 32): axis T (time) "
        "has 2 entries; only a (Z, Y, X) stack is segmented: send one time point",
    ),
    "imagej-ZCYX": (
        (3, 2, 32, 32),
        {"imagej": True, "metadata": {"axes": "ZCYX"}},
        "the TIFF is a hyperstack with axes ZCYX (shape 3 x 2 x 32 x 32): axis C (channel) "
        "has 2 entries; only a (Z, Y, X) stack is segmented: send one channel",
    ),
    "imagej-CYX": (
        (4, 32, 32),
        {"imagej": True, "metadata": {"axes": "CYX"}},
        "the TIFF is a hyperstack with axes CYX (shape 4 x 32 x 32): axis C (channel) has 4 "
        "entries; only a (Z, Y, X) stack is segmented: send one channel; if these are Z "
        "slices, save the TIFF with axes ZYX",
    ),
    "imagej-TYX": (
        (3, 32, 32),
        {"imagej": True, "metadata": {"axes": "TYX"}},
        "the TIFF is a hyperstack with axes TYX (shape 3 x 32 x 32): axis T (time) has 3 "
        "entries; only a (Z, Y, X) stack is segmented: send one time point",
    ),
    "ome-TCZYX": (
        (2, 1, 3, 32, 32),
        {"ome": True, "metadata": {"axes": "TCZYX"}},
        "the TIFF is a hyperstack with axes TZYX (shape 2 x 3 x 32 x 32): axis T (time) has "
        "2 entries; only a (Z, Y, X) stack is segmented: send one time point",
    ),
    "shaped-5d": (
        (2, 2, 2, 32, 32),
        {},
        "the TIFF is a hyperstack with axes QQQYX (shape 2 x 2 x 2 x 32 x 32): more than one "
        "axis besides Y and X has several entries (Q (unnamed) = 2, Q (unnamed) = 2, "
        "Q (unnamed) = 2); send a (Z, Y, X) stack",
    ),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_hyperstacks_with_channels_time_or_two_stack_axes_are_refused_naming_the_axis(
    case: str, tmp_path: Path
) -> None:
    shape, kwargs, message = REFUSED[case]
    data = tiff_bytes(_stack(shape), **kwargs)
    with pytest.raises(ImageError) as upload:
        decode_image(data, Limits(), max_pages=None)
    assert (upload.value.status, upload.value.code) == (422, "unsupported_axis")
    assert upload.value.message == message
    path = tmp_path / f"{case}.tif"
    path.write_bytes(data)
    with pytest.raises(ImageError) as file:
        read_stack(path)  # what `mitoseg predict` reads
    assert (file.value.status, file.value.code) == (422, "unsupported_axis")
    assert file.value.message == f"{path}: {message}"


ACCEPTED: dict[str, tuple[tuple[int, ...], dict[str, Any]]] = {
    "imagej-ZYX": ((4, 32, 32), {"imagej": True, "metadata": {"axes": "ZYX"}}),
    "imagej-TZCYX-one-time-one-channel": (
        (1, 4, 1, 32, 32),
        {"imagej": True, "metadata": {"axes": "TZCYX"}},
    ),
    "ome-ZYX": ((4, 32, 32), {"ome": True, "metadata": {"axes": "ZYX"}}),
    "ome-TCZYX-one-time-one-channel": (
        (1, 1, 4, 32, 32),
        {"ome": True, "metadata": {"axes": "TCZYX"}},
    ),
    "plain-pages": ((4, 32, 32), {"photometric": "minisblack"}),
}


@pytest.mark.parametrize("case", sorted(ACCEPTED))
def test_z_stacks_are_segmented_along_z_whatever_the_metadata(case: str, tmp_path: Path) -> None:
    shape, kwargs = ACCEPTED[case]
    arr = _stack(shape)
    data = tiff_bytes(arr, **kwargs)
    expected = arr.reshape(-1, 32, 32)
    np.testing.assert_array_equal(decode_image(data, Limits()), expected)
    (tmp_path / "z.tif").write_bytes(data)
    np.testing.assert_array_equal(read_stack(tmp_path / "z.tif"), expected)
