"""Benchmark 2: feeding the training step — rows/s from the store into torch batches, and time spent waiting.

Rows/s, three cases over the same train video files, interleaved, median of N passes:

* ``pyarrow``: ``pyarrow.parquet.read_table`` of every file, the columns training reads — the I/O limit;
* ``pyarrow_collate``: the same read, then :class:`ulrl.data.TrainCollate` on batch-size slices — the
  decode + collate limit of one thread, without Ray;
* ``ray_data``: :func:`ulrl.data.train_batches` over :func:`ulrl.data.train_dataset` (Ray Data read,
  local shuffle buffer, prefetch, collate into tensors) — what a Train worker consumes, full batches only;
* ``ray_data_materialized``: the same over the dataset materialised once in Ray's object store (a candidate
  change, not what training does today): every pass skips the Parquet read tasks.

Data-wait share: one Ray Train worker running the shipped step (:mod:`benchmarks.harness`); seconds blocked
in ``next(batch)`` over all seconds of the measured epochs (pipeline restarts at epoch starts included);
measured for the shipped streaming dataset and for the materialised one.
"""

from __future__ import annotations

import pyarrow.parquet as pq

from benchmarks.common import Goal, Record, interleaved, summary
from benchmarks.harness import run_timed
from ulrl.config import JobConfig
from ulrl.data import TrainCollate, train_batches, train_columns, train_dataset
from ulrl.store import Store, open_store

TARGET_WAIT_SHARE = 0.10
"""Brief: the step waits for data at most 10 % of its time."""


def read_pyarrow(store: Store, collate: TrainCollate | None = None, batch_size: int = 0) -> int:
    """Rows read from every train video file; with ``collate``, rows collated in full ``batch_size`` slices."""
    rows = 0
    for path in store.files("train", "videos"):
        table = pq.read_table(path, columns=train_columns(store.manifest), filesystem=store.filesystem)
        if collate is None:
            rows += table.num_rows
            continue
        for start in range(0, table.num_rows - batch_size + 1, batch_size):  # full batches, as drop_last
            collate(table.slice(start, batch_size))
            rows += batch_size
    return rows


def read_ray(dataset, cfg: JobConfig, manifest: dict) -> int:
    """Rows of every full batch of one pass of the training iterator over ``dataset`` on the CPU."""
    batches = train_batches(dataset.iterator(), 0, cfg, manifest, device="cpu")
    return sum(int(batch["video_index"].shape[0]) for batch in batches)


def run(mode: str, cfg: JobConfig) -> Record:
    """``cfg``: the benchmark job (:func:`benchmarks.stores.bench_config`); Ray must be connected."""
    repeats, epochs = {"tiny": (1, 1), "quick": (3, 1), "full": (5, 2)}[mode]
    store = open_store(cfg.store.uri)
    batch = cfg.train.batch_size
    record = Record("data_feed", mode, {"repeats": repeats, "measured_epochs": epochs, "batch_size": batch,
                                        "train_videos": store.manifest["splits"]["train"]["videos"],
                                        "shuffle_buffer": cfg.data.shuffle_buffer,
                                        "prefetch_batches": cfg.data.prefetch_batches})  # fmt: skip
    collate = TrainCollate.from_config(cfg, store.manifest, epoch=0)
    dataset = train_dataset(store, cfg)
    materialized = dataset.materialize()
    cases = {"pyarrow": lambda: read_pyarrow(store),
             "pyarrow_collate": lambda: read_pyarrow(store, collate, batch),
             "ray_data": lambda: read_ray(dataset, cfg, store.manifest),
             "ray_data_materialized": lambda: read_ray(materialized, cfg, store.manifest)}  # fmt: skip
    counts = {name: case() for name, case in cases.items()}  # also warms files, workers and caches
    samples = interleaved(cases, repeats, warmup=0)
    rows_per_s = {name: counts[name] / summary(times)["median"] for name, times in samples.items()}
    timed = run_timed(cfg, num_workers=1, epochs=epochs, warmup_epochs=1)
    timed_materialized = run_timed(cfg, num_workers=1, epochs=epochs, warmup_epochs=1, materialize=True)
    record.results = {
        "rows": counts, "seconds": {name: summary(times) for name, times in samples.items()},
        "rows_per_s": rows_per_s,
        "ray_data_share_of_io_limit": rows_per_s["ray_data"] / rows_per_s["pyarrow"],
        "ray_data_share_of_collate_limit": rows_per_s["ray_data"] / rows_per_s["pyarrow_collate"],
        "ray_data_materialized_share_of_io_limit": rows_per_s["ray_data_materialized"] / rows_per_s["pyarrow"],
        "training": _training(timed), "training_materialized": _training(timed_materialized),
    }  # fmt: skip
    share = timed["wait_share"]
    record.goals.append(Goal("data wait share of a training step (1 worker)", f"<= {TARGET_WAIT_SHARE:.0%}",
                             round(share, 4), share <= TARGET_WAIT_SHARE,
                             "" if share <= TARGET_WAIT_SHARE else _why_waiting(record.results)))  # fmt: skip
    return record


def _training(timed: dict) -> dict:
    """The harness run's rates plus how much of the wait is each epoch's first batch (pipeline start)."""
    first = sum(epoch["wait"][0] for epoch in timed["epochs"])
    keys = ("steps", "samples_per_s", "wait_share", "wait_seconds", "step_seconds", "threads")
    return {**{key: timed[key] for key in keys}, "first_batch_share_of_wait": first / max(timed["wait_seconds"], 1e-9)}


def _why_waiting(results: dict) -> str:
    shipped, candidate = results["training"], results["training_materialized"]
    return (f"{shipped['first_batch_share_of_wait']:.0%} of the wait is the first batch of an epoch: Ray Data "
            "re-runs its Parquet read tasks every epoch (task scheduling costs seconds on a busy machine); "
            f"with the train split materialised once the wait share is {candidate['wait_share']:.1%}")
