"""Training pieces that need no Ray: the lr schedule and early stopping, checkpoints, config shipping,
fail-fast checks, the training epoch and validation (against a naive oracle) on hand-made batches."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pyarrow as pa
import pytest
import torch

from ulrl.checkpoint import (CheckpointError, CheckpointReader, TrainState, after_epoch, load_model_from_checkpoint,
                             run_storage, save_checkpoint)  # fmt: skip
from ulrl.config import ConfigError, JobConfig, TrainConfig, apply_overrides, from_dict, to_dict
from ulrl.data import TrainCollate
from ulrl.model import ModelDims, build_model
from ulrl.raycluster import ResourceError, check_resources, worker_resources
from ulrl.store import StoreError
from ulrl.tracking import NullLogger, RunLogger, prepare_tracking, resolve_tracking_uri
from ulrl.train_loop import Worker, check_data, epoch_seed, evaluate_split, progress_line, resolve_paths, train_epoch

TINY_MODEL = {
    "embed_dim": 16, "video_rnn_size": 8, "video_kernel_sizes": [2, 3], "video_num_filters": 4, "word_dim": 8,
    "text_rnn_size": 8, "text_kernel_sizes": [2], "text_num_filters": 4, "dropout": 0.1,
}  # fmt: skip
DIMS = ModelDims(frame_dim=6, clip_dim=0, vocab_size=20, num_concepts=30, sentence_dim=0)
MANIFEST = {**DIMS.to_dict(), "splits": {"train": {"videos": 40, "captions": 80}, "val": {"videos": 12, "captions": 24}}}


def tiny_config(**train) -> JobConfig:
    cfg = from_dict({"model": TINY_MODEL, "train": {"batch_size": 8, "seed": 3, **train}})
    return cfg


# ---------------------------------------------------------------------------------- schedule


def test_schedule_decays_every_epoch_and_halves_on_a_plateau_after_three_epochs_at_one_lr():
    train = TrainConfig(lr=1.0, lr_decay=0.9, plateau_factor=0.5, patience=2)
    state = TrainState.initial(train)
    expected = [  # score, lr after the epoch, best, bad epochs, stopped — computed by hand
        (10.0, 0.9, 10.0, 0, False),
        (12.0, 0.81, 12.0, 0, False),
        (11.0, 0.81 * 0.9 * 0.5, 12.0, 1, False),  # third epoch at this lr and no improvement: halve
        (11.0, 0.81 * 0.9 * 0.5 * 0.9, 12.0, 2, False),  # lr just cut: only the decay
        (11.5, 0.81 * 0.9 * 0.5 * 0.9 * 0.9, 12.0, 3, True),  # bad_epochs 3 > patience 2: stop
    ]
    for epoch, (score, lr, best, bad, stopped) in enumerate(expected, start=1):
        state = after_epoch(state, score, steps=5, train=train)
        assert (state.epoch, state.best_score, state.bad_epochs, state.stopped) == (epoch, best, bad, stopped)
        assert state.lr == pytest.approx(lr, rel=1e-12)
    assert state.global_step == 25


def test_schedule_edge_cases():
    train = TrainConfig(lr=1.0, lr_decay=1.0, plateau_factor=0.5, patience=0)
    state = after_epoch(TrainState.initial(train), float("nan"), 1, train)
    assert state.best_score is None and state.bad_epochs == 1  # NaN never improves
    for _ in range(10):
        state = after_epoch(state, -1.0 if state.best_score is None else state.best_score, 1, train)
    assert not state.stopped  # patience 0 never stops
    assert state.best_score == -1.0  # the first real score is a best; equal scores are not improvements
    assert state.lr == pytest.approx(0.5**3)  # plateau cuts after epochs 3, 6 and 9 at one lr


def test_train_state_json_round_trip():
    state = TrainState(epoch=4, lr=1.5e-4, best_score=91.25, bad_epochs=1, epochs_at_lr=2, global_step=77,
                       stopped=False, mlflow_run_id="abc123")  # fmt: skip
    assert TrainState.from_json(state.to_json()) == state
    assert json.loads(TrainState.initial(TrainConfig()).to_json())["best_score"] is None


def test_epoch_seed_differs_per_epoch_and_rank():
    seeds = {epoch_seed(0, epoch, rank) for epoch in range(50) for rank in range(8)}
    assert len(seeds) == 400


# ---------------------------------------------------------------------------------- checkpoints


class Wrapped(torch.nn.Module):
    """Stands in for the DDP wrapper: the real model sits at ``.module``."""

    def __init__(self, module):
        super().__init__()
        self.module = module


def test_checkpoint_round_trip(tmp_path):
    cfg = tiny_config(lr=0.01)
    torch.manual_seed(0)
    model = build_model(cfg.model, DIMS)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    model(_batch(_video_table(np.random.default_rng(0), 4))).get("video_emb").sum().backward()
    optimizer.step()
    state = TrainState(epoch=2, lr=0.009, best_score=55.0, global_step=10, mlflow_run_id="run-1")
    folder = save_checkpoint(tmp_path / "ckpt", Wrapped(model), optimizer, state, cfg, DIMS)

    loaded, loaded_cfg, loaded_dims = load_model_from_checkpoint(str(folder))
    assert loaded_cfg == cfg and loaded_dims == DIMS and not loaded.training
    for key, value in model.state_dict().items():  # keys without a "module." prefix
        assert torch.equal(loaded.state_dict()[key], value), key
    reader = CheckpointReader(folder)
    assert reader.state() == state
    restored = torch.optim.Adam(loaded.parameters(), lr=0.01)
    restored.load_state_dict(reader.tensors("optimizer.pt"))
    assert restored.state_dict()["state"][0]["step"] == 1
    batch = _batch(_video_table(np.random.default_rng(1), 5))
    with torch.no_grad():
        assert torch.allclose(model.eval()(batch)["text_emb"], loaded(batch)["text_emb"])


def test_checkpoint_missing_file_names_it(tmp_path):
    save_checkpoint(tmp_path, build_model(tiny_config().model, DIMS), None, TrainState(0, 1.0), tiny_config(), DIMS)
    with pytest.raises(CheckpointError, match="optimizer.pt"):
        CheckpointReader(tmp_path).tensors("optimizer.pt")
    (tmp_path / "model_meta.json").unlink()
    with pytest.raises(CheckpointError, match="model_meta.json"):
        load_model_from_checkpoint(tmp_path)


# ---------------------------------------------------------------------------------- config shipping, checks


def test_config_survives_shipping_to_workers(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = apply_overrides(tiny_config(), {"loss.negatives.strategy": "random", "store.uri": "data/store",
                                          "tracking.uri": "sqlite:///runs/mlflow.db"})  # fmt: skip
    shipped = resolve_paths(cfg)
    assert shipped.store.uri == str(tmp_path / "data" / "store")
    wire = json.loads(json.dumps(to_dict(shipped)))  # what Ray carries: plain JSON-able dicts
    assert from_dict(wire) == shipped
    assert resolve_paths(apply_overrides(cfg, {"store.uri": "s3://b/p"})).store.uri == "s3://b/p"
    assert resolve_tracking_uri("sqlite:///runs/mlflow.db") == f"sqlite:///{tmp_path}/runs/mlflow.db"
    assert resolve_tracking_uri("sqlite:////abs/m.db") == "sqlite:////abs/m.db"
    assert resolve_tracking_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"


def test_run_storage(tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    local = apply_overrides(tiny_config(), {"store.uri": str(tmp_path)})
    assert run_storage(local) == (f"{tmp_path}/runs", None)
    path, filesystem = run_storage(apply_overrides(local, {"train.storage_uri": "s3://bucket/runs/"}))
    assert path == "bucket/runs" and filesystem.type_name == "s3"


def test_check_resources():
    train = TrainConfig(num_workers=2, cpus_per_worker=0.5)
    check_resources(train, {"CPU": 2.0})  # 1 CPU for the workers + 1 for Ray Data
    with pytest.raises(ResourceError, match=r"num_workers=8 × train.cpus_per_worker=0.5 = 4 CPUs.*cluster's 4 CPUs"):
        check_resources(TrainConfig(num_workers=8, cpus_per_worker=0.5), {"CPU": 4.0})
    with pytest.raises(ResourceError, match="needs 2 GPUs; the cluster has 1"):
        check_resources(TrainConfig(num_workers=2, use_gpu=True), {"CPU": 16.0, "GPU": 1.0})
    assert worker_resources(TrainConfig(use_gpu=True, cpus_per_worker=4)) == {"CPU": 4, "GPU": 1}


def test_check_data():
    check_data(tiny_config(num_workers=5), MANIFEST)  # 40 videos / 5 workers = 8 rows = one batch
    with pytest.raises(ConfigError, match="train.batch_size: 8 exceeds the 6 training rows"):
        check_data(tiny_config(num_workers=6), MANIFEST)
    all_captions = apply_overrides(tiny_config(num_workers=10), {"data.caption_sampling": "all"})
    check_data(all_captions, MANIFEST)  # 80 caption rows
    with pytest.raises(StoreError, match="no 'val' split"):
        check_data(tiny_config(), {**MANIFEST, "splits": {"train": MANIFEST["splits"]["train"]}})


# ---------------------------------------------------------------------------------- epoch and validation


def _video_table(rng: np.random.Generator, n: int, start: int = 0) -> pa.Table:
    """n videos with 1-5 frames, 1-3 concept labels and two captions each (token ids 2..19)."""
    frames = [rng.normal(size=(int(rng.integers(1, 6)), DIMS.frame_dim)).astype(np.float32).tolist() for _ in range(n)]
    concepts = [sorted(rng.choice(DIMS.num_concepts, size=int(rng.integers(1, 4)), replace=False).tolist())
                for _ in range(n)]  # fmt: skip
    captions = [[rng.integers(2, 20, size=int(rng.integers(2, 6))).tolist() for _ in range(2)] for _ in range(n)]
    return pa.table({
        "video_index": pa.array(np.arange(start, start + n), pa.int64()),
        "frames": pa.array(frames, pa.list_(pa.list_(pa.float32(), DIMS.frame_dim))),
        "concept_ids": pa.array(concepts, pa.list_(pa.int32())),
        "caption_token_ids": pa.array(captions, pa.list_(pa.list_(pa.int32()))),
    })  # fmt: skip


def _batch(table: pa.Table, epoch: int = 0) -> dict[str, torch.Tensor]:
    return TrainCollate(epoch, 0, 64, 32, DIMS.num_concepts, DIMS.frame_dim)(table)


def _worker(cfg: JobConfig, logger=None) -> Worker:
    contradiction = torch.zeros(DIMS.num_concepts, DIMS.num_concepts)
    contradiction[0, 1] = contradiction[1, 0] = 1.0
    return Worker(cfg, 0, 1, torch.device("cpu"), MANIFEST, DIMS, contradiction, None, logger or NullLogger())


def test_train_epoch_caps_steps_logs_window_means_and_learns(tmp_path):
    cfg = apply_overrides(tiny_config(lr=0.01, log_every=1, max_steps_per_epoch=12),
                          {"tracking.uri": f"sqlite:///{tmp_path}/mlflow.db", "tracking.experiment": "unit"})
    cfg = prepare_tracking(cfg)
    logger = RunLogger.open(cfg, "unit-run")
    worker = _worker(cfg, logger)
    torch.manual_seed(0)
    model = build_model(cfg.model, DIMS)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.train.lr)
    table = _video_table(np.random.default_rng(0), 8)
    batches = [_batch(table, epoch) for epoch in range(20)]  # one fixed batch of videos, captions vary
    generator = torch.Generator().manual_seed(0)

    means, steps, samples = train_epoch(worker, model, optimizer, batches, generator, global_step=100)
    assert (steps, samples) == (12, 96)
    history = logger.client.get_metric_history(logger.run_id, "step_loss")
    assert [m.step for m in sorted(history, key=lambda m: m.step)] == list(range(101, 113))
    losses = [m.value for m in sorted(history, key=lambda m: m.step)]
    assert means["loss"] == pytest.approx(np.mean(losses), rel=1e-6)  # epoch mean = mean of logged steps
    assert all(math.isfinite(v) for v in means.values())
    assert np.mean(losses[-3:]) < np.mean(losses[:3])  # it fits a fixed batch
    params = logger.client.get_run(logger.run_id).data.params
    assert params["train.max_steps_per_epoch"] == "12" and params["model.embed_dim"] == "16"


def _naive_ranks(text: np.ndarray, video: np.ndarray, owner: np.ndarray) -> tuple[list[int], list[int]]:
    """t2v: 1 + videos scoring strictly higher than the caption's own; v2t: best own caption's rank among
    all captions, counting only other videos' captions above it."""
    t2v = [1 + sum(text[c] @ video[v] > text[c] @ video[owner[c]] for v in range(len(video))) for c in range(len(text))]
    v2t = []
    for v in range(len(video)):
        best = max(video[v] @ text[c] for c in range(len(text)) if owner[c] == v)
        v2t.append(1 + sum(video[v] @ text[c] > best for c in range(len(text)) if owner[c] != v))
    return t2v, v2t


def test_evaluate_split_matches_a_naive_oracle_whatever_the_row_order():
    cfg = tiny_config()
    torch.manual_seed(1)
    model = build_model(cfg.model, DIMS).eval()
    table = _video_table(np.random.default_rng(2), 12, start=100)
    shuffled = table.take(pa.array(np.random.default_rng(3).permutation(12)))
    metrics = evaluate_split(_worker(cfg), model, [shuffled.slice(0, 5), shuffled.slice(5)])

    video_emb, text_emb, owner, labels = [], [], [], []
    with torch.no_grad():  # one item at a time, in store order
        for row in range(12):
            batch = _batch(table.slice(row, 1))
            video_emb.append(model.encode_video(batch["frames"], batch["frame_mask"])[0].numpy())
            labels.append(batch["concept_labels"][0].numpy())
            for tokens in table["caption_token_ids"][row].as_py():
                text_emb.append(model.encode_text(torch.tensor([tokens]), torch.ones(1, len(tokens), dtype=torch.bool))[0].numpy())
                owner.append(row)
    t2v, v2t = _naive_ranks(np.array(text_emb), np.array(video_emb), np.array(owner))
    rsum = sum(100.0 * np.mean(np.array(r) <= k) for r in (t2v, v2t) for k in (1, 5, 10))
    assert metrics["val_rsum"] == pytest.approx(rsum)
    assert metrics["val_t2v_r5"] == pytest.approx(100.0 * np.mean(np.array(t2v) <= 5))

    with torch.no_grad():
        probs = torch.sigmoid(model.decode_concepts(torch.tensor(np.array(video_emb)))).numpy()
    recall = [len(set(np.argsort(-p)[:10]) & set(np.flatnonzero(y))) / min(y.sum(), 10) for p, y in zip(probs, labels)]
    assert metrics["val_concept_recall_video"] == pytest.approx(np.mean(recall), rel=1e-6)
    assert metrics["val_concept_recall"] == pytest.approx(
        (metrics["val_concept_recall_video"] + metrics["val_concept_recall_text"]) / 2
    )


def test_cluster_address_and_loopback_mode(monkeypatch):
    import subprocess
    import sys

    from ulrl.config import RayConfig
    from ulrl.raycluster import cluster_address

    monkeypatch.setenv("RAY_ADDRESS", "local")
    assert cluster_address(RayConfig()) == ""  # "local" means: start one
    assert cluster_address(RayConfig(address="10.0.0.5:6379")) == "10.0.0.5:6379"
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    assert cluster_address(RayConfig()) == "127.0.0.1:6379"
    probe = ("import os; from ulrl.config import RayConfig; from ulrl.raycluster import prefer_loopback; "
             "print(prefer_loopback(RayConfig()), os.environ.get('RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER'))")  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["True", "0"]  # set before Ray is imported: a local cluster listens on loopback only


def test_progress_line():
    metrics = {"epoch": 2, "train_loss": 41.5, "train_triplet": 15.25, "val_rsum": 73.4375, "val_concept_recall": 0.0625,
               "lr": 1.98e-4, "samples_per_s": 12.34, "epoch_seconds": 20.0}  # fmt: skip
    assert progress_line(metrics, 3) == ("[ulrl] epoch 2/3 loss 41.5000 (triplet 15.2500) val_rsum 73.44 "
                                         "concept_recall 0.062 lr 1.98e-04 12.3 samples/s 20.0s")  # fmt: skip
