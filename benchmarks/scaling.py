"""Benchmark 3: data-parallel scaling — training samples/s with 1 and 2 (or more) Ray Train workers.

Each run is :func:`benchmarks.harness.run_timed` (the shipped ingest + DDP step; on CPU half a CPU and one
torch thread per worker, as Ray sets ``OMP_NUM_THREADS=1``); the runs alternate the worker counts forward
and backward (1, 2 | 2, 1 | ...) so load drifts hit every count alike. Efficiency(n) = median rate(n) /
(n × median rate(1)); 1.0 is linear. The per-worker batch is fixed: n workers take steps of n × the batch.
"""

from __future__ import annotations

import os
import statistics

from benchmarks.common import Goal, Record
from benchmarks.harness import run_timed
from ulrl.config import JobConfig

TARGET_EFFICIENCY = 0.85
"""Brief: 2 workers reach at least 85 % of twice the 1-worker rate."""


def schedule(counts: tuple[int, ...], rounds: int) -> list[int]:
    """Worker counts in run order: the counts forward, then backward, ``rounds`` times."""
    order: list[int] = []
    for round_index in range(rounds):
        order += list(counts) if round_index % 2 == 0 else list(reversed(counts))
    return order


def run(mode: str, cfg: JobConfig, counts: tuple[int, ...] = (1, 2)) -> Record:
    """``cfg``: the benchmark job (:func:`benchmarks.stores.bench_config`); Ray must be connected."""
    rounds, epochs = (2, 2) if mode == "full" else (1, 1)
    record = Record("scaling", mode, {"rounds": rounds, "measured_epochs": epochs, "worker_counts": list(counts),
                                      "batch_size_per_worker": cfg.train.batch_size, "use_gpu": cfg.train.use_gpu,
                                      "cpus_per_worker": cfg.train.cpus_per_worker})  # fmt: skip
    runs = []
    for workers in schedule(counts, rounds):
        timed = run_timed(cfg, num_workers=workers, epochs=epochs, warmup_epochs=1)
        runs.append({"workers": workers, **{k: timed[k] for k in ("samples_per_s", "wait_share", "steps", "threads")}})
    rate = {n: statistics.median(r["samples_per_s"] for r in runs if r["workers"] == n) for n in counts}
    efficiency = {str(n): rate[n] / (n * rate[counts[0]] / counts[0]) for n in counts}
    record.results = {"runs": runs, "samples_per_s": {str(n): v for n, v in rate.items()},
                      "speedup": {str(n): rate[n] / rate[counts[0]] for n in counts}, "efficiency": efficiency}
    if "2" in efficiency and counts[0] == 1:
        met = efficiency["2"] >= TARGET_EFFICIENCY
        record.goals.append(Goal("2-worker scaling efficiency", f">= {TARGET_EFFICIENCY:g}", round(efficiency["2"], 3),
                                 met, "" if met else _why(runs)))  # fmt: skip
    return record


def _why(runs: list[dict]) -> str:
    waits = {n: statistics.median(r["wait_share"] for r in runs if r["workers"] == n) for n in (1, 2)}
    return (f"the workers, Ray Data's read/collate tasks and the DDP all-reduce share {os.cpu_count()} cores "
            f"(data-wait share {waits[1]:.0%} with 1 worker, {waits[2]:.0%} with 2): two busy workers leave the "
            "data pipeline no free core")
