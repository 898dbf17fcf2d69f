"""The napari plugin, headless: manifest, reader (TIFF + OME-Zarr), widget, screenshot.

Qt needs a display: when ``$DISPLAY`` is unset the module starts its own ``Xvfb`` (Debian
package ``xvfb``) on a free display number. The tests skip, saying why, when napari, Qt
or Xvfb cannot start. The widget runs a tiny UNet (with an inference plan beside it) on
a real EM slice of the bundled VNC sample.

Every test that opens a viewer runs in a fresh ``pytest`` process of its own
(:func:`in_fresh_process`): napari renders with Mesa's llvmpipe under Xvfb, and Mesa's
LLVM and TensorFlow's LLVM cannot live in one process (whichever loads second crashes
it), while the rest of the suite loads TensorFlow into this process. The parent does the
TensorFlow part (building the tiny model, the reference masks) and hands files over.

``MITOSEG_DOCS_SCREENSHOT=docs/napari.png`` (and optionally ``MITOSEG_NAPARI_MODEL`` =
a trained ``.keras``) also writes the screenshot used in the README.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile

REPO = Path(__file__).resolve().parents[2]
VNC = REPO / "src" / "mitoseg" / "sample_data" / "vnc" / "test" / "images.tif"
VOXEL = (50.0, 4.6, 4.6)  # VNC: 50 nm sections, 4.6 nm pixels

napari = pytest.importorskip("napari", reason="napari is not installed (dev extra)")
pytest.importorskip("pytestqt", reason="pytest-qt is not installed (dev extra)")


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the test process dies, even by a crash
    (Linux ``prctl(PR_SET_PDEATHSIG)``; elsewhere atexit alone stops it)."""
    import ctypes
    import signal

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


def _start_xvfb() -> tuple[subprocess.Popen, str] | None:
    """Start Xvfb on a display it picks itself (``-displayfd``: no guessing, and stale
    lock files of killed servers cannot exhaust a range); returns it and its ``$DISPLAY``."""
    xvfb = shutil.which("Xvfb")
    if xvfb is None:
        return None
    read, write = os.pipe()
    proc = subprocess.Popen(
        [xvfb, "-displayfd", str(write), "-screen", "0", "1280x1024x24", "-nolisten", "tcp"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        pass_fds=(write,),
        preexec_fn=_die_with_parent,
    )
    os.close(write)
    with os.fdopen(read) as fh:
        number = fh.readline().strip()  # written once the server accepts connections
    if not number.isdigit():
        _stop(proc)
        return None
    return proc, f":{number}"


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()  # SIGTERM: the server removes its lock file and socket
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)  # reaped here: the container's init may not reap orphans


@pytest.fixture(scope="module", autouse=True)
def display() -> Iterator[None]:
    """A display for Qt: the existing ``$DISPLAY``, else our own Xvfb, for this module's
    tests (``$DISPLAY`` is restored afterwards). The server stays up until the test
    process exits (a QApplication connected to it would end with it)."""
    if os.environ.get("DISPLAY") or os.environ.get("QT_QPA_PLATFORM") == "offscreen":
        yield
        return
    started = _start_xvfb()
    if started is None:
        pytest.skip("no $DISPLAY and Xvfb cannot start: apt-get install -y xvfb")
    proc, number = started
    atexit.register(_stop, proc)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DISPLAY", number)
        yield


#: Set in the child process that runs one viewer test (see :func:`in_fresh_process`).
CHILD_ENV = "MITOSEG_NAPARI_CHILD"
#: Folder the parent hands to the child (model, reference masks).
CASE_ENV = "MITOSEG_NAPARI_CASE"


@functools.lru_cache(maxsize=1)
def qt_problem() -> str | None:
    """Why a Qt application cannot start on this display (None when it can): a missing
    xcb library makes Qt abort the process, so it is tried in a throwaway one."""
    import sys

    code = "from qtpy.QtWidgets import QApplication; app = QApplication([]); print('ok')"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    if r.returncode == 0 and "ok" in r.stdout:
        return None
    lines = r.stderr.strip().splitlines() or [f"exit status {r.returncode}"]
    return next((line for line in lines if "could not" in line.lower()), lines[-1])


def in_fresh_process(request: pytest.FixtureRequest, case: Path | None = None) -> bool:
    """Run the calling test again in a fresh pytest process (unless this is that process).

    Returns:
        True in the parent, after the child passed (the caller returns); False in the
        child, which goes on with the test body.
    """
    import sys

    if os.environ.get(CHILD_ENV):
        return False
    problem = qt_problem()
    if problem is not None:
        pytest.skip(
            f"Qt cannot start here ({problem}): it needs a display (Xvfb) and Qt's xcb "
            "libraries; on Debian: apt-get install -y xvfb libxcb-cursor0 libxcb-icccm4 "
            "libxcb-keysyms1 libxkbcommon-x11-0 libegl1 (see .ci/run)"
        )
    env = {**os.environ, CHILD_ENV: "1", "TF_CPP_MIN_LOG_LEVEL": "3"}
    if case is not None:
        env[CASE_ENV] = str(case)
    nodeid = request.node.nodeid  # without the "@group" that `--dist loadgroup` adds
    if nodeid.rfind("@") > nodeid.rfind("]"):
        nodeid = nodeid.rsplit("@", 1)[0]
    cmd = [sys.executable, "-m", "pytest", nodeid, "-q", "-p", "no:cacheprovider"]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    out = r.stdout[-6000:] + r.stderr[-3000:]
    if r.returncode != 0 and " skipped" in r.stdout and " passed" not in r.stdout:
        pytest.skip(f"the viewer test skipped in its process: {out[-500:]}")
    assert r.returncode == 0, out
    assert " passed" in r.stdout, out
    return True


def open_viewer(request: pytest.FixtureRequest) -> Any:
    """A shown napari viewer from napari's ``make_napari_viewer`` fixture (child only)."""
    make_napari_viewer = request.getfixturevalue("make_napari_viewer")
    try:
        return make_napari_viewer(show=True)
    except Exception as exc:  # no GL / Qt platform: say why
        pytest.skip(f"napari cannot start a viewer here: {exc}")


def vnc(z: int = 2, h: int = 192, w: int = 256) -> np.ndarray:
    return tifffile.imread(VNC)[:z, :h, :w]


# ----------------------------------------------------------------- manifest


def test_manifest_is_found_through_the_entry_point() -> None:
    import npe2

    pm = npe2.PluginManager.instance()
    pm.discover()
    manifest = pm.get_manifest("mitoseg")
    assert [r.command for r in manifest.contributions.readers] == ["mitoseg.get_reader"]
    assert [w.display_name for w in manifest.contributions.widgets] == [
        "Segment mitochondria",
        "Label store",
    ]
    for cmd in manifest.contributions.commands:
        module, _, attr = cmd.python_name.partition(":")
        assert callable(getattr(__import__(module, fromlist=[attr]), attr))


def test_plugin_modules_import_without_qt() -> None:
    import sys

    code = (
        "import sys, mitoseg.napari, mitoseg.napari._reader, mitoseg.napari._segment, "
        "mitoseg.napari._labels; "
        "bad = [m for m in sys.modules if m.split('.')[0] in "
        "('PyQt5', 'PyQt6', 'PySide2', 'PySide6', 'qtpy', 'napari', 'tensorflow')]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


# ----------------------------------------------------------------- reader


def _write_tiffs(tmp: Path) -> dict[str, Path]:
    from mitoseg.io import write_stack

    img = vnc()
    mask = np.where(img > np.percentile(img, 80), 255, 0).astype(np.uint8)
    inst = np.zeros(img.shape, np.uint32)
    inst[:, 10:40, 10:50], inst[:, 100:150, 60:90] = 7, 70_000
    paths = {"image": tmp / "images.tif", "mask": tmp / "pred.tif", "inst": tmp / "pred_obj.tif"}
    write_stack(paths["image"], img, VOXEL)
    write_stack(paths["mask"], mask, VOXEL)
    write_stack(paths["inst"], inst, VOXEL)
    return paths


def test_uncalibrated_tiff_opens_with_unit_scale(tmp_path: Path) -> None:
    from mitoseg.napari._reader import get_reader

    p = tmp_path / "raw.tif"
    tifffile.imwrite(p, vnc(1))
    ((data, kwargs, kind),) = get_reader(str(p))(str(p))
    assert kind == "image" and data.shape == (192, 256)
    assert kwargs["scale"] == (1.0, 1.0) and "units" not in kwargs
    assert kwargs["metadata"]["voxel_size_nm"] is None


def _multiscale(name: str, levels: int, v05: bool, scale: list[float]) -> dict[str, Any]:
    axes = [{"name": a, "type": "space", "unit": "nanometer"} for a in "zyx"]
    ms = {
        "name": name,
        "axes": axes,
        "datasets": [
            {
                "path": str(i),
                "coordinateTransformations": [
                    {"type": "scale", "scale": [scale[0], scale[1] * 2**i, scale[2] * 2**i]}
                ],
            }
            for i in range(levels)
        ],
    }
    if not v05:
        ms["version"] = "0.4"
    return ms


def write_ome_zarr(path: Path, image: np.ndarray, mask: np.ndarray, v05: bool) -> None:
    """A small OME-Zarr as the volume path writes it: 2-level image pyramid, labels/mito."""
    import zarr

    fmt = 3 if v05 else 2

    def put(attrs: dict[str, Any], group: Any) -> None:
        group.attrs.update({"ome": {"version": "0.5", **attrs}} if v05 else attrs)

    root = zarr.open_group(str(path), mode="w", zarr_format=fmt)
    for i, level in enumerate((image, image[:, ::2, ::2])):
        root.create_array(str(i), shape=level.shape, dtype=level.dtype, chunks=(1, 64, 64))[:] = (
            level
        )
    put({"multiscales": [_multiscale("image", 2, v05, list(VOXEL))]}, root)
    labels = root.create_group("labels")
    put({"labels": ["mito"]}, labels)
    mito = labels.create_group("mito")
    mito.create_array("0", shape=mask.shape, dtype=mask.dtype, chunks=(1, 64, 64))[:] = mask
    put(
        {
            "multiscales": [_multiscale("mito", 1, v05, list(VOXEL))],
            "image-label": {"colors": [{"label-value": 1, "rgba": [255, 0, 255, 255]}]},
        },
        mito,
    )


def test_napari_opens_tiff_and_ome_zarr_with_the_plugin(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """``viewer.open(..., plugin="mitoseg")``: calibrated TIFF image, 0/255 mask and uint32
    instances, then OME-Zarr 0.4 and 0.5 stores (image pyramid + ``labels/``)."""
    if in_fresh_process(request):
        return
    viewer = open_viewer(request)
    paths = _write_tiffs(tmp_path)
    img = tifffile.imread(paths["image"])
    viewer.open([str(p) for p in paths.values()], plugin="mitoseg")
    image, mask, inst = (viewer.layers[p.stem] for p in paths.values())
    assert type(image).__name__ == "Image" and type(mask).__name__ == "Labels"
    assert type(inst).__name__ == "Labels" and inst.data.dtype == np.uint32
    for layer in (image, mask, inst):
        np.testing.assert_allclose(layer.scale, VOXEL, rtol=1e-6)
        assert [str(u) for u in layer.units] == ["nanometer"] * 3
        assert layer.metadata["voxel_size_nm"] == pytest.approx(list(VOXEL))
    np.testing.assert_array_equal(image.data, img)
    np.testing.assert_array_equal(mask.data, img > np.percentile(img, 80))
    assert set(np.unique(inst.data)) == {0, 7, 70_000}

    labels = np.zeros(img.shape, np.uint32)
    labels[:, 20:60, 30:90] = 3
    for v05 in (False, True):
        viewer.layers.clear()
        store = tmp_path / f"vol{int(v05)}.zarr"
        write_ome_zarr(store, img, labels, v05)
        viewer.open(str(store), plugin="mitoseg")
        zimage, mito = viewer.layers[store.stem], viewer.layers["mito"]
        assert zimage.multiscale and len(zimage.data) == 2
        np.testing.assert_array_equal(np.asarray(zimage.data[0]), img)
        np.testing.assert_allclose(zimage.scale, VOXEL)
        assert type(mito).__name__ == "Labels"
        np.testing.assert_array_equal(np.asarray(mito.data), labels)
        np.testing.assert_allclose(mito.scale, VOXEL)


@pytest.mark.parametrize("ngff", ["0.4", "0.5"])
def test_reader_reads_the_volume_path_output(tmp_path: Path, ngff: str) -> None:
    """The store ``mitoseg predict`` writes for volumes (:mod:`mitoseg.volume.ngff`)."""
    from mitoseg.inference.objects import instance_labels
    from mitoseg.napari._reader import get_reader
    from mitoseg.volume.ngff import create_output, write_levels

    img = vnc(2, 160, 192)
    mask = (img > np.percentile(img, 85)).astype(np.uint8)
    inst, _ = instance_labels(mask, 5)
    uri = str(tmp_path / "out.ome.zarr")
    root = create_output(
        uri, shape=img.shape, dtype=img.dtype, voxel_size_nm=VOXEL, block_z=1, n_blocks=2,
        ngff=ngff,
    )  # fmt: skip
    write_levels(root, img, 0, label=False)
    write_levels(root["labels/mask"], mask, 0, label=True)
    write_levels(root["labels/instances"], inst, 0, label=True)
    layers = get_reader(uri)(uri)
    assert [(kw["name"], kind) for _, kw, kind in layers] == [
        ("out", "image"), ("mask", "labels"), ("instances", "labels"),
    ]  # fmt: skip
    (image, _, _), (m, _, _), (ins, _, _) = layers
    levels = image if isinstance(image, list) else [image]
    np.testing.assert_array_equal(np.asarray(levels[0]), img)
    np.testing.assert_array_equal(np.asarray(m if not isinstance(m, list) else m[0]), mask)
    got = np.asarray(ins if not isinstance(ins, list) else ins[0])
    assert got.dtype == np.uint32
    np.testing.assert_array_equal(got, inst)
    for _, kw, _ in layers:
        np.testing.assert_allclose(kw["scale"], VOXEL)
        assert kw["units"] == ("nm",) * 3


def test_reader_declines_other_files(tmp_path: Path) -> None:
    from mitoseg.napari._reader import get_reader

    (tmp_path / "a.png").write_bytes(b"\x89PNG")
    (tmp_path / "plain").mkdir()
    assert get_reader(str(tmp_path / "a.png")) is None
    assert get_reader(str(tmp_path / "plain")) is None
    assert get_reader([]) is None


def _bad_stores(tmp: Path) -> list[tuple[Path, str]]:
    import zarr

    bad_tiff = tmp / "broken.tif"
    bad_tiff.write_bytes(b"II*\x00not a tiff")
    no_ms = tmp / "nomulti.zarr"
    zarr.open_group(str(no_ms), mode="w", zarr_format=2).attrs["foo"] = 1
    missing = tmp / "missing.zarr"
    write_ome_zarr(missing, vnc(1, 64, 64), np.zeros((1, 64, 64), np.uint8), v05=False)
    shutil.rmtree(missing / "labels" / "mito")
    unit = tmp / "unit.zarr"
    write_ome_zarr(unit, vnc(1, 64, 64), np.zeros((1, 64, 64), np.uint8), v05=False)
    attrs = json.loads((unit / ".zattrs").read_text())
    attrs["multiscales"][0]["axes"][2]["unit"] = "parsec"
    (unit / ".zattrs").write_text(json.dumps(attrs))
    return [
        (bad_tiff, r"broken\.tif: cannot read"),
        (no_ms, r"nomulti\.zarr: image has no OME-Zarr 'multiscales' metadata"),
        (missing, r"missing\.zarr: labels/mito is listed in labels/ but missing"),
        (unit, r"unit\.zarr: image axis 'x' has unknown unit 'parsec'"),
    ]


@pytest.mark.parametrize(
    "case", range(4), ids=["corrupt-tiff", "no-multiscales", "missing-label", "bad-unit"]
)
def test_reader_errors_name_the_file(tmp_path: Path, case: int) -> None:
    from mitoseg.io import DataError
    from mitoseg.napari._reader import read_layers

    path, message = _bad_stores(tmp_path)[case]
    with pytest.raises(DataError, match=message):
        read_layers(str(path))


# ----------------------------------------------------------------- widget


def _tiny_model(tmp: Path) -> tuple[Path, Any]:
    """A tiny untrained UNet with a 64-pixel-tile plan beside it; the threshold is the
    median probability on a real slice, so the mask is far from trivial."""
    import keras

    from mitoseg.config import ModelConfig
    from mitoseg.inference.plan import PLAN_FILE, InferencePlan
    from mitoseg.inference.predict import iter_stack_probabilities
    from mitoseg.model.unet import build_unet

    keras.utils.set_random_seed(3)
    model = build_unet(ModelConfig(depth=2, base_filters=4, batch_norm=False, dropout=0.0), 2)
    path = tmp / "tiny.keras"
    model.save(path)
    plan = InferencePlan.default_for(1, 4, tile_size=64, halo=8, batch_size=8, min_object_size=5)
    probs = next(iter_stack_probabilities(model, vnc(1), plan))
    plan = plan.with_overrides(threshold=round(float(np.median(probs)), 6))
    plan.write(tmp / PLAN_FILE)
    return path, plan


@pytest.mark.parametrize(
    ("model", "endpoint", "error", "message"),
    [
        ("  ", "", ValueError, "model URI is empty"),
        ("x", "ftp://host", ValueError, "endpoint URL must start with http:// or https://"),
    ],
    ids=["empty-model", "bad-url"],
)
def test_widget_input_errors(model: str, endpoint: str, error: type, message: str) -> None:
    from mitoseg.napari._segment import SegmentWorker, segment_remote

    worker = SegmentWorker()
    with pytest.raises(error, match=message):
        if endpoint:
            segment_remote(vnc(1), endpoint)
        else:
            worker.segment(vnc(1), model)
    assert worker._proc is None  # refused before a worker process started


@pytest.mark.parametrize("shape", [(3, 4, 5, 6), (3,)], ids=["4d", "1d"])
def test_as_stack_rejects_other_ranks(shape: tuple[int, ...]) -> None:
    from mitoseg.napari._segment import as_stack

    with pytest.raises(ValueError) as info:
        as_stack(np.zeros(shape, np.uint8))
    assert str(info.value) == f"image layer: expected (Z, H, W) or (H, W), got shape {shape}"


def test_segment_worker_keeps_models_and_restarts(tmp_path: Path) -> None:
    """The worker process (no Qt): the result of ``segment_stack`` here, its model kept
    after the file is gone, errors raised in the caller, a dead worker replaced."""
    import keras

    from mitoseg.inference.predict import segment_stack
    from mitoseg.napari._segment import SegmentWorker
    from mitoseg.tracking import ModelNotFoundError

    model_path, plan = _tiny_model(tmp_path)
    stack = vnc(1)
    expected = segment_stack(keras.saving.load_model(model_path), stack, plan)
    worker = SegmentWorker()
    try:
        classes, names, min_size = worker.segment(stack, str(model_path), timeout=600)
        np.testing.assert_array_equal(classes, expected)
        assert (names, min_size) == (list(plan.class_names), plan.min_object_size)
        first = worker._proc.pid
        worker._proc.kill()
        worker._proc.join(timeout=30)
        classes, _, _ = worker.segment(stack, str(model_path), timeout=600)  # a new worker
        assert worker._proc.pid != first
        np.testing.assert_array_equal(classes, expected)
        model_path.unlink()
        classes, _, _ = worker.segment(stack, f" {model_path} ", timeout=600)  # kept loaded
        np.testing.assert_array_equal(classes, expected)
        with pytest.raises(ModelNotFoundError, match=r"^model file not found: .*gone\.keras$"):
            worker.segment(stack, str(tmp_path / "gone.keras"), timeout=600)
    finally:
        worker.close()
    assert worker._proc is None


def _mask_fraction_in_screenshot(shot: np.ndarray) -> float:
    rgb = shot[..., :3].astype(int)
    magenta = (rgb[..., 0] - rgb[..., 1] > 90) & (rgb[..., 2] - rgb[..., 1] > 90)
    return float(magenta.mean())


def test_widget_segments_the_selected_layer_and_screenshot(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    img = tifffile.imread(VNC)[:2]  # (2, 512, 768) real EM
    if not os.environ.get(CHILD_ENV):
        # Parent (TensorFlow allowed): the tiny model and the reference result.
        import keras

        from mitoseg.inference.objects import instance_labels
        from mitoseg.inference.predict import segment_stack

        model_path, plan = _tiny_model(tmp_path)
        expected = segment_stack(keras.saving.load_model(model_path), img, plan)
        ref, n = instance_labels(expected == 1, plan.min_object_size)
        assert n > 0
        np.save(tmp_path / "expected.npy", expected)
        np.save(tmp_path / "instances.npy", ref)
        in_fresh_process(request, tmp_path)
        return
    case = Path(os.environ[CASE_ENV])
    model_path = Path(os.environ.get("MITOSEG_NAPARI_MODEL") or case / "tiny.keras")
    viewer = open_viewer(request)
    layer = viewer.add_image(img, name="vnc", scale=VOXEL, units=("nm",) * 3)
    _, widget = viewer.window.add_plugin_dock_widget("mitoseg", "Segment mitochondria")
    widget.image.value = layer
    widget.model.value = str(model_path)
    qtbot = request.getfixturevalue("qtbot")

    def segment() -> None:  # a started napari worker; the layers come when it returns
        layers = viewer.layers
        before = layers["vnc instances"].data if "vnc instances" in layers else None
        widget()
        qtbot.waitUntil(
            lambda: "vnc instances" in layers and layers["vnc instances"].data is not before,
            timeout=900_000,
        )

    segment()
    mask, inst = viewer.layers["vnc mask"], viewer.layers["vnc instances"]
    assert "tensorflow" not in __import__("sys").modules, "TensorFlow loaded next to napari"
    if "MITOSEG_NAPARI_MODEL" not in os.environ:
        np.testing.assert_array_equal(mask.data, np.load(case / "expected.npy"))
        np.testing.assert_array_equal(inst.data, np.load(case / "instances.npy"))
        assert mask.metadata["n_objects"] == int(inst.data.max())
    assert inst.data.dtype == np.uint32
    assert mask.metadata["model"] == str(model_path)  # the label store's provenance
    np.testing.assert_allclose(mask.scale, VOXEL)
    np.testing.assert_allclose(inst.scale, VOXEL)
    assert 0 < mask.data.mean() < 1

    segment()  # again: the layers are replaced, not duplicated
    assert [lay.name for lay in viewer.layers] == ["vnc", "vnc mask", "vnc instances"]

    viewer.dims.set_current_step(0, 0)
    viewer.reset_view()
    shot = viewer.screenshot(canvas_only=True, flash=False)
    out = tmp_path / "napari.png"
    from PIL import Image

    Image.fromarray(shot).save(out)
    back = np.asarray(Image.open(out))
    assert back.shape[0] > 200 and back.shape[1] > 200
    assert back[..., :3].std() > 20, "the screenshot is blank"
    fraction = _mask_fraction_in_screenshot(back)
    assert fraction > 0.02, f"mask colour covers only {fraction:.4f} of the screenshot"
    viewer.layers["vnc mask"].visible = False
    bare = viewer.screenshot(canvas_only=True, flash=False)
    assert _mask_fraction_in_screenshot(bare) < fraction / 10
    docs = os.environ.get("MITOSEG_DOCS_SCREENSHOT")
    if docs:
        viewer.layers["vnc mask"].visible = True
        with contextlib.suppress(Exception):
            viewer.window.resize(1100, 750)
        Image.fromarray(viewer.screenshot(canvas_only=False, flash=False)).save(REPO / docs)
