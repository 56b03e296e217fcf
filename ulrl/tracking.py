"""MLflow tracking of training runs: the driver prepares, rank 0 of the Train workers logs.

Driver (:func:`prepare_tracking`): resolves a relative ``sqlite:///`` URI to an absolute one (Train V2
chdirs every worker into its run directory, so a relative path would open a different database) and creates
the experiment once, before any worker starts (concurrent creation races). A new experiment keeps its
artifacts at ``<store uri>/mlflow`` (:func:`artifact_location`); on S3 the endpoint comes from
``MLFLOW_S3_ENDPOINT_URL``.

Worker (:class:`RunLogger`): rank 0 opens one MLflow run per Train run, named like it (``train.name``, or the
Tune trial's name), logs the flattened config as params and the resolved YAML as an artifact, then per-epoch
and per-``log_every``-step metrics. A resumed run (a re-run of the name, or a restart after a worker failure)
passes the run id stored in its checkpoint and keeps logging to the same run; a failure before the first
checkpoint leaves that attempt's run marked FAILED (when the worker could still say so) and the restart opens
a new one. Other ranks (and ``tracking.enabled: false``) get :class:`NullLogger`. The config holds no
credentials; keep it so, since all of it becomes params.
"""

from __future__ import annotations

import os
import time
from typing import Any

from ulrl.config import JobConfig, apply_overrides, to_flat_dict, to_yaml

SQLITE_PREFIX = "sqlite:///"


def resolve_tracking_uri(uri: str, cwd: str | None = None) -> str:
    """``sqlite:///mlflow.db`` → ``sqlite:////abs/cwd/mlflow.db``; absolute and non-sqlite URIs unchanged."""
    if uri.startswith(SQLITE_PREFIX) and not uri[len(SQLITE_PREFIX):].startswith("/"):
        path = os.path.abspath(os.path.join(cwd or os.getcwd(), uri[len(SQLITE_PREFIX):]))
        return SQLITE_PREFIX + path
    return uri


def experiment_name(cfg: JobConfig) -> str:
    return cfg.tracking.experiment or f"ulrl-{cfg.data.source}"


def artifact_location(cfg: JobConfig) -> str | None:
    """Where a new experiment keeps its artifacts: ``<store uri>/mlflow`` for an S3 store, and for a local
    store tracked in sqlite (rather than ``./mlruns`` of whichever directory the driver ran in); None (the
    tracking server decides) otherwise."""
    uri = cfg.store.uri.rstrip("/")
    if uri.startswith("s3://"):
        return f"{uri}/mlflow"
    if "://" not in uri and cfg.tracking.uri.startswith(SQLITE_PREFIX):
        return os.path.join(os.path.abspath(uri), "mlflow")
    return None


def prepare_tracking(cfg: JobConfig) -> JobConfig:
    """Driver side: absolute tracking URI and explicit experiment name in the returned config, and the
    experiment created if missing. No-op when tracking is disabled."""
    if not cfg.tracking.enabled:
        return cfg
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    uri, name = resolve_tracking_uri(cfg.tracking.uri), experiment_name(cfg)
    client = MlflowClient(tracking_uri=uri)
    if client.get_experiment_by_name(name) is None:
        try:
            client.create_experiment(name, artifact_location=artifact_location(cfg))
        except MlflowException:  # created concurrently (e.g. by another Tune trial): fine if it now exists
            if client.get_experiment_by_name(name) is None:
                raise
    return apply_overrides(cfg, {"tracking.uri": uri, "tracking.experiment": name})


class NullLogger:
    """The logger of ranks ≠ 0 and of untracked runs: accepts everything, does nothing."""

    run_id = ""
    active = False
    """Whether anything is recorded: callers skip host syncs that would only feed a NullLogger."""

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def set_tags(self, tags: dict[str, str]) -> None:
        pass

    def finish(self, status: str = "FINISHED") -> None:
        pass


class RunLogger(NullLogger):
    """One MLflow run, written through ``MlflowClient`` (no global active-run state in the worker)."""

    active = True

    def __init__(self, client: Any, run_id: str):
        self.client, self.run_id = client, run_id

    @classmethod
    def open(cls, cfg: JobConfig, run_name: str, run_id: str = "", tags: dict[str, str] | None = None
             ) -> RunLogger:
        """Continue ``run_id`` if given, else create a run and log the config as params and YAML artifact."""
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=resolve_tracking_uri(cfg.tracking.uri))
        if run_id:
            client.update_run(run_id, status="RUNNING")
            return cls(client, run_id)
        experiment = client.get_experiment_by_name(experiment_name(cfg))
        if experiment is None:
            raise RuntimeError(f"MLflow experiment '{experiment_name(cfg)}' missing: call prepare_tracking first")
        run = client.create_run(experiment.experiment_id, run_name=run_name, tags=tags or {})
        logger = cls(client, run.info.run_id)
        logger.log_config(cfg)
        return logger

    def log_config(self, cfg: JobConfig) -> None:
        from mlflow.entities import Param

        params = [Param(key, str(value)) for key, value in sorted(to_flat_dict(cfg).items())]
        for start in range(0, len(params), 100):  # MLflow accepts at most 100 params per batch
            self.client.log_batch(self.run_id, params=params[start:start + 100])
        self.client.log_text(self.run_id, to_yaml(cfg), "config.yaml")

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        entries = [Metric(key, float(value), now, step) for key, value in metrics.items()]
        self.client.log_batch(self.run_id, metrics=entries)

    def set_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(key, str(value)) for key, value in tags.items()])

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)


def open_logger(cfg: JobConfig, rank: int, run_name: str, run_id: str = "",
                tags: dict[str, str] | None = None) -> NullLogger:
    """:class:`RunLogger` on rank 0 when tracking is enabled, :class:`NullLogger` elsewhere."""
    if rank != 0 or not cfg.tracking.enabled:
        return NullLogger()
    return RunLogger.open(cfg, run_name, run_id, tags)


def tag_run(cfg: JobConfig, run_id: str, tags: dict[str, str]) -> None:
    """Driver side: add tags to a finished run (e.g. the best checkpoint's URI)."""
    if cfg.tracking.enabled and run_id:
        from mlflow import MlflowClient


        client = MlflowClient(tracking_uri=resolve_tracking_uri(cfg.tracking.uri))
        RunLogger(client, run_id).set_tags(tags)
