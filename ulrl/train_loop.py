"""Distributed training of the ITV model with Ray Train (V2): the driver and the per-worker loop.

[1] Driver, :func:`run_training`: fails fast on a missing store, a batch larger than a worker's shard, or
    workers the cluster can never hold; resolves local paths and the MLflow URI to absolute ones (Train V2
    chdirs each worker into its run directory); builds a ``TorchTrainer`` with the train split sharded over
    the workers and the validation split given whole to each; tags the MLflow run with the best checkpoint.
    The Tune job calls the same function with its callbacks and a trial-based run name.
[2] Worker, :func:`train_loop_per_worker`: DDP (gloo on CPU, nccl on GPU), Adam, the reference lr schedule
    and early stopping (:func:`ulrl.checkpoint.after_epoch`), gradient clipping, bf16 autocast on GPU.
    Each epoch ends with validation on the full validation split and one ``ray.train.report`` per rank
    (rank 0 attaches the checkpoint), so every rank calls ``report`` the same number of times.

Decisions:

* ``find_unused_parameters`` stays off for every config: an encoder the config does not use is never built
  (``sentence`` vs ``multilevel`` text encoder, no level 4 without clip features), and disabled loss terms
  are zeros attached to the logits' graph, so every parameter receives a gradient on every step.
* Global negatives (``loss.global_negatives``): each rank scores its B local rows against all N = Σ B_r
  gathered columns; the gathered copy carries gradients only for the rank's own rows, and DDP averages the
  parameter gradients. Off, each rank uses in-batch negatives of its local batch.
* Agreement: rank 0 validates on the whole (unsplit) validation split and broadcasts the numbers before the
  schedule step, so lr changes and early stopping are identical on every rank by construction (validating
  on every rank as well would only repeat the same work while the ranks wait at the same barrier).
* Host syncs: loss terms stay detached device tensors summed over steps; rank 0 reads them every
  ``train.log_every`` steps and at epoch end.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from ulrl.checkpoint import CheckpointReader, TrainState, after_epoch, checkpoint_uri, run_storage, save_checkpoint
from ulrl.config import ConfigError, JobConfig, apply_overrides, from_dict, to_dict
from ulrl.data import (collate_captions, collate_videos, expand_captions, multi_hot, read_split, train_batches,
                       train_columns, train_dataset)  # fmt: skip
from ulrl.losses import LOSS_KEYS, total_loss
from ulrl.metrics import concept_recall_at_k, retrieval_metrics
from ulrl.model import ModelDims, build_model
from ulrl.raycluster import check_resources, connect, worker_resources
from ulrl.store import Store, StoreError, open_store
from ulrl.tracking import NullLogger, open_logger, prepare_tracking, tag_run

FORWARDED_ENV = ("AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION", "AWS_REGION", "MLFLOW_S3_ENDPOINT_URL",
                 "ULRL_WORKER_PID_DIR")  # fmt: skip
"""Driver environment passed on to the workers (endpoints only, never credentials: nodes get those from
their own AWS chain). ``ULRL_WORKER_PID_DIR``: each rank writes ``rank<r>.pid`` there (operators, tests)."""


# ----------------------------------------------------------------------------------------- [1] driver


def run_training(cfg: JobConfig, callbacks: list[Any] | None = None, run_name: str | None = None):
    """Train ``cfg`` on the Ray cluster (connecting first if needed); returns the ``ray.train.Result``.

    Re-running the same run name with the same storage resumes from its latest checkpoint. Raises
    :class:`StoreError`, :class:`ConfigError` or :class:`ulrl.raycluster.ResourceError` before anything starts.
    """
    store = open_store(cfg.store.uri)
    check_data(cfg, store.manifest)
    if not ray.is_initialized():
        connect(cfg.ray)
    check_resources(cfg.train, ray.cluster_resources())
    cfg = prepare_tracking(resolve_paths(cfg))
    result = build_trainer(cfg, store, callbacks, run_name or cfg.train.name).fit()
    best = best_checkpoint(result)
    if best is not None:  # the run's MLflow id lives in its checkpoints
        tags = {"best_checkpoint": checkpoint_uri(best), "last_checkpoint": checkpoint_uri(result.checkpoint)}
        tag_run(cfg, CheckpointReader(best).state().mlflow_run_id, tags)
    return result


def build_trainer(cfg: JobConfig, store: Store, callbacks: list[Any] | None, name: str):
    """The ``TorchTrainer``: train split sharded over the workers, validation split whole on each,
    checkpoints ranked by ``val_rsum``, ``train.max_failures`` restarts from the latest checkpoint."""
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    storage_path, filesystem = run_storage(cfg)
    run_config = RunConfig(
        name=name,
        storage_path=storage_path,
        storage_filesystem=filesystem,
        failure_config=FailureConfig(max_failures=cfg.train.max_failures),
        checkpoint_config=CheckpointConfig(
            num_to_keep=cfg.train.checkpoints_to_keep, checkpoint_score_attribute="val_rsum",
            checkpoint_score_order="max",
        ),  # fmt: skip
        callbacks=callbacks or None,
        worker_runtime_env={"env_vars": {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}},
    )
    scaling = ScalingConfig(num_workers=cfg.train.num_workers, use_gpu=cfg.train.use_gpu,
                            resources_per_worker=worker_resources(cfg.train))  # fmt: skip
    val_videos = read_split(store, "val", "videos", train_columns(store.manifest))
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=to_dict(cfg),
        scaling_config=scaling,
        run_config=run_config,
        datasets={"train": train_dataset(store, cfg), "val": val_videos},
        dataset_config=DataConfig(datasets_to_split=["train"], execution_options={"train": _ordered_ingest()}),
    )


def check_data(cfg: JobConfig, manifest: dict[str, Any]) -> None:
    """Both splits exist and every worker's shard holds at least one full batch."""
    for split in ("train", "val"):
        if split not in manifest["splits"]:
            raise StoreError(f"store {cfg.store.uri} has no '{split}' split (has: {', '.join(manifest['splits'])})")
    counts = manifest["splits"]["train"]
    rows = counts["captions"] if cfg.data.caption_sampling == "all" else counts["videos"]
    if rows // cfg.train.num_workers < cfg.train.batch_size:
        raise ConfigError(
            f"train.batch_size: {cfg.train.batch_size} exceeds the {rows // cfg.train.num_workers} training rows "
            f"of each of the {cfg.train.num_workers} workers; lower train.batch_size or train.num_workers"
        )


def resolve_paths(cfg: JobConfig) -> JobConfig:
    """Local store and storage paths made absolute (workers run in another directory)."""
    overrides = {}
    for key, value in (("store.uri", cfg.store.uri), ("train.storage_uri", cfg.train.storage_uri)):
        if value and "://" not in value:
            overrides[key] = os.path.abspath(os.path.expanduser(value))
    return apply_overrides(cfg, overrides)


def _ordered_ingest():
    """Train ingest options with ``preserve_order``: block order, hence (with one worker and the seeded
    local shuffle) the data order, is the same on every run."""
    from ray.train import DataConfig

    options = DataConfig.default_ingest_options()
    options.preserve_order = True
    return options


def best_checkpoint(result: Any) -> Any:
    """The run's best checkpoint by ``val_rsum`` (the latest one if none was ranked); None without any."""
    return result.get_best_checkpoint("val_rsum", "max") if result.best_checkpoints else result.checkpoint


def best_checkpoint_uri(result: Any) -> str:
    """URI of the best checkpoint of a finished run (empty if none)."""
    best = best_checkpoint(result)
    return checkpoint_uri(best) if best is not None else ""


# ----------------------------------------------------------------------------------------- [2] worker


@dataclasses.dataclass
class Worker:
    """What every step of a worker needs, built once per worker process."""

    cfg: JobConfig
    rank: int
    world_size: int
    device: torch.device
    manifest: dict[str, Any]
    dims: ModelDims
    contradiction: torch.Tensor  # (K, K)
    cooccurrence: torch.Tensor | None  # (K, K) bool, only for "exclusive" negatives
    logger: Any = dataclasses.field(default_factory=NullLogger)
    val_tables: list | None = None  # rank 0's validation rows (Arrow), read on first use

    def autocast(self):
        if self.cfg.train.use_gpu and self.cfg.train.bf16 and self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point on every worker; ``config`` is ``to_dict(JobConfig)``."""
    cfg = from_dict(config)
    worker = _setup_worker(cfg)
    state, model, optimizer = _restore(worker, ray.train.get_checkpoint())
    worker.logger = open_logger(cfg, worker.rank, ray.train.get_context().get_experiment_name(),
                                state.mlflow_run_id, {"ulrl.train_name": cfg.train.name})  # fmt: skip
    state = dataclasses.replace(state, mlflow_run_id=worker.logger.run_id or state.mlflow_run_id)
    train_shard, val_shard = ray.train.get_dataset_shard("train"), ray.train.get_dataset_shard("val")
    try:
        while state.epoch < cfg.train.epochs and not state.stopped:
            state = _run_epoch(worker, state, model, optimizer, train_shard, val_shard)
    except BaseException:
        worker.logger.finish("FAILED")
        raise
    if state.stopped:
        worker.logger.set_tags({"stopped_early_after_epoch": str(state.epoch)})
    worker.logger.finish("FINISHED")


def _setup_worker(cfg: JobConfig) -> Worker:
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    _write_pid(rank)
    store = open_store(cfg.store.uri)
    device = ray.train.torch.get_device()
    contradiction = torch.as_tensor(store.contradiction(), device=device)  # (K, K)
    cooccurrence = None
    if cfg.loss.negatives.strategy == "exclusive":
        from ulrl.concepts import cooccurrence_matrix

        labels = store.read_table("train", "videos", ["concept_ids"])["concept_ids"].to_pylist()
        cooccurrence = torch.as_tensor(cooccurrence_matrix(labels, store.manifest["num_concepts"]), device=device)
    dims = ModelDims.from_manifest(store.manifest)
    return Worker(cfg, rank, world_size, device, store.manifest, dims, contradiction, cooccurrence)


def _write_pid(rank: int) -> None:
    folder = os.environ.get("ULRL_WORKER_PID_DIR")
    if folder:
        tmp = Path(folder, f".rank{rank}.pid.tmp")
        tmp.write_text(str(os.getpid()))
        tmp.replace(Path(folder, f"rank{rank}.pid"))  # atomic: a reader never sees a half-written PID


def _restore(worker: Worker, checkpoint: Any) -> tuple[TrainState, torch.nn.Module, torch.optim.Optimizer]:
    """Model (same seeded init on every rank), DDP wrapper and Adam, from ``checkpoint`` when resuming."""
    cfg = worker.cfg
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, worker.dims)
    state, optimizer_state = TrainState.initial(cfg.train), None
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            reader = CheckpointReader(folder)
            state = reader.state()
            model.load_state_dict(reader.tensors("model.pt"))
            optimizer_state = reader.tensors("optimizer.pt")
    model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": False})
    optimizer = torch.optim.Adam(model.parameters(), lr=state.lr)
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)
    set_lr(optimizer, state.lr)
    return state, model, optimizer


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """Seed of dropout and negative sampling for one (epoch, rank): resuming at an epoch replays it."""
    return (seed * 1_000_003 + epoch * 1009 + rank) % (2**63)


def _run_epoch(worker: Worker, state: TrainState, model, optimizer, train_shard, val_shard) -> TrainState:
    cfg, epoch = worker.cfg, state.epoch
    torch.manual_seed(epoch_seed(cfg.train.seed, epoch, worker.rank))
    generator = torch.Generator(device=worker.device).manual_seed(epoch_seed(cfg.train.seed + 1, epoch, worker.rank))
    started = time.perf_counter()
    batches = train_batches(train_shard, epoch, cfg, worker.manifest, worker.device)
    means, steps, samples = train_epoch(worker, model, optimizer, batches, generator, state.global_step)
    train_seconds = time.perf_counter() - started
    val = validate(worker, model, val_shard)
    new_state = after_epoch(state, val["val_rsum"], steps, cfg.train)
    set_lr(optimizer, new_state.lr)
    metrics = {
        "epoch": new_state.epoch, **{f"train_{k}": v for k, v in means.items()}, **val,
        "lr": state.lr, "next_lr": new_state.lr, "steps": steps,
        "samples_per_s": samples * worker.world_size / max(train_seconds, 1e-9),
        "epoch_seconds": time.perf_counter() - started,
    }  # fmt: skip
    worker.logger.log_metrics(metrics, step=new_state.epoch)
    if worker.rank == 0:
        # the real stdout: Train V2's patched print would log the line twice (logger + tee)
        print(progress_line(metrics, cfg.train.epochs), file=sys.__stdout__, flush=True)
    _report(worker, metrics, model, optimizer, new_state)
    return new_state


def train_step(worker: Worker, model, optimizer, batch: dict[str, torch.Tensor], generator) -> dict[str, torch.Tensor]:
    """One optimizer step; returns the detached loss terms (device scalars, no host sync)."""
    cfg = worker.cfg
    optimizer.zero_grad(set_to_none=True)
    with worker.autocast():
        out = model(batch)
        terms = total_loss(out, batch, worker.contradiction, cfg.loss, worker.cooccurrence, generator)
    terms["loss"].backward()
    if cfg.train.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
    optimizer.step()
    return {key: terms[key].detach() for key in LOSS_KEYS}


def train_epoch(worker: Worker, model, optimizer, batches, generator, global_step: int
                ) -> tuple[dict[str, float], int, int]:
    """Steps over this rank's shard (at most ``train.max_steps_per_epoch``). Returns the epoch mean of each
    loss term over all ranks, the steps taken and this rank's sample count."""
    cfg, logging = worker.cfg, worker.logger.active
    model.train()
    totals = torch.zeros(len(LOSS_KEYS), device=worker.device, dtype=torch.float64)  # (terms,)
    window = torch.zeros_like(totals)
    steps = samples = 0
    for batch in batches:
        terms = train_step(worker, model, optimizer, batch, generator)
        stacked = torch.stack([terms[key] for key in LOSS_KEYS]).double()  # (terms,)
        totals += stacked
        window += stacked
        steps += 1
        samples += int(batch["video_index"].shape[0])
        if logging and steps % cfg.train.log_every == 0:
            values = (window / cfg.train.log_every).tolist()  # the one host sync per log_every steps
            worker.logger.log_metrics({f"step_{k}": v for k, v in zip(LOSS_KEYS, values)}, global_step + steps)
            window.zero_()
        if 0 < cfg.train.max_steps_per_epoch <= steps:
            break
    if steps == 0:
        raise RuntimeError(f"rank {worker.rank}: the training shard yielded no full batch of {cfg.train.batch_size}")
    means = _all_reduce_mean(totals, steps, worker.world_size)
    return dict(zip(LOSS_KEYS, means)), steps, samples


def _all_reduce_mean(totals: torch.Tensor, steps: int, world_size: int) -> list[float]:
    if world_size > 1:
        dist.all_reduce(totals)
    return (totals / (steps * world_size)).tolist()


def validate(worker: Worker, model, val_shard) -> dict[str, float]:
    """Validation metrics, computed by rank 0 and broadcast, so every rank holds identical numbers and takes
    the same schedule and early-stopping decisions (:func:`evaluate_split`)."""
    metrics = {}
    if worker.rank == 0:
        if worker.val_tables is None:  # read once per worker process; the paper's validation set is small
            worker.val_tables = list(val_shard.iter_batches(batch_size=worker.cfg.eval.batch_size,
                                                            batch_format="pyarrow"))  # fmt: skip
        metrics = evaluate_split(worker, getattr(model, "module", model), worker.val_tables)
    return _broadcast(metrics, worker)


@torch.inference_mode()
def evaluate_split(worker: Worker, raw, tables: list) -> dict[str, float]:
    """Retrieval over a whole split (every video, every caption) and top-10 concept recall of both decoders.

    Keys: ``val_rsum`` (model-selection score), ``val_{t2v,v2t}_{r1,r5,r10,medr,meanr,map}``,
    ``val_concept_recall`` (mean of ``val_concept_recall_video`` and ``val_concept_recall_text``).
    """
    was_training = raw.training
    raw.eval()  # BatchNorm on running statistics, no dropout
    encoded = _encode_split(worker, raw, tables)
    raw.train(was_training)
    order = np.argsort(encoded["video_index"])  # row i of video_emb ↔ i-th smallest video_index
    caption_video_idx = np.searchsorted(encoded["video_index"][order], encoded["caption_video_index"])
    metrics = retrieval_metrics(encoded["text_emb"], encoded["video_emb"][order], caption_video_idx)
    result = {f"val_{key}": value for key, value in metrics.items()}
    result["val_concept_recall_video"] = encoded["recall_video"]
    result["val_concept_recall_text"] = encoded["recall_text"]
    result["val_concept_recall"] = (encoded["recall_video"] + encoded["recall_text"]) / 2
    return result


def _encode_split(worker: Worker, raw, tables: list) -> dict[str, Any]:
    """Embeddings of all videos and captions of ``tables`` (Arrow video rows); concept recall accumulated
    batch by batch, so the (items, K) probabilities never sit in memory whole."""
    cfg, manifest, device = worker.cfg, worker.manifest, worker.device
    videos, texts, video_index, caption_index = [], [], [], []
    recall = {"video": [0.0, 0], "text": [0.0, 0]}
    for table in tables:
        captions = expand_captions(table)  # one row per caption, its video's columns (labels) repeated
        video, _ = collate_videos(table, cfg.data.max_frames, manifest.get("clip_dim", 0), manifest["frame_dim"])
        text, _ = collate_captions(captions, cfg.data.max_words, manifest.get("sentence_dim", 0))
        video, text = ({k: v.to(device) for k, v in part.items()} for part in (video, text))
        with worker.autocast():
            video_emb = raw.encode_video(video["frames"], video["frame_mask"], video.get("clip_features"))  # (B, D)
            text_emb = raw.encode_text(text["tokens"], text["token_mask"], text.get("sentence_features"))  # (C, D)
            video_probs = torch.sigmoid(raw.decode_concepts(video_emb).float()).cpu()  # (B, K)
            text_probs = torch.sigmoid(raw.decode_concepts(text_emb).float()).cpu()  # (C, K)
        _accumulate_recall(recall["video"], video_probs, multi_hot(table["concept_ids"], manifest["num_concepts"]))
        _accumulate_recall(recall["text"], text_probs, multi_hot(captions["concept_ids"], manifest["num_concepts"]))
        videos.append(video_emb.float().cpu())
        texts.append(text_emb.float().cpu())
        video_index.append(video["video_index"].cpu().numpy())
        caption_index.append(text["video_index"].cpu().numpy())
    return {
        "video_emb": torch.cat(videos), "text_emb": torch.cat(texts),
        "video_index": np.concatenate(video_index), "caption_video_index": np.concatenate(caption_index),
        "recall_video": recall["video"][0] / max(recall["video"][1], 1),
        "recall_text": recall["text"][0] / max(recall["text"][1], 1),
    }  # fmt: skip


def _accumulate_recall(total: list, probs: torch.Tensor, labels: np.ndarray) -> None:
    """Add a batch's recall@10 sum and item count (items without labels do not count)."""
    count = int((labels.sum(1) > 0).sum())
    if count:
        total[0] += concept_recall_at_k(probs, labels, k=10) * count
        total[1] += count


def _broadcast(metrics: dict[str, float], worker: Worker) -> dict[str, float]:
    """Rank 0's dict on every rank."""
    if worker.world_size == 1:
        return metrics
    box = [metrics]
    dist.broadcast_object_list(box, src=0, device=worker.device)  # nccl needs this rank's GPU
    return box[0]


def _report(worker: Worker, metrics: dict[str, float], model, optimizer, state: TrainState) -> None:
    """The per-epoch barrier: every rank reports; rank 0 attaches the checkpoint."""
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = None
        if worker.rank == 0:
            save_checkpoint(folder, model, optimizer, state, worker.cfg, worker.dims)
            checkpoint = ray.train.Checkpoint.from_directory(folder)
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=f"epoch_{state.epoch:04d}")


def progress_line(metrics: dict[str, float], epochs: int) -> str:
    """One line per epoch for the job log."""
    return (
        f"[ulrl] epoch {int(metrics['epoch'])}/{epochs} loss {metrics['train_loss']:.4f} "
        f"(triplet {metrics['train_triplet']:.4f}) val_rsum {metrics['val_rsum']:.2f} "
        f"concept_recall {metrics['val_concept_recall']:.3f} lr {metrics['lr']:.2e} "
        f"{metrics['samples_per_s']:.1f} samples/s {metrics['epoch_seconds']:.1f}s"
    )
