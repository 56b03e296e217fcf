"""One typed configuration tree for every job, loaded from YAML and overridden by dotted ``key=value``.

Precedence: ``key=value`` arguments > YAML file > dataclass defaults. Unknown keys and values of the
wrong type are errors naming the dotted key. The same :func:`apply_overrides` serves the command line and
Ray Tune (a trial's sampled ``{"loss.ul_alpha": 0.1}`` is applied exactly like ``loss.ul_alpha=0.1``).

The config is never mutated after load: derived quantities (feature dims, vocabulary size, the
contradiction matrix) are read from the store's manifest by the code that needs them.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration problem; the message names the offending key."""


@dataclass(frozen=True)
class StoreConfig:
    uri: str = "data/store"
    """Root of the feature store: a local folder or ``s3://bucket/prefix``."""
    overwrite: bool = False
    """Replace an existing store at ``uri`` (otherwise ``prepare`` refuses)."""
    shard_rows: int = 2000
    """Rows per Parquet file when writing a split."""
    feature_dtype: str = "float16"
    """Storage dtype of frame features: ``float16`` or ``float32``."""


@dataclass(frozen=True)
class DigitsConfig:
    """The moving-digits benchmark (videos of handwritten digits moving on a canvas)."""

    train_videos: int = 3000
    """Number of training videos."""
    val_videos: int = 300
    """Number of validation videos."""
    test_videos: int = 1000
    """Number of test videos."""
    captions_per_video: int = 2
    """Captions written per video, each mentioning only some of its attributes."""
    mention_prob: float = 0.35
    """Probability that a caption mentions a given true attribute."""
    two_digit_prob: float = 0.5
    """Probability that a video shows two digits (distinct classes) instead of one."""
    min_frames: int = 8
    """Shortest video, in frames."""
    max_frames: int = 20
    """Longest video, in frames."""
    canvas: int = 32
    """Canvas side in pixels."""
    feature_dim: int = 256
    """Dimension of the frame features produced by the fixed random-conv extractor."""
    num_queries: int = 40
    """AVS-style test queries (two or three attributes each)."""
    seed: int = 0
    """Seed of everything random in the benchmark."""


@dataclass(frozen=True)
class AvsConfig:
    """Import of a collection in the BigFile layout of the public AVS feature releases."""

    root: str = ""
    """Folder holding ``<collection>/FeatureData/<feature>/`` and ``<collection>/TextData/``."""
    train_collection: str = ""
    """Collection name of the training split."""
    val_collection: str = ""
    """Collection name of the validation split."""
    test_collection: str = ""
    """Collection name of the test split (may be empty)."""
    features: list[str] = field(default_factory=list)
    """Frame feature names, concatenated per frame in this order."""
    clip_features: list[str] = field(default_factory=list)
    """Video-level feature names (e.g. motion), concatenated; empty for none."""
    queries: str = ""
    """Optional TREC topic file (``<id> <text>`` per line) for the test split."""
    qrels: str = ""
    """Optional qrels file for ``queries``."""


@dataclass(frozen=True)
class DataConfig:
    source: str = "moving-digits"
    """Where ``prepare`` reads from: ``moving-digits`` or ``avs``."""
    digits: DigitsConfig = field(default_factory=DigitsConfig)
    """Moving-digits benchmark settings."""
    avs: AvsConfig = field(default_factory=AvsConfig)
    """AVS BigFile import settings."""
    concept_min_freq: int = 5
    """A caption word becomes a concept when it occurs at least this often (paper: 5)."""
    vocab_min_freq: int = 5
    """A word enters the text vocabulary at this frequency (paper: 5)."""
    contradiction_file: str = ""
    """Optional user pair file in the ``concept<->a,b`` form, added to the WordNet antonyms."""
    wordnet_antonyms: bool = True
    """Mine contradiction pairs from WordNet antonyms."""
    max_frames: int = 64
    """Frames kept per video by the reader (paper: 64)."""
    max_words: int = 32
    """Tokens kept per caption by the reader."""
    caption_sampling: str = "sample"
    """``sample``: one caption per video per epoch (seeded); ``all``: every caption is a training row."""
    shuffle_buffer: int = 2000
    """Rows in each training worker's local shuffle buffer (0 disables; raised to the batch size); each row
    holds its video's frames, so this bounds memory (rows × frames × frame_dim × 2 bytes)."""
    prefetch_batches: int = 2
    """Training batches collated ahead of the step on a background thread."""


@dataclass(frozen=True)
class ModelConfig:
    text_encoder: str = "multilevel"
    """``multilevel`` (BoW + word-embedding biGRU + CNN) or ``sentence`` (precomputed features → FC)."""
    embed_dim: int = 2048
    """Dimension of the common space."""
    video_rnn_size: int = 1024
    """biGRU hidden size per direction of the video encoder."""
    video_kernel_sizes: list[int] = field(default_factory=lambda: [2, 3, 4, 5])
    """1-D CNN kernel sizes over the video biGRU outputs."""
    video_num_filters: int = 512
    """Filters per kernel size (video)."""
    word_dim: int = 500
    """Word-embedding dimension of the text encoder."""
    text_rnn_size: int = 512
    """biGRU hidden size per direction of the text encoder."""
    text_kernel_sizes: list[int] = field(default_factory=lambda: [2, 3, 4])
    """1-D CNN kernel sizes over the text biGRU outputs."""
    text_num_filters: int = 512
    """Filters per kernel size (text)."""
    dropout: float = 0.2
    """Dropout in both encoders and the concept decoder."""


@dataclass(frozen=True)
class NegativesConfig:
    strategy: str = "antonym"
    """Negative concepts for the unlikelihood term: antonym, random, hard, exclusive or none."""
    k: int = 10
    """Extra negative concepts per sample (random/hard/exclusive); antonyms always count."""
    seed: int = 0
    """Seed of the random strategy."""


@dataclass(frozen=True)
class LossConfig:
    margin: float = 0.2
    """Triplet margin Δ."""
    max_violation: bool = True
    """Use only the hardest negative (VSE++) instead of summing all violations."""
    lam: float = 0.2
    """λ: weight of the positive-concept mean against the negative-concept mean in the likelihood."""
    ul_alpha: float = 0.01
    """α: weight of the unlikelihood term (paper: 0.01)."""
    likelihood: bool = True
    """Train the concept decoder with the likelihood loss."""
    unlikelihood: bool = True
    """Add the unlikelihood loss on negative concepts."""
    reduction: str = "sum"
    """Batch reduction of every term: ``sum`` (paper) or ``mean``."""
    global_negatives: bool = False
    """Hardest triplet negatives from all workers' batches (all-gather) instead of the local batch."""
    negatives: NegativesConfig = field(default_factory=NegativesConfig)
    """Negative-concept sampling."""


@dataclass(frozen=True)
class TrainConfig:
    name: str = "ulrl"
    """Run name; re-running the same name resumes from its latest checkpoint."""
    storage_uri: str = ""
    """Where runs and checkpoints go; empty means ``<store.uri>/runs``."""
    num_workers: int = 2
    """Ray Train workers (DDP ranks)."""
    use_gpu: bool = False
    """One GPU per worker with nccl; otherwise CPU with gloo."""
    cpus_per_worker: float = 0.5
    """CPUs reserved per worker; keep it fractional on small machines so Ray Data can read."""
    batch_size: int = 128
    """Per-worker batch size."""
    epochs: int = 100
    """Maximum epochs."""
    lr: float = 2e-4
    """Adam learning rate (paper: 2e-4)."""
    lr_decay: float = 0.99
    """Learning rate multiplied by this after every epoch."""
    plateau_factor: float = 0.5
    """Learning rate multiplied by this when validation does not improve."""
    patience: int = 2
    """Stop after this many epochs without validation improvement (0 disables)."""
    grad_clip: float = 2.0
    """Gradient-norm clip."""
    bf16: bool = True
    """bf16 autocast on GPU (ignored on CPU)."""
    max_failures: int = 2
    """Times Ray restarts the worker group from the last checkpoint after a failure."""
    checkpoints_to_keep: int = 2
    """Checkpoints kept, best by validation score."""
    seed: int = 0
    """Seed of weights, caption sampling and shuffling."""
    log_every: int = 50
    """Steps between logged loss values (the only host syncs in the loop)."""
    max_steps_per_epoch: int = 0
    """Cap on steps per epoch (0 = the whole shard); for smoke tests and benchmarks."""


@dataclass(frozen=True)
class TuneConfig:
    name: str = "ulrl-sweep"
    """Sweep name; re-running the same name resumes it."""
    space: dict[str, Any] = field(default_factory=dict)
    """Dotted key → distribution, e.g. ``{"loss.ul_alpha": {"loguniform": [0.001, 1.0]}}``;
    kinds: loguniform/uniform [low, high], choice [..], grid [..]."""
    search_alg: str = "random"
    """``random`` (grid keys expand), or ``optuna`` when installed."""
    num_samples: int = 8
    """Trials sampled (each grid point is repeated this many times under ``random``)."""
    max_concurrent_trials: int = 0
    """Trials at once; 0 derives it from the cluster's resources and a trial's needs."""
    asha: bool = True
    """Stop weak trials early with ASHA on the validation score."""
    grace_period: int = 2
    """Epochs a trial runs before ASHA may stop it."""
    driver_cpus: float = 0.01
    """CPU share of a trial's driver (it only waits on its TorchTrainer)."""
    eval_trials: bool = True
    """Evaluate every trial's best checkpoint on the val split (concept mAP, contradiction rate) for the table."""


@dataclass(frozen=True)
class TrackingConfig:
    uri: str = "sqlite:///mlflow.db"
    """MLflow tracking URI; a relative sqlite path is resolved against the working directory."""
    experiment: str = ""
    """Experiment name; empty means ``ulrl-<data.source>``."""
    enabled: bool = True
    """Log runs to MLflow."""


@dataclass(frozen=True)
class RegistryConfig:
    model_name: str = "ulrl"
    """Registered model name."""
    register: bool = True
    """Register the evaluated model."""
    alias: str = "champion"
    """Alias that services pull (``models:/<name>@<alias>``)."""
    promote: str = "auto"
    """``auto``: move the alias when the model beats the current holder; ``always`` or ``never``."""
    selection_metric: str = "rsum"
    """Evaluation metric (a key of metrics.json, higher is better) that ``promote: auto`` compares."""


@dataclass(frozen=True)
class EvalConfig:
    split: str = "test"
    """Store split to evaluate."""
    checkpoint: str = ""
    """Checkpoint directory/URI to evaluate; empty means the best checkpoint of ``train.name``."""
    model_uri: str = ""
    """Evaluate a registered model instead (``models:/ulrl@champion``)."""
    thetas: list[float] = field(default_factory=lambda: [0.0, 0.3, 0.5, 1.0])
    """Fusion weights θ: score = (1−θ)·embedding + θ·concept."""
    query_threshold: float = 0.99
    """Decoded query concepts kept above this probability (paper: 0.99)."""
    video_threshold: float = 0.5
    """Video concept probabilities at or below this are zeroed (paper: 0.5)."""
    top_n: int = 1000
    """Ranked list length per query (TREC run file)."""
    batch_size: int = 256
    """Batch size of encoding."""
    output_dir: str = "outputs/eval"
    """Local folder for metrics.json, the TREC run file and plots."""


@dataclass(frozen=True)
class RayConfig:
    address: str = ""
    """Cluster address; empty connects to a running cluster or starts a local one."""
    num_cpus: float = 0
    """Logical CPUs of a local cluster (0 = all)."""
    object_store_mb: int = 512
    """Object store size of a local cluster, in MiB."""


@dataclass(frozen=True)
class JobConfig:
    store: StoreConfig = field(default_factory=StoreConfig)
    """Feature store location."""
    data: DataConfig = field(default_factory=DataConfig)
    """Data preparation and reading."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Model architecture."""
    loss: LossConfig = field(default_factory=LossConfig)
    """Training objective."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Distributed training."""
    tune: TuneConfig = field(default_factory=TuneConfig)
    """Hyperparameter sweeps."""
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    """MLflow tracking."""
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    """MLflow model registry."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Evaluation and search."""
    ray: RayConfig = field(default_factory=RayConfig)
    """Ray cluster connection."""


# ---------------------------------------------------------------------------------------------- loading


def _type_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against annotation ``tp``; ints widen to floats, nothing else converts."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
        return _build(tp, value, key + ".")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if origin in (typing.Union, types.UnionType):
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is bool and not isinstance(value, bool):
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp in (int, float, str) and (not isinstance(value, tp) or isinstance(value, bool)):
        raise ConfigError(f"{key}: expected {tp.__name__}, got {value!r}")
    return value


def _build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    hints = _type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown config key '{prefix}{unknown[0]}'")
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in data.items()}
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as nested plain dicts (what Ray ships to workers and what YAML holds)."""
    return dataclasses.asdict(cfg)


def from_dict(data: dict[str, Any]) -> JobConfig:
    """Build and type-check a :class:`JobConfig` from nested dicts."""
    return _build(JobConfig, data)


def parse_value(text: str) -> Any:
    """Parse the right side of ``key=value`` as YAML (``0.1``, ``true``, ``[2, 3]``, ``s3://b/p``)."""
    try:
        return yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError:
        return text


def apply_overrides(cfg: JobConfig, overrides: dict[str, Any]) -> JobConfig:
    """Return a new config with dotted-key values replaced; the CLI and Ray Tune both call this."""
    data = to_dict(cfg)
    for dotted, value in overrides.items():
        node = data
        parts = dotted.split(".")
        for part in parts[:-1]:
            if not isinstance(node, dict) or part not in node or not isinstance(node[part], dict):
                raise ConfigError(f"unknown config key '{dotted}'")
            node = node[part]
        if parts[-1] not in node:
            raise ConfigError(f"unknown config key '{dotted}'")
        node[parts[-1]] = value
    return from_dict(data)


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """``["loss.lam=0.3", "train.use_gpu=true"]`` → ``{"loss.lam": 0.3, "train.use_gpu": True}``."""
    out: dict[str, Any] = {}
    for arg in args:
        key, sep, value = arg.partition("=")
        if not sep or not key:
            raise ConfigError(f"override '{arg}' is not of the form key=value")
        out[key.strip()] = parse_value(value.strip())
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> JobConfig:
    """Defaults, then the YAML file at ``path``, then ``key=value`` overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML ({err})") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
        data = loaded or {}
    cfg = from_dict(data)
    validate(cfg)
    cfg = apply_overrides(cfg, parse_overrides(overrides or []))
    validate(cfg)
    return cfg


_CHOICES = {
    "data.source": ("moving-digits", "avs"),
    "data.caption_sampling": ("sample", "all"),
    "model.text_encoder": ("multilevel", "sentence"),
    "loss.reduction": ("sum", "mean"),
    "loss.negatives.strategy": ("antonym", "random", "hard", "exclusive", "none"),
    "store.feature_dtype": ("float16", "float32"),
    "registry.promote": ("auto", "always", "never"),
    "tune.search_alg": ("random", "optuna"),
}


def get_dotted(cfg: Any, dotted: str) -> Any:
    """Read ``cfg.a.b.c`` from ``"a.b.c"``."""
    node = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def validate(cfg: JobConfig) -> None:
    """Cross-field checks that types alone cannot express."""
    for key, allowed in _CHOICES.items():
        value = get_dotted(cfg, key)
        if value not in allowed:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(allowed)}")
    if cfg.train.num_workers < 1:
        raise ConfigError("train.num_workers: must be at least 1")
    if cfg.train.batch_size < 2:
        raise ConfigError("train.batch_size: the triplet loss needs at least 2 pairs per batch")
    if not 0.0 <= cfg.loss.lam <= 1.0:
        raise ConfigError("loss.lam: must lie in [0, 1]")
    if cfg.loss.ul_alpha < 0:
        raise ConfigError("loss.ul_alpha: must be non-negative")
    for theta in cfg.eval.thetas:
        if not 0.0 <= theta <= 1.0:
            raise ConfigError("eval.thetas: each θ must lie in [0, 1]")


def to_flat_dict(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """``{"loss.lam": 0.2, ...}``: the form logged as MLflow params and used by Tune."""
    out: dict[str, Any] = {}
    for key, value in (to_dict(cfg) if dataclasses.is_dataclass(cfg) else cfg).items():
        if isinstance(value, dict) and value and key != "space":
            out.update(to_flat_dict(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def to_yaml(cfg: JobConfig) -> str:
    """The resolved config as YAML (logged as an MLflow artifact, stored in checkpoints)."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
