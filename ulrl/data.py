"""Reading the store with Ray Data and collating Arrow batches into the model's torch batches.

Two layers:

* pure, vectorised Arrow → numpy transforms (:func:`pad_frames`, :func:`pad_tokens`, :func:`multi_hot`,
  :func:`caption_choice`, :func:`expand_captions`): no per-row Python loops, unit-testable without Ray;
* Ray Data glue (:func:`read_split`, :func:`train_dataset`, :func:`train_batches`) and the collates that
  ``iter_torch_batches`` / ``map_batches`` call (:class:`TrainCollate`, :func:`collate_videos`,
  :func:`collate_captions`).

A ragged Arrow list column is a flat ``values`` buffer plus ``offsets`` (row ``b`` owns
``values[offsets[b]:offsets[b+1]]``), so padding is one gather: for every kept element compute its
(row, step) target and its flat source index, then ``out[row, step] = values[src]``.

Truncation: frames past ``data.max_frames`` and tokens past ``data.max_words`` are dropped for every level
of the encoders. The reference ITV code keeps only the first 64 frames for its GRU but mean-pools all frames
for level 1; we truncate for level 1 too (one padded tensor feeds every level), which differs only for
videos longer than ``max_frames``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray.data
import torch
from ray.data.collate_fn import ArrowBatchCollateFn

from ulrl.config import JobConfig
from ulrl.store import Store, StoreError, access_error, open_store


class DataFormatError(StoreError):
    """A store file or batch does not match the layout the manifest promises; the message names it."""


# ------------------------------------------------------------------------------- Arrow → numpy transforms


def _as_array(column: pa.Array | pa.ChunkedArray, name: str) -> pa.Array:
    """One contiguous Arrow array (batches from Ray may hold several chunks); nulls are a format error."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if array.null_count:
        raise DataFormatError(f"column '{name}' has {array.null_count} null rows")
    return array


def _ragged_gather(offsets: np.ndarray, max_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Targets and sources of a pad-and-truncate gather over a list column.

    offsets: (B+1,) absolute offsets into the flat child. Returns ``lengths`` (B,) kept per row (≤ max_len),
    and for every kept element its ``rows``, ``steps`` (position in the row) and ``src`` (flat child index).
    """
    lengths = np.minimum(np.diff(offsets), max_len)  # (B,)
    rows = np.repeat(np.arange(len(lengths)), lengths)  # (N,)
    row_start = np.cumsum(lengths) - lengths  # (B,) first kept element of each row in the N axis
    steps = np.arange(len(rows)) - row_start[rows]  # (N,)
    src = offsets[:-1][rows] + steps  # (N,)
    return lengths, rows, steps, src


def pad_frames(frames: pa.Array | pa.ChunkedArray, max_frames: int, frame_dim: int | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
    """Zero-pad a ``list<fixed_size_list<float16|float32>[F]>`` column.

    Returns ``frames`` (B, T, F) float32 with T = min(max_frames, longest video in the batch) and
    ``frame_mask`` (B, T) bool. Frames after the first ``max_frames`` are dropped. A video without frames
    or an inner size other than ``frame_dim`` raises :class:`DataFormatError`.
    """
    array = _as_array(frames, "frames")
    width = array.type.value_type.list_size
    if frame_dim is not None and width != frame_dim:
        raise DataFormatError(f"column 'frames' holds {width}-d frames, the manifest says frame_dim={frame_dim}")
    offsets = array.offsets.to_numpy().astype(np.int64)  # (B+1,) absolute into array.values
    if (np.diff(offsets) == 0).any():
        raise DataFormatError(f"column 'frames': row {int(np.argmax(np.diff(offsets) == 0))} has no frames")
    # flatten() honours the child's own slice offset; .values does not
    flat = array.values.flatten().to_numpy(zero_copy_only=True).reshape(-1, width)  # (total_frames, F)
    lengths, rows, steps, src = _ragged_gather(offsets, max_frames)
    steps_max = int(lengths.max(initial=0))
    out = np.zeros((len(lengths), steps_max, width), dtype=np.float32)  # (B, T, F)
    out[rows, steps] = flat[src]  # float16 → float32 on assignment
    return out, np.arange(steps_max) < lengths[:, None]


def pad_tokens(token_ids: pa.Array | pa.ChunkedArray, max_words: int) -> tuple[np.ndarray, np.ndarray]:
    """Zero-pad a ``list<int32>`` column: ``tokens`` (B, L) int64 with L = min(max_words, longest caption),
    at least 1, and ``token_mask`` (B, L) bool. Token 0 is the pad id, so padding never collides with a word."""
    array = _as_array(token_ids, "token_ids")
    offsets = array.offsets.to_numpy().astype(np.int64)  # (B+1,)
    flat = array.values.to_numpy(zero_copy_only=False)  # (total_tokens,) child of a plain list is unsliced
    lengths, rows, steps, src = _ragged_gather(offsets, max_words)
    width = max(1, int(lengths.max(initial=0)))
    out = np.zeros((len(lengths), width), dtype=np.int64)  # (B, L)
    out[rows, steps] = flat[src]
    return out, np.arange(width) < lengths[:, None]


def multi_hot(concept_ids: pa.Array | pa.ChunkedArray, num_concepts: int) -> np.ndarray:
    """``list<int32>`` concept ids → (B, K) float32 with ``y[b, k] = 1`` iff k is in row b."""
    array = _as_array(concept_ids, "concept_ids")
    offsets = array.offsets.to_numpy().astype(np.int64)  # (B+1,)
    ids = array.values.to_numpy(zero_copy_only=False)[offsets[0]:offsets[-1]]  # (N,)
    if len(ids) and (ids.min() < 0 or ids.max() >= num_concepts):
        raise DataFormatError(f"column 'concept_ids': id {int(ids.max())} outside [0, {num_concepts})")
    labels = np.zeros((len(offsets) - 1, num_concepts), dtype=np.float32)  # (B, K)
    labels[np.repeat(np.arange(len(offsets) - 1), np.diff(offsets)), ids] = 1.0
    return labels


def dense_rows(column: pa.Array | pa.ChunkedArray, dim: int, name: str) -> np.ndarray:
    """A fixed- or variable-size list column of equal-length float rows → (B, dim) float32."""
    array = _as_array(column, name)
    flat = array.flatten().to_numpy(zero_copy_only=False)
    if flat.size != len(array) * dim:
        raise DataFormatError(f"column '{name}': expected {dim} values per row, got {flat.size} for {len(array)} rows")
    # a copy: Arrow buffers are read-only and torch warns on (and must not write to) them
    return flat.astype(np.float32).reshape(len(array), dim)  # (B, dim)


# ------------------------------------------------------------------------------------- caption selection

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser on uint64 arrays (wrapping arithmetic): a bijection with full avalanche."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def caption_choice(video_index: np.ndarray, num_captions: np.ndarray, seed: int, epoch: int) -> np.ndarray:
    """Which caption each video uses this epoch: ``mix(video_index ⊕ mix(seed·φ + epoch)) mod n_captions``.

    Deterministic in (seed, epoch, video_index) — independent of sharding, batching and shuffling —
    and close to uniform over a video's captions. Returns (B,) int64 in ``[0, num_captions)``.
    """
    num_captions = np.asarray(num_captions, dtype=np.int64)
    if (num_captions <= 0).any():
        raise DataFormatError(f"video_index {int(video_index[np.argmax(num_captions <= 0)])} has no captions")
    mask64 = (1 << 64) - 1
    stream = _mix64(np.array([seed & mask64], np.uint64) * _GOLDEN + np.array([epoch & mask64], np.uint64))
    hashed = _mix64(np.asarray(video_index).astype(np.uint64) ^ stream)  # (B,)
    return (hashed % num_captions.astype(np.uint64)).astype(np.int64)


def _pick(nested: pa.Array, choice: np.ndarray, name: str) -> pa.Array:
    """Row b's ``choice[b]``-th element of a ``list<list<T>>`` column, as a ``list<T>`` array."""
    array = _as_array(nested, name)
    offsets = array.offsets.to_numpy().astype(np.int64)  # (B+1,) absolute into array.values
    return array.values.take(pa.array(offsets[:-1] + choice))


def expand_captions(table: pa.Table) -> pa.Table:
    """``all`` mode: one row per (video, caption). The video columns repeat once per caption and the nested
    ``caption_token_ids`` / ``caption_sentence_features`` become the flat ``token_ids`` /
    ``sentence_features`` of the caption rows. Usable as ``map_batches(expand_captions, batch_format="pyarrow")``."""
    captions = _as_array(table["caption_token_ids"], "caption_token_ids")
    per_video = np.diff(captions.offsets.to_numpy().astype(np.int64))  # (B,)
    nested = [name for name in ("caption_token_ids", "caption_sentence_features") if name in table.column_names]
    expanded = table.drop_columns(nested).take(pa.array(np.repeat(np.arange(table.num_rows), per_video)))
    expanded = expanded.append_column("token_ids", captions.flatten())
    if "caption_sentence_features" in nested:
        features = _as_array(table["caption_sentence_features"], "caption_sentence_features").flatten()
        expanded = expanded.append_column("sentence_features", features)
    return expanded


# ------------------------------------------------------------------------------------------------ collates


def collate_videos(table: pa.Table, max_frames: int, clip_dim: int = 0, frame_dim: int | None = None
                   ) -> tuple[dict[str, torch.Tensor], np.ndarray]:
    """Video rows → ``{"frames", "frame_mask", "clip_features"?, "video_index"}`` tensors, plus the
    ``video_id`` strings (B,) when the table has them (else the video indices)."""
    frames, frame_mask = pad_frames(table["frames"], max_frames, frame_dim)
    batch = {"frames": torch.from_numpy(frames), "frame_mask": torch.from_numpy(frame_mask)}
    if clip_dim > 0:
        batch["clip_features"] = torch.from_numpy(dense_rows(table["clip_features"], clip_dim, "clip_features"))
    video_index = table["video_index"].to_numpy().astype(np.int64)  # (B,)
    batch["video_index"] = torch.from_numpy(video_index)
    ids = table["video_id"].to_numpy() if "video_id" in table.column_names else video_index
    return batch, ids


def collate_captions(table: pa.Table, max_words: int, sentence_dim: int = 0
                     ) -> tuple[dict[str, torch.Tensor], np.ndarray]:
    """Caption rows → ``{"tokens", "token_mask", "sentence_features"?, "video_index"}`` tensors, plus the
    ``caption_id`` strings (B,) when the table has them (else the video indices)."""
    tokens, token_mask = pad_tokens(table["token_ids"], max_words)
    batch = {"tokens": torch.from_numpy(tokens), "token_mask": torch.from_numpy(token_mask)}
    if sentence_dim > 0:
        features = dense_rows(table["sentence_features"], sentence_dim, "sentence_features")
        batch["sentence_features"] = torch.from_numpy(features)
    video_index = table["video_index"].to_numpy().astype(np.int64)  # (B,)
    batch["video_index"] = torch.from_numpy(video_index)
    ids = table["caption_id"].to_numpy() if "caption_id" in table.column_names else video_index
    return batch, ids


class TrainCollate(ArrowBatchCollateFn):
    """Video rows → the training batch of docs/architecture.md (one (video, caption) pair per row).

    Rows either carry their caption already (``token_ids``, from :func:`expand_captions`) or all their
    captions (``caption_token_ids``); then :func:`caption_choice` (seed, epoch) picks one, so build a new
    collate every epoch. Input is the ``pyarrow.Table`` Ray hands an :class:`ArrowBatchCollateFn` (no
    per-row conversion); it runs on Ray's prefetch threads, so it holds no mutable state.
    """

    def __init__(self, epoch: int, seed: int, max_frames: int, max_words: int, num_concepts: int,
                 frame_dim: int | None = None, clip_dim: int = 0, sentence_dim: int = 0):
        super().__init__()
        self.epoch, self.seed = epoch, seed
        self.max_frames, self.max_words, self.num_concepts = max_frames, max_words, num_concepts
        self.frame_dim, self.clip_dim, self.sentence_dim = frame_dim, clip_dim, sentence_dim

    @classmethod
    def from_config(cls, cfg: JobConfig, manifest: dict[str, Any], epoch: int) -> TrainCollate:
        return cls(epoch, cfg.train.seed, cfg.data.max_frames, cfg.data.max_words, manifest["num_concepts"],
                   manifest["frame_dim"], manifest.get("clip_dim", 0), manifest.get("sentence_dim", 0))

    def _captions(self, table: pa.Table) -> pa.Table:
        """The table with one ``token_ids`` (and ``sentence_features``) caption per row."""
        if "token_ids" in table.column_names:
            return table
        nested = _as_array(table["caption_token_ids"], "caption_token_ids")
        video_index = table["video_index"].to_numpy()
        choice = caption_choice(video_index, np.diff(nested.offsets.to_numpy()), self.seed, self.epoch)
        table = table.append_column("token_ids", _pick(nested, choice, "caption_token_ids"))
        if self.sentence_dim > 0:
            picked = _pick(table["caption_sentence_features"], choice, "caption_sentence_features")
            table = table.append_column("sentence_features", picked)
        return table

    def __call__(self, batch: pa.Table) -> dict[str, torch.Tensor]:
        table = self._captions(batch)
        video, _ = collate_videos(table, self.max_frames, self.clip_dim, self.frame_dim)
        text, _ = collate_captions(table, self.max_words, self.sentence_dim)
        labels = multi_hot(table["concept_ids"], self.num_concepts)  # (B, K)
        return {**video, **text, "concept_labels": torch.from_numpy(labels)}


# ---------------------------------------------------------------------------------------------- Ray Data


def _opened(store: Store | str) -> Store:
    return open_store(store) if isinstance(store, str) else store


def _expected_types(manifest: dict[str, Any]) -> dict[str, tuple[pa.DataType, ...]]:
    """Column → allowed Arrow types, from the manifest's dimensions."""
    frame_dim, clip_dim = manifest["frame_dim"], manifest.get("clip_dim", 0)
    expected = {
        "video_index": (pa.int64(),),
        "frames": tuple(pa.list_(pa.list_(t, frame_dim)) for t in (pa.float16(), pa.float32())),
        "concept_ids": (pa.list_(pa.int32()),),
        "token_ids": (pa.list_(pa.int32()),),
        "caption_token_ids": (pa.list_(pa.list_(pa.int32())),),
    }
    if clip_dim > 0:
        expected["clip_features"] = (pa.list_(pa.float32(), clip_dim),)
    return expected


def _check_schema(filesystem: pafs.FileSystem, path: str, columns: list[str] | None,
                  expected: dict[str, tuple[pa.DataType, ...]]) -> None:
    """Footer-only check that every requested column exists with the type the manifest implies."""
    with filesystem.open_input_file(path) as handle:
        schema = pq.read_schema(handle)
    for name in columns if columns is not None else schema.names:
        if name not in schema.names:
            raise DataFormatError(f"{path}: no column '{name}'")
        allowed = expected.get(name)
        if allowed and schema.field(name).type not in allowed:
            raise DataFormatError(f"{path}: column '{name}' has type {schema.field(name).type}, expected "
                                  f"{' or '.join(map(str, allowed))} (from the manifest)")


def read_split(store: Store | str, split: str, kind: str = "videos", columns: list[str] | None = None
               ) -> ray.data.Dataset:
    """Lazy Ray Dataset over ``<store>/<split>/<kind>/*.parquet`` (kind ``videos`` or ``captions``).

    ``store`` is an opened :class:`~ulrl.store.Store` or its root URI (local folder or
    ``s3://bucket/prefix``, resolved by :func:`ulrl.store.resolve_uri`). Every file's schema is checked
    against the manifest first (footers only), so a wrong frame dimension fails here, naming the file.
    """
    if kind not in ("videos", "captions"):
        raise ValueError(f"kind must be 'videos' or 'captions', got {kind!r}")
    store = _opened(store)
    paths = store.files(split, kind)
    if not paths:
        raise StoreError(f"store {store.uri}: split '{split}' has no {kind} files")
    expected = _expected_types(store.manifest)
    try:
        for path in paths:
            _check_schema(store.filesystem, path, columns, expected)
    except OSError as err:
        raise access_error(store.uri, err) from err
    return ray.data.read_parquet(paths, filesystem=store.filesystem, columns=columns)


def train_columns(manifest: dict[str, Any]) -> list[str]:
    """Video columns the training collate reads."""
    columns = ["video_index", "frames", "concept_ids", "caption_token_ids"]
    if manifest.get("clip_dim", 0) > 0:
        columns.append("clip_features")
    if manifest.get("sentence_dim", 0) > 0:
        columns.append("caption_sentence_features")
    return columns


def train_dataset(store: Store | str, cfg: JobConfig, split: str = "train") -> ray.data.Dataset:
    """The training Dataset handed to ``TorchTrainer(datasets=...)``: the needed video columns, expanded to
    one row per caption in ``all`` mode (so the batch size counts pairs)."""
    store = _opened(store)
    dataset = read_split(store, split, "videos", train_columns(store.manifest))
    if cfg.data.caption_sampling == "all":
        dataset = dataset.map_batches(expand_captions, batch_format="pyarrow", zero_copy_batch=True)
    return dataset


def train_batches(shard: ray.data.DataIterator, epoch: int, cfg: JobConfig, manifest: dict[str, Any],
                  device: Any = None, pin_memory: bool = False) -> Iterator[dict[str, torch.Tensor]]:
    """One epoch of collated training batches from this worker's shard.

    ``drop_last`` because BatchNorm and the triplet loss need at least two pairs; the local shuffle is
    reseeded every epoch (``seed + epoch``). ``device=None`` lets Ray pick the Train worker's device.
    """
    shuffle = max(cfg.data.shuffle_buffer, cfg.train.batch_size) if cfg.data.shuffle_buffer > 0 else None
    return shard.iter_torch_batches(
        batch_size=cfg.train.batch_size,
        collate_fn=TrainCollate.from_config(cfg, manifest, epoch),
        drop_last=True,
        local_shuffle_buffer_size=shuffle,
        local_shuffle_seed=cfg.train.seed + epoch if shuffle else None,
        prefetch_batches=cfg.data.prefetch_batches,
        device="auto" if device is None else device,
        pin_memory=pin_memory,
    )
