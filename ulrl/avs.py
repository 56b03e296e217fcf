"""Reader of AVS collections in the BigFile layout of the dual_encoding / ITV feature releases.

::

    <root>/<collection>/FeatureData/<feature>/shape.txt        "rows dim"
    <root>/<collection>/FeatureData/<feature>/id.txt           row ids, whitespace-separated
    <root>/<collection>/FeatureData/<feature>/feature.bin      rows × dim float32, row-major
    <root>/<collection>/FeatureData/<feature>/video2frames.txt {video_id: [frame_id, ...]} (Python literal)
    <root>/<collection>/TextData/<collection>.caption.txt      "<video_id>#enc#<n> <caption>" per line

Frame features of several names are concatenated per frame (they must hold the same frame ids); clip-level
features (one row per video id) are concatenated per video. ``feature.bin`` is memory-mapped, so a split
streams out as :class:`~ulrl.raw.VideoChunk` s of ``chunk_videos`` videos without loading the collection.
A test collection without a caption file is read as a search-only split (queries + qrels, no captions).
"""

from __future__ import annotations

import ast
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from ulrl.config import AvsConfig
from ulrl.raw import RawSplit, VideoChunk
from ulrl.store import PrepareError

CHUNK_VIDEOS = 256
"""Videos per streamed chunk."""


class AvsFormatError(PrepareError):
    """A file of the collection does not follow the BigFile layout; the message names file and line."""


@dataclass(frozen=True)
class BigFile:
    """One feature of one collection: ``matrix[index[row_id]]`` is that row's (dim,) float32 vector."""

    folder: Path
    ids: list[str]
    index: dict[str, int]
    matrix: np.ndarray  # (rows, dim) float32 memmap

    @property
    def dim(self) -> int:
        return self.matrix.shape[1]


def open_bigfile(folder: Path) -> BigFile:
    """Open ``folder/{shape.txt, id.txt, feature.bin}`` and check that the three agree."""
    shape_path, id_path, bin_path = folder / "shape.txt", folder / "id.txt", folder / "feature.bin"
    for path in (shape_path, id_path, bin_path):
        if not path.is_file():
            raise AvsFormatError(f"{path}: missing (BigFile layout needs shape.txt, id.txt, feature.bin)")
    fields = shape_path.read_text().split()
    if len(fields) != 2 or not all(f.isdigit() for f in fields):
        raise AvsFormatError(f"{shape_path}: expected 'rows dim', got {shape_path.read_text()[:80]!r}")
    rows, dim = int(fields[0]), int(fields[1])
    ids = id_path.read_text().split()
    if len(ids) != rows:
        raise AvsFormatError(f"{id_path}: {len(ids)} ids but shape.txt says {rows} rows")
    expected, actual = rows * dim * 4, bin_path.stat().st_size
    if actual != expected:
        raise AvsFormatError(
            f"{bin_path}: {actual} bytes, expected rows*dim*4 = {rows}*{dim}*4 = {expected} "
            f"({'truncated' if actual < expected else 'too long'})"
        )
    index = {row_id: row for row, row_id in enumerate(ids)}
    if len(index) != rows:
        duplicate = next(i for i, n in Counter(ids).items() if n > 1)
        raise AvsFormatError(f"{id_path}: duplicate id '{duplicate}'")
    matrix = np.memmap(bin_path, dtype=np.float32, mode="r", shape=(rows, dim)) if rows else np.zeros((0, dim))
    return BigFile(folder, ids, index, matrix)


def gather_rows(bigfile: BigFile, row_ids: list[str], owner: str) -> np.ndarray:
    """The (len(row_ids), dim) float32 rows of ``row_ids``; a missing id or a non-finite value is an error."""
    try:
        rows = np.fromiter((bigfile.index[r] for r in row_ids), dtype=np.int64, count=len(row_ids))
    except KeyError as err:
        raise AvsFormatError(f"{bigfile.folder / 'id.txt'}: no row for id {err.args[0]!r} ({owner})") from None
    values = np.asarray(bigfile.matrix[rows], dtype=np.float32)  # (n, dim), reads only these rows
    finite = np.isfinite(values).all(axis=1)
    if not finite.all():
        bad = int(rows[np.argmin(finite)])
        raise AvsFormatError(
            f"{bigfile.folder / 'feature.bin'}: row {bad} (id '{bigfile.ids[bad]}') holds NaN or inf"
        )
    return values


def read_video2frames(path: Path) -> dict[str, list[str]]:
    """Parse the ``{video_id: [frame_id, ...]}`` literal (``ast.literal_eval``: the file is data, not code)."""
    try:
        mapping = ast.literal_eval(path.read_text())
    except (ValueError, SyntaxError) as err:
        raise AvsFormatError(f"{path}: not a Python dict literal ({err.__class__.__name__}: {err})") from None
    if not isinstance(mapping, dict):
        raise AvsFormatError(f"{path}: expected a dict {{video_id: [frame_id, ...]}}")
    for video_id, frame_ids in mapping.items():
        if not isinstance(frame_ids, list | tuple) or not frame_ids:
            raise AvsFormatError(f"{path}: video '{video_id}' needs a non-empty list of frame ids")
    return {str(v): [str(f) for f in frame_ids] for v, frame_ids in mapping.items()}


def read_captions(path: Path) -> pl.DataFrame:
    """``<video_id>#enc#<n> <caption>`` lines → caption_id, video_id, text (blank lines skipped)."""
    caption_ids, video_ids, texts = [], [], []
    first_line: dict[str, int] = {}
    with path.open("rb") as lines:
        for line_no, raw in enumerate(lines, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise AvsFormatError(f"{path}:{line_no}: not UTF-8 ({err.reason} at byte {err.start})") from None
            if not line.strip():
                continue
            caption_id, _, text = line.strip().partition(" ")
            if "#" not in caption_id or not text.strip():
                raise AvsFormatError(f"{path}:{line_no}: expected '<video_id>#enc#<n> <caption>', got {line[:80]!r}")
            if caption_id in first_line:
                raise AvsFormatError(
                    f"{path}:{line_no}: duplicate caption id '{caption_id}' (first on line {first_line[caption_id]})"
                )
            first_line[caption_id] = line_no
            caption_ids.append(caption_id)
            video_ids.append(caption_id.split("#", 1)[0])
            texts.append(text.strip())
    return pl.DataFrame({"caption_id": caption_ids, "video_id": video_ids, "text": texts}, schema=_CAPTION_SCHEMA)


_CAPTION_SCHEMA = {"caption_id": pl.String, "video_id": pl.String, "text": pl.String}


def read_topics(path: Path) -> pl.DataFrame:
    """TREC topic file, ``<query_id> <text>`` per line → query_id, text."""
    rows = []
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        query_id, _, text = line.strip().partition(" ")
        if not text.strip():
            raise AvsFormatError(f"{path}:{line_no}: expected '<query_id> <text>', got {line[:80]!r}")
        rows.append((query_id, text.strip()))
    return pl.DataFrame(rows, schema={"query_id": pl.String, "text": pl.String}, orient="row")


def read_qrels(path: Path) -> pl.DataFrame:
    """TREC qrels, ``<query_id> <iteration> <video_id> <relevance>`` per line → query_id, video_id, relevance."""
    rows = []
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 4 or not fields[3].lstrip("-").isdigit():
            raise AvsFormatError(f"{path}:{line_no}: expected '<query_id> 0 <video_id> <relevance>', got {line[:80]!r}")
        rows.append((fields[0], fields[2], int(fields[3])))
    schema = {"query_id": pl.String, "video_id": pl.String, "relevance": pl.Int32}
    return pl.DataFrame(rows, schema=schema, orient="row")


def _video2frames_path(feature_root: Path, features: list[str]) -> Path:
    candidates = [feature_root / features[0] / "video2frames.txt", feature_root / "video2frames.txt"]
    for path in candidates:
        if path.is_file():
            return path
    raise AvsFormatError(f"video2frames.txt not found (looked at {', '.join(map(str, candidates))})")


def _open_features(feature_root: Path, names: list[str]) -> list[BigFile]:
    """Open the frame features and check they share their frame ids (concatenated per frame)."""
    bigfiles = [open_bigfile(feature_root / name) for name in names]
    first = bigfiles[0]
    for other in bigfiles[1:]:
        if other.ids != first.ids and set(other.ids) != set(first.ids):
            extra = next(iter(set(other.ids) ^ set(first.ids)))
            raise AvsFormatError(
                f"{other.folder / 'id.txt'}: frame ids differ from {first.folder / 'id.txt'} (e.g. '{extra}'); "
                "frame features concatenated per frame must share their frame ids"
            )
    return bigfiles


def _split_videos(captions: pl.DataFrame | None, video2frames: dict[str, list[str]], path: Path) -> list[str]:
    """Videos of the split: those with captions (in caption-file order), or all videos when search-only."""
    if captions is None:
        return list(video2frames)
    video_ids = captions["video_id"].unique(maintain_order=True).to_list()
    missing = [v for v in video_ids if v not in video2frames]
    if missing:
        row = captions["video_id"].to_list().index(missing[0])
        raise AvsFormatError(
            f"{path}: caption '{captions['caption_id'][row]}' is for video '{missing[0]}', "
            "which has no frames in video2frames.txt"
        )
    return video_ids


def _chunks(
    video_ids: list[str],
    video2frames: dict[str, list[str]],
    frame_files: list[BigFile],
    clip_files: list[BigFile],
    chunk_videos: int,
) -> Iterator[VideoChunk]:
    for start in range(0, len(video_ids), chunk_videos):
        ids = video_ids[start : start + chunk_videos]
        frames = [
            np.concatenate([gather_rows(bf, video2frames[v], f"video '{v}'") for bf in frame_files], axis=1)
            for v in ids
        ]  # each (T_v, ΣF)
        clip = None
        if clip_files:
            clip = np.concatenate([gather_rows(bf, ids, "clip-level feature") for bf in clip_files], axis=1)  # (n, ΣC)
        yield VideoChunk(video_ids=ids, frames=frames, clip_features=clip)


def read_collection(
    root: str | Path,
    collection: str,
    split: str,
    features: Sequence[str],
    clip_features: Sequence[str] = (),
    queries: str = "",
    qrels: str = "",
    chunk_videos: int = CHUNK_VIDEOS,
) -> RawSplit:
    """One collection as a :class:`RawSplit` named ``split``; videos stream lazily from the memmaps."""
    base = Path(root) / collection
    if not base.is_dir():
        raise AvsFormatError(f"{base}: collection folder not found")
    if not features:
        raise AvsFormatError("data.avs.features: name at least one frame feature")
    feature_root = base / "FeatureData"
    frame_files = _open_features(feature_root, list(features))
    clip_files = [open_bigfile(feature_root / name) for name in clip_features]
    v2f_path = _video2frames_path(feature_root, list(features))
    video2frames = read_video2frames(v2f_path)
    caption_path = base / "TextData" / f"{collection}.caption.txt"
    if caption_path.is_file():
        captions = read_captions(caption_path)
    elif queries:
        captions = None  # a search-only test collection (e.g. TRECVid): queries and qrels, no captions
    else:
        raise AvsFormatError(f"{caption_path}: caption file not found")
    video_ids = _split_videos(captions, video2frames, caption_path)
    return RawSplit(
        name=split,
        video_chunks=lambda: _chunks(video_ids, video2frames, frame_files, clip_files, chunk_videos),
        captions=captions if captions is not None else pl.DataFrame(schema=_CAPTION_SCHEMA),
        queries=read_topics(Path(queries)) if queries else None,
        qrels=read_qrels(Path(qrels)) if qrels else None,
    )


def read_avs(cfg: AvsConfig) -> dict[str, RawSplit]:
    """train / val / test splits from ``cfg``; empty collection names are skipped (train is required)."""
    if not cfg.root or not cfg.train_collection:
        raise AvsFormatError("data.avs.root and data.avs.train_collection must be set for data.source=avs")
    if (cfg.queries or cfg.qrels) and not cfg.test_collection:
        raise AvsFormatError("data.avs.queries/qrels need data.avs.test_collection")
    for key in ("queries", "qrels"):
        if getattr(cfg, key) and not Path(getattr(cfg, key)).is_file():
            raise AvsFormatError(f"data.avs.{key}: {getattr(cfg, key)} not found")
    collections = {"train": cfg.train_collection, "val": cfg.val_collection, "test": cfg.test_collection}
    splits = {}
    for split, collection in collections.items():
        if not collection:
            continue
        extra = {"queries": cfg.queries, "qrels": cfg.qrels} if split == "test" else {}
        splits[split] = read_collection(cfg.root, collection, split, cfg.features, cfg.clip_features, **extra)
    return splits
