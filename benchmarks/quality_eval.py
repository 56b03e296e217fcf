"""Evaluate one trained checkpoint for the quality benchmark, with the per-item scores the tests need.

Everything is :mod:`ulrl.evaluate`'s: the model source, :class:`ulrl.evaluate.EncodeBatch` (the callable its
Ray Data actors run), :func:`ulrl.evaluate.build_report` (retrieval, AVS per-query AP by θ through
``ulrl.search.rank``, concept mAP, contradiction rates). Two differences, both about cost, not numbers: the
batches are encoded in this process instead of by a Ray Data actor pool (no actor start-up per checkpoint),
and no index, plots, TREC files or MLflow run are written. Added: each video's contradiction flag (its
decoded set holds an antonym pair), for a paired test of the contradiction rate.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch

from ulrl.config import JobConfig
from ulrl.store import Store, open_store

FUSED_THETA = 0.5
"""θ of the fused score reported (fixed in advance: ``avs_map_fused`` of evaluate picks θ on the test queries)."""


def encode_local(store: Store, split: str, kind: str, bundle: Any, batch_size: int):
    """All videos or captions of ``split`` through ``EncodeBatch`` in this process → ``ulrl.evaluate.Encoded``."""
    from ulrl.evaluate import EncodeBatch, Encoded

    columns = (["video_id", "video_index", "frames"] if kind == "videos" else ["caption_id", "video_index", "token_ids"])
    if kind == "videos" and store.manifest.get("clip_dim", 0):
        columns.append("clip_features")
    if kind == "captions" and store.manifest.get("sentence_dim", 0):
        columns.append("sentence_features")
    table = store.read_table(split, kind, columns)
    encode = EncodeBatch(bundle, kind)
    parts = [encode(table.slice(start, batch_size)) for start in range(0, table.num_rows, batch_size)]
    cat = {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}
    order = np.lexsort((cat["id"], cat["video_index"]))  # the order encode_split returns
    return Encoded(cat["id"][order], cat["video_index"][order].astype(np.int64),
                   np.asarray(cat["embedding"][order], np.float32), np.asarray(cat["concept_probs"][order], np.float32))


def contradiction_flags(probs: np.ndarray, contradiction: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """(N,) bool: the decoded set {k : p_k > threshold} of each row holds both concepts of some pair."""
    decoded = torch.as_tensor(probs) > threshold  # (N, K)
    pairs = torch.as_tensor(contradiction) > 0
    pairs = torch.triu(pairs | pairs.T, diagonal=1).nonzero()  # (P, 2) unordered pairs
    return (decoded[:, pairs[:, 0]] & decoded[:, pairs[:, 1]]).any(1).numpy()


def evaluate_checkpoint(cfg: JobConfig, checkpoint: str, split: str = "test") -> dict[str, Any]:
    """Metrics of ``checkpoint`` on ``split``: ``{"metrics", "query_ids", "query_ap": {θ: [...]},
    "contradiction_flags": [...]}`` (per-query AP by θ, in the split's query order)."""
    from ulrl.evaluate import build_report, load_model_source

    thetas = sorted({*cfg.eval.thetas, FUSED_THETA})
    cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, split=split, checkpoint=checkpoint, thetas=thetas))
    store = open_store(cfg.store.uri)
    source = load_model_source(cfg, store)
    videos = encode_local(store, split, "videos", source.bundle, cfg.eval.batch_size)
    captions = encode_local(store, split, "captions", source.bundle, cfg.eval.batch_size)
    report, _, query_set = build_report(cfg, store, source, videos, captions)
    per_query = (report["avs"] or {}).get("per_query", {})
    return {
        "metrics": report["metrics"],
        "query_ids": list(per_query),
        "query_ap": {f"{t:.2f}": [per_query[q][f"{t:.2f}"] for q in per_query] for t in (0.0, FUSED_THETA, 1.0)},
        "contradiction_flags": contradiction_flags(videos.probs, store.contradiction()).tolist(),
    }

