"""The whole system in one command: prepare moving digits, train on 2 local workers, evaluate, register, search.

    python -m jobs.demo                                   # jobs/configs/digits.yaml, about 5 minutes on 2 cores
    python -m jobs.demo --config jobs/configs/tiny.yaml   # seconds to a minute, a smoke test
    python -m jobs.demo --workdir outputs/demo-short train.epochs=2

Everything goes to ``--workdir`` (default ``outputs/demo``): the store, the training runs, the MLflow database
and artifacts, the evaluation outputs. The folder is the demo's own: it is emptied first (a folder that is not
empty and was not made by the demo is refused). The printed figures are read back from the evaluation's
MLflow run, so they are what MLflow holds. ``key=value`` overrides apply after the demo's own paths.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path
from typing import Any

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "digits.yaml"
MARKER = ".ulrl-demo"
"""File that marks a folder as the demo's, so that it may be emptied."""


class DemoError(RuntimeError):
    """The demo cannot start (work folder not ours) or a stage failed."""


def stage(message: str) -> None:
    print(f"\n[demo] ── {message}", flush=True)


def fresh_workdir(workdir: Path) -> Path:
    """Empty ``workdir`` (only if it is the demo's or empty) and mark it; returns its absolute path."""
    workdir = workdir.expanduser().absolute()
    if workdir.exists() and any(workdir.iterdir()):
        if not (workdir / MARKER).is_file():
            raise DemoError(f"{workdir} is not empty and was not made by the demo: choose another --workdir")
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / MARKER).write_text("made by python -m jobs.demo; emptied on every run\n")
    return workdir


def demo_overrides(workdir: Path) -> list[str]:
    """Where the demo puts everything (user overrides come after and win)."""
    return [f"store.uri={workdir / 'store'}", "store.overwrite=true", f"train.storage_uri={workdir / 'runs'}",
            f"tracking.uri=sqlite:///{workdir / 'mlflow.db'}", f"eval.output_dir={workdir / 'eval'}",
            "registry.promote=always"]  # fmt: skip


def create_experiment(cfg: Any, workdir: Path) -> None:
    """The experiment with its artifacts in the work folder (MLflow's default is ./mlruns of the caller)."""
    from mlflow import MlflowClient

    from ulrl.tracking import experiment_name, resolve_tracking_uri

    client = MlflowClient(tracking_uri=resolve_tracking_uri(cfg.tracking.uri))
    if client.get_experiment_by_name(experiment_name(cfg)) is None:
        client.create_experiment(experiment_name(cfg), artifact_location=str(workdir / "mlartifacts"))


def mlflow_metrics(cfg: Any, run_id: str) -> dict[str, float]:
    from mlflow import MlflowClient

    from ulrl.tracking import resolve_tracking_uri

    return dict(MlflowClient(tracking_uri=resolve_tracking_uri(cfg.tracking.uri)).get_run(run_id).data.metrics)


def sample_query(cfg: Any) -> str:
    """The first AVS query of the evaluated split, or a fixed one when it has none."""
    from ulrl.store import open_store

    store = open_store(cfg.store.uri)
    if cfg.eval.split in store.manifest.get("query_splits", []):
        return str(store.read_table(cfg.eval.split, "queries", ["text"])["text"][0])
    return "a big four moving upward"


def run(config: str, overrides: list[str], workdir: Path) -> dict[str, Any]:
    """All stages; returns the figures printed (the MLflow run's metrics), the run id and stage times."""
    from jobs.evaluate import summary
    from jobs.prepare import main as prepare_main
    from jobs.search import print_answers, run_search
    from ulrl.config import load_config
    from ulrl.evaluate import evaluate
    from ulrl.raycluster import connect
    from ulrl.train_loop import run_training

    argv = [*demo_overrides(workdir), *overrides]
    cfg = load_config(config, argv)
    times, start = {}, time.perf_counter()
    stage(f"1/4 prepare {cfg.data.source} → {cfg.store.uri}")
    prepare_main(["--config", config, *argv])
    times["prepare"] = time.perf_counter() - start
    stage(f"2/4 train '{cfg.train.name}' on {cfg.train.num_workers} workers for up to {cfg.train.epochs} epochs")
    connect(cfg.ray)
    create_experiment(cfg, workdir)
    run_training(cfg)
    times["train"] = time.perf_counter() - start - sum(times.values())
    stage(f"3/4 evaluate on split '{cfg.eval.split}' and register '{cfg.registry.model_name}@{cfg.registry.alias}'")
    result = evaluate(cfg)
    times["evaluate"] = time.perf_counter() - start - sum(times.values())
    figures = mlflow_metrics(cfg, result.run_id)
    print(f"\n[demo] figures of MLflow run {result.run_id} (split '{cfg.eval.split}'):\n{summary(figures)}", flush=True)
    stage("4/4 search with the registered model")
    answers, header = run_search(cfg, [sample_query(cfg)], top_k=5)
    print_answers(answers, header)
    times["search"] = time.perf_counter() - start - sum(times.values())
    spent = ", ".join(f"{stage_name} {seconds:.0f}s" for stage_name, seconds in times.items())
    print(f"\n[demo] times: {spent}; total {sum(times.values()):.0f}s", flush=True)
    return {"figures": figures, "run_id": result.run_id, "times": times, "tracking_uri": cfg.tracking.uri}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m jobs.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML config (default: digits.yaml)")
    parser.add_argument("--workdir", default="outputs/demo", help="the demo's own folder (emptied first)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from ulrl.config import ConfigError
    from ulrl.evaluate import EvaluationError
    from ulrl.store import StoreError

    args = parse_args(argv)
    try:
        run(args.config, args.overrides, fresh_workdir(Path(args.workdir)))
    except (DemoError, ConfigError, StoreError, EvaluationError) as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    except SystemExit as err:  # a stage's own CLI reported a bad input and exited
        return int(err.code or 2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
