"""Hyperparameter sweeps with Ray Tune over the one training driver (:func:`ulrl.train_loop.run_training`).

[1] Search space, checked before anything starts: ``tune.space`` maps dotted config keys to one distribution
    each, ``{"loss.ul_alpha": {"loguniform": [0.001, 1.0]}, "loss.negatives.k": {"grid": [5, 20]}}``
    (kinds: :data:`KINDS`). Every key is probed with :func:`ulrl.config.apply_overrides` + ``validate``
    (both ends of a range, every listed value), so an unknown key or an out-of-range value fails at parse
    time, naming ``tune.space.<key>``. ``random`` search expands grid keys (each grid point ``num_samples``
    times); ``optuna`` takes ranges and choices only.
[2] Trial (Train V2 pattern): a function trainable is the Train driver. It applies its sampled values with
    ``apply_overrides``, names its Train run ``<tune.name>-<trial id>`` (no timestamp: a restored trial
    resumes its run from the latest checkpoint) and calls ``run_training`` with ``TuneReportCallback``
    (rank-0 metrics + ``checkpoint_path`` to Tune) and :class:`ChildRunTagger`. The trial driver reserves
    ``tune.driver_cpus``; ASHA (``tune.asha``) stops weak trials on ``val_rsum`` by ``epoch``.
[3] Sweep: one MLflow parent run per sweep (tags ``ulrl.role=sweep``, ``ulrl.sweep=<tune.name>``); each
    trial's run (opened by rank 0 of its workers, params = the flattened config, so the sampled values too)
    becomes its child through the ``mlflow.parentRunId`` tag. Tune state lives under
    ``<train storage>/tune/<tune.name>``; re-running the same name restores the sweep (unfinished and
    errored trials continue) and reuses its parent run.
[4] Result table: one row per trial (sampled values, epochs, best ``val_rsum`` and its checkpoint, MLflow
    run id); ``jobs.tune`` adds evaluation columns, writes CSV + plot and registers the best trial.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from typing import Any

import ray
from ray.train import UserCallback

from ulrl.config import ConfigError, JobConfig, apply_overrides, from_dict, to_dict, validate
from ulrl.tracking import RunLogger, experiment_name, prepare_tracking, tag_run

KINDS = ("loguniform", "uniform", "choice", "grid")
"""Distribution kinds of ``tune.space``: ranges ``[low, high]`` or value lists."""
METRIC, MODE = "val_rsum", "max"
"""What Tune, ASHA and the result table rank trials by."""
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
"""Allowed sweep names: they become Tune/Train folder names and appear in MLflow filter strings."""
SWEEP_TAGS = {"ulrl.role": "sweep"}
"""Tags of a sweep's MLflow parent run (plus ``ulrl.sweep``: the sweep name)."""


class SpaceError(ConfigError):
    """A bad ``tune.space`` entry; the message names ``tune.space.<key>``."""


# ----------------------------------------------------------------------------------------- [1] space


@dataclass(frozen=True)
class Dimension:
    """One swept config key: ``kind`` ∈ :data:`KINDS`; ``values`` is ``(low, high)`` or the candidates."""

    key: str
    kind: str
    values: tuple

    @property
    def is_range(self) -> bool:
        return self.kind in ("loguniform", "uniform")

    def probes(self) -> list[Any]:
        """Values that must pass ``apply_overrides`` + ``validate``: both ends of a range (as floats, which
        is what Tune samples, so an int key rejects a range), every listed value."""
        return [float(v) for v in self.values] if self.is_range else list(self.values)

    def domain(self) -> Any:
        """The Tune search-space object."""
        from ray import tune

        if self.kind == "grid":
            return tune.grid_search(list(self.values))
        if self.kind == "choice":
            return tune.choice(list(self.values))
        return getattr(tune, self.kind)(*self.values)


def parse_dimension(key: str, spec: Any) -> Dimension:
    """``{"loguniform": [0.001, 1.0]}`` → :class:`Dimension`; :class:`SpaceError` on any malformed spec."""
    where = f"tune.space.{key}"
    if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in KINDS:
        raise SpaceError(f"{where}: expected one of {{{'|'.join(KINDS)}: [...]}}, got {spec!r}")
    kind, values = next(iter(spec.items()))
    if not isinstance(values, list) or not values:
        raise SpaceError(f"{where}: {kind} needs a non-empty list, got {values!r}")
    if kind in ("loguniform", "uniform"):
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        if len(values) != 2 or not numeric or not values[0] < values[1]:
            raise SpaceError(f"{where}: {kind} needs [low, high] numbers with low < high, got {values!r}")
        if kind == "loguniform" and values[0] <= 0:
            raise SpaceError(f"{where}: loguniform needs low > 0, got {values[0]!r}")
    return Dimension(key, kind, tuple(values))


def parse_space(cfg: JobConfig) -> list[Dimension]:
    """The checked dimensions of ``tune.space`` (see the module docstring, [1])."""
    if not NAME.fullmatch(cfg.tune.name):
        raise ConfigError(f"tune.name: {cfg.tune.name!r} must be letters, digits, '.', '_' or '-' "
                          "(it names folders and runs)")
    if not cfg.tune.space:
        raise SpaceError("tune.space: empty, nothing to sweep (e.g. {loss.ul_alpha: {loguniform: [0.001, 1.0]}})")
    dims = [parse_dimension(key, spec) for key, spec in cfg.tune.space.items()]
    for dim in dims:
        if dim.key.startswith("tune."):
            raise SpaceError(f"tune.space.{dim.key}: sweep settings cannot be swept")
        for value in dim.probes():
            try:
                validate(apply_overrides(cfg, {dim.key: value}))
            except SpaceError:
                raise
            except ConfigError as err:
                raise SpaceError(f"tune.space.{dim.key}: {err}") from None
    if cfg.tune.search_alg == "optuna":
        grid = [dim.key for dim in dims if dim.kind == "grid"]
        if grid:
            raise SpaceError(f"tune.space.{grid[0]}: grid is not supported with tune.search_alg=optuna; use choice")
    if cfg.tune.asha and cfg.tune.grace_period < 1:
        raise ConfigError("tune.grace_period: must be at least 1 epoch")
    return dims


def param_space(dims: list[Dimension]) -> dict[str, Any]:
    """Tune's ``param_space``: flat, keyed by the dotted config keys."""
    return {dim.key: dim.domain() for dim in dims}


def search_algorithm(cfg: JobConfig, concurrency: int = 0) -> Any:
    """Seeded random/grid variant generation, or Optuna's TPE (``tune.search_alg``), running at most
    ``concurrency`` trials at once (0: no limit). The variant generator takes the limit itself (Tune ignores
    ``TuneConfig.max_concurrent_trials`` for it); Optuna gets a ``ConcurrencyLimiter``."""
    if cfg.tune.search_alg == "random":
        from ray.tune.search.basic_variant import BasicVariantGenerator

        return BasicVariantGenerator(max_concurrent=concurrency, random_state=cfg.train.seed)
    try:
        import optuna  # noqa: F401  (Ray's wrapper imports it lazily and fails late)
        from ray.tune.search import ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch
    except ImportError:
        raise ConfigError("tune.search_alg: optuna is not installed (pip install 'ulrl[tune]')") from None
    searcher = OptunaSearch(seed=cfg.train.seed)
    return ConcurrencyLimiter(searcher, max_concurrent=concurrency) if concurrency > 0 else searcher


def scheduler(cfg: JobConfig) -> Any:
    """ASHA on ``val_rsum`` (metric and mode come from the ``TuneConfig``), rungs counted in epochs."""
    if not cfg.tune.asha:
        return None
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(time_attr="epoch", max_t=cfg.train.epochs, grace_period=min(cfg.tune.grace_period,
                                                                                     cfg.train.epochs))


def max_concurrent_trials(cfg: JobConfig, cluster: dict[str, float]) -> int:
    """``tune.max_concurrent_trials``, or when 0 how many trials the cluster holds at once: CPUs left after
    the one Ray Data needs over a trial's CPUs (workers × cpus_per_worker + driver), capped by
    GPUs // workers with ``train.use_gpu``; at least 1."""
    if cfg.tune.max_concurrent_trials > 0:
        return cfg.tune.max_concurrent_trials
    from ulrl.raycluster import MIN_FREE_CPUS

    per_trial = cfg.train.num_workers * cfg.train.cpus_per_worker + cfg.tune.driver_cpus
    fits = math.floor((cluster.get("CPU", 0.0) - MIN_FREE_CPUS) / per_trial + 1e-9)
    if cfg.train.use_gpu:
        fits = min(fits, math.floor(cluster.get("GPU", 0.0) / cfg.train.num_workers))
    return max(1, fits)


# ----------------------------------------------------------------------------------------- [2] trial


def trial_run_name(sweep: str, trial_id: str) -> str:
    """Train run (and MLflow child run) name of a trial; stable across restores."""
    return f"{sweep}-{trial_id}"


def run_trial(params: dict[str, Any], base: dict[str, Any], parent_run_id: str) -> None:
    """Tune function trainable: train ``base`` (``to_dict`` of a resolved config) with ``params`` applied."""
    from ray.tune.integration.ray_train import TuneReportCallback

    from ulrl.train_loop import run_training

    trial_id = ray.tune.get_context().get_trial_id()
    cfg = apply_overrides(from_dict(base), params)
    callbacks = [TuneReportCallback()]
    if parent_run_id:  # first: the run is tagged before Tune sees the report (and may stop the trial)
        tags = {"mlflow.parentRunId": parent_run_id, "ulrl.sweep": cfg.tune.name, "ulrl.trial_id": trial_id}
        callbacks.insert(0, ChildRunTagger(cfg, tags))
    run_training(cfg, callbacks=callbacks, run_name=trial_run_name(cfg.tune.name, trial_id))


class ChildRunTagger(UserCallback):
    """Train callback (runs in the Train controller): after the first checkpointed report, reads the
    MLflow run id that rank 0 stored in the checkpoint and tags that run (``mlflow.parentRunId`` …)."""

    def __init__(self, cfg: JobConfig, tags: dict[str, str]):
        self.cfg, self.tags, self.tagged = cfg, tags, ""

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        if checkpoint is None:
            return
        from ulrl.checkpoint import CheckpointReader

        run_id = CheckpointReader(checkpoint).state().mlflow_run_id
        if run_id and run_id != self.tagged:
            tag_run(self.cfg, run_id, self.tags)
            self.tagged = run_id


# ----------------------------------------------------------------------------------------- [3] sweep


def tune_storage(cfg: JobConfig) -> tuple[str, Any]:
    """``(storage_path, storage_filesystem)`` of the Tuner: ``<train storage>/tune``."""
    from ulrl.checkpoint import run_storage

    path, filesystem = run_storage(cfg)
    return f"{path.rstrip('/')}/tune", filesystem


def prepare_sweep(cfg: JobConfig) -> tuple[JobConfig, list[Dimension]]:
    """Checked space, then absolute paths and tracking URI (trials run in their own directories)."""
    from ulrl.train_loop import resolve_paths

    dims = parse_space(cfg)
    search_algorithm(cfg)  # fails here, before Ray starts, when optuna is missing
    return prepare_tracking(resolve_paths(cfg)), dims


def parent_run(cfg: JobConfig, reuse: bool) -> str:
    """Id of the sweep's MLflow parent run: the latest one of ``tune.name`` when ``reuse`` (a restored
    sweep), else a new run logging the sweep's config. Empty when tracking is off."""
    if not cfg.tracking.enabled:
        return ""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=cfg.tracking.uri)
    experiment = client.get_experiment_by_name(experiment_name(cfg)).experiment_id
    if reuse:
        query = f"tags.`ulrl.sweep` = '{cfg.tune.name}' and tags.`ulrl.role` = 'sweep'"
        found = client.search_runs([experiment], query, order_by=["attributes.start_time DESC"], max_results=1)
        if found:
            client.update_run(found[0].info.run_id, status="RUNNING")
            return found[0].info.run_id
    run = client.create_run(experiment, run_name=cfg.tune.name, tags={**SWEEP_TAGS, "ulrl.sweep": cfg.tune.name})
    RunLogger(client, run.info.run_id).log_config(cfg)
    return run.info.run_id


def build_tuner(cfg: JobConfig, dims: list[Dimension], parent_run_id: str, restore: bool) -> Any:
    """A new Tuner, or with ``restore`` the one saved under ``<tune storage>/<tune.name>`` (its unfinished and
    errored trials continue; finished ones keep their results)."""
    from ray import tune

    trainable = tune.with_resources(
        tune.with_parameters(run_trial, base=to_dict(cfg), parent_run_id=parent_run_id),
        {"cpu": cfg.tune.driver_cpus},
    )
    path, filesystem = tune_storage(cfg)
    if restore:
        return tune.Tuner.restore(f"{path}/{cfg.tune.name}", trainable=trainable, resume_errored=True,
                                  storage_filesystem=filesystem)  # fmt: skip
    return tune.Tuner(
        trainable,
        param_space=param_space(dims),
        tune_config=tune.TuneConfig(
            metric=METRIC, mode=MODE, num_samples=cfg.tune.num_samples, scheduler=scheduler(cfg),
            search_alg=search_algorithm(cfg, max_concurrent_trials(cfg, ray.cluster_resources())),
        ),  # fmt: skip
        run_config=tune.RunConfig(name=cfg.tune.name, storage_path=path, storage_filesystem=filesystem,
                                  failure_config=tune.FailureConfig(max_failures=0), verbose=1),  # fmt: skip
    )


def sweep_exists(cfg: JobConfig) -> bool:
    """Whether ``tune.name`` already has restorable Tune state (a re-run restores it)."""
    from ray import tune

    path, filesystem = tune_storage(cfg)
    return tune.Tuner.can_restore(f"{path}/{cfg.tune.name}", storage_filesystem=filesystem)


@dataclass(frozen=True)
class Sweep:
    """A finished sweep: the resolved config, its dimensions, the parent run and the ranked table."""

    cfg: JobConfig
    dims: list[Dimension]
    parent_run_id: str
    rows: list[dict[str, Any]]
    restored: bool


def run_sweep(cfg: JobConfig) -> Sweep:
    """Check everything, connect to Ray, run (or restore) the sweep and build its ranked result table.
    Raises :class:`ConfigError`, ``StoreError`` or ``ResourceError`` before any trial starts."""
    from ulrl.raycluster import check_resources, connect
    from ulrl.store import open_store
    from ulrl.train_loop import check_data

    cfg, dims = prepare_sweep(cfg)
    check_data(cfg, open_store(cfg.store.uri).manifest)
    connect(cfg.ray)
    check_resources(cfg.train, ray.cluster_resources())
    restore = sweep_exists(cfg)
    parent_run_id = parent_run(cfg, reuse=restore)
    grid = build_tuner(cfg, dims, parent_run_id, restore).fit()
    storage_uri = cfg.train.storage_uri or cfg.store.uri
    rows = ranked_rows([trial_row(result, dims, storage_uri) for result in grid])
    rows = close_child_runs(cfg, parent_run_id, rows)
    return Sweep(cfg, dims, parent_run_id, rows, restore)


def close_child_runs(cfg: JobConfig, parent_run_id: str, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Add each trial's MLflow run id to its row, and end the runs of trials that Tune stopped (ASHA kills the
    trial, so rank 0 never ends its run): status KILLED, tag ``ulrl.stopped_by=scheduler``."""
    if not parent_run_id:
        return [{**row, "mlflow_run_id": ""} for row in rows]
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=cfg.tracking.uri)
    experiment = client.get_experiment_by_name(experiment_name(cfg)).experiment_id
    children = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{parent_run_id}'", max_results=10_000)
    by_trial = {run.data.tags.get("ulrl.trial_id"): run for run in children}
    for run in children:
        if run.info.status == "RUNNING":
            client.set_tag(run.info.run_id, "ulrl.stopped_by", "scheduler")
            client.set_terminated(run.info.run_id, status="KILLED")
    return [{**row, "mlflow_run_id": by_trial[row["trial_id"]].info.run_id if row["trial_id"] in by_trial else ""}
            for row in rows]  # fmt: skip


# ----------------------------------------------------------------------------------------- [4] table


def checkpoint_location(path: str, storage_uri: str) -> str:
    """URI of a ``checkpoint_path`` reported by ``TuneReportCallback`` (a path within the storage's
    filesystem: ``bucket/key`` on S3)."""
    if storage_uri.startswith("s3://") and not path.startswith("s3://"):
        return f"s3://{path}"
    return path


def trial_row(result: Any, dims: list[Dimension], storage_uri: str) -> dict[str, Any]:
    """One table row from a Tune ``Result``: trial id, sampled values, status, wall seconds, epochs run and the
    best report by ``val_rsum`` (its epoch, concept recall and checkpoint URI)."""
    metrics = result.metrics or {}
    row: dict[str, Any] = {"trial_id": metrics.get("trial_id") or os.path.basename(str(result.path))}
    row.update({dim.key: (result.config or {}).get(dim.key) for dim in dims})
    row["status"] = "ERROR" if result.error else "TERMINATED"
    row["seconds"] = float(metrics.get("time_total_s", float("nan")))
    history = result.metrics_dataframe
    if history is None or METRIC not in history or history[METRIC].isna().all():
        return {**row, "epochs": 0, "best_val_rsum": float("nan"), "best_epoch": 0, "checkpoint": ""}
    best = history.loc[history[METRIC].idxmax()]
    row.update(epochs=int(history["epoch"].max()), best_val_rsum=float(best[METRIC]), best_epoch=int(best["epoch"]),
               best_val_concept_recall=float(best.get("val_concept_recall", float("nan"))),
               checkpoint=checkpoint_location(str(best.get("checkpoint_path") or ""), storage_uri))  # fmt: skip
    return row


def ranked_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows best first by ``best_val_rsum`` (NaN last), with a 1-based ``rank``."""
    def score(row: dict[str, Any]) -> float:
        return -math.inf if math.isnan(row["best_val_rsum"]) else row["best_val_rsum"]

    ordered = sorted(rows, key=lambda row: (-score(row), row["trial_id"]))
    return [{"rank": i + 1, **row} for i, row in enumerate(ordered)]
