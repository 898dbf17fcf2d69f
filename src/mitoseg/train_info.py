"""``train.json``: what the train stage hands to evaluate and register.

Written by ``pipelines/train.py`` (:meth:`TrainInfo.write`), read by ``pipelines/evaluate.py``
and ``pipelines/register.py`` (:meth:`TrainInfo.read`), so both readers accept and reject
the same files with the same messages. Light module: pydantic only, no TensorFlow.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from mitoseg.io import DataError, read_json_object, write_json

__all__ = ["TRAIN_INFO_FILE", "TrainInfo"]

#: File name of the hand-off in the train stage's output directory.
TRAIN_INFO_FILE = "train.json"


class TrainInfo(BaseModel):
    """The train stage's outcome (``artifacts/train/train.json``).

    Attributes:
        run_id: MLflow run holding the logged model (``runs:/<run_id>/model``).
        experiment_id: its MLflow experiment.
        model_path: the best model, ``<out>/model.keras``.
        best_epoch: 1-based epoch of the saved model.
        epochs_run: epochs in the history (a resumed run's earlier epochs included).
        train_seconds: wall-clock seconds of training.
        patches_per_second: training throughput.
        params: the resolved ``train`` config (``TrainConfig.model_dump(mode="json")``).
        n_classes: classes including background.
        class_names: class names in index order (``n_classes`` of them).
        resumed: continued from a backup of an interrupted run.
        stop_reason: ``completed``, ``early_stopping`` or ``time_budget``.
        run_key: name of the run's backup directory.
        init_from: model URI the weights were initialised from, or None.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    run_id: str = Field(min_length=1)
    experiment_id: str = Field(min_length=1)
    model_path: str = Field(min_length=1)
    best_epoch: int = Field(ge=0)
    epochs_run: int = Field(ge=0)
    train_seconds: float = Field(ge=0)
    patches_per_second: float = Field(ge=0)
    params: dict[str, Any]
    n_classes: int = Field(ge=2)
    class_names: list[str]
    resumed: bool
    stop_reason: str = Field(min_length=1)
    run_key: str = Field(min_length=1)
    init_from: str | None

    @model_validator(mode="after")
    def _names_match_classes(self) -> TrainInfo:
        if len(self.class_names) != self.n_classes:
            raise ValueError(f"{len(self.class_names)} class_names for n_classes={self.n_classes}")
        return self

    def write(self, path: str | Path) -> Path:
        """Write as indented JSON, atomically; returns ``path``."""
        write_json(path, self.model_dump(mode="json"))
        return Path(path)

    @classmethod
    def read(cls, path: str | Path) -> TrainInfo:
        """Read and validate a ``train.json``.

        Raises:
            DataError: missing file, not JSON, not an object, or invalid / missing /
                unknown fields; the message names the file and each field, e.g.
                ``train.json: missing 'run_id'``.
        """
        data = read_json_object(path, "train info")
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            parts = []
            for err in exc.errors():
                loc = ".".join(str(x) for x in err["loc"])
                if err["type"] == "missing":
                    parts.append(f"missing {loc!r}")
                else:
                    msg = str(err["msg"]).removeprefix("Value error, ")
                    parts.append(f"{loc}: {msg}" if loc else msg)
            raise DataError(f"{path}: " + "; ".join(parts)) from None
