"""The served model: a self-contained bundle, its MLflow pyfunc wrapper, registration and alias promotion.

A :class:`ModelBundle` is everything needed to answer a query without the store: the weights (a
``state_dict``), the config (architecture, ``data.max_words``, ``eval`` thresholds), the model dims, the
concept bank, the vocabulary and the contradiction pairs. On disk it is one folder (:data:`BUNDLE_FILES`),
logged as the ``bundle`` artifact of an ``mlflow.pyfunc`` model; weights load with ``weights_only=True``.
There is no torch.export (pt2) copy: pt2 freezes sequence lengths, and queries and videos vary in length.

:class:`UlrlPyfuncModel` lives in this package and the model is logged with ``code_paths=[<ulrl>]``: MLflow
copies the package next to the model and puts it first on ``sys.path`` when it loads, so
``mlflow.pyfunc.load_model("models:/ulrl@champion")`` works in any process that has torch/mlflow/nltk —
with or without ulrl installed — and runs the code the model was logged with.
``predict`` takes a DataFrame with a ``text`` column, or a ``frames`` column (each cell a (T, F) list of frame
vectors, any T ≥ 1; plus ``clip_features`` when the model has them) and returns one row per input:
``embedding`` (list of D floats), ``concepts`` (list of {concept, probability, weight}; for texts the selected
query concepts of :mod:`ulrl.search`, for videos the decoded ones, p > ``eval.video_threshold``, at most
``params["top_concepts"]`` = 10) and ``contradicting`` (names: antonyms of those concepts, not among them).

Promotion (``registry.promote``): ``always`` moves ``registry.alias`` to the new version, ``never`` leaves it,
``auto`` moves it when the alias is free, when its holder has no ``selection_metric`` tag naming the same
metric, or when the new value is strictly higher. Both tags are written on every registered version.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch
import yaml

from ulrl import search
from ulrl.concepts import encode_tokens, index_of
from ulrl.config import JobConfig, from_dict, to_yaml
from ulrl.model import ITVModel, ModelDims, ModelInputError, build_model

BUNDLE_FILES = ("model.pt", "model_meta.json", "config.yaml", "concepts.json", "vocab.json", "contradictions.json")
PACKAGE_DIR = Path(__file__).resolve().parent
"""The ulrl package folder, logged as the model's ``code_paths``."""
METRIC_TAG, VALUE_TAG = "selection_metric", "selection_value"
"""Model-version tags: the metric that ranks versions for ``promote: auto`` and its value."""


class RegistryError(ValueError):
    """A bundle folder or registered model that cannot be read; the message names the file or URI."""


# ---------------------------------------------------------------------------------------------- bundle


def state_fingerprint(state_dict: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the parameter names and bytes (sorted by name): the same weights give the same value
    however they were serialised. Search compares it with the index's to refuse a mismatched model."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous().reshape(-1)  # 0-d buffers (BN counters) too
        digest.update(name.encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class ModelBundle:
    """Weights + what interprets them (see the module docstring)."""

    cfg: JobConfig
    dims: ModelDims
    state_dict: dict[str, torch.Tensor]
    concepts: list[str]
    vocab: list[str]
    pairs: list[tuple[str, str]]

    def build(self) -> ITVModel:
        """The model in ``eval()`` mode on the CPU."""
        model = build_model(self.cfg.model, self.dims)
        model.load_state_dict(self.state_dict)
        return model.eval()

    def fingerprint(self) -> str:
        return state_fingerprint(self.state_dict)

    def contradiction(self) -> torch.Tensor:
        """(K, K) C[a, b] = 1 iff b contradicts a."""
        from ulrl.concepts import contradiction_matrix

        return torch.from_numpy(contradiction_matrix(self.pairs, self.concepts))

    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        torch.save(self.state_dict, folder / "model.pt")
        meta = {"dims": self.dims.to_dict(), "fingerprint": self.fingerprint(), "torch": torch.__version__}
        files = {"model_meta.json": meta, "concepts.json": {"concepts": self.concepts},
                 "vocab.json": {"words": self.vocab}, "contradictions.json": {"pairs": [list(p) for p in self.pairs]}}
        for name, value in files.items():
            (folder / name).write_text(json.dumps(value))
        (folder / "config.yaml").write_text(to_yaml(self.cfg))
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> ModelBundle:
        folder = Path(folder)
        missing = [name for name in BUNDLE_FILES if not (folder / name).is_file()]
        if missing:
            raise RegistryError(f"{folder}: not a model bundle, no {missing[0]}")
        read = lambda name: json.loads((folder / name).read_text())  # noqa: E731
        cfg = from_dict(yaml.safe_load((folder / "config.yaml").read_text()) or {})
        state = torch.load(folder / "model.pt", map_location="cpu", weights_only=True)
        pairs = [(a, b) for a, b in read("contradictions.json")["pairs"]]
        return cls(cfg, ModelDims.from_manifest(read("model_meta.json")["dims"]), state,
                   read("concepts.json")["concepts"], read("vocab.json")["words"], pairs)  # fmt: skip


def bundle_from_checkpoint(location: Any, store: Any) -> ModelBundle:
    """A bundle from a training checkpoint (dir/URI/Ray Checkpoint) and the opened store it trained on."""
    from ulrl.checkpoint import CheckpointReader

    reader = CheckpointReader(location)
    dims = reader.dims()
    if dims.num_concepts != len(store.concepts):
        raise RegistryError(f"{reader.location}: the model decodes {dims.num_concepts} concepts, "
                            f"store {store.uri} has {len(store.concepts)}")
    return ModelBundle(reader.config(), dims, reader.tensors("model.pt"), store.concepts, store.vocab, store.pairs)


def with_serving_config(bundle: ModelBundle, cfg: JobConfig) -> ModelBundle:
    """The bundle with the ``eval`` (thresholds) and ``registry`` sections of ``cfg``; the architecture and
    data sections stay those the model was trained with."""
    return dataclasses.replace(bundle, cfg=dataclasses.replace(bundle.cfg, eval=cfg.eval, registry=cfg.registry))


def bundle_from_registry(model_uri: str, tracking_uri: str) -> ModelBundle:
    """Download ``models:/name@alias`` (or any model URI) and read its bundle artifact."""
    mlflow.set_tracking_uri(tracking_uri)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=tmp)
        except mlflow.exceptions.MlflowException as err:
            raise RegistryError(f"{model_uri}: {str(err).splitlines()[0]}") from None
        return ModelBundle.load(Path(local) / "artifacts" / "bundle")


# ---------------------------------------------------------------------------------------------- encoding


def text_batch(texts: list[str], vocab: list[str], max_words: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (Q, L) int64 zero-padded (L ≥ 1) and token_mask (Q, L) bool of free texts."""
    vocab_index = index_of(vocab)
    ids = [encode_tokens(text, vocab_index, max_words) for text in texts]
    width = max([1, *map(len, ids)])
    tokens = torch.zeros(len(texts), width, dtype=torch.int64)  # (Q, L)
    for row, seq in enumerate(ids):
        tokens[row, : len(seq)] = torch.tensor(seq, dtype=torch.int64)
    return tokens, torch.arange(width) < torch.tensor([len(s) for s in ids]).unsqueeze(1)


def frames_batch(videos: list[Any], frame_dim: int, max_frames: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Frames (B, T, F) float32 zero-padded and frame_mask (B, T) bool from per-video (T_i, F) arrays."""
    arrays = []
    for row, video in enumerate(videos):
        array = np.asarray([np.asarray(f, dtype=np.float32) for f in video], dtype=np.float32)
        if array.ndim != 2 or array.shape[0] == 0 or array.shape[1] != frame_dim:
            raise ModelInputError(f"row {row}: frames must be a non-empty list of {frame_dim}-d vectors, "
                                  f"got shape {array.shape}")
        arrays.append(torch.from_numpy(array[:max_frames]))
    frames = torch.nn.utils.rnn.pad_sequence(arrays, batch_first=True)  # (B, T, F)
    lengths = torch.tensor([len(a) for a in arrays])
    return frames, torch.arange(frames.shape[1]) < lengths.unsqueeze(1)


@torch.no_grad()
def encode_texts(model: ITVModel, texts: list[str], vocab: list[str], max_words: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings (Q, D) and concept probabilities (Q, K) of free texts."""
    tokens, mask = text_batch(texts, vocab, max_words)
    emb = model.encode_text(tokens, mask)  # (Q, D)
    return emb, torch.sigmoid(model.decode_concepts(emb))  # (Q, K)


@torch.no_grad()
def encode_frames(model: ITVModel, frames: torch.Tensor, mask: torch.Tensor, clip: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings (B, D) and concept probabilities (B, K) of padded videos."""
    emb = model.encode_video(frames, mask, clip)  # (B, D)
    return emb, torch.sigmoid(model.decode_concepts(emb))  # (B, K)


# ---------------------------------------------------------------------------------------------- pyfunc


class Encoder:
    """A bundle's model on the CPU with what query/video encoding needs; shared by the pyfunc model and
    ``jobs.evaluate`` (so evaluate scores queries exactly as the served model does)."""

    def __init__(self, bundle: ModelBundle):
        self.bundle = bundle
        self.model = bundle.build()
        self.contradiction = bundle.contradiction()  # (K, K)
        self.generic = search.generic_mask(bundle.concepts)  # (K,)

    def queries(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Query embeddings (Q, D), concept probabilities (Q, K) and weights c_q (Q, K)
        (:func:`ulrl.search.query_concept_weights`)."""
        cfg = self.bundle.cfg
        emb, probs = encode_texts(self.model, texts, self.bundle.vocab, cfg.data.max_words)
        lexical = search.lexical_matrix(texts, self.bundle.concepts)
        return emb, probs, search.query_concept_weights(probs, lexical, cfg.eval.query_threshold, self.generic)

    def videos(self, frames: list[Any], clip_features: list[Any] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Video embeddings (B, D) and concept probabilities (B, K) of per-video (T_i, F) frame lists."""
        dims, cfg = self.bundle.dims, self.bundle.cfg
        padded, mask = frames_batch(frames, dims.frame_dim, cfg.data.max_frames)
        clip = None
        if dims.clip_dim > 0:
            if clip_features is None:
                raise ModelInputError(f"this model needs a 'clip_features' column ({dims.clip_dim}-d per video)")
            clip = torch.tensor(np.stack([np.asarray(c, np.float32) for c in clip_features]))
        return encode_frames(self.model, padded, mask, clip)

    def describe(self, probs: torch.Tensor, weights: torch.Tensor) -> list[tuple[list[dict], list[str]]]:
        """Per row: selected concepts (weight > 0, heaviest first) and the contradicting concept names."""
        names = self.bundle.concepts
        against = search.contradicting_concepts(weights > 0, self.contradiction)  # (B, K)
        rows = []
        for p, w, a in zip(probs, weights, against):
            order = sorted(torch.nonzero(w > 0).flatten().tolist(), key=lambda k: (-float(w[k]), names[k]))
            concepts = [{"concept": names[k], "probability": float(p[k]), "weight": float(w[k])} for k in order]
            rows.append((concepts, [names[k] for k in torch.nonzero(a).flatten().tolist()]))
        return rows


class UlrlPyfuncModel(mlflow.pyfunc.PythonModel):
    """``mlflow.pyfunc`` wrapper of a :class:`ModelBundle` (artifact ``bundle``); see the module docstring."""

    def load_context(self, context: Any) -> None:
        self.encoder = Encoder(ModelBundle.load(context.artifacts["bundle"]))

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        """DataFrame with ``text`` or ``frames`` (+ ``clip_features``) → embedding, concepts, contradicting."""
        frame = pd.DataFrame(model_input)
        if "text" in frame.columns:
            emb, probs, weights = self.encoder.queries([str(t) for t in frame["text"]])
        elif "frames" in frame.columns:
            clip = list(frame["clip_features"]) if "clip_features" in frame.columns else None
            emb, probs = self.encoder.videos(list(frame["frames"]), clip)
            top = int((params or {}).get("top_concepts", 10))
            vectors = search.video_concept_vectors(probs, self.encoder.bundle.cfg.eval.video_threshold)
            probs = weights = _keep_top(vectors, top)
        else:
            raise ModelInputError(f"input needs a 'text' or a 'frames' column, got {list(frame.columns)}")
        described = self.encoder.describe(probs, weights)
        rows = [(e.tolist(), concepts, against) for e, (concepts, against) in zip(emb, described)]
        return pd.DataFrame(rows, columns=["embedding", "concepts", "contradicting"])


def _keep_top(weights: torch.Tensor, top: int) -> torch.Tensor:
    """Zero all but the ``top`` largest entries of each row of (B, K) weights."""
    if top >= weights.shape[1]:
        return weights
    cut = torch.topk(weights, max(top, 0), dim=1)
    return torch.zeros_like(weights).scatter_(1, cut.indices, cut.values)


# ---------------------------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class Registration:
    """A registered model version and whether the alias now points at it."""

    name: str
    version: str
    alias: str
    promoted: bool

    @property
    def model_uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


def pip_requirements() -> list[str]:
    """Pinned requirements of the served model (given explicitly: MLflow's inference loads the model in a
    subprocess, which is slow, and would miss nltk, imported lazily)."""
    from importlib.metadata import version

    names = ("mlflow", "torch", "numpy", "pandas", "pyyaml", "nltk")
    return [f"{name}=={version(name).split('+')[0]}" for name in names]


def should_promote(policy: str, value: float, holder_value: float | None) -> bool:
    """``always``/``never`` as named; ``auto``: no comparable holder, or ``value`` strictly higher (NaN never is)."""
    if policy in ("always", "never"):
        return policy == "always"
    return holder_value is None or (not math.isnan(value) and value > holder_value)


def holder_value(client: Any, name: str, alias: str, metric: str) -> float | None:
    """The selection value of the version holding ``alias``; None if no version holds it or its tags name
    another metric (or a NaN), so that it cannot be compared."""
    from mlflow.exceptions import MlflowException

    try:
        holder = client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None
    if holder.tags.get(METRIC_TAG) != metric:
        return None
    try:
        value = float(holder.tags.get(VALUE_TAG, "nan"))
    except ValueError:
        return None
    return None if math.isnan(value) else value


def log_and_register(bundle: ModelBundle, tracking_uri: str, run_id: str, metrics: dict[str, float],
                     tags: dict[str, str] | None = None) -> Registration:
    """Log ``bundle`` as a pyfunc model in run ``run_id`` (left FINISHED), register it under
    ``registry.model_name``, tag the version and apply ``registry.promote`` (see the module docstring)."""
    registry = bundle.cfg.registry
    if registry.selection_metric not in metrics:
        raise RegistryError(f"registry.selection_metric: '{registry.selection_metric}' is not an evaluation metric "
                            f"(have: {', '.join(sorted(metrics))})")
    value = float(metrics[registry.selection_metric])
    mlflow.set_tracking_uri(tracking_uri)
    with tempfile.TemporaryDirectory() as tmp, mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(
            name="model", python_model=UlrlPyfuncModel(), artifacts={"bundle": str(bundle.save(Path(tmp) / "bundle"))},
            code_paths=[str(PACKAGE_DIR)], pip_requirements=pip_requirements(),
            registered_model_name=registry.model_name,
        )  # fmt: skip
    client = mlflow.MlflowClient(tracking_uri)
    version = str(info.registered_model_version)
    previous = holder_value(client, registry.model_name, registry.alias, registry.selection_metric)
    version_tags = {METRIC_TAG: registry.selection_metric, VALUE_TAG: repr(value),
                    "fingerprint": bundle.fingerprint(), "run_id": run_id, **(tags or {})}
    for key, tag in version_tags.items():
        client.set_model_version_tag(registry.model_name, version, key, str(tag))
    promoted = should_promote(registry.promote, value, previous)
    if promoted:
        client.set_registered_model_alias(registry.model_name, registry.alias, version)
    return Registration(registry.model_name, version, registry.alias, promoted)
