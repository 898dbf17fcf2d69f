"""Tiled inference core: seamless blending, any size, TTA, masks, error paths (no keras)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from mitoseg.inference.normalize import normalize_slice
from mitoseg.inference.plan import InferencePlan
from mitoseg.inference.predict import (
    WINDOW_FLOOR,
    as_predict_batch,
    check_tiling,
    context_window,
    decide_mask,
    iter_stack_probabilities,
    keep_seeded_regions,
    mask_to_image,
    predict_slice,
    predict_tiled,
    probabilities_to_mask,
    segment_stack,
    tile_positions,
    window_2d,
)


def pixelwise(batch: np.ndarray) -> np.ndarray:
    """A predictor that is a pure function of each pixel value: channels x and x**2."""
    return np.concatenate([batch, batch**2], axis=-1)


def box_blur(batch: np.ndarray) -> np.ndarray:
    """3x3 mean filter per tile: equivariant under flips and 90-degree rotations."""
    return ndimage.uniform_filter(batch, size=(1, 3, 3, 1), mode="reflect")


def _image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((h, w)).astype(np.float32)


class Recorder:
    """Batch predictor that records the batch shapes it was called with."""

    def __init__(self, fn=pixelwise) -> None:
        self.fn = fn
        self.shapes: list[tuple[int, ...]] = []

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        assert batch.dtype == np.float32
        self.shapes.append(batch.shape)
        return self.fn(batch)


def test_window_is_symmetric_floored_and_peaks_in_the_centre() -> None:
    w = window_2d(16)
    assert w.shape == (16, 16) and w.dtype == np.float32
    assert w.min() >= WINDOW_FLOOR
    np.testing.assert_allclose(w, w.T)
    np.testing.assert_allclose(w, w[::-1, ::-1])
    assert w[7, 7] == w[8, 8] == w.max() and w.max() > 0.98


def test_tile_positions() -> None:
    assert tile_positions(10, 4, 2) == [0, 2, 4, 6]
    assert tile_positions(11, 4, 3) == [0, 3, 6, 7]
    assert tile_positions(4, 4, 1) == [0]
    with pytest.raises(ValueError, match=r"^tile_positions: length 3 is smaller than tile_size 4$"):
        tile_positions(3, 4, 1)


@pytest.mark.parametrize("tta", [False, True])
def test_constant_predictor_gives_a_constant_map(tta: bool) -> None:
    def const(batch: np.ndarray) -> np.ndarray:
        return np.full((*batch.shape[:3], 2), (0.25, 0.75), dtype=np.float32)

    out = predict_tiled(_image(37, 53), const, tile_size=16, overlap=0.5, batch_size=3, tta=tta)
    assert out.shape == (37, 53, 2) and out.dtype == np.float32
    np.testing.assert_allclose(out[..., 0], 0.25, atol=1e-6)
    np.testing.assert_allclose(out[..., 1], 0.75, atol=1e-6)


@pytest.mark.parametrize(
    ("shape", "overlap"),
    [((1, 1), 0.5), ((5, 70), 0.5), ((33, 17), 0.25), ((64, 64), 0.0), ((100, 37), 0.75)],
)
def test_pixelwise_predictor_is_seamless(shape: tuple[int, int], overlap: float) -> None:
    img = _image(*shape)
    out = predict_tiled(img, pixelwise, tile_size=16, overlap=overlap, batch_size=4)
    assert out.shape == (*shape, 2)
    np.testing.assert_allclose(out[..., 0], img, atol=1e-6)
    np.testing.assert_allclose(out[..., 1], img**2, atol=1e-6)


def test_smaller_than_tile_is_padded_to_one_tile() -> None:
    rec = Recorder()
    img = _image(5, 7)
    out = predict_tiled(img, rec, tile_size=32, overlap=0.5)
    assert rec.shapes == [(1, 32, 32, 1)]
    np.testing.assert_allclose(out[..., 0], img, atol=1e-6)


def test_batching_and_tile_count() -> None:
    # 48x48, tile 16, overlap 0.5: step 8, margin 4 -> padded 56 -> 6 x 6 = 36 tiles
    rec = Recorder()
    predict_tiled(_image(48, 48), rec, tile_size=16, overlap=0.5, batch_size=8)
    assert [s[0] for s in rec.shapes] == [8, 8, 8, 8, 4]
    assert all(s[1:] == (16, 16, 1) for s in rec.shapes)
    rec_tta = Recorder()
    predict_tiled(_image(48, 48), rec_tta, tile_size=16, overlap=0.5, batch_size=8, tta=True)
    assert len(rec_tta.shapes) == 5 * 8


def test_tta_with_an_equivariant_predictor_changes_nothing() -> None:
    img = _image(40, 29, seed=3)
    plain = predict_tiled(img, box_blur, tile_size=16, overlap=0.5, batch_size=5)
    tta = predict_tiled(img, box_blur, tile_size=16, overlap=0.5, batch_size=5, tta=True)
    np.testing.assert_allclose(tta, plain, atol=1e-6)
    # and a non-equivariant predictor (a ramp along tile columns) is averaged over the
    # 8 transforms: col/T, row/T, (T-1-col)/T, (T-1-row)/T ... -> (T-1) / (2T) everywhere
    ramp = np.arange(16, dtype=np.float32) / 16

    def columns(batch: np.ndarray) -> np.ndarray:
        return np.broadcast_to(ramp[None, None, :, None], batch.shape).copy()

    avg = predict_tiled(img, columns, tile_size=16, overlap=0.5, tta=True)
    np.testing.assert_allclose(avg, 15 / 32, atol=1e-6)
    assert not np.allclose(predict_tiled(img, columns, tile_size=16), 15 / 32, atol=1e-3)


def test_deterministic() -> None:
    img = _image(50, 61, seed=7)
    a = predict_tiled(img, box_blur, tile_size=16, overlap=0.5, tta=True)
    b = predict_tiled(img, box_blur, tile_size=16, overlap=0.5, tta=True)
    assert np.array_equal(a, b)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"tile_size": 8}, "tile_size must be an integer >= 16, got 8"),
        (
            {"tile_size": 40},
            "tile_size must be a multiple of 16 (the UNet halves H and W depth "
            "times, so tiles need a side divisible by 2**depth), got 40",
        ),
        ({"tile_size": 32, "divisor": 64}, "tile_size must be an integer >= 64, got 32"),
        ({"overlap": 1.0}, "overlap must be in [0, 1), got 1.0"),
        ({"batch_size": 0}, "batch_size must be an integer >= 1, got 0"),
        ({"divisor": 0}, "divisor must be a positive integer, got 0"),
    ],
)
def test_tiling_argument_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError) as exc:
        predict_tiled(_image(8, 8), pixelwise, **{"tile_size": 16, **kwargs})
    assert str(exc.value) == message


def test_image_and_predictor_errors() -> None:
    with pytest.raises(
        ValueError,
        match=r"^predict_tiled: expected \(H, W, C\) or \(H, W\), got shape \(2, 3, 4, 1\)$",
    ):
        predict_tiled(np.zeros((2, 3, 4, 1)), pixelwise, tile_size=16)
    with pytest.raises(
        ValueError, match=r"^predict_tiled: expected a non-empty array, got shape \(0, 5\)$"
    ):
        predict_tiled(np.zeros((0, 5)), pixelwise, tile_size=16)
    nan = _image(4, 4)
    nan[1, 1] = np.nan
    with pytest.raises(ValueError, match=r"^predict_tiled: image contains NaN or infinite values$"):
        predict_tiled(nan, pixelwise, tile_size=16)
    with pytest.raises(ValueError) as exc:
        predict_tiled(_image(4, 4), lambda b: b[..., 0], tile_size=16)
    assert str(exc.value) == (
        "predict_batch returned shape (1, 16, 16) for an input batch of shape (1, 16, 16, 1); "
        "expected (1, 16, 16, C)"
    )
    calls = iter(range(100))

    def changing(batch: np.ndarray) -> np.ndarray:
        return pixelwise(batch) if next(calls) == 0 else batch

    with pytest.raises(
        ValueError, match=r"^predict_batch returned 1 channels after 2 for earlier tiles$"
    ):
        predict_tiled(_image(40, 40), changing, tile_size=16, batch_size=2)


def test_check_tiling_accepts_valid() -> None:
    check_tiling(256, 0.5, 8)
    check_tiling(64, 0.0, 1, divisor=64)


def test_probabilities_to_mask() -> None:
    p1 = np.array([[[0.2], [0.5]], [[0.7], [0.49]]], dtype=np.float32)
    m = probabilities_to_mask(p1, 0.5)
    assert m.dtype == np.uint8 and m.tolist() == [[0, 1], [1, 0]]
    assert probabilities_to_mask(p1, 0.1).tolist() == [[1, 1], [1, 1]]
    p3 = np.array([[[0.1, 0.8, 0.1], [0.3, 0.3, 0.4]]], dtype=np.float32)
    assert probabilities_to_mask(p3, 0.99).tolist() == [[1, 2]]
    with pytest.raises(
        ValueError,
        match=r"^probabilities_to_mask: expected \(\.\.\., C\) probabilities, got shape \(3,\)$",
    ):
        probabilities_to_mask(np.zeros(3))
    with pytest.raises(
        ValueError, match=r"^probabilities_to_mask: threshold must be in \[0, 1\], got 1.5$"
    ):
        probabilities_to_mask(p1, 1.5)
    with pytest.raises(
        ValueError, match=r"^probabilities_to_mask: 300 classes do not fit a uint8 mask$"
    ):
        probabilities_to_mask(np.zeros((2, 2, 300)))


def test_mask_to_image() -> None:
    mask = np.array([[0, 1], [1, 0]], dtype=np.uint8)
    img = mask_to_image(mask, 2)
    assert img.dtype == np.uint8 and img.tolist() == [[0, 255], [255, 0]]
    multi = np.array([[0, 3], [2, 1]], dtype=np.int64)
    out = mask_to_image(multi, 4)
    assert out.dtype == np.uint8 and out.tolist() == [[0, 3], [2, 1]]
    with pytest.raises(ValueError, match=r"^mask_to_image: mask values \[0, 3\] outside 0\.\.2$"):
        mask_to_image(multi, 3)
    with pytest.raises(ValueError, match=r"^mask_to_image: n_classes must be in 2\.\.256, got 1$"):
        mask_to_image(mask, 1)


def pixelwise_one(batch: np.ndarray) -> np.ndarray:
    return batch.copy()


def _plan(**fields) -> InferencePlan:
    base = {
        "n_classes": 2,
        "class_names": ["background", "mito"],
        "tile_size": 16,
        "halo": 4,
        "batch_size": 16,
        "threshold": 0.5,
    }
    return InferencePlan.model_validate({**base, **fields})


def test_segment_stack_follows_the_plan_uint16_and_2d_input() -> None:
    rng = np.random.default_rng(1)
    stack = rng.integers(0, 65535, size=(2, 40, 50), dtype=np.uint16)
    out = segment_stack(pixelwise_one, stack, _plan())
    assert out.shape == (2, 40, 50) and out.dtype == np.uint8
    for z in range(2):
        expected = (normalize_slice(stack[z]) >= 0.5).astype(np.uint8)
        assert np.array_equal(out[z], expected)
    single = segment_stack(pixelwise_one, stack[0], _plan(threshold=0.3))
    assert single.shape == (1, 40, 50)
    assert np.array_equal(single[0], (normalize_slice(stack[0]) >= 0.3).astype(np.uint8))


def test_a_slice_that_fits_runs_as_one_rectangular_tile() -> None:
    rec = Recorder(pixelwise_one)
    img = _image(40, 70)
    out = predict_tiled(img, rec, tile_size=96, halo=8)
    # 40 + 2 * 8 = 56 -> 64 rows; 70 + 16 = 86 -> 96 columns: one forward pass
    assert rec.shapes == [(1, 64, 96, 1)]
    np.testing.assert_array_equal(out[..., 0], img)


def test_halo_sets_the_tile_step() -> None:
    rec = Recorder()
    # 16 rows + 2 * 8 fit one tile row; 64 columns, tile 32, halo 8: padded 80, step 16
    # -> starts 0, 16, 32, 48
    predict_tiled(_image(16, 64), rec, tile_size=32, halo=8, batch_size=64)
    assert rec.shapes == [(4, 32, 32, 1)]
    with pytest.raises(ValueError, match=r"^halo must be below tile_size / 2 = 16, got 16$"):
        predict_tiled(_image(8, 8), rec, tile_size=32, halo=16)
    with pytest.raises(ValueError, match=r"^halo must be an integer >= 0, got -1$"):
        predict_tiled(_image(8, 8), rec, tile_size=32, halo=-1)


@pytest.mark.parametrize(
    ("image", "blank"),
    [
        (np.zeros((30, 30), np.uint8), True),
        (np.full((30, 30), 40000, np.uint16), True),
        (np.where(np.arange(900).reshape(30, 30) % 97 == 0, 3, 0).astype(np.uint8), True),
        (np.tile(np.arange(30, dtype=np.uint8) * 8, (30, 1)), False),
    ],
)
def test_blank_slices_are_background_without_a_forward_pass(image, blank: bool) -> None:
    rec = Recorder(lambda b: np.ones_like(b))  # a model that calls everything foreground
    mask = segment_stack(rec, image, _plan())
    assert (rec.shapes == []) == blank
    assert (mask.max() == 0) == blank
    probs = predict_slice(
        image, rec, _plan(n_classes=3, class_names=["a", "b", "c"], threshold=None)
    )
    if blank:
        assert (
            probs.shape == (30, 30, 3) and (probs[..., 0] == 1).all() and probs[..., 1:].max() == 0
        )


def test_iter_stack_probabilities_yields_per_slice() -> None:
    stack = np.arange(2 * 20 * 24, dtype=np.uint8).reshape(2, 20, 24)
    probs = list(iter_stack_probabilities(pixelwise, stack, _plan()))
    assert len(probs) == 2 and probs[0].shape == (20, 24, 2)
    np.testing.assert_allclose(probs[1][..., 0], normalize_slice(stack[1]), atol=1e-6)


@pytest.mark.parametrize(
    ("stack", "message"),
    [
        (np.zeros(4, np.uint8), r"expected \(Z, H, W\) or \(H, W\), got shape \(4,\)"),
        (np.zeros((4, 4), complex), "expected an integer or float image stack, got complex128"),
        (np.zeros((0, 4, 4), np.uint8), r"expected a non-empty array, got shape \(0, 4, 4\)"),
    ],
)
def test_segment_stack_errors(stack: np.ndarray, message: str) -> None:
    with pytest.raises(ValueError, match=rf"^stack: {message}$"):
        segment_stack(pixelwise_one, stack, _plan())


def test_as_predict_batch_rejects_what_it_cannot_call() -> None:
    with pytest.raises(
        TypeError, match=r"^expected a Keras model or a callable batch predictor, got int$"
    ):
        as_predict_batch(3)


def test_border_zero_puts_the_image_border_at_the_tile_border() -> None:
    rec = Recorder(pixelwise_one)
    img = _image(40, 64)
    out = predict_tiled(img, rec, tile_size=96, halo=8, border=0)
    assert rec.shapes == [(1, 48, 64, 1)]  # 40 -> 48 (divisor), 64 fits exactly
    np.testing.assert_array_equal(out[..., 0], img)
    seen: list[np.ndarray] = []
    predict_tiled(img, lambda b: seen.append(b) or b, tile_size=96, halo=8, border=0)
    np.testing.assert_array_equal(seen[0][0, 4:44, :, 0], img)  # only the rounding is padded
    with pytest.raises(ValueError, match=r"^border must be an integer >= 0, got -2$"):
        predict_tiled(img, rec, tile_size=96, halo=8, border=-2)


# ---------------------------------------------------------------- 2.5D (z_context)


@pytest.mark.parametrize(
    ("z", "depth", "k", "expected"),
    [
        (0, 1, 0, [0]),
        (0, 1, 2, [0, 0, 0, 0, 0]),
        (0, 5, 1, [0, 0, 1]),
        (2, 5, 1, [1, 2, 3]),
        (4, 5, 1, [3, 4, 4]),
        (1, 5, 2, [0, 0, 1, 2, 3]),
    ],
)
def test_context_window_clamps_at_the_stack_ends(z, depth, k, expected) -> None:
    assert context_window(z, depth, k) == expected


@pytest.mark.parametrize(("z", "depth", "k"), [(-1, 3, 1), (3, 3, 1), (0, 0, 1), (0, 3, -1)])
def test_context_window_errors(z, depth, k) -> None:
    with pytest.raises(ValueError, match=r"^context_window: need 0 <= z < depth and k >= 0"):
        context_window(z, depth, k)


def channel(c: int):
    """A 2.5D predictor whose answer is input channel ``c``: it shows which slice sits there."""
    return lambda batch: batch[..., c : c + 1].copy()


@pytest.mark.parametrize("c", [0, 1, 2])
def test_a_25d_plan_feeds_neighbouring_slices_as_channels(c: int) -> None:
    rng = np.random.default_rng(3)
    stack = rng.integers(0, 255, size=(4, 20, 24), dtype=np.uint8)
    rec = Recorder(channel(c))
    probs = list(iter_stack_probabilities(rec, stack, _plan(z_context=1)))
    assert {s[-1] for s in rec.shapes} == {3}
    for z, p in enumerate(probs):
        source = context_window(z, 4, 1)[c]
        np.testing.assert_allclose(p[..., 0], normalize_slice(stack[source]), atol=1e-6)


def test_a_25d_block_with_its_context_matches_the_whole_stack() -> None:
    """What the volume path relies on: slices z0..z1 predicted from a block carrying k
    extra slices on each side equal the whole-stack prediction."""
    rng = np.random.default_rng(4)
    stack = rng.integers(0, 255, size=(9, 20, 24), dtype=np.uint8)

    def mix(batch: np.ndarray) -> np.ndarray:
        return batch @ np.array([[0.2], [0.5], [0.3]], dtype=np.float32)

    plan = _plan(z_context=1)
    whole = segment_stack(mix, stack, plan)
    block = segment_stack(mix, stack[2:7], plan)  # slices 3..5 with one slice each side
    assert np.array_equal(block[1:4], whole[3:6])


def test_a_single_image_is_its_own_context_and_blank_neighbours_are_zeros() -> None:
    image = np.tile(np.arange(24, dtype=np.uint8) * 10, (20, 1))
    rec = Recorder(channel(0))
    out = predict_slice(image, rec, _plan(z_context=2))
    assert {s[-1] for s in rec.shapes} == {5}
    np.testing.assert_allclose(out[..., 0], normalize_slice(image), atol=1e-6)
    stack = np.stack([np.zeros_like(image), image])  # slice 0 is blank
    probs = list(iter_stack_probabilities(channel(0), stack, _plan(z_context=1)))
    assert probs[0].max() == 0  # a blank slice: background without a forward pass
    assert probs[1].max() == 0  # its blank neighbour reaches the network as zeros


def test_predict_slice_context_errors() -> None:
    image = _image(8, 8)
    with pytest.raises(
        ValueError, match=r"^predict_slice: the plan \(z_context 1\) needs 3 context slices, got 2$"
    ):
        predict_slice(image, channel(0), _plan(z_context=1), [image, image])
    with pytest.raises(ValueError, match=r"^predict_slice: context slices .* differ from"):
        predict_slice(image, channel(0), _plan(z_context=1), [image, image, image[:4]])


# ------------------------------------------------------------------- z-averaging


@pytest.mark.parametrize(("r", "depth"), [(1, 1), (1, 5), (2, 5), (3, 4)])
def test_z_average_is_the_clamped_mean_of_neighbouring_probabilities(r: int, depth: int) -> None:
    rng = np.random.default_rng(6)
    stack = rng.integers(0, 255, size=(depth, 12, 14), dtype=np.uint8)
    probs = np.stack([p[..., 0] for p in iter_stack_probabilities(pixelwise, stack, _plan())])
    averaged = list(iter_stack_probabilities(pixelwise, stack, _plan(z_average=r)))
    assert len(averaged) == depth and all(a.shape == (12, 14, 2) for a in averaged)
    for z in range(depth):
        expected = probs[context_window(z, depth, r)].mean(axis=0)
        np.testing.assert_allclose(averaged[z][..., 0], expected, atol=1e-6)


@pytest.mark.parametrize(("k", "r"), [(0, 1), (1, 1), (2, 1), (1, 2)])
def test_a_block_with_z_halo_slices_matches_the_whole_stack(k: int, r: int) -> None:
    rng = np.random.default_rng(7)
    stack = rng.integers(0, 255, size=(12, 20, 24), dtype=np.uint8)

    def mix(batch: np.ndarray) -> np.ndarray:
        w = np.linspace(0.1, 1.0, batch.shape[-1], dtype=np.float32)
        return (batch @ (w / w.sum()))[..., None]

    plan = _plan(z_context=k, z_average=r)
    assert plan.z_halo == k + r
    whole = np.stack(list(iter_stack_probabilities(mix, stack, plan)))
    h = plan.z_halo
    for z0, z1 in [(0, 4), (4, 8), (8, 12)]:
        lo, hi = max(0, z0 - h), min(12, z1 + h)
        block = np.stack(list(iter_stack_probabilities(mix, stack[lo:hi], plan)))
        np.testing.assert_array_equal(block[z0 - lo : z1 - lo], whole[z0:z1])
        window = list(iter_stack_probabilities(mix, stack[lo:hi], plan, start=z0 - lo,
                                               stop=z1 - lo))  # fmt: skip
        np.testing.assert_array_equal(np.stack(window), whole[z0:z1])


@pytest.mark.parametrize(
    ("k", "r", "start", "stop", "predicted"),
    [
        (0, 0, 2, 5, [2, 3, 4]),
        (1, 0, 2, 5, [2, 3, 4]),  # context slices 1 and 5 are read, not predicted
        (0, 1, 2, 5, [1, 2, 3, 4, 5]),  # z-averaging needs one predicted slice each side
        (2, 1, 0, 3, [0, 1, 2, 3]),  # clamped at the stack's start
        (1, 2, 6, 8, [4, 5, 6, 7]),  # and at its end
    ],
)
def test_only_the_wanted_slices_and_their_z_average_halo_are_predicted(
    k: int, r: int, start: int, stop: int, predicted: list[int]
) -> None:
    """The network runs once per predicted slice here (one tile, one batch)."""
    stack = np.random.default_rng(8).integers(0, 255, size=(8, 16, 16), dtype=np.uint8)
    rec = Recorder(channel(k))
    plan = _plan(z_context=k, z_average=r)
    out = list(iter_stack_probabilities(rec, stack, plan, start=start, stop=stop))
    assert len(rec.shapes) == len(predicted)
    whole = list(iter_stack_probabilities(channel(k), stack, plan))
    assert len(out) == stop - start
    for z, p in zip(range(start, stop), out, strict=True):
        np.testing.assert_array_equal(p, whole[z])


@pytest.mark.parametrize(("start", "stop"), [(-1, 2), (2, 2), (3, 2), (0, 5)])
def test_iter_stack_probabilities_window_errors(start: int, stop: int) -> None:
    stack = np.zeros((4, 16, 16), np.uint8)
    with pytest.raises(
        ValueError,
        match=rf"^iter_stack_probabilities: need 0 <= start < stop <= 4 \(the stack's "
        rf"slices\), got start={start}, stop={stop}$",
    ):
        next(iter_stack_probabilities(pixelwise, stack, _plan(), start=start, stop=stop))


# ---------------------------------------------------------------- hysteresis


def _regions() -> np.ndarray:
    """(8, 12) probabilities: a region peaking at 0.9 (rows 1-2, cols 1-3), one touching it
    only diagonally that stays at 0.6 (row 3, col 4), and a faint separate one at 0.6."""
    p = np.zeros((8, 12), np.float32)
    p[1:3, 1:4] = [[0.6, 0.9, 0.6], [0.6, 0.6, 0.6]]
    p[3, 4] = 0.6  # 8-connected to the seeded region: kept with it
    p[5:7, 7:11] = 0.6  # never reaches the seed: dropped
    return p


def test_keep_seeded_regions_keeps_8_connected_regions_that_reach_the_seed() -> None:
    p = _regions()
    kept = keep_seeded_regions(p >= 0.5, p, 0.8)
    expected = np.zeros_like(kept)
    expected[1:3, 1:4] = 1
    expected[3, 4] = 1
    assert kept.dtype == np.uint8 and np.array_equal(kept, expected)
    assert not keep_seeded_regions(np.zeros((4, 4), bool), np.ones((4, 4)), 0.5).any()


def test_decide_mask_is_the_threshold_alone_without_a_seed_threshold() -> None:
    p = _regions()[..., None]
    assert np.array_equal(decide_mask(p, _plan()), probabilities_to_mask(p, 0.5))
    seeded = decide_mask(p, _plan(seed_threshold=0.8))
    assert seeded.sum() == 7 and not seeded[5:7, 7:11].any()


def test_segment_stack_applies_the_plans_hysteresis_to_every_slice() -> None:
    stack = (np.stack([_regions(), np.flip(_regions(), 1)]) * 255).astype(np.uint8)
    plan = _plan(seed_threshold=0.8)
    out = segment_stack(pixelwise_one, stack, plan)
    for z, probs in enumerate(iter_stack_probabilities(pixelwise_one, stack, plan)):
        fg = probs[..., 0] >= 0.5
        assert np.array_equal(out[z], keep_seeded_regions(fg, probs[..., 0], 0.8))
        assert 0 < out[z].sum() < fg.sum()  # the faint region is dropped, the seeded kept


@pytest.mark.parametrize(
    ("mask", "probs", "seed", "message"),
    [
        (np.zeros((4, 4)), np.zeros((4, 5)), 0.5, r"one shape, got \(4, 4\) and \(4, 5\)"),
        (np.zeros((2, 4, 4)), np.zeros((2, 4, 4)), 0.5, r"expected \(H, W\) mask"),
        (np.zeros((4, 4)), np.zeros((4, 4)), 1.5, r"seed_threshold must be in \[0, 1\], got 1.5"),
    ],
)
def test_keep_seeded_regions_errors(mask, probs, seed, message) -> None:
    with pytest.raises(ValueError, match=rf"^keep_seeded_regions: .*{message}"):
        keep_seeded_regions(mask, probs, seed)
