"""Evaluation of a trained model on one store split, and the collection index that search reads.

[1] Model: ``eval.model_uri`` (a registered model) or ``eval.checkpoint``, by default the best checkpoint
    (``val_rsum``) of run ``train.name`` under the runs storage; its thresholds/registry come from this config.
[2] Encoding: Ray Data ``map_batches`` with :class:`EncodeBatch`, an actor class that builds the model once per
    actor, an autoscaling pool of 1–2 actors of ``ENCODE_CPUS`` each; videos and captions run concurrently.
[3] Figures (every one goes to metrics.json; the scalars to MLflow too):
    * caption→video / video→caption R@1/5/10, MedR, MeanR, mAP, rsum (:func:`ulrl.metrics.retrieval_metrics`);
    * AVS, where the split has queries: per-query AP of the fused score at every θ of ``eval.thetas`` ∪ {0, 1}
      (θ = 0 is the embedding-only scorer, θ = 1 the concept-only one; :func:`ulrl.search.rank`, the code path
      ``jobs.search`` uses). Qrels holding pooled-but-unjudged rows (relevance < 0) are sampled: then xinfAP
      (one stratum), else plain AP. ``avs_best_theta`` is the θ of the best mean — chosen on the evaluated
      queries themselves, so it is an oracle choice, reported as such. One TREC run file per θ, ranked lists
      of ``eval.top_n``, written with score = top_n − rank + 1 so that trec_eval keeps our exact order;
    * concepts: decoding mAP/AUC of the video probabilities against the caption labels; with true labels, against
      the true attributes and against the true attributes the captions never mention (entries of mentioned
      concepts are masked out); contradiction rate of the decoded sets (p > 0.5) of videos and of captions.
[4] Output: ``eval.output_dir``/{metrics.json, run_theta*.trec, plots/*.png}, an MLflow run in the training
    experiment (tagged with the checkpoint, the model fingerprint and the training run id) holding the scalars
    and those files, the registered model (:func:`ulrl.registry.log_and_register`, checkpoints only), and the
    collection index ``<store>/index/<split>/`` (``part-*.parquet`` + ``index.json`` written last).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ulrl import metrics, plots, search
from ulrl.config import JobConfig
from ulrl.index import VideoIndex, write_index
from ulrl.registry import (Encoder, ModelBundle, Registration, bundle_from_checkpoint, bundle_from_registry,
                           log_and_register, with_serving_config)  # fmt: skip
from ulrl.store import Store, open_store
from ulrl.tracking import resolve_tracking_uri

ENCODE_CPUS = 0.5
"""CPUs per encoding actor: two fit next to the driver on a 2-core machine."""


class EvaluationError(ValueError):
    """Inputs that cannot be evaluated together (no run, a model of another store, unknown qrels ids)."""


def log(message: str) -> None:
    print(f"[evaluate] {message}", flush=True)


# ------------------------------------------------------------------------------------------ [1] model


@dataclass(frozen=True)
class ModelSource:
    bundle: ModelBundle
    checkpoint: str
    """Checkpoint URI, or "" for a registered model."""
    model_uri: str
    """Registered model URI, or "" for a checkpoint."""
    train_run_id: str
    """MLflow run of the training (from the checkpoint), or ""."""

    @property
    def name(self) -> str:
        return self.model_uri or self.checkpoint


def default_checkpoint(cfg: JobConfig) -> str:
    """URI of the best checkpoint (``val_rsum``) of run ``train.name`` under the runs storage."""
    import os

    from ray.train import Result

    from ulrl.checkpoint import checkpoint_uri, run_storage
    from ulrl.train_loop import best_checkpoint

    path, filesystem = run_storage(cfg)
    run_dir = f"{path.rstrip('/')}/{cfg.train.name}" if filesystem else os.path.abspath(f"{path}/{cfg.train.name}")
    try:
        result = Result.from_path(run_dir, storage_filesystem=filesystem)
    except RuntimeError:
        raise EvaluationError(f"no finished training run '{cfg.train.name}' under {path}: run jobs.train first, "
                              "or set eval.checkpoint / eval.model_uri") from None
    best = best_checkpoint(result)
    if best is None:
        raise EvaluationError(f"training run {run_dir} has no checkpoint")
    return checkpoint_uri(best)


def load_model_source(cfg: JobConfig, store: Store) -> ModelSource:
    """The model to evaluate ([1] of the module docstring); its concept bank must be the store's."""
    if cfg.eval.model_uri:
        bundle = bundle_from_registry(cfg.eval.model_uri, resolve_tracking_uri(cfg.tracking.uri))
        source = ModelSource(with_serving_config(bundle, cfg), "", cfg.eval.model_uri, "")
    else:
        from ulrl.checkpoint import CheckpointReader

        checkpoint = cfg.eval.checkpoint or default_checkpoint(cfg)
        bundle = with_serving_config(bundle_from_checkpoint(checkpoint, store), cfg)
        source = ModelSource(bundle, checkpoint, "", CheckpointReader(checkpoint).state().mlflow_run_id)
    if source.bundle.concepts != store.concepts:
        raise EvaluationError(f"{source.name} was trained with another concept bank than store {store.uri}")
    return source


# ------------------------------------------------------------------------------------------ [2] encoding


class EncodeBatch:
    """``map_batches`` callable: Arrow rows of videos or captions → ids, embeddings (B, D), probabilities (B, K)."""

    def __init__(self, bundle: ModelBundle, kind: str):
        torch.set_num_threads(1)  # the actor holds a fraction of a CPU; more threads only contend
        self.model, self.cfg, self.dims, self.kind = bundle.build(), bundle.cfg, bundle.dims, kind

    @torch.no_grad()
    def __call__(self, table: Any) -> dict[str, np.ndarray]:
        from ulrl.data import collate_captions, collate_videos

        if self.kind == "videos":
            batch, ids = collate_videos(table, self.cfg.data.max_frames, self.dims.clip_dim, self.dims.frame_dim)
            emb = self.model.encode_video(batch["frames"], batch["frame_mask"], batch.get("clip_features"))
        else:
            batch, ids = collate_captions(table, self.cfg.data.max_words, self.dims.sentence_dim)
            emb = self.model.encode_text(batch["tokens"], batch["token_mask"], batch.get("sentence_features"))
        probs = torch.sigmoid(self.model.decode_concepts(emb))  # (B, K)
        return {"id": np.asarray(ids).astype(str), "video_index": batch["video_index"].numpy(),
                "embedding": emb.numpy(), "concept_probs": probs.numpy()}  # fmt: skip


@dataclass(frozen=True)
class Encoded:
    """One split's rows, ordered by (video_index, id)."""

    ids: np.ndarray
    """(N,) video or caption ids."""
    video_index: np.ndarray
    """(N,) int64 index of the (owning) video."""
    embedding: np.ndarray
    """(N, D) float32."""
    probs: np.ndarray
    """(N, K) float32 concept probabilities."""


def _columns(kind: str, manifest: dict[str, Any]) -> list[str]:
    if kind == "videos":
        return ["video_id", "video_index", "frames"] + (["clip_features"] if manifest.get("clip_dim", 0) else [])
    sentence = ["sentence_features"] if manifest.get("sentence_dim", 0) else []
    return ["caption_id", "video_index", "token_ids", *sentence]


def encode_split(store: Store, split: str, kind: str, bundle: ModelBundle, batch_size: int) -> Encoded:
    """Encode every video (``kind="videos"``) or caption of a split with Ray Data batch inference."""
    from ray.data import ActorPoolStrategy

    from ulrl.data import read_split

    dataset = read_split(store, split, kind, _columns(kind, store.manifest)).map_batches(
        EncodeBatch, fn_constructor_kwargs={"bundle": bundle, "kind": kind}, batch_size=batch_size,
        batch_format="pyarrow", compute=ActorPoolStrategy(min_size=1, max_size=2), num_cpus=ENCODE_CPUS,
    )  # fmt: skip
    parts = list(dataset.iter_batches(batch_size=None, batch_format="numpy"))
    if not parts:
        raise EvaluationError(f"store {store.uri}: split '{split}' has no {kind}")
    cat = {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}
    order = np.lexsort((cat["id"], cat["video_index"]))  # Ray may return blocks in any order
    return Encoded(cat["id"][order], cat["video_index"][order].astype(np.int64),
                   np.asarray(cat["embedding"][order], np.float32), np.asarray(cat["concept_probs"][order], np.float32))


def encode_videos_and_captions(store: Store, split: str, bundle: ModelBundle, batch_size: int
                               ) -> tuple[Encoded, Encoded]:
    """Both encodings at once (two Ray Data executions from two driver threads), so their actor start-ups overlap."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2) as pool:
        videos, captions = (pool.submit(encode_split, store, split, kind, bundle, batch_size)
                            for kind in ("videos", "captions"))  # fmt: skip
        return videos.result(), captions.result()


# ------------------------------------------------------------------------------------------ [3] figures


def finite(value: float) -> float | None:
    """JSON has no NaN: undefined figures (no positives, no queries) are written as null."""
    return None if value is None or math.isnan(value) else float(value)


def video_labels(store: Store, split: str, count: int) -> tuple[np.ndarray, np.ndarray | None]:
    """(N, K) caption labels and (N, K) true labels (None without ``has_true_labels``), in video_index order."""
    from ulrl.data import multi_hot

    has_true = bool(store.manifest.get("has_true_labels"))
    columns = ["video_index", "concept_ids"] + (["true_concept_ids"] if has_true else [])
    table = store.read_table(split, "videos", columns).sort_by("video_index")
    if not np.array_equal(table["video_index"].to_numpy(), np.arange(count)):
        raise EvaluationError(f"store {store.uri}: split '{split}' video_index is not 0..{count - 1}")
    K = len(store.concepts)
    caption = multi_hot(table["concept_ids"], K)  # (N, K)
    return caption, multi_hot(table["true_concept_ids"], K) if has_true else None


def concept_report(videos: Encoded, captions: Encoded, caption_labels: np.ndarray, true_labels: np.ndarray | None,
                   contradiction: np.ndarray) -> tuple[dict[str, float], dict[str, list[float | None]]]:
    """Scalars (decoding mAP/AUC, contradiction rates) and per-concept AP lists ([3] of the docstring)."""
    probs = videos.probs  # (N, K)
    label_sets = {"caption": (caption_labels, None)}
    if true_labels is not None:
        label_sets["true"] = (true_labels, None)
        label_sets["unmentioned"] = (true_labels, 1.0 - caption_labels)  # only concepts no caption mentions
    scalars, per_concept = {}, {}
    for name, (labels, mask) in label_sets.items():
        scalars[f"concept_map_{name}"] = metrics.concept_map(probs, labels, mask)
        scalars[f"concept_auc_{name}"] = metrics.concept_auc(probs, labels, mask)
        # per-concept AP, the quantity concept_map averages
        ap, valid = metrics.column_average_precision(probs, labels, mask, 128)
        per_concept[name] = [finite(a) if v else None for a, v in zip(ap.tolist(), valid.tolist())]
    scalars["contradiction_rate_video"] = metrics.contradiction_rate(probs, contradiction)
    scalars["contradiction_rate_caption"] = metrics.contradiction_rate(captions.probs, contradiction)
    return scalars, per_concept


@dataclass(frozen=True)
class QuerySet:
    ids: list[str]
    texts: list[str]
    relevant: list[np.ndarray]
    """Per query the indices of its relevant videos (relevance > 0)."""
    judgments: dict[str, dict[str, metrics.Judgment]] | None
    """Per query every judged video, when the qrels are sampled (some relevance < 0); else None."""


def load_queries(store: Store, split: str, video_ids: np.ndarray) -> QuerySet | None:
    """The split's AVS queries and qrels, or None when it has none."""
    if split not in store.manifest.get("query_splits", []):
        return None
    queries = store.read_table(split, "queries").to_pydict()
    qrels = store.read_table(split, "qrels").to_pydict()
    position = {vid: i for i, vid in enumerate(video_ids.tolist())}
    known = set(queries["query_id"])
    for row, (qid, vid) in enumerate(zip(qrels["query_id"], qrels["video_id"])):
        if vid not in position or qid not in known:
            raise EvaluationError(f"store {store.uri}: {split}/qrels.parquet row {row}: unknown "
                                  f"{'video ' + vid if vid not in position else 'query ' + qid}")
    relevant = {qid: [] for qid in queries["query_id"]}
    judged = {qid: {} for qid in queries["query_id"]}
    for qid, vid, rel in zip(qrels["query_id"], qrels["video_id"], qrels["relevance"]):
        judged[qid][vid] = metrics.Judgment(int(rel))
        if rel > 0:
            relevant[qid].append(position[vid])
    sampled = any(rel < 0 for rel in qrels["relevance"])
    relevant_rows = [np.asarray(relevant[qid], np.int64) for qid in queries["query_id"]]
    return QuerySet(queries["query_id"], queries["text"], relevant_rows, judged if sampled else None)


def scorer_thetas(thetas: list[float]) -> list[float]:
    """The configured θ plus 0 (embedding only) and 1 (concepts only), ascending."""
    return sorted({0.0, 1.0, *map(float, thetas)})


def avs_report(query_set: QuerySet, encoder: Encoder, videos: Encoded, cfg: JobConfig
               ) -> tuple[dict[str, float], dict[str, Any], dict[float, np.ndarray]]:
    """Scalars, details (per-query AP by θ) and (Q, top_n) rankings by θ of the AVS queries."""
    emb, _, weights = encoder.queries(query_set.texts)
    queries = search.Queries(emb, weights)
    collection = search.Collection.from_probs(torch.from_numpy(videos.embedding), torch.from_numpy(videos.probs),
                                              cfg.eval.video_threshold)  # fmt: skip
    thetas, per_theta, rankings = scorer_thetas(cfg.eval.thetas), {}, {}
    for theta in thetas:
        ranked, _ = search.rank(queries, collection, theta, cfg.eval.top_n)
        rankings[theta] = ranked
        per_theta[theta] = _query_ap(query_set, ranked, videos.ids, cfg.eval.top_n)
    means = {theta: float(np.mean(ap)) for theta, ap in per_theta.items()}
    best = max(thetas, key=lambda t: (means[t], -t))  # ties: the smaller θ
    scalars = {"avs_map_emb": means[0.0], "avs_map_concept": means[1.0], "avs_map_fused": means[best],
               "avs_best_theta": best, **{f"avs_map_theta_{t:.2f}": means[t] for t in thetas}}  # fmt: skip
    details = {"measure": "infAP" if query_set.judgments else "AP", "thetas": thetas, "best_theta": best,
               "mean_by_theta": {f"{t:.2f}": means[t] for t in thetas},
               "per_query": {qid: {"text": text, **{f"{t:.2f}": float(per_theta[t][q]) for t in thetas}}
                             for q, (qid, text) in enumerate(zip(query_set.ids, query_set.texts))}}  # fmt: skip
    return scalars, details, rankings


def _query_ap(query_set: QuerySet, ranked: np.ndarray, video_ids: np.ndarray, top_n: int) -> np.ndarray:
    """(Q,) AP of complete qrels, or xinfAP of sampled ones, of (Q, k) ranked video indices."""
    if query_set.judgments is None:
        return metrics.avs_average_precision(ranked, query_set.relevant, top_n)
    run = {qid: video_ids[row].tolist() for qid, row in zip(query_set.ids, ranked)}
    ap = metrics.inferred_ap_per_query(run, query_set.judgments, top_n)
    return np.array([ap[qid] for qid in query_set.ids])


def build_report(cfg: JobConfig, store: Store, source: ModelSource, videos: Encoded, captions: Encoded
                 ) -> tuple[dict[str, Any], dict[float, np.ndarray], QuerySet | None]:
    """metrics.json's content, the AVS rankings by θ and the query set ([3] of the module docstring)."""
    split = cfg.eval.split
    if not np.array_equal(videos.video_index, np.arange(len(videos.ids))):
        raise EvaluationError(f"store {store.uri}: split '{split}' video_index is not 0..{len(videos.ids) - 1}")
    caption_labels, true_labels = video_labels(store, split, len(videos.ids))
    scalars = metrics.retrieval_metrics(captions.embedding, videos.embedding, captions.video_index)
    concept_scalars, per_concept = concept_report(videos, captions, caption_labels, true_labels, store.contradiction())
    scalars.update(concept_scalars)
    query_set, avs, rankings = load_queries(store, split, videos.ids), None, {}
    if query_set is not None and source.bundle.cfg.model.text_encoder == "sentence":
        log("AVS skipped: the 'sentence' text encoder needs precomputed query features, free-text queries have none")
        query_set = None
    if query_set is not None:
        avs_scalars, avs, rankings = avs_report(query_set, Encoder(source.bundle), videos, cfg)
        scalars.update(avs_scalars)
    report = {
        "split": split, "store": store.uri,
        "model": {"checkpoint": source.checkpoint, "model_uri": source.model_uri,
                  "fingerprint": source.bundle.fingerprint(), "train_run_id": source.train_run_id},
        "counts": {"videos": len(videos.ids), "captions": len(captions.ids),
                   "queries": len(query_set.ids) if query_set else 0},
        "metrics": {key: finite(value) for key, value in scalars.items()},
        "avs": avs,
        "per_concept_ap": {name: {c: ap for c, ap in zip(store.concepts, values) if ap is not None}
                           for name, values in per_concept.items()},
    }  # fmt: skip
    return report, rankings, query_set


# ------------------------------------------------------------------------------------------ [4] outputs


def write_outputs(out_dir: Path, report: dict[str, Any], rankings: dict[float, np.ndarray],
                  query_set: QuerySet | None, video_ids: np.ndarray, top_n: int) -> list[Path]:
    """metrics.json, one TREC run per θ and the plots under ``out_dir``; returns the written files."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob("run_theta*.trec"):
        stale.unlink()
    files = []
    for theta, ranked in rankings.items():
        path = out_dir / f"run_theta{theta:.2f}.trec"
        metrics.write_trec_run(path, query_set.ids, [video_ids[row].tolist() for row in ranked],
                               tag=f"ulrl-theta{theta:.2f}", top_n=top_n)  # fmt: skip
        files.append(path)
    files += plots.evaluation_plots(out_dir / "plots", report)
    path = out_dir / "metrics.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=1))
    tmp.replace(path)
    return [*files, path]


def track(cfg: JobConfig, source: ModelSource, report: dict[str, Any], files: list[Path]
          ) -> tuple[str, Registration | None]:
    """The evaluation's MLflow run (scalars, files) and, for a checkpoint, the registered model version."""
    if not cfg.tracking.enabled:
        log("tracking.enabled is false: no MLflow run and no registration")
        return "", None
    from ulrl.tracking import RunLogger, prepare_tracking

    cfg = prepare_tracking(cfg)
    model = report["model"]
    tags = {"ulrl.kind": "evaluate", "ulrl.split": cfg.eval.split, "ulrl.train_name": cfg.train.name,
            "checkpoint": model["checkpoint"], "model_uri": model["model_uri"], "fingerprint": model["fingerprint"],
            "train_run_id": model["train_run_id"]}  # fmt: skip
    logger = RunLogger.open(cfg, f"{cfg.train.name}-eval-{cfg.eval.split}", tags=tags)
    try:
        logger.log_metrics({k: v for k, v in report["metrics"].items() if v is not None}, step=0)
        for path in files:
            folder = "evaluation/plots" if path.suffix == ".png" else "evaluation"
            logger.client.log_artifact(logger.run_id, str(path), folder)
        registration = None
        if cfg.registry.register and source.checkpoint:
            registration = log_and_register(source.bundle, cfg.tracking.uri, logger.run_id, report["metrics"],
                                            {"checkpoint": source.checkpoint})  # fmt: skip
    except BaseException:
        logger.finish("FAILED")
        raise
    logger.finish()
    return logger.run_id, registration


# ------------------------------------------------------------------------------------------ job


@dataclass(frozen=True)
class EvalResult:
    report: dict[str, Any]
    """metrics.json's content."""
    output_dir: Path
    run_id: str
    """The evaluation's MLflow run ("" without tracking)."""
    registration: Registration | None
    index_uri: str


def evaluate(cfg: JobConfig) -> EvalResult:
    """Encode ``eval.split`` with the model of [1], compute [3], write [4]. Ray is connected here."""
    from ulrl.raycluster import connect

    started = time.perf_counter()
    store = open_store(cfg.store.uri)
    store.files(cfg.eval.split, "videos")  # StoreError naming the splits when it is missing
    source = load_model_source(cfg, store)
    log(f"model {source.name} (fingerprint {source.bundle.fingerprint()}) on split '{cfg.eval.split}' of {store.uri}")
    connect(cfg.ray)
    videos, captions = encode_videos_and_captions(store, cfg.eval.split, source.bundle, cfg.eval.batch_size)
    log(f"encoded {len(videos.ids)} videos and {len(captions.ids)} captions ({time.perf_counter() - started:.1f}s)")
    report, rankings, query_set = build_report(cfg, store, source, videos, captions)
    output_dir = Path(cfg.eval.output_dir)
    files = write_outputs(output_dir, report, rankings, query_set, videos.ids, cfg.eval.top_n)
    log(f"wrote {len(files)} files to {output_dir}")
    run_id, registration = track(cfg, source, report, files)
    if registration is not None:
        state = "now holds" if registration.promoted else "stays with the previous holder of"
        log(f"registered {registration.model_uri}; it {state} alias '{registration.alias}'")
    meta = {"model": source.name, **report["model"], "registered": registration.model_uri if registration else "",
            "best_theta": (report["avs"] or {}).get("best_theta")}
    index = VideoIndex(meta, videos.ids, videos.embedding, videos.probs)
    index_uri = write_index(store, cfg.eval.split, index, cfg.store.shard_rows)
    log(f"index → {index_uri}; done in {time.perf_counter() - started:.1f}s")
    return EvalResult(report, output_dir, run_id, registration, index_uri)
