"""The feature store: Parquet shards + JSON metadata under one root (a local folder or ``s3://bucket/prefix``).

:func:`write_store` turns :class:`~ulrl.raw.RawSplit` s into the layout of ``docs/store.md``; :func:`open_store`
reads its metadata back. A store is valid iff ``<root>/manifest.json`` exists: every row is validated while it
is staged under ``<root>/.tmp-<uuid>/``, the staged files are moved into place only after the whole input
passed, and the manifest is written last. A failed run deletes what it wrote, so it never leaves a root that
looks like a store. Credentials are never read from the config: pyarrow uses the standard AWS chain
(environment, profile, instance role) and ``AWS_ENDPOINT_URL`` for a non-AWS endpoint.
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs

from ulrl import concepts as concepts_lib
from ulrl.config import to_dict

SCHEMA_VERSION = 1
"""Version of the layout this module writes and reads."""

TABLES = ("videos", "captions", "queries", "qrels")
"""Tables of a split: sharded ``videos`` / ``captions`` folders, single-file ``queries`` / ``qrels``."""

_METADATA = ("concepts.json", "contradictions.json", "vocab.json")


class StoreError(Exception):
    """The store cannot be read: no manifest, an unknown schema version, an unreachable location."""


class PrepareError(ValueError):
    """Input that cannot become a store; the message names the file/split, row and key."""


class ColumnError(PrepareError):
    """A table lacks a required column, has an unexpected one, or a column of the wrong type."""


class FeatureError(PrepareError):
    """Features of the wrong shape or dimension, or holding NaN/inf."""


class IdError(PrepareError):
    """Duplicate ids, captions of unknown videos, videos without captions, dangling query ids."""


class StoreExistsError(PrepareError):
    """The target already holds a store and ``store.overwrite`` is false."""


class StoreAccessError(PrepareError, StoreError):
    """The store location cannot be reached or written (endpoint down, wrong credentials, no bucket)."""


# ---------------------------------------------------------------------------------------------- locations


def resolve_uri(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path within it) for a local folder (relative or absolute) or an ``s3://`` URI.

    S3 goes through :class:`pyarrow.fs.S3FileSystem` with ``endpoint_override=$AWS_ENDPOINT_URL`` (moto,
    MinIO, ...); keys, session tokens and region come from the AWS credential chain, never from the config.
    """
    endpoint = os.environ.get("AWS_ENDPOINT_URL")
    if uri.startswith("s3://") and endpoint:
        # explicit, so that a dead endpoint fails after seconds; AWS proper goes through from_uri (region lookup)
        filesystem = pafs.S3FileSystem(endpoint_override=endpoint, connect_timeout=5, request_timeout=60)
        return filesystem, uri.removeprefix("s3://").rstrip("/")
    if "://" in uri:
        filesystem, path = pafs.FileSystem.from_uri(uri)
        return filesystem, path.rstrip("/")
    return pafs.LocalFileSystem(), Path(uri).expanduser().absolute().as_posix().rstrip("/")


_ACCESS_HINTS = (
    (("NETWORK_CONNECTION", "curlCode"), "cannot reach the storage endpoint {endpoint}"),
    (("ACCESS_DENIED", "INVALID_ACCESS_KEY_ID", "SIGNATURE_DOES_NOT_MATCH", "Forbidden"),
     "access denied: check the AWS credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE)"),
    (("NO_SUCH_BUCKET",), "the bucket does not exist"),
)  # fmt: skip


def access_error(uri: str, err: OSError) -> StoreAccessError:
    """Turn a filesystem error into one line that says what to fix."""
    detail = str(err).splitlines()[0] if str(err) else type(err).__name__
    for markers, hint in _ACCESS_HINTS:
        if any(marker in detail for marker in markers):
            endpoint = os.environ.get("AWS_ENDPOINT_URL") or "(AWS default)"
            return StoreAccessError(f"store {uri}: {hint.format(endpoint=endpoint)} ({detail})")
    return StoreAccessError(f"store {uri}: {detail}")


@contextlib.contextmanager
def storage_errors(uri: str) -> Iterator[None]:
    """Filesystem calls inside raise :class:`StoreAccessError` naming ``uri`` instead of a bare OSError."""
    try:
        yield
    except OSError as err:
        raise access_error(uri, err) from err


def read_json(filesystem: pafs.FileSystem, path: str) -> Any:
    with filesystem.open_input_stream(path) as stream:
        return json.loads(stream.read())


def write_json(filesystem: pafs.FileSystem, path: str, value: Any) -> None:
    with filesystem.open_output_stream(path) as stream:
        stream.write(json.dumps(value, indent=1).encode())


# ---------------------------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class Store:
    """An opened store: its manifest and metadata in memory, its tables read on demand."""

    uri: str
    filesystem: pafs.FileSystem
    root: str
    """Path of the root within ``filesystem`` (``bucket/prefix`` on S3)."""
    manifest: dict[str, Any]
    concepts: list[str]
    """Concept names; the index is the concept id."""
    concept_frequency: list[int]
    """Training-caption frequency of each concept."""
    vocab: list[str]
    """Token words; the index is the token id (0 = ``<pad>``, 1 = ``<unk>``)."""
    pairs: list[tuple[str, str]]
    """Contradicting concept pairs, both orders listed."""

    def contradiction(self) -> Any:
        """(K, K) matrix with C[a, b] = 1 iff concept b contradicts concept a (``concepts.contradiction_matrix``)."""
        return concepts_lib.contradiction_matrix(self.pairs, self.concepts)

    def files(self, split: str, table: str) -> list[str]:
        """Paths (within :attr:`filesystem`) of one table of a split; empty when the split lacks it."""
        if split not in self.manifest["splits"]:
            raise StoreError(f"store {self.uri} has no split '{split}' (has: {', '.join(self.manifest['splits'])})")
        if table not in TABLES:
            raise StoreError(f"unknown table '{table}': one of {', '.join(TABLES)}")
        if table in ("videos", "captions"):
            return [f"{self.root}/{name}" for name in self.manifest["splits"][split][f"{table[:-1]}_files"]]
        if split not in self.manifest["query_splits"]:
            return []
        return [f"{self.root}/{split}/{table}.parquet"]

    def uris(self, split: str, table: str) -> list[str]:
        """Like :meth:`files`, as URIs (``s3://bucket/...`` or local paths) for readers without a filesystem."""
        scheme = "s3://" if self.filesystem.type_name == "s3" else ""
        return [scheme + path for path in self.files(split, table)]

    def read_table(self, split: str, table: str, columns: list[str] | None = None) -> pa.Table:
        """One whole table of a split as Arrow (``videos``, ``captions``, ``queries`` or ``qrels``)."""
        paths = self.files(split, table)
        if not paths:
            raise StoreError(f"store {self.uri}: split '{split}' has no {table}")
        with storage_errors(self.uri):
            return pads.dataset(paths, filesystem=self.filesystem, format="parquet").to_table(columns=columns)


def open_store(uri: str) -> Store:
    """Read the manifest and metadata of the store at ``uri``; :class:`StoreError` if there is none."""
    filesystem, root = resolve_uri(uri)
    with storage_errors(uri):
        try:
            manifest = read_json(filesystem, f"{root}/manifest.json")
        except FileNotFoundError:
            raise StoreError(f"no store at {uri}: run python -m jobs.prepare") from None
        version = manifest.get("schema_version")
        if version != SCHEMA_VERSION:
            raise StoreError(
                f"{uri}/manifest.json: schema_version {version!r} is not supported (this version reads "
                f"{SCHEMA_VERSION}): run python -m jobs.prepare with store.overwrite=true"
            )
        concepts = read_json(filesystem, f"{root}/concepts.json")
        vocab = read_json(filesystem, f"{root}/vocab.json")
        pairs = read_json(filesystem, f"{root}/contradictions.json")["pairs"]
    return Store(uri, filesystem, root, manifest, concepts["concepts"], concepts["frequency"], vocab["words"],
                 [(a, b) for a, b in pairs])  # fmt: skip


# ---------------------------------------------------------------------------------------------- writing


def _check_target(filesystem: pafs.FileSystem, root: str, uri: str, overwrite: bool) -> dict | None:
    """The manifest of a store already at ``root`` (None if none); refuses to replace it unless asked."""
    info = filesystem.get_file_info(f"{root}/manifest.json")
    if info.type == pafs.FileType.NotFound:
        return None
    if not overwrite:
        raise StoreExistsError(f"{uri} already holds a store (manifest.json): pass store.overwrite=true to replace it")
    try:
        return read_json(filesystem, info.path)
    except ValueError:
        return {}


def _move(filesystem: pafs.FileSystem, src: str, dst: str) -> None:
    """Move a file or folder. Local: one rename. S3 has no rename: a server-side copy + delete per object."""
    if filesystem.type_name == "local":
        filesystem.create_dir(dst.rsplit("/", 1)[0], recursive=True)
        filesystem.move(src, dst)
        return
    if filesystem.get_file_info(src).type == pafs.FileType.File:
        filesystem.move(src, dst)
        return
    for info in filesystem.get_file_info(pafs.FileSelector(src, recursive=True)):
        if info.type == pafs.FileType.File:
            filesystem.move(info.path, dst + info.path[len(src) :])


def _delete(filesystem: pafs.FileSystem, path: str) -> None:
    kind = filesystem.get_file_info(path).type
    if kind == pafs.FileType.File:
        filesystem.delete_file(path)
    elif kind == pafs.FileType.Directory:
        filesystem.delete_dir(path)


def _split_entries(split: str) -> list[str]:
    return [f"{split}/videos", f"{split}/captions", f"{split}/queries.parquet", f"{split}/qrels.parquet"]


def _publish(filesystem: pafs.FileSystem, root: str, staging: str, manifest: dict, old: dict | None,
             moved: list[str]) -> None:
    """Replace the old store (if any) by the staged one; the manifest goes last. ``moved`` collects targets."""
    if old is not None:
        filesystem.delete_file(f"{root}/manifest.json")  # from here on the old store is no longer valid
    splits = set(manifest["splits"]) | set((old or {}).get("splits", {}))
    for split in splits:
        for entry in _split_entries(split):
            _delete(filesystem, f"{root}/{entry}")  # old shards, or leftovers of a failed run
    staged = [*_METADATA, *(e for split in manifest["splits"] for e in _split_entries(split))]
    for entry in staged:
        if filesystem.get_file_info(f"{staging}/{entry}").type != pafs.FileType.NotFound:
            moved.append(f"{root}/{entry}")
            _move(filesystem, f"{staging}/{entry}", f"{root}/{entry}")
    write_json(filesystem, f"{staging}/manifest.json", manifest)
    _move(filesystem, f"{staging}/manifest.json", f"{root}/manifest.json")


def _cleanup(filesystem: pafs.FileSystem, paths: list[str], created_root: str | None) -> None:
    """Best-effort removal of what a failed run wrote (a second error must not hide the first), and of the
    root if this run created it and it is empty now (on S3 pyarrow leaves a marker object for the parent of
    whatever it deletes)."""
    for path in paths:
        with contextlib.suppress(OSError):
            _delete(filesystem, path)
    with contextlib.suppress(OSError):
        if created_root and not filesystem.get_file_info(pafs.FileSelector(created_root, allow_not_found=True)):
            _delete(filesystem, created_root)


def _manifest(cfg: Any, source: str, layout: Any, metadata: Any, entries: dict, query_splits: list) -> dict:
    return {
        "schema_version": SCHEMA_VERSION, "source": source, "frame_dim": layout.frame_dim,
        "clip_dim": layout.clip_dim or 0, "sentence_dim": layout.sentence_dim or 0,
        "vocab_size": len(metadata.words), "num_concepts": len(metadata.concepts),
        "feature_dtype": cfg.store.feature_dtype, "has_true_labels": bool(layout.has_true_labels),
        "splits": entries, "query_splits": query_splits, "created_by": to_dict(cfg),
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }  # fmt: skip


def write_store(cfg: Any, splits: dict[str, Any], source: str,
                progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Validate ``splits`` (``{name: RawSplit}``, must hold ``train``) and write them as the store at
    ``cfg.store.uri``; returns the manifest. ``progress`` receives one line per step.

    The concept bank and vocabulary come from the *train* captions (``data.concept_min_freq``,
    ``data.vocab_min_freq``), contradiction pairs from WordNet antonyms and ``data.contradiction_file``.
    Bad input raises a :class:`PrepareError` subclass and leaves no manifest and no staged data behind.
    """
    from ulrl import store_build as build  # it imports this module's errors

    say = progress or (lambda message: None)
    uri = cfg.store.uri
    if cfg.store.shard_rows < 1:
        raise PrepareError(f"store.shard_rows: must be at least 1, got {cfg.store.shard_rows}")
    if "train" not in splits:
        raise PrepareError(f"no 'train' split to build the concept bank from (have: {', '.join(splits)})")
    filesystem, root = resolve_uri(uri)
    with storage_errors(uri):
        old = _check_target(filesystem, root, uri, cfg.store.overwrite)
        created_root = root if filesystem.get_file_info(root).type == pafs.FileType.NotFound else None
    checked = build.check_captions(splits)
    metadata = build.build_metadata(cfg.data, checked["train"]["text"].to_list())
    say(f"concept bank: {len(metadata.concepts)} concepts; vocabulary: {len(metadata.words)} words; "
        f"contradiction pairs: {len(metadata.pairs) // 2}")  # fmt: skip
    captions = build.annotate_captions(checked, metadata)
    staging = f"{root}/.tmp-{uuid.uuid4().hex}"
    written = [staging]  # what a failure must delete; publishing adds the moved targets
    layout, seen, entries, query_splits = build.Layout(cfg.store.feature_dtype), {}, {}, []
    try:
        for name, split in splits.items():
            entries[name], has_queries = build.write_split(
                filesystem, staging, uri, cfg.store, split, captions[name], layout, seen, metadata.concept_index
            )
            query_splits += [name] if has_queries else []
            say(f"{name}: {entries[name]['videos']} videos, {entries[name]['captions']} captions, "
                f"{len(entries[name]['video_files'])} video shard(s)" + (", queries" if has_queries else ""))
        manifest = _manifest(cfg, source, layout, metadata, entries, query_splits)
        with storage_errors(uri):
            metadata.write(filesystem, staging)
            _publish(filesystem, root, staging, manifest, old, written)
            filesystem.delete_dir(staging)
    except BaseException:
        _cleanup(filesystem, written, created_root)
        raise
    say(f"wrote store {uri}")
    return manifest
