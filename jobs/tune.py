"""Sweep training hyperparameters with Ray Tune; table and plot to MLflow; the best trial evaluated and registered.

    python -m jobs.tune --config jobs/configs/sweep-digits.yaml [key=value ...]
    ray job submit --working-dir . -- python -m jobs.tune --config jobs/configs/sweep-digits.yaml

[1] Run the sweep of ``tune.space`` (:func:`ulrl.tune.run_sweep`); re-running the same ``tune.name`` restores
    it. [2] With ``tune.eval_trials``, every trial's best checkpoint is evaluated on the val split (concept
    decoding mAP, contradiction rate; no MLflow run, no registration). [3] The best trial (by ``val_rsum``) is
    evaluated on ``eval.split`` by :func:`ulrl.evaluate.evaluate`: its own MLflow run, a registered version,
    alias ``registry.alias`` moved only when it beats the holder (``registry.promote``). [4] The ranked table
    (``sweep.csv``, ``sweep.md``) and ``sweep.png`` go to ``<eval.output_dir>/<tune.name>/`` and onto the
    sweep's MLflow parent run, which then ends. Bad input prints one ``error:`` line and exits with status 2.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import math
import sys
import time
from pathlib import Path
from typing import Any

from jobs._cli import job_parser
from ulrl.config import ConfigError, JobConfig, apply_overrides, load_config

VAL_KEYS = ("concept_map_caption", "concept_map_true", "concept_map_unmentioned", "contradiction_rate_video",
            "contradiction_rate_caption")  # fmt: skip
"""Evaluation figures of each trial's best checkpoint on the val split, as ``val_<key>`` table columns."""
TEST_KEYS = ("rsum", "avs_map_fused", *VAL_KEYS)
"""Figures of the best trial on ``eval.split``, logged on the parent run as ``best_<split>_<key>``."""
PLOTTED = (("best_val_rsum", "best val rsum"), ("val_contradiction_rate_video", "val contradiction rate"),
           ("val_concept_map_unmentioned", "val concept mAP (unmentioned)"))  # fmt: skip
"""Rows of the sweep figure: table column and axis label (columns the table lacks are skipped)."""


def log(message: str) -> None:
    print(f"[tune] {message}", flush=True)


# ------------------------------------------------------------------------------------------ evaluation


def trial_config(sweep_cfg: JobConfig, row: dict[str, Any], keys: list[str],
                 overrides: dict[str, Any] | None = None) -> JobConfig:
    """The trial's config (the sweep's, with the row's sampled ``keys``) plus dotted ``overrides``."""
    return apply_overrides(sweep_cfg, {**{key: row[key] for key in keys}, **(overrides or {})})


def evaluate_on_val(cfg: JobConfig, checkpoint: str) -> dict[str, float]:
    """``val_<key>`` figures (:data:`VAL_KEYS`) of ``checkpoint``: the report of :mod:`ulrl.evaluate` without
    outputs, MLflow run, registration or index, on encodings made in this process (:func:`encode_here`)."""
    from ulrl.evaluate import build_report, load_model_source
    from ulrl.store import open_store

    cfg = apply_overrides(cfg, {"eval.checkpoint": checkpoint, "eval.split": "val"})
    store = open_store(cfg.store.uri)
    source = load_model_source(cfg, store)
    videos, captions = (encode_here(store, "val", kind, source.bundle, cfg.eval.batch_size)
                        for kind in ("videos", "captions"))  # fmt: skip
    report, _, _ = build_report(cfg, store, source, videos, captions)
    values = report["metrics"]
    return {f"val_{key}": _number(values.get(key)) for key in VAL_KEYS if key in values}


def encode_here(store: Any, split: str, kind: str, bundle: Any, batch_size: int) -> Any:
    """:class:`ulrl.evaluate.Encoded` of a small split, encoded by ``ulrl.evaluate.EncodeBatch`` in this process:
    on a validation split, starting Ray Data's encoding actors would take far longer than the encoding."""
    import numpy as np
    import torch

    from ulrl.evaluate import EncodeBatch, Encoded, EvaluationError

    threads = torch.get_num_threads()
    encode = EncodeBatch(bundle, kind)  # sets one torch thread (it is meant for an actor): restored below
    try:
        table = store.read_table(split, kind)
        parts = [encode(table.slice(start, batch_size)) for start in range(0, table.num_rows, batch_size)]
    finally:
        torch.set_num_threads(threads)
    if not parts:
        raise EvaluationError(f"store {store.uri}: split '{split}' has no {kind}")
    cat = {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}
    order = np.lexsort((cat["id"], cat["video_index"]))  # Encoded's contract: rows by (video_index, id)
    return Encoded(cat["id"][order], cat["video_index"][order].astype(np.int64), cat["embedding"][order],
                   cat["concept_probs"][order])  # fmt: skip


def evaluate_best(sweep: Any, row: dict[str, Any]) -> Any:
    """:func:`ulrl.evaluate.evaluate` of the best trial's checkpoint on ``eval.split`` (registers it);
    its outputs go to ``<eval.output_dir>/<tune.name>/best-<split>``."""
    from ulrl.evaluate import evaluate
    from ulrl.tune import trial_run_name

    cfg = sweep.cfg
    keys = [dim.key for dim in sweep.dims]
    best_cfg = trial_config(cfg, row, keys, {
        "eval.checkpoint": row["checkpoint"], "train.name": trial_run_name(cfg.tune.name, row["trial_id"]),
        "eval.output_dir": str(Path(cfg.eval.output_dir, cfg.tune.name, f"best-{cfg.eval.split}")),
    })  # fmt: skip
    return evaluate(best_cfg)


def _number(value: Any) -> float:
    return float("nan") if value is None else float(value)


# ------------------------------------------------------------------------------------------ table and plot


def columns(rows: list[dict[str, Any]]) -> list[str]:
    """Every key of ``rows`` in first-seen order."""
    seen: dict[str, None] = {}
    for row in rows:
        seen.update(dict.fromkeys(row))
    return list(seen)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.4g}"
    return "" if value is None else str(value)


def write_table(rows: list[dict[str, Any]], folder: Path) -> list[Path]:
    """``sweep.csv`` (full precision, NaN as empty) and ``sweep.md`` (4 significant digits, without the long
    checkpoint and run-id columns) of the ranked rows; returns both paths."""
    folder.mkdir(parents=True, exist_ok=True)
    names = columns(rows)
    csv_path, md_path = folder / "sweep.csv", folder / "sweep.md"
    with csv_path.open("w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=names)
        writer.writeheader()
        writer.writerows([{k: "" if isinstance(v, float) and math.isnan(v) else v for k, v in r.items()} for r in rows])
    shown = [name for name in names if name not in ("checkpoint", "mlflow_run_id")]
    lines = ["| " + " | ".join(shown) + " |", "|" + "---|" * len(shown)]
    lines += ["| " + " | ".join(_cell(row.get(name)) for name in shown) + " |" for row in rows]
    md_path.write_text("\n".join(lines) + "\n")
    return [csv_path, md_path]


def plot_sweep(path: Path, rows: list[dict[str, Any]], dims: list[Any]) -> Path:
    """One panel per (plotted figure, swept key): each trial's value against its sampled value (log axis for
    log-uniform keys, category positions for choice/grid keys); hollow points are trials that ran fewer epochs
    than the longest (stopped early), the red star is the best trial."""
    import matplotlib

    matplotlib.use("Agg", force=True)  # no display on cluster nodes
    import matplotlib.pyplot as plt

    figures = [(key, label) for key, label in PLOTTED if any(key in row for row in rows)]
    most = max(row.get("epochs", 0) for row in rows)
    finished = [row.get("epochs", 0) == most for row in rows]  # hollow: stopped by ASHA (or early stopping)
    fig, axes = plt.subplots(len(figures), len(dims), figsize=(3.8 * len(dims), 2.9 * len(figures)), squeeze=False)
    for col, dim in enumerate(dims):
        categories = None if dim.is_range else [str(v) for v in dim.values]
        xs = [row[dim.key] if categories is None else categories.index(str(row[dim.key])) for row in rows]
        for line, (key, label) in enumerate(figures):
            ax = axes[line][col]
            _scatter(ax, xs, [row.get(key, float("nan")) for row in rows], finished)
            _x_axis(ax, dim, categories)
            ax.set_xlabel(dim.key)
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _scatter(ax: Any, xs: list[Any], ys: list[float], finished: list[bool]) -> None:
    """Filled points for trials that ran the most epochs, hollow ones for the rest, a star on the best (first)."""
    hollow = {"facecolors": "none", "edgecolors": "tab:blue", "label": "stopped early"}
    styles = {True: {"color": "tab:blue"}, False: hollow}
    for full, style in styles.items():
        points = [(x, y) for x, y, done in zip(xs, ys, finished) if done == full]
        if points:
            ax.scatter([x for x, _ in points], [y for _, y in points], s=28, **style)
    ax.scatter(xs[:1], ys[:1], s=120, marker="*", color="tab:red", label="best trial")  # rows are ranked


def _x_axis(ax: Any, dim: Any, categories: list[str] | None) -> None:
    """The whole swept range (log for log-uniform keys, major labels only), or one tick per category."""
    from matplotlib.ticker import NullFormatter

    if categories is not None:
        ax.set_xticks(range(len(categories)), categories, rotation=30)
        ax.set_xlim(-0.5, len(categories) - 0.5)
        return
    if dim.kind == "loguniform":
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())
    low, high = dim.values
    pad = (math.log10(high / low) if dim.kind == "loguniform" else high - low) * 0.05
    ax.set_xlim(*((low / 10**pad, high * 10**pad) if dim.kind == "loguniform" else (low - pad, high + pad)))


# ------------------------------------------------------------------------------------------ MLflow


def finish_parent(sweep: Any, files: list[Path], best: dict[str, Any], evaluation: Any) -> None:
    """Table and plot as artifacts of the parent run, the best trial's figures as its metrics and tags; the
    run ends FINISHED. The evaluation run is tagged with the sweep (not nested: children are trials)."""
    if not sweep.parent_run_id:
        return
    from mlflow import MlflowClient

    from ulrl.tracking import RunLogger

    cfg, parent = sweep.cfg, RunLogger(MlflowClient(tracking_uri=sweep.cfg.tracking.uri), sweep.parent_run_id)
    for path in files:
        parent.client.log_artifact(parent.run_id, str(path), "sweep")
    metrics = {"best_val_rsum": best["best_val_rsum"], "trials": len(sweep.rows)}
    tags = {"best_trial_id": best["trial_id"], "best_checkpoint": best["checkpoint"],
            "best_run_id": best.get("mlflow_run_id", "")}  # fmt: skip
    if evaluation is not None:
        split, values = cfg.eval.split, evaluation.report["metrics"]
        metrics.update({f"best_{split}_{key}": values[key] for key in TEST_KEYS if values.get(key) is not None})
        tags["evaluation_run_id"] = evaluation.run_id
        if evaluation.registration is not None:
            tags.update(registered_model=evaluation.registration.model_uri,
                        promoted=str(evaluation.registration.promoted))
        if evaluation.run_id:
            RunLogger(parent.client, evaluation.run_id).set_tags({"ulrl.sweep": cfg.tune.name,
                                                                  "ulrl.sweep_run_id": parent.run_id})  # fmt: skip
    parent.log_metrics({k: v for k, v in metrics.items() if not math.isnan(float(v))}, step=0)
    parent.set_tags(tags)
    parent.finish("FINISHED")


# ------------------------------------------------------------------------------------------ job


@dataclasses.dataclass(frozen=True)
class SweepReport:
    sweep: Any
    """The :class:`ulrl.tune.Sweep` (ranked rows with the val columns added)."""
    files: list[Path]
    evaluation: Any
    """The best trial's :class:`ulrl.evaluate.EvalResult`, or None when no trial has a checkpoint."""


def run(cfg: JobConfig) -> SweepReport:
    """[1]–[4] of the module docstring."""
    from ulrl.tune import run_sweep

    started = time.perf_counter()
    sweep = run_sweep(cfg)
    state = "restored" if sweep.restored else "new"
    log(f"{state} sweep '{sweep.cfg.tune.name}': {len(sweep.rows)} trials in {time.perf_counter() - started:.0f}s")
    rows = sweep.rows
    if sweep.cfg.tune.eval_trials:
        keys = [dim.key for dim in sweep.dims]
        rows = [{**row, **(evaluate_on_val(trial_config(sweep.cfg, row, keys), row["checkpoint"])
                           if row["checkpoint"] else {})} for row in rows]  # fmt: skip
        log(f"evaluated every trial on the val split ({time.perf_counter() - started:.0f}s)")
    sweep = dataclasses.replace(sweep, rows=rows)
    folder = Path(sweep.cfg.eval.output_dir, sweep.cfg.tune.name)
    files = write_table(rows, folder) + [plot_sweep(folder / "sweep.png", rows, sweep.dims)]
    best = rows[0]
    evaluation = evaluate_best(sweep, best) if best["checkpoint"] else None
    finish_parent(sweep, files, best, evaluation)
    log(f"done in {time.perf_counter() - started:.0f}s")
    return SweepReport(sweep, files, evaluation)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return job_parser("tune", __doc__).parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from ulrl.checkpoint import CheckpointError
    from ulrl.evaluate import EvaluationError
    from ulrl.raycluster import ResourceError
    from ulrl.registry import RegistryError
    from ulrl.store import StoreError

    args = parse_args(argv)
    try:
        report = run(load_config(args.config, args.overrides))
    except (ConfigError, StoreError, ResourceError, EvaluationError, RegistryError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    print((report.files[1]).read_text(), flush=True)
    registration = report.evaluation.registration if report.evaluation else None
    if registration is not None:
        state = "holds" if registration.promoted else "did not take"
        print(f"best trial registered as {registration.model_uri}; it {state} alias '{registration.alias}'")
    print(f"table and plot: {', '.join(map(str, report.files))}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
