"""The in-memory form of a collection before it becomes a store: what importers produce and
``store.write_store`` consumes. Videos arrive in chunks so a large collection never sits in memory whole."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import polars as pl


@dataclass
class VideoChunk:
    """A few videos of one split."""

    video_ids: list[str]
    """Video ids, unique within the collection."""
    frames: list[np.ndarray]
    """Per video a (T_i, F) float32 array of frame features."""
    clip_features: np.ndarray | None = None
    """(n, C) float32 video-level features (e.g. motion), or None."""
    true_attributes: list[list[str]] | None = None
    """Per video the full set of true attribute words (benchmark ground truth, evaluation only)."""


@dataclass
class RawSplit:
    """One split (train / val / test) of a collection."""

    name: str
    """Split name."""
    video_chunks: Callable[[], Iterator[VideoChunk]]
    """Returns a fresh iterator over the split's videos each time it is called."""
    captions: pl.DataFrame
    """Columns caption_id (str), video_id (str), text (str); optional sentence_features (list[f32])."""
    queries: pl.DataFrame | None = None
    """AVS-style queries: query_id (str), text (str)."""
    qrels: pl.DataFrame | None = None
    """Relevance judgments: query_id (str), video_id (str), relevance (int)."""
