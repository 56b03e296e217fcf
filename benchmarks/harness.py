"""A timed training run on Ray Train: the shipped worker pieces with clocks around ``next(batch)`` and the step.

:func:`timed_loop_per_worker` is ``ulrl.train_loop``'s per-worker loop minus validation, checkpoints and
MLflow: the same dataset shard, :func:`ulrl.data.train_batches` (Ray Data ingest, ``TrainCollate``, prefetch),
DDP via ``prepare_model`` and :func:`ulrl.train_loop.train_step`. Per step it records the seconds blocked
in ``next()`` (waiting for data) and the seconds of the step. The first ``warmup_epochs`` epochs are not
measured (pipeline and allocator start-up); every measured epoch restarts the data pipeline as real
training does, and that restart counts as waiting. Rank 0's timings come back as ``timings.json`` in the
run's one checkpoint (so they reach the driver from any node); the run is deleted once read.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from ulrl.config import JobConfig, from_dict, to_dict


def timed_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point; ``config`` = ``{"job": to_dict(JobConfig), "epochs", "warmup_epochs"}``."""
    import ray.train
    import torch

    from ulrl.data import train_batches
    from ulrl.train_loop import train_step

    cfg = from_dict(config["job"])
    worker, model, optimizer = _setup_worker(cfg)
    generator = torch.Generator(device=worker.device).manual_seed(cfg.train.seed + worker.rank)
    shard = ray.train.get_dataset_shard("train")
    epochs = []
    for epoch in range(config["warmup_epochs"] + config["epochs"]):
        batches = train_batches(shard, epoch, cfg, worker.manifest, worker.device)
        step = lambda batch: train_step(worker, model, optimizer, batch, generator)  # noqa: E731
        timings = _timed_epoch(batches, step, worker.device)
        if epoch >= config["warmup_epochs"]:
            epochs.append(timings)
    _report_timings(worker.rank, {"rank": worker.rank, "world_size": worker.world_size,
                                  "batch_size": cfg.train.batch_size, "threads": torch.get_num_threads(),
                                  "epochs": epochs})  # fmt: skip


def _setup_worker(cfg: JobConfig):
    """The shipped loop's ``Worker`` (no MLflow), the DDP-prepared model and Adam, as ``train_loop`` builds them."""
    import ray.train
    import ray.train.torch
    import torch

    from ulrl.model import ModelDims, build_model
    from ulrl.store import open_store
    from ulrl.train_loop import Worker

    context = ray.train.get_context()
    store = open_store(cfg.store.uri)
    device = ray.train.torch.get_device()
    dims = ModelDims.from_manifest(store.manifest)
    contradiction = torch.as_tensor(store.contradiction(), device=device, dtype=torch.float32)  # (K, K)
    worker = Worker(cfg, context.get_world_rank(), context.get_world_size(), device, store.manifest, dims,
                    contradiction, None)  # fmt: skip
    torch.manual_seed(cfg.train.seed)
    model = ray.train.torch.prepare_model(build_model(cfg.model, dims),
                                          parallel_strategy_kwargs={"find_unused_parameters": False})
    return worker, model, torch.optim.Adam(model.parameters(), lr=cfg.train.lr)


def _report_timings(rank: int, timings: dict[str, Any]) -> None:
    """Every rank reports (``report`` is a barrier); rank 0 attaches ``timings.json`` as the checkpoint."""
    import ray.train

    with tempfile.TemporaryDirectory() as folder:
        checkpoint = None
        if rank == 0:
            Path(folder, "timings.json").write_text(json.dumps(timings))
            checkpoint = ray.train.Checkpoint.from_directory(folder)
        ray.train.report({"steps": sum(len(epoch["step"]) for epoch in timings["epochs"])}, checkpoint=checkpoint)


def _timed_epoch(batches, step, device) -> dict[str, list[float]]:
    """Seconds waiting in ``next()`` and seconds in ``step`` for every batch of one epoch."""
    import torch

    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    waits, steps = [], []
    iterator = iter(batches)
    while True:
        start = time.perf_counter()
        batch = next(iterator, None)
        fetched = time.perf_counter()
        if batch is None:
            break
        step(batch)
        sync()
        waits.append(fetched - start)
        steps.append(time.perf_counter() - fetched)
    waits.append(time.perf_counter() - start)  # the end-of-epoch wait (the iterator draining) counts too
    return {"wait": waits, "step": steps}


def run_timed(cfg: JobConfig, num_workers: int, epochs: int, warmup_epochs: int, materialize: bool = False
              ) -> dict[str, Any]:
    """One TorchTrainer run of :func:`timed_loop_per_worker`; returns rank 0's timings plus the derived rates.

    ``materialize``: read the train split into Ray's object store once, before training (not what
    ``run_training`` does today; measured as the candidate fix for per-epoch pipeline restarts).
    """
    import ray

    from benchmarks.stores import join, remove
    from ulrl.raycluster import check_resources
    from ulrl.train_loop import resolve_paths

    cfg = resolve_paths(cfg)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, num_workers=num_workers))
    check_resources(cfg.train, ray.cluster_resources())
    name = f"bench-{num_workers}w-{time.time_ns()}"
    trainer = _trainer(cfg, name, {"job": to_dict(cfg), "epochs": epochs, "warmup_epochs": warmup_epochs},
                       materialize)  # fmt: skip
    try:
        with trainer.fit().checkpoint.as_directory() as folder:
            timings = json.loads(Path(folder, "timings.json").read_text())
    finally:
        remove(join(cfg.train.storage_uri or join(cfg.store.uri, "runs"), name))
    return {**timings, **rates(timings)}


def _trainer(cfg: JobConfig, name: str, loop_config: dict[str, Any], materialize: bool):
    """A ``TorchTrainer`` set up as ``ulrl.train_loop.build_trainer`` sets up training (train split only)."""
    from ray.train import DataConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from ulrl.checkpoint import run_storage
    from ulrl.data import train_dataset
    from ulrl.raycluster import worker_resources
    from ulrl.store import open_store

    ingest = DataConfig.default_ingest_options()
    ingest.preserve_order = True  # as run_training's ingest: the same data order on every run
    dataset = train_dataset(open_store(cfg.store.uri), cfg)
    storage_path, filesystem = run_storage(cfg)
    return TorchTrainer(
        timed_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=cfg.train.num_workers, use_gpu=cfg.train.use_gpu,
                                     resources_per_worker=worker_resources(cfg.train)),
        run_config=RunConfig(name=name, storage_path=storage_path, storage_filesystem=filesystem),
        datasets={"train": dataset.materialize() if materialize else dataset},
        dataset_config=DataConfig(datasets_to_split=["train"], execution_options={"train": ingest}),
    )


def rates(timings: dict[str, Any]) -> dict[str, float]:
    """Samples/s over the measured epochs (all ranks' samples; DDP keeps ranks in step) and the data-wait share."""
    wait = sum(sum(epoch["wait"]) for epoch in timings["epochs"])
    step = sum(sum(epoch["step"]) for epoch in timings["epochs"])
    steps = sum(len(epoch["step"]) for epoch in timings["epochs"])
    samples = steps * timings["batch_size"] * timings["world_size"]
    return {"steps": steps, "samples_per_s": samples / (wait + step), "wait_share": wait / (wait + step),
            "wait_seconds": wait, "step_seconds": step}  # fmt: skip

