"""Training state, the paper's learning-rate schedule, and checkpoint directories (no Ray import).

A checkpoint is a directory, local or on S3 (Ray Train persists it under ``<storage>/<run name>/``)::

    model.pt              state_dict of the unwrapped model (never the DDP wrapper)
    optimizer.pt          Adam state_dict
    scheduler/state.json  TrainState: epochs done, next lr, best score, counters, MLflow run id
    config.yaml           the resolved JobConfig the run trained with
    model_meta.json       ModelDims (+ store URI) so the model can be rebuilt without the store

Everything loads with ``torch.load(..., weights_only=True)``: no pickled code runs on load.

RNG: nothing random is saved. Every epoch reseeds torch and the negative-sampling generator from
``(train.seed, epoch, rank)`` and the data order is a function of ``(train.seed, epoch)``, so a run resumed at
epoch e replays epoch e exactly as an uninterrupted run would.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import torch
import yaml

from ulrl.config import JobConfig, TrainConfig, from_dict, to_yaml, validate
from ulrl.model import ITVModel, ModelDims, build_model
from ulrl.store import resolve_uri

PLATEAU_MIN_EPOCHS = 3
"""The plateau cut needs the current lr to have been used this many epochs (reference ``lr_counter > 2``)."""
FILES = ("model.pt", "optimizer.pt", "scheduler/state.json", "config.yaml", "model_meta.json")


class CheckpointError(ValueError):
    """A checkpoint directory is missing a file or holds something unreadable; the message names it."""


@dataclass(frozen=True)
class TrainState:
    """Everything besides weights that a resumed run needs; saved as ``scheduler/state.json``."""

    epoch: int
    """Epochs completed; the next epoch to run has this index."""
    lr: float
    """Learning rate of the next epoch."""
    best_score: float | None = None
    """Best validation score (val_rsum) so far; None before the first validation."""
    bad_epochs: int = 0
    """Consecutive epochs without a new best score."""
    epochs_at_lr: int = 0
    """Epochs since the last plateau cut (or since the start)."""
    global_step: int = 0
    """Optimizer steps taken."""
    stopped: bool = False
    """Early stopping fired; a resumed run trains no further."""
    mlflow_run_id: str = ""
    """MLflow run that a resumed run keeps logging to."""

    @classmethod
    def initial(cls, train: TrainConfig) -> TrainState:
        return cls(epoch=0, lr=train.lr)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> TrainState:
        data = json.loads(text)
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def after_epoch(state: TrainState, score: float, steps: int, train: TrainConfig) -> TrainState:
    """The schedule of the reference code after an epoch with validation ``score`` (higher is better).

    1. lr ← lr · ``lr_decay`` every epoch;
    2. when the score is not a new best and the current lr has been in use for ≥ ``PLATEAU_MIN_EPOCHS``
       epochs: lr ← lr · ``plateau_factor`` and that count restarts;
    3. early stop once ``bad_epochs > patience`` (the reference stops after more than 2 consecutive
       non-improving epochs with its patience 2); ``patience = 0`` never stops.

    A NaN score never improves.
    """
    improved = not math.isnan(score) and (state.best_score is None or score > state.best_score)
    bad_epochs = 0 if improved else state.bad_epochs + 1
    epochs_at_lr = state.epochs_at_lr + 1
    lr = state.lr * train.lr_decay
    if not improved and epochs_at_lr >= PLATEAU_MIN_EPOCHS:
        lr, epochs_at_lr = lr * train.plateau_factor, 0
    return dataclasses.replace(
        state,
        epoch=state.epoch + 1,
        lr=lr,
        best_score=score if improved else state.best_score,
        bad_epochs=bad_epochs,
        epochs_at_lr=epochs_at_lr,
        global_step=state.global_step + steps,
        stopped=train.patience > 0 and bad_epochs > train.patience,
    )


# ------------------------------------------------------------------------------------------ writing


def save_checkpoint(directory: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                    state: TrainState, cfg: JobConfig, dims: ModelDims) -> Path:
    """Write the five checkpoint files into ``directory`` (created); returns it."""
    directory = Path(directory)
    (directory / "scheduler").mkdir(parents=True, exist_ok=True)
    unwrapped = getattr(model, "module", model)  # DDP wraps only when world_size > 1
    torch.save(unwrapped.state_dict(), directory / "model.pt")
    if optimizer is not None:
        torch.save(optimizer.state_dict(), directory / "optimizer.pt")
    (directory / "scheduler" / "state.json").write_text(state.to_json())
    (directory / "config.yaml").write_text(to_yaml(cfg))
    meta = {"format": 1, "dims": dims.to_dict(), "store_uri": cfg.store.uri, "torch": torch.__version__}
    (directory / "model_meta.json").write_text(json.dumps(meta, indent=1))
    return directory


# ------------------------------------------------------------------------------------------ reading


class CheckpointReader:
    """Read the files of a checkpoint directory given as a local path, a URI (``s3://...``), or a Ray
    ``Checkpoint`` (anything with ``.path`` and ``.filesystem``)."""

    def __init__(self, location: Any):
        if hasattr(location, "filesystem") and hasattr(location, "path"):
            self.filesystem, self.root = location.filesystem, str(location.path).rstrip("/")
        else:
            self.filesystem, self.root = resolve_uri(str(location))
        self.location = str(location) if "://" in str(location) else self.root

    def read_bytes(self, name: str) -> bytes:
        try:
            with self.filesystem.open_input_stream(f"{self.root}/{name}") as stream:
                return stream.read()
        except FileNotFoundError:
            raise CheckpointError(f"{self.location}: no {name} (not a ulrl checkpoint?)") from None

    def read_text(self, name: str) -> str:
        return self.read_bytes(name).decode("utf-8")

    def tensors(self, name: str, map_location: str | torch.device = "cpu") -> dict[str, Any]:
        """``torch.load`` of a state dict with ``weights_only=True``."""
        return torch.load(io.BytesIO(self.read_bytes(name)), map_location=map_location, weights_only=True)

    def config(self) -> JobConfig:
        try:
            cfg = from_dict(yaml.safe_load(self.read_text("config.yaml")) or {})
        except ValueError as err:
            raise CheckpointError(f"{self.location}/config.yaml: {err}") from None
        validate(cfg)
        return cfg

    def dims(self) -> ModelDims:
        meta = json.loads(self.read_text("model_meta.json"))
        return ModelDims.from_manifest(meta["dims"])

    def state(self) -> TrainState:
        return TrainState.from_json(self.read_text("scheduler/state.json"))


def load_model_from_checkpoint(location: Any, map_location: str | torch.device = "cpu"
                               ) -> tuple[ITVModel, JobConfig, ModelDims]:
    """Rebuild the trained model from a checkpoint directory/URI/Ray Checkpoint, in ``eval()`` mode.

    Returns ``(model, cfg, dims)``: ``cfg`` is the config the run trained with (its ``store.uri`` locates
    the concept bank and vocabulary); ``dims`` the model's data dimensions.
    """
    reader = CheckpointReader(location)
    cfg, dims = reader.config(), reader.dims()
    model = build_model(cfg.model, dims)
    try:
        model.load_state_dict(reader.tensors("model.pt", map_location))
    except RuntimeError as err:
        raise CheckpointError(f"{reader.location}/model.pt does not fit its config: {err}") from None
    return model.to(map_location).eval(), cfg, dims


def checkpoint_uri(checkpoint: Any) -> str:
    """A URI for a Ray ``Checkpoint``: ``s3://bucket/...`` on S3, the local path otherwise."""
    filesystem = getattr(checkpoint, "filesystem", None)
    path = str(checkpoint.path)
    if filesystem is not None and filesystem.type_name == "s3" and not path.startswith("s3://"):
        return f"s3://{path}"
    return path


def run_storage(cfg: JobConfig) -> tuple[str, pafs.FileSystem | None]:
    """Where Ray Train keeps a run's checkpoints, as ``RunConfig(storage_path, storage_filesystem)``:
    ``train.storage_uri``, else ``<store.uri>/runs``. On S3 the path loses its scheme and an explicit
    filesystem carries the endpoint (``AWS_ENDPOINT_URL``) to every process; credentials stay with each
    process's AWS chain."""
    uri = cfg.train.storage_uri or f"{cfg.store.uri.rstrip('/')}/runs"
    if "://" not in uri:
        return uri, None
    filesystem, path = resolve_uri(uri)
    return path, filesystem
