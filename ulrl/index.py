"""The collection index that ``jobs.evaluate`` writes and ``jobs.search`` reads, inside the store::

    <root>/index/<split>/part-00000.parquet ...   video_id string, video_index int64,
                                                  embedding fixed_size_list<float32>[D],
                                                  concept_probs fixed_size_list<float32>[K]
    <root>/index/<split>/index.json              written last: the model (checkpoint or registered URI, the
                                                  weights' fingerprint), best θ, counts, file names

A re-run deletes ``index.json`` first, so a reader never pairs a manifest with parts of another run.
Probabilities are stored whole (not thresholded), so search may use any ``eval.video_threshold``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from ulrl.store import Store, StoreError, read_json, write_json


class IndexMissingError(StoreError):
    """The store has no (complete) index of the split, or its files disagree with ``index.json``."""


INDEX_FILE = "index.json"
"""The index manifest, written after its Parquet parts: its presence means the index is complete."""


@dataclass(frozen=True)
class VideoIndex:
    """An encoded collection; row i is the video with ``video_index`` i."""

    meta: dict[str, Any]
    """``index.json`` without the bookkeeping keys: model, fingerprint, best θ, thresholds."""
    ids: np.ndarray
    """(N,) video ids."""
    embedding: np.ndarray
    """(N, D) float32 unit-norm embeddings."""
    probs: np.ndarray
    """(N, K) float32 concept probabilities."""


def _folder(store: Store, split: str) -> str:
    return f"{store.root}/index/{split}"


def _fixed_rows(matrix: np.ndarray) -> pa.FixedSizeListArray:
    """(n, w) floats → an Arrow ``fixed_size_list<float32>[w]`` column."""
    flat = np.ascontiguousarray(matrix, np.float32).reshape(-1)
    return pa.FixedSizeListArray.from_arrays(flat, matrix.shape[1])


def _part(index: VideoIndex, rows: slice) -> pa.Table:
    return pa.table({
        "video_id": pa.array(index.ids[rows].tolist(), pa.string()),
        "video_index": pa.array(np.arange(len(index.ids))[rows], pa.int64()),
        "embedding": _fixed_rows(index.embedding[rows]),
        "concept_probs": _fixed_rows(index.probs[rows]),
    })  # fmt: skip


def write_index(store: Store, split: str, index: VideoIndex, rows_per_file: int) -> str:
    """Write ``index`` as ``<store>/index/<split>/`` (parts, then ``index.json``); returns the folder's URI."""
    fs, folder = store.filesystem, _folder(store, split)
    fs.create_dir(folder, recursive=True)
    if fs.get_file_info(f"{folder}/{INDEX_FILE}").type == pafs.FileType.File:
        fs.delete_file(f"{folder}/{INDEX_FILE}")  # the old index is invalid from here on
    count, names = len(index.ids), []
    for part, start in enumerate(range(0, count, max(rows_per_file, 1))):
        names.append(f"part-{part:05d}.parquet")
        pq.write_table(_part(index, slice(start, start + rows_per_file)), f"{folder}/{names[-1]}", filesystem=fs)
    for info in fs.get_file_info(pafs.FileSelector(folder)):
        if info.base_name.endswith(".parquet") and info.base_name not in names:
            fs.delete_file(info.path)  # parts of a larger earlier index
    manifest = {**index.meta, "split": split, "videos": count, "embed_dim": index.embedding.shape[1],
                "num_concepts": index.probs.shape[1], "files": names,
                "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}  # fmt: skip
    write_json(fs, f"{folder}/{INDEX_FILE}", manifest)
    return f"{store.uri.rstrip('/')}/index/{split}"


def read_index(store: Store, split: str) -> VideoIndex:
    """The index of a split; :class:`IndexMissingError` when there is none or it is inconsistent."""
    fs, folder = store.filesystem, _folder(store, split)
    where = f"{store.uri.rstrip('/')}/index/{split}"
    try:
        meta = read_json(fs, f"{folder}/{INDEX_FILE}")
        table = pads.dataset([f"{folder}/{name}" for name in meta["files"]], filesystem=fs, format="parquet").to_table()
    except FileNotFoundError:
        raise IndexMissingError(f"store {store.uri} has no index of split '{split}': run python -m jobs.evaluate "
                                f"with eval.split={split}") from None
    table = table.sort_by("video_index")
    if table.num_rows != meta["videos"]:
        raise IndexMissingError(f"{where}: {table.num_rows} rows, {INDEX_FILE} says {meta['videos']}")
    def rows(name: str, width: int) -> np.ndarray:  # a copy: Arrow buffers are read-only, torch warns on them
        return np.array(table[name].combine_chunks().flatten(), np.float32).reshape(-1, width)

    ids = table["video_id"].to_numpy(zero_copy_only=False).astype(str)
    return VideoIndex(meta, ids, rows("embedding", meta["embed_dim"]), rows("concept_probs", meta["num_concepts"]))
