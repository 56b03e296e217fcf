"""Validation and staging of store rows: what :func:`ulrl.store.write_store` does with each split.

Captions are checked and annotated as polars tables (token ids, concept ids); videos stream chunk by chunk
through :func:`check_frames` into Parquet shards of ``store.shard_rows`` rows, so a split never has to fit in
memory as Arrow. Every error names the split (or file), the row or video id, and the key.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from ulrl import concepts as concepts_lib
from ulrl.store import ColumnError, FeatureError, IdError, PrepareError, storage_errors, write_json

# ---------------------------------------------------------------------------------------------- metadata


@dataclass(frozen=True)
class Metadata:
    """What the train captions and the pair sources define for the whole store."""

    concepts: list[str]
    frequency: list[int]
    words: list[str]
    pairs: list[tuple[str, str]]

    @property
    def concept_index(self) -> dict[str, int]:
        return concepts_lib.index_of(self.concepts)

    @property
    def word_index(self) -> dict[str, int]:
        return concepts_lib.index_of(self.words)

    def write(self, filesystem: pafs.FileSystem, folder: str) -> None:
        write_json(filesystem, f"{folder}/concepts.json", {"concepts": self.concepts, "frequency": self.frequency})
        write_json(filesystem, f"{folder}/contradictions.json", {"pairs": [list(p) for p in self.pairs]})
        write_json(filesystem, f"{folder}/vocab.json", {"words": self.words})


def build_metadata(data_cfg: Any, train_texts: list[str]) -> Metadata:
    """Concept bank (with frequencies), vocabulary and symmetric contradiction pairs from the train captions."""
    concepts = concepts_lib.build_concept_bank(train_texts, data_cfg.concept_min_freq)
    counts = Counter(word for text in train_texts for word in concepts_lib.concept_words(text))
    pairs: set[tuple[str, str]] = set()
    if data_cfg.wordnet_antonyms:
        pairs.update(concepts_lib.wordnet_antonym_pairs(concepts))
    if data_cfg.contradiction_file:
        if not Path(data_cfg.contradiction_file).is_file():
            raise PrepareError(f"data.contradiction_file: {data_cfg.contradiction_file} not found")
        pairs.update(concepts_lib.read_pair_file(data_cfg.contradiction_file, concepts))
    pairs |= {(b, a) for a, b in pairs}  # the store lists both orders
    words = concepts_lib.build_vocab(train_texts, data_cfg.vocab_min_freq)
    return Metadata(concepts, [counts[c] for c in concepts], words, sorted(pairs))


# ---------------------------------------------------------------------------------------------- tables

_CAPTION_COLUMNS = {"caption_id": pl.String, "video_id": pl.String, "text": pl.String}
_QUERY_COLUMNS = {"query_id": pl.String, "text": pl.String}
_QREL_COLUMNS = {"query_id": pl.String, "video_id": pl.String, "relevance": pl.Int32}


def check_table(frame: pl.DataFrame, columns: dict[str, Any], where: str, optional: tuple[str, ...] = ()
                ) -> pl.DataFrame:
    """Required columns present with their dtype (integers widen to the asked one) and non-null; no others."""
    missing = [name for name in columns if name not in frame.columns]
    if missing:
        raise ColumnError(f"{where}: missing column '{missing[0]}' (has: {', '.join(frame.columns) or 'none'})")
    unexpected = [name for name in frame.columns if name not in columns and name not in optional]
    if unexpected:
        expected = ", ".join([*columns, *optional])
        raise ColumnError(f"{where}: unexpected column '{unexpected[0]}' (expected: {expected})")
    for name, dtype in columns.items():
        actual = frame.schema[name]
        if actual != dtype and not (dtype.is_integer() and actual.is_integer()):
            raise ColumnError(f"{where}: column '{name}' is {actual}, expected {dtype}")
        nulls = frame[name].is_null()
        if nulls.any():
            raise ColumnError(f"{where} row {nulls.arg_max()}: '{name}' is null")
    return frame.with_columns(pl.col(name).cast(dtype) for name, dtype in columns.items())


def _first_duplicate(values: pl.Series, what: str, where: str) -> None:
    duplicated = values.is_duplicated()
    if duplicated.any():
        rows = duplicated.arg_true()
        value = values[rows[0]]
        rows = (values == value).arg_true()
        raise IdError(f"{where} rows {rows[0]} and {rows[1]}: duplicate {what} '{value}'")


def _check_sentence_features(captions: pl.DataFrame, where: str) -> int:
    """Dimension of the optional ``sentence_features`` column (0 when absent); every row the same, finite."""
    if "sentence_features" not in captions.columns:
        return 0
    dtype = captions.schema["sentence_features"]
    if not isinstance(dtype, pl.List | pl.Array):
        raise ColumnError(f"{where}: column 'sentence_features' is {dtype}, expected list[f32]")
    lengths = captions["sentence_features"].list.len()
    if captions.height and (lengths != lengths[0]).any():
        row = (lengths != lengths[0]).arg_max()
        raise FeatureError(f"{where} row {row}: sentence_features has {lengths[row]} values, row 0 has {lengths[0]}")
    values = captions["sentence_features"].explode().cast(pl.Float64)
    if values.is_null().any() or not values.is_finite().all():
        row = captions.with_row_index().filter(
            pl.col("sentence_features").list.eval(~pl.element().is_finite() | pl.element().is_null()).list.any()
        )["index"][0]
        raise FeatureError(f"{where} row {row}: sentence_features holds NaN, inf or null")
    return int(lengths[0]) if captions.height else 0


def check_captions(splits: dict[str, Any]) -> dict[str, pl.DataFrame]:
    """Every split's caption table checked (columns, types, no nulls); caption ids unique over all splits."""
    checked = {
        name: check_table(split.captions, _CAPTION_COLUMNS, f"split '{name}' captions", ("sentence_features",))
        for name, split in splits.items()
    }
    for name, captions in checked.items():
        _first_duplicate(captions["caption_id"], "caption id", f"split '{name}' captions")
    every = pl.concat([c.select("caption_id", pl.lit(n).alias("split")) for n, c in checked.items()])
    duplicated = every.filter(pl.col("caption_id").is_duplicated())
    if duplicated.height:
        caption_id = duplicated["caption_id"][0]
        first, second = duplicated.filter(pl.col("caption_id") == caption_id)["split"][:2]
        raise IdError(f"caption id '{caption_id}' appears in split '{first}' and split '{second}'")
    return checked


def annotate_captions(checked: dict[str, pl.DataFrame], metadata: Metadata) -> dict[str, pl.DataFrame]:
    """Add ``token_ids`` (vocabulary ids) and ``concept_ids`` (sorted bank ids) to every caption."""
    concept_index, word_index = metadata.concept_index, metadata.word_index

    def annotate(captions: pl.DataFrame) -> pl.DataFrame:
        texts = captions["text"].to_list()
        tokens = [concepts_lib.encode_tokens(text, word_index) for text in texts]
        concepts = [concepts_lib.caption_concepts(text, concept_index) for text in texts]
        return captions.with_columns(pl.Series("token_ids", tokens, dtype=pl.List(pl.Int32)),
                                     pl.Series("concept_ids", concepts, dtype=pl.List(pl.Int32)))  # fmt: skip

    return {name: annotate(captions) for name, captions in checked.items()}


def group_captions(captions: pl.DataFrame) -> dict[str, tuple]:
    """video_id → (caption token id lists, video-level concept ids = union of its captions', sentence features)."""
    video_concepts = pl.col("concept_ids").list.explode(keep_nulls=False, empty_as_null=False).unique().sort()
    aggregations = [pl.col("token_ids"), video_concepts]
    if "sentence_features" in captions.columns:
        aggregations.append(pl.col("sentence_features"))
    grouped = captions.group_by("video_id", maintain_order=True).agg(aggregations)
    return {row[0]: row[1:] for row in grouped.iter_rows()}


# ---------------------------------------------------------------------------------------------- videos


@dataclass
class Layout:
    """Dimensions fixed by the first video/caption seen; every later one must agree (feeds the manifest)."""

    feature_dtype: str
    frame_dim: int | None = None
    clip_dim: int | None = None
    sentence_dim: int | None = None
    has_true_labels: bool | None = None

    def agree(self, key: str, value: Any, where: str) -> None:
        expected = getattr(self, key)
        if expected is None:
            setattr(self, key, value)
        elif value != expected:
            raise FeatureError(f"{where}: {key} is {value}, but earlier videos/captions have {expected}")

    def video_schema(self) -> pa.Schema:
        dtype = pa.float16() if self.feature_dtype == "float16" else pa.float32()
        ids = pa.list_(pa.int32())
        fields = [("video_id", pa.string()), ("video_index", pa.int64()), ("num_frames", pa.int32()),
                  ("frames", pa.list_(pa.list_(dtype, self.frame_dim)))]  # fmt: skip
        fields += [("clip_features", pa.list_(pa.float32(), self.clip_dim))] if self.clip_dim else []
        fields += [("concept_ids", ids)] + ([("true_concept_ids", ids)] if self.has_true_labels else [])
        fields += [("caption_token_ids", pa.list_(ids))]
        fields += [("caption_sentence_features", pa.list_(pa.list_(pa.float32())))] if self.sentence_dim else []
        return pa.schema(fields)


def check_frames(frames: Any, layout: Layout, where: str) -> np.ndarray:
    """(T, F) finite features of one video, cast to the storage dtype."""
    frames = np.asarray(frames)
    if frames.ndim != 2 or frames.shape[0] == 0:
        raise FeatureError(f"{where}: frames must be a (T, F) array with T >= 1, got shape {frames.shape}")
    layout.agree("frame_dim", frames.shape[1], where)
    finite = np.isfinite(frames).all(axis=1)  # (T,)
    if not finite.all():
        raise FeatureError(f"{where}: frame {int(np.argmin(finite))} holds NaN or inf")
    with np.errstate(over="ignore"):  # an overflow becomes inf, reported just below
        stored = frames.astype(np.float16 if layout.feature_dtype == "float16" else np.float32)  # (T, F)
    if not np.isfinite(stored).all():
        raise FeatureError(f"{where}: values beyond the float16 range; set store.feature_dtype=float32")
    return stored


def _check_chunk(chunk: Any, layout: Layout, where: str) -> None:
    """Per-chunk agreement of lengths, clip-feature dimension and presence of true attributes."""
    n = len(chunk.video_ids)
    if len(chunk.frames) != n:
        raise FeatureError(f"{where}: {n} video ids but {len(chunk.frames)} frame arrays")
    clip_dim = 0
    if chunk.clip_features is not None:
        clip = np.asarray(chunk.clip_features)
        if clip.ndim != 2 or clip.shape[0] != n:
            raise FeatureError(f"{where}: clip_features must be ({n}, C), got {clip.shape}")
        finite = np.isfinite(clip).all(axis=1)  # (n,)
        if not finite.all():
            video_id = chunk.video_ids[np.argmin(finite)]
            raise FeatureError(f"{where}: clip_features of video '{video_id}' hold NaN or inf")
        clip_dim = clip.shape[1]
    layout.agree("clip_dim", clip_dim, where)
    if chunk.true_attributes is not None and len(chunk.true_attributes) != n:
        raise FeatureError(f"{where}: {n} video ids but {len(chunk.true_attributes)} true attribute lists")
    layout.agree("has_true_labels", chunk.true_attributes is not None, where)


class _VideoShards:
    """Buffers video rows and writes ``part-NNNNN.parquet`` every ``shard_rows`` rows."""

    def __init__(self, filesystem: pafs.FileSystem, staging: str, uri: str, split: str, shard_rows: int,
                 layout: Layout):
        self.filesystem, self.staging, self.uri, self.split = filesystem, staging, uri, split
        self.shard_rows, self.layout = shard_rows, layout
        self.rows: list[dict[str, Any]] = []
        self.files: list[str] = []

    def add(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        if len(self.rows) >= self.shard_rows:
            self.flush()

    def flush(self) -> None:
        if not self.rows:
            return
        schema = self.layout.video_schema()
        columns = {f.name: pa.array([r[f.name] for r in self.rows], f.type) for f in schema if f.name != "frames"}
        columns["frames"] = frames_array([r["frames"] for r in self.rows], schema.field("frames").type)
        name = f"{self.split}/videos/part-{len(self.files):05d}.parquet"
        with storage_errors(self.uri):
            self.filesystem.create_dir(f"{self.staging}/{self.split}/videos", recursive=True)
            pq.write_table(pa.table(columns, schema=schema), f"{self.staging}/{name}", filesystem=self.filesystem)
        self.files.append(name)
        self.rows = []


def frames_array(frames: list[np.ndarray], arrow_type: pa.DataType) -> pa.Array:
    """Videos' (T_i, F) arrays → one ``list<fixed_size_list<dtype>[F]>`` array without Python-level rows."""
    flat = np.concatenate(frames)  # (ΣT_i, F)
    offsets = np.concatenate([[0], np.cumsum([len(f) for f in frames])]).astype(np.int32)  # (n + 1,)
    rows = pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), flat.shape[1])
    return pa.ListArray.from_arrays(pa.array(offsets), rows, type=arrow_type)


def _stream_videos(split: Any, by_video: dict[str, tuple], seen: dict[str, str], shards: _VideoShards,
                   concept_index: dict[str, int], search_only: bool) -> dict[str, int]:
    """Validate and shard every video of ``split``; returns video_id → video_index."""
    layout, video_index = shards.layout, {}
    for number, chunk in enumerate(split.video_chunks()):
        _check_chunk(chunk, layout, f"split '{split.name}' chunk {number}")
        for i, video_id in enumerate(chunk.video_ids):
            where = f"split '{split.name}' video '{video_id}'"
            if video_id in seen:
                raise IdError(f"{where}: duplicate video id (already in split '{seen[video_id]}')")
            if video_id not in by_video and not search_only:
                raise IdError(f"{where}: the video has no captions")
            seen[video_id] = split.name
            token_ids, concept_ids, *sentences = by_video.get(video_id, ([], [], []))
            row = {"video_id": video_id, "video_index": len(video_index), "concept_ids": concept_ids,
                   "frames": check_frames(chunk.frames[i], layout, where), "caption_token_ids": token_ids,
                   "caption_sentence_features": sentences[0] if sentences else None}  # fmt: skip
            row["num_frames"] = len(row["frames"])
            if chunk.clip_features is not None:
                row["clip_features"] = np.asarray(chunk.clip_features[i], dtype=np.float32)
            if chunk.true_attributes is not None:
                attributes = " ".join(chunk.true_attributes[i])  # same normalisation as a caption's words
                row["true_concept_ids"] = concepts_lib.caption_concepts(attributes, concept_index)
            video_index[video_id] = row["video_index"]
            shards.add(row)
    shards.flush()
    if not video_index:
        raise PrepareError(f"split '{split.name}' has no videos")
    return video_index


# ---------------------------------------------------------------------------------------------- splits


def _caption_table(captions: pl.DataFrame, video_index: dict[str, int], split: str, sentence_dim: int) -> pa.Table:
    """Captions with their video's index; a caption of a video the split does not hold is an error."""
    indexed = captions.with_row_index("row").with_columns(
        pl.col("video_id").replace_strict(video_index, default=None, return_dtype=pl.Int64).alias("video_index")
    )
    orphans = indexed.filter(pl.col("video_index").is_null())
    if orphans.height:
        row, caption_id, video_id = orphans.select("row", "caption_id", "video_id").row(0)
        raise IdError(f"split '{split}' captions row {row}: caption '{caption_id}' is for unknown video '{video_id}'")
    ids = pa.list_(pa.int32())
    fields = [("caption_id", pa.string()), ("video_id", pa.string()), ("video_index", pa.int64()),
              ("text", pa.string()), ("token_ids", ids), ("concept_ids", ids)]  # fmt: skip
    fields += [("sentence_features", pa.list_(pa.float32()))] if sentence_dim else []
    schema = pa.schema(fields)
    return indexed.select(schema.names).to_arrow().cast(schema)


def _query_tables(split: Any, video_index: dict[str, int]) -> tuple[pa.Table, pa.Table] | None:
    """Checked queries and qrels of a split (both or neither); qrels must name known queries and videos."""
    if split.queries is None and split.qrels is None:
        return None
    if split.queries is None or split.qrels is None:
        raise ColumnError(f"split '{split.name}': queries and qrels must be given together")
    queries = check_table(split.queries, _QUERY_COLUMNS, f"split '{split.name}' queries")
    _first_duplicate(queries["query_id"], "query id", f"split '{split.name}' queries")
    qrels = check_table(split.qrels, _QREL_COLUMNS, f"split '{split.name}' qrels").with_row_index("row")
    for column, known in (("query_id", set(queries["query_id"])), ("video_id", set(video_index))):
        unknown = qrels.filter(~pl.col(column).is_in(list(known)))
        if unknown.height:
            row, value = unknown["row"][0], unknown[column][0]
            raise IdError(f"split '{split.name}' qrels row {row}: unknown {column} '{value}'")
    schemas = [pa.schema([("query_id", pa.string()), ("text", pa.string())]),
               pa.schema([("query_id", pa.string()), ("video_id", pa.string()), ("relevance", pa.int32())])]
    return queries.to_arrow().cast(schemas[0]), qrels.drop("row").to_arrow().cast(schemas[1])


def _write_sharded(filesystem: pafs.FileSystem, staging: str, name: str, table: pa.Table, shard_rows: int
                   ) -> list[str]:
    filesystem.create_dir(f"{staging}/{name}", recursive=True)
    files = []
    for start in range(0, max(table.num_rows, 1), shard_rows):
        files.append(f"{name}/part-{len(files):05d}.parquet")
        pq.write_table(table.slice(start, shard_rows), f"{staging}/{files[-1]}", filesystem=filesystem)
    return files


def write_split(filesystem: pafs.FileSystem, staging: str, uri: str, store_cfg: Any, split: Any,
                captions: pl.DataFrame, layout: Layout, seen: dict[str, str], concept_index: dict[str, int]
                ) -> tuple[dict[str, Any], bool]:
    """Stage one split; returns its manifest entry and whether it has queries."""
    search_only = captions.height == 0 and split.queries is not None  # a search collection without captions
    if captions.height:
        layout.agree("sentence_dim", _check_sentence_features(captions, f"split '{split.name}' captions"),
                     f"split '{split.name}' captions")  # fmt: skip
    shards = _VideoShards(filesystem, staging, uri, split.name, store_cfg.shard_rows, layout)
    video_index = _stream_videos(split, group_captions(captions), seen, shards, concept_index, search_only)
    caption_table = _caption_table(captions, video_index, split.name, layout.sentence_dim or 0)
    queries = _query_tables(split, video_index)
    with storage_errors(uri):
        caption_files = _write_sharded(filesystem, staging, f"{split.name}/captions", caption_table,
                                       store_cfg.shard_rows)  # fmt: skip
        for table, name in zip(queries or (), ("queries", "qrels")):
            pq.write_table(table, f"{staging}/{split.name}/{name}.parquet", filesystem=filesystem)
    entry = {"videos": len(video_index), "captions": caption_table.num_rows,
             "video_files": shards.files, "caption_files": caption_files}  # fmt: skip
    return entry, queries is not None
