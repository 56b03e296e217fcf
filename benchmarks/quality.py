"""Benchmark 5: retrieval and interpretation quality of the loss variants on moving digits, several seeds.

Every variant trains through the shipped driver (:func:`ulrl.train_loop.run_training`, Ray Train, same data,
same fixed budget of ``epochs``, no early stopping) and its best checkpoint (by ``val_rsum``, the paper's
model selection) is evaluated on the test split by :mod:`benchmarks.quality_eval` (= ``ulrl.evaluate``):

* ``triplet``: matching loss only;  ``likelihood``: + the likelihood loss on both decoders;
* ``ul_0.01`` / ``ul_0.1``: + unlikelihood on WordNet antonyms, α = 0.01 (the paper) and 0.1 (calibration.md);
* ``neg_<strategy>``: + unlikelihood with the best negative sampling of the sweep
  (``benchmarks/results/sweep-digits.csv``, its top-ranked row) or, without a sweep, ``hard`` at α = 0.1.

Significance: per-query AP (fused θ = 0.5, embedding θ = 0, concept θ = 1) and per-video contradiction flags,
each averaged over the seeds, compared pairwise with :func:`benchmarks.stats.compare` (paired randomisation
test and paired t-test).
"""

from __future__ import annotations

import csv
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import RESULTS_DIR, Goal, Record
from benchmarks.quality_eval import FUSED_THETA, evaluate_checkpoint
from benchmarks.stats import compare
from benchmarks.stores import join, remove
from ulrl.config import JobConfig, apply_overrides

SWEEP_CSV = RESULTS_DIR / "sweep-digits.csv"
METRICS = {
    "t2v_r1": "R@1", "t2v_r5": "R@5", "t2v_r10": "R@10", "avs_map_theta_0.00": "AVS AP emb",
    f"avs_map_theta_{FUSED_THETA:.2f}": "AVS AP fused", "avs_map_theta_1.00": "AVS AP concept",
    "concept_map_unmentioned": "concept mAP unmentioned", "contradiction_rate_video": "contradiction rate",
}  # fmt: skip
"""Reported metric key (of ``ulrl.evaluate``'s metrics) → column title."""
BASE_VARIANTS = {
    "triplet": {"loss.likelihood": False, "loss.unlikelihood": False},
    "likelihood": {"loss.likelihood": True, "loss.unlikelihood": False},
    "ul_0.01": {"loss.likelihood": True, "loss.unlikelihood": True, "loss.negatives.strategy": "antonym",
                "loss.ul_alpha": 0.01},
    "ul_0.1": {"loss.likelihood": True, "loss.unlikelihood": True, "loss.negatives.strategy": "antonym",
               "loss.ul_alpha": 0.1},
}  # fmt: skip
MAX_R1_COST = 1.0
"""Brief: unlikelihood may cost at most 1 point of R@1 ..."""
MIN_CONTRADICTION_CUT = 0.5
"""... while at least halving the contradiction rate."""


@dataclass(frozen=True)
class Plan:
    seeds: tuple[int, ...]
    overrides: dict[str, Any]
    """Training budget over the benchmark job (full: none, i.e. digits.yaml's 6 epochs on 2 workers)."""
    variants: tuple[str, ...] = ()
    """Variant names to run; empty = all (the smoke test runs two)."""


PLANS = {"tiny": Plan((0,), {"train.epochs": 1, "train.num_workers": 1}, variants=("likelihood", "ul_0.1")),
         "quick": Plan((0, 1), {"train.epochs": 3, "train.num_workers": 1}),
         "full": Plan((0, 1, 2), {})}  # fmt: skip


def best_negatives(path: Path = SWEEP_CSV) -> tuple[str, dict[str, Any], str]:
    """(variant name, overrides, where they came from): the sweep's top row, else ``hard`` at α = 0.1."""
    fallback = {"loss.likelihood": True, "loss.unlikelihood": True, "loss.negatives.strategy": "hard",
                "loss.ul_alpha": 0.1}  # fmt: skip
    if not path.exists():
        return "neg_hard", fallback, "default (no sweep results)"
    with path.open(newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if row.get("loss.negatives.strategy")]
    if not rows:
        return "neg_hard", fallback, f"default ({path.name} has no loss.negatives.strategy column)"
    top = min(rows, key=_sweep_order)
    overrides = {**fallback, "loss.negatives.strategy": top["loss.negatives.strategy"]}
    for key, kind in (("loss.ul_alpha", float), ("loss.negatives.k", int)):
        if top.get(key) not in (None, ""):
            overrides[key] = kind(float(top[key]))
    return f"neg_{overrides['loss.negatives.strategy']}", overrides, f"{path.name}, top-ranked trial"


def _sweep_order(row: dict[str, str]) -> tuple[float, float]:
    """Sort key of a sweep row: its ``rank`` when present, else the higher ``best_val_rsum`` first."""
    def number(text: str | None, default: float) -> float:
        try:
            value = float(text)
        except (TypeError, ValueError):
            return default
        return default if math.isnan(value) else value

    return number(row.get("rank"), math.inf), -number(row.get("best_val_rsum"), -math.inf)


def variants(only: tuple[str, ...] = ()) -> tuple[dict[str, dict[str, Any]], str]:
    """Name → overrides of every variant (or of those in ``only``), and where the negatives came from."""
    name, overrides, source = best_negatives()
    table = {**BASE_VARIANTS, name: overrides}
    return {k: v for k, v in table.items() if not only or k in only}, source


def train_and_evaluate(cfg: JobConfig) -> dict[str, Any]:
    """One ``run_training`` run, then its best checkpoint evaluated on the test split."""
    from ulrl.train_loop import best_checkpoint_uri, run_training

    checkpoint = best_checkpoint_uri(run_training(cfg))
    return evaluate_checkpoint(cfg, checkpoint)


def run(mode: str, base: JobConfig, log=print) -> Record:
    """``base``: the benchmark job (:func:`benchmarks.stores.bench_config`); the runs go to a fresh folder
    under its ``train.storage_uri``, deleted at the end."""
    plan = PLANS[mode]
    table, source = variants(plan.variants)
    base = apply_overrides(base, plan.overrides)
    record = Record("quality", mode, {"seeds": list(plan.seeds), "epochs": base.train.epochs,
                                      "num_workers": base.train.num_workers, "fused_theta": FUSED_THETA,
                                      "variants": table, "negatives_from": source, "lr": base.train.lr,
                                      "batch_size": base.train.batch_size,
                                      "train_videos": base.data.digits.train_videos})  # fmt: skip
    evaluations: dict[str, list[dict]] = {name: [] for name in table}
    storage = join(base.train.storage_uri, f"quality-{time.time_ns()}")
    try:
        for index, seed in enumerate(plan.seeds):
            for name in (list(table) if index % 2 == 0 else list(reversed(table))):  # alternate the order
                log(f"quality: {name}, seed {seed}")
                cfg = apply_overrides(base, {**table[name], "train.seed": seed, "train.storage_uri": storage,
                                             "train.name": f"quality-{name}-s{seed}"})  # fmt: skip
                evaluations[name].append(train_and_evaluate(cfg))
    finally:
        remove(storage)
    record.results = {"variants": {name: aggregate(runs) for name, runs in evaluations.items()},
                      "tests": significance(evaluations)}
    if {"likelihood", "ul_0.1"} <= set(table):
        record.goals.append(unlikelihood_goal(record.results["variants"]))
    return record


def aggregate(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per metric the mean, standard deviation and per-seed values over the seeds."""
    out = {}
    for key in METRICS:
        values = [run["metrics"].get(key) for run in runs]
        values = [float("nan") if v is None else float(v) for v in values]
        out[key] = {"mean": float(np.mean(values)), "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
                    "per_seed": values}  # fmt: skip
    return out


def _seed_mean(runs: list[dict[str, Any]], pick) -> np.ndarray:
    return np.mean([np.asarray(pick(run), dtype=float) for run in runs], axis=0)


def significance(evaluations: dict[str, list[dict]]) -> list[dict[str, Any]]:
    """Paired tests of each variant against the one it adds a term to (items averaged over seeds)."""
    negatives = [name for name in evaluations if name.startswith("neg_")]
    pairs = [("likelihood", "triplet"), ("ul_0.01", "likelihood"), ("ul_0.1", "likelihood")]
    pairs += [(name, "likelihood") for name in negatives]
    rows = []
    for system, baseline in (pair for pair in pairs if set(pair) <= set(evaluations)):
        a, b = evaluations[system], evaluations[baseline]
        for theta, label in (("0.00", "AVS AP emb"), (f"{FUSED_THETA:.2f}", "AVS AP fused"), ("1.00", "AVS AP concept")):
            scores = [_seed_mean(runs, lambda r, t=theta: r["query_ap"][t]) for runs in (a, b)]
            rows.append({"system": system, "baseline": baseline, "measure": f"{label} (per query)", **compare(*scores)})
        flags = [_seed_mean(runs, lambda r: r["contradiction_flags"]) for runs in (a, b)]
        rows.append({"system": system, "baseline": baseline, "measure": "contradiction (per video)", **compare(*flags)})
    return rows


def unlikelihood_goal(summary: dict[str, Any]) -> Goal:
    """α = 0.1 against likelihood only: contradiction rate at most halved, R@1 down by at most one point."""
    rate = {name: summary[name]["contradiction_rate_video"]["mean"] for name in ("likelihood", "ul_0.1")}
    r1_cost = summary["likelihood"]["t2v_r1"]["mean"] - summary["ul_0.1"]["t2v_r1"]["mean"]
    ratio = rate["ul_0.1"] / rate["likelihood"] if rate["likelihood"] > 0 else float("nan")
    met = ratio <= MIN_CONTRADICTION_CUT and r1_cost <= MAX_R1_COST
    why = ""
    if math.isnan(ratio):
        why = "likelihood-only training decoded no contradicting pair, so there was nothing to halve"
    elif not met:
        why = (f"contradiction rate {rate['likelihood']:.1%} → {rate['ul_0.1']:.1%} (×{ratio:.2f}), "
               f"R@1 cost {r1_cost:+.2f} points")
    return Goal("unlikelihood (α=0.1) vs likelihood: contradiction rate ×≤0.5 at ≤1 point R@1",
                "ratio <= 0.5, R@1 cost <= 1", round(ratio, 3), bool(met), why)
