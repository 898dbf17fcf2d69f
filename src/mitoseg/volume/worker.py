"""What a volume job keeps on each Dask worker: the model, loaded once, and the input.

:class:`PredictorPlugin` is registered on every worker for the job's lifetime; the tasks
of :mod:`mitoseg.volume.job` and :mod:`mitoseg.volume.stitch` reach it through
:func:`worker_volume` and :func:`worker_predictor`.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from distributed import WorkerPlugin

from mitoseg.inference.plan import InferencePlan
from mitoseg.volume.spec import JobSpec
from mitoseg.volume.store import Volume, open_volume

__all__ = ["PredictorPlugin", "model_payload", "plugin_loads", "worker_predictor", "worker_volume"]


class PredictorPlugin(WorkerPlugin):
    """Loads the model once per worker and keeps its batch predictor.

    Args:
        model: ``.keras`` file bytes, or a picklable callable / object with
            ``predict_on_batch`` used as it is.
        plan_json: the inference plan as JSON.
        calibration: the plan's int8 calibration inputs
            (:meth:`~mitoseg.inference.plan.InferencePlan.calibration_images`; its JSON does not
            hold them), so every worker compiles the engine the plan was decided with.
    """

    def __init__(
        self, model: bytes | Any, plan_json: str, calibration: np.ndarray | None = None
    ) -> None:
        self.model = model
        self.plan_json = plan_json
        self.calibration = calibration
        self.predict_batch: Callable[[np.ndarray], np.ndarray] | None = None
        self.loads = 0
        #: volumes opened on this worker, by source and voxel size (opened once per job)
        self.volumes: dict[str, Volume] = {}

    def setup(self, worker: Any) -> None:
        """Called once when the plugin reaches a worker: load the model."""
        from mitoseg.inference.predict import as_predict_batch

        plan = InferencePlan.model_validate_json(self.plan_json)
        net = self.model
        if isinstance(net, bytes):
            import keras

            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "model.keras"
                path.write_bytes(net)
                net = keras.models.load_model(path, compile=False)
        if hasattr(net, "predict_on_batch"):
            from mitoseg.inference.runtime import predictor_for_plan

            self.predict_batch = predictor_for_plan(net, plan, calibration=self.calibration)
        else:
            self.predict_batch = as_predict_batch(net)
        self.loads += 1


def _plugin(spec: JobSpec) -> PredictorPlugin:
    """The job's plugin on the worker running the calling task."""
    from distributed import get_worker

    return get_worker().plugins[spec.plugin]


def worker_volume(spec: JobSpec) -> Volume:
    """The job's input volume, opened once per worker (kept by the job's plugin)."""
    volumes = _plugin(spec).volumes
    key = f"{spec.source}|{spec.voxel_size_nm}"
    if key not in volumes:
        volumes[key] = open_volume(spec.source, spec.voxel_size_nm)
    return volumes[key]


def worker_predictor(spec: JobSpec) -> Callable[[np.ndarray], np.ndarray]:
    plugin = _plugin(spec)
    assert plugin.predict_batch is not None
    return plugin.predict_batch


def plugin_loads(name: str, dask_worker: Any = None) -> int:
    """Times the model was loaded on this worker (run on every worker by ``client.run``)."""
    plugin = dask_worker.plugins.get(name) if dask_worker is not None else None
    return int(getattr(plugin, "loads", 0))


def model_payload(model: Any) -> bytes | Any:
    if hasattr(model, "save") and hasattr(model, "predict_on_batch"):
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "model.keras"
            model.save(path)
            return path.read_bytes()
    if callable(model) or hasattr(model, "predict_on_batch"):
        return model
    raise TypeError(
        f"expected a Keras model or a batch-predict callable, got {type(model).__name__}"
    )
