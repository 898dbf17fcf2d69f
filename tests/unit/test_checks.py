"""mitoseg.checks: the shared array argument checks and their messages."""

from __future__ import annotations

import numpy as np
import pytest

from mitoseg.checks import check_array, check_stack


@pytest.mark.parametrize(
    ("value", "kwargs", "message"),
    [
        (np.zeros(5), {"ndim": (2, 3)}, r"^f: expected \(Z, H, W\) or \(H, W\), got shape \(5,\)$"),
        (np.zeros((2, 2)), {"ndim": 4}, r"^f: expected \(N, H, W, C\), got shape \(2, 2\)$"),
        (np.zeros((1,) * 5), {"ndim": 5}, None),
        (np.zeros((2, 2)), {"ndim": 5}, r"^f: expected 5-D, got shape \(2, 2\)$"),
        (np.zeros((2, 2)), {"ndim": 2, "dtypes": ("uint8",)}, r"^f: expected uint8, got float64$"),
        (np.zeros((0, 2)), {"ndim": 2, "nonempty": True}, r"^f: expected a non-empty array"),
        ([[1, 2]], {"ndim": 2}, None),
        (
            np.zeros((2, 2, 2, 2)),
            {"ndim": (2, 3), "axes": {3: "(H, W, C)"}},
            r"^f: expected \(H, W, C\) or \(H, W\), got shape \(2, 2, 2, 2\)$",
        ),
        (np.zeros((2, 2, 3)), {"ndim": (2, 3), "axes": {3: "(H, W, C)"}}, None),
        (
            np.zeros((1, 4, 4, 2)),
            {"ndim": 4, "axes": {4: "(B, H, W, 1)"}, "sizes": {-1: 1}},
            r"^f: expected \(B, H, W, 1\), got shape \(1, 4, 4, 2\)$",
        ),
        (
            np.zeros((3, 4, 4)),
            {"ndim": 3, "sizes": {1: 4, 2: 5}},
            r"^f: expected \(Z, H, W\), got shape \(3, 4, 4\)$",
        ),
        (np.zeros((1, 4, 4, 1)), {"ndim": 4, "sizes": {-1: 1}}, None),
        (np.zeros(4), {"ndim": 2, "sizes": {-1: 4}}, r"^f: expected \(H, W\), got shape \(4,\)$"),
    ],
)
def test_check_array(value: object, kwargs: dict, message: str | None) -> None:
    if message is None:
        assert isinstance(check_array(value, "f", **kwargs), np.ndarray)
    else:
        with pytest.raises(ValueError, match=message):
            check_array(value, "f", **kwargs)


@pytest.mark.parametrize(
    ("shape", "expected"),
    [
        ((4, 5), (1, 4, 5)),
        ((2, 4, 5), (2, 4, 5)),
        ((0, 4, 5), (0, 4, 5)),
    ],
)
def test_check_stack_returns_zyx(shape: tuple[int, ...], expected: tuple[int, ...]) -> None:
    value = np.arange(int(np.prod(shape)), dtype=np.uint8).reshape(shape)
    out = check_stack(value, "f")
    assert out.shape == expected
    assert np.shares_memory(out, value) or value.size == 0
    np.testing.assert_array_equal(out.reshape(shape), value)


@pytest.mark.parametrize(
    ("value", "kwargs", "message"),
    [
        (np.zeros(5), {}, r"^f: expected \(Z, H, W\) or \(H, W\), got shape \(5,\)$"),
        (
            np.zeros((1, 2, 2, 2)),
            {},
            r"^f: expected \(Z, H, W\) or \(H, W\), got shape \(1, 2, 2, 2\)$",
        ),
        (np.zeros((0, 4, 4)), {"nonempty": True}, r"^f: expected a non-empty array, got shape"),
        (
            np.zeros((4, 0)),
            {"nonempty": True},
            r"^f: expected a non-empty array, got shape \(4, 0\)$",
        ),
        (np.zeros((4, 4)), {"dtypes": ("uint8",)}, r"^f: expected uint8, got float64$"),
    ],
)
def test_check_stack_errors(value: np.ndarray, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check_stack(value, "f", **kwargs)
