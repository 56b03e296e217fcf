"""The job config and the moving-digits store of the Ray benchmarks; a store is built once per size and reused.

Full mode trains exactly ``jobs/configs/digits.yaml`` (its data, model, batch and learning rate); quick and
tiny mode shrink its data and model (:data:`SHRINK`). A store lives under ``<work dir>/digits-<hash of its
data config>`` (default work dir ``data/bench``, which git ignores; an ``s3://bucket/prefix`` work dir serves a
multi-node cluster), so changing a size builds a new store and an unchanged one is found again. Building goes
through the same code as ``python -m jobs.prepare`` (:func:`ulrl.digits.moving_digits` +
:func:`ulrl.store.write_store`). Training runs of the benchmarks go to ``<work dir>/runs``, deleted once read.
"""

from __future__ import annotations

import contextlib
import hashlib
import json

import pyarrow.fs as pafs

from benchmarks.common import REPO_ROOT
from ulrl.config import JobConfig, apply_overrides, load_config, to_dict
from ulrl.store import StoreError, open_store, resolve_uri, write_store

DIGITS_YAML = REPO_ROOT / "jobs" / "configs" / "digits.yaml"
SHRINK = {
    "full": {},
    "quick": {
        "data.digits.train_videos": 400, "data.digits.val_videos": 64, "data.digits.test_videos": 160,
        "data.digits.num_queries": 20, "data.digits.feature_dim": 64, "data.digits.canvas": 24,
        "data.digits.min_frames": 6, "data.digits.max_frames": 10, "data.concept_min_freq": 3,
        "data.vocab_min_freq": 3, "store.shard_rows": 200,
        "model.embed_dim": 64, "model.video_rnn_size": 32, "model.video_num_filters": 16, "model.word_dim": 32,
        "model.text_rnn_size": 32, "model.text_num_filters": 16, "train.batch_size": 32,
    },
    "tiny": {  # jobs/configs/tiny.yaml's sizes
        "data.digits.train_videos": 96, "data.digits.val_videos": 32, "data.digits.test_videos": 48,
        "data.digits.num_queries": 8, "data.digits.feature_dim": 32, "data.digits.canvas": 24,
        "data.digits.min_frames": 4, "data.digits.max_frames": 8, "data.concept_min_freq": 2,
        "data.vocab_min_freq": 2, "store.shard_rows": 64,
        "model.embed_dim": 32, "model.video_rnn_size": 16, "model.video_num_filters": 8, "model.word_dim": 16,
        "model.text_rnn_size": 16, "model.text_num_filters": 8, "train.batch_size": 16,
    },
}  # fmt: skip
"""Overrides of ``digits.yaml`` per mode: quick keeps a filler-heavy concept bank of ~100+ concepts."""


def join(uri: str, name: str) -> str:
    """``uri/name`` for a local folder or an ``s3://`` prefix."""
    return f"{str(uri).rstrip('/')}/{name}"


def remove(uri: str) -> None:
    """Delete a folder (local or on S3) and everything in it; a missing one is fine."""
    filesystem, path = resolve_uri(uri)
    with contextlib.suppress(FileNotFoundError):
        if filesystem.get_file_info(path).type == pafs.FileType.Directory:
            filesystem.delete_dir(path)


def store_uri(work_dir: str, cfg: JobConfig) -> str:
    """Where the store of ``cfg``'s data lives (the hash covers the data and store config)."""
    key = json.dumps({"data": to_dict(cfg.data), "store": to_dict(cfg.store)}, sort_keys=True)
    return join(work_dir, f"digits-{hashlib.sha256(key.encode()).hexdigest()[:10]}")


def ensure_store(cfg: JobConfig, log=print) -> None:
    """Build the store at ``cfg.store.uri`` unless a finished one is there already."""
    from ulrl.digits import moving_digits

    try:
        open_store(cfg.store.uri)
        return
    except StoreError:
        pass
    log(f"preparing the moving-digits store ({cfg.data.digits.train_videos} train videos)")
    build = apply_overrides(cfg, {"store.overwrite": True})
    write_store(build, moving_digits(build.data.digits), build.data.source)


def bench_config(mode: str, work_dir: str, extra: dict | None = None) -> JobConfig:
    """The job every Ray benchmark trains with: ``digits.yaml`` shrunk for ``mode``, its store under
    ``work_dir``, runs under ``<work_dir>/runs``, no MLflow, no early stopping, no per-step logging."""
    cfg = load_config(DIGITS_YAML, [])
    cfg = apply_overrides(cfg, {**SHRINK[mode], "store.overwrite": False})
    overrides = {"store.uri": store_uri(work_dir, cfg), "train.storage_uri": join(work_dir, "runs"),
                 "tracking.enabled": False, "train.patience": 0, "train.log_every": 1000, **(extra or {})}
    return apply_overrides(cfg, overrides)
