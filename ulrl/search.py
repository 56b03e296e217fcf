"""Interpretable search (paper §5): query concept selection, fused ranking and per-hit explanations.

Pure torch/numpy; ``jobs.evaluate`` (AVS scores of every θ) and ``jobs.search`` (one query, top-k) share
:func:`rank`, so the numbers evaluate reports are the rankings search returns.

Scores of query q against video v, per query over the whole collection:

* embedding  s_emb(q, v) = ψ(q)·φ(v)  (both unit-norm: cosine);
* concept    s_con(q, v) = c_q · ŷ'_v, with ŷ'_v = ŷ_v where ŷ_v > ``video_threshold`` and 0 elsewhere;
* fused      s(q, v) = (1 − θ)·mm(s_emb)(q, v) + θ·mm(s_con)(q, v), where mm min-max normalises each
  query's row over the collection, mm(s) = (s − min_v s) / (max_v s − min_v s) (a constant row → 0).

Since mm is increasing per row, θ = 0 ranks exactly as the embedding and θ = 1 exactly as the concepts.

Query concept vector c_q (:func:`query_concept_weights`), the union of

* decoded concepts: ŷ_q,k ≥ ``query_threshold`` (paper: 0.99), weight ŷ_q,k;
* lexical matches: the query's concept words (:func:`ulrl.concepts.concept_words`: stopwords removed,
  WordNet lemmas) that are in the bank, weight 1.0.

Two deliberate departures from the reference code: (1) lexical matching is an exact lemma match — the
paper embeds each word with a sentence transformer and accepts the nearest bank entry at cosine > 0.9,
which needs a model we do not ship; (2) a lexical match weighs 1.0 — the reference gives it the decoder's
own probability, and since that vector was zeroed at ≤ 0.5 a word the user typed counted for nothing
whenever the decoder disagreed; we take the user's word as certain. The generic concepts "video" and
"clip" are never selected (the reference drops them from decoded concepts; as typed words they match every
video equally). Contradicting concepts of a query are the antonyms of its selected concepts that are not
selected themselves; they explain hits (present or absent in the video) and do not change the score,
as in the released ranking (its "minus contrary" vector is commented out).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ulrl.concepts import concept_words
from ulrl.metrics import rank_chunked

GENERIC_CONCEPTS = frozenset({"video", "clip"})
"""Concepts never selected for a query (they describe every item of a video collection)."""


class SearchError(ValueError):
    """Search inputs that do not fit together (dimensions, thresholds, an empty collection)."""


# ---------------------------------------------------------------------------------------- concept selection


def lexical_concepts(text: str, bank_index: Mapping[str, int]) -> list[int]:
    """Sorted bank ids of the query's concept words (exact lemma match), generic concepts left out."""
    return sorted({bank_index[w] for w in concept_words(text) if w in bank_index and w not in GENERIC_CONCEPTS})


def lexical_matrix(texts: Sequence[str], concepts: Sequence[str]) -> Tensor:
    """(Q, K) bool: entry [q, k] iff concept k is one of query q's words (:func:`lexical_concepts`)."""
    bank_index = {name: k for k, name in enumerate(concepts)}
    matrix = torch.zeros(len(texts), len(concepts), dtype=torch.bool)  # (Q, K)
    for row, text in enumerate(texts):
        matrix[row, lexical_concepts(text, bank_index)] = True
    return matrix


def generic_mask(concepts: Sequence[str]) -> Tensor:
    """(K,) bool: which bank entries are :data:`GENERIC_CONCEPTS`."""
    return torch.tensor([name in GENERIC_CONCEPTS for name in concepts], dtype=torch.bool)


def query_concept_weights(query_probs: Tensor, lexical: Tensor, threshold: float, generic: Tensor | None = None
                          ) -> Tensor:
    """c_q (Q, K): 1.0 on lexical matches, ŷ on decoded concepts (ŷ ≥ threshold), 0 elsewhere.

    query_probs (Q, K) decoder probabilities; lexical (Q, K) bool; generic (K,) bool, never decoded.
    """
    if query_probs.shape != lexical.shape:
        raise SearchError(f"query_probs {tuple(query_probs.shape)} and lexical {tuple(lexical.shape)} differ")
    decoded = query_probs >= threshold  # (Q, K)
    if generic is not None:
        decoded &= ~generic.to(decoded.device)
    weights = torch.where(decoded, query_probs, torch.zeros_like(query_probs))  # (Q, K)
    return torch.where(lexical.to(weights.device), torch.ones_like(weights), weights)


def video_concept_vectors(video_probs: Tensor, threshold: float) -> Tensor:
    """ŷ' (N, K): the probabilities, zeroed at or below ``threshold`` (paper: 0.5)."""
    return video_probs.masked_fill(video_probs <= threshold, 0.0)


def contradicting_concepts(selected: Tensor, contradiction: Tensor) -> Tensor:
    """(Q, K) bool: concepts b with C[a, b] = 1 for some selected a, b itself not selected.

    selected (Q, K) bool; contradiction (K, K), C[a, b] = 1 iff b contradicts a.
    """
    reached = selected.float() @ contradiction.float()  # (Q, K) number of selected concepts b contradicts
    return (reached > 0) & ~selected


# ---------------------------------------------------------------------------------------- fused ranking


def minmax_rows(scores: Tensor) -> Tensor:
    """(s − min) / (max − min) per row of (q, N) scores; a constant row becomes 0."""
    low = scores.min(dim=1, keepdim=True).values  # (q, 1)
    span = scores.max(dim=1, keepdim=True).values - low  # (q, 1)
    return torch.where(span > 0, (scores - low) / span.clamp_min(1e-30), torch.zeros_like(scores))


@dataclass(frozen=True)
class Queries:
    """Encoded queries: embeddings (Q, D) and concept weights c_q (Q, K)."""

    embedding: Tensor
    concept_weights: Tensor


@dataclass(frozen=True)
class Collection:
    """Encoded videos: embeddings (N, D) and thresholded concept vectors ŷ' (N, K)."""

    embedding: Tensor
    concept_vectors: Tensor

    @classmethod
    def from_probs(cls, embedding: Tensor, concept_probs: Tensor, video_threshold: float) -> Collection:
        return cls(embedding.float(), video_concept_vectors(concept_probs.float(), video_threshold))


def fused_scores(queries: Queries, collection: Collection, theta: float, rows: slice = slice(None)) -> Tensor:
    """(q, N) fused scores of the queries in ``rows``; a term of weight 0 is not computed at all."""
    if not 0.0 <= theta <= 1.0:
        raise SearchError(f"theta must lie in [0, 1], got {theta}")
    if queries.embedding.shape[1] != collection.embedding.shape[1]:
        raise SearchError(f"query embeddings are {queries.embedding.shape[1]}-d, the collection's "
                          f"{collection.embedding.shape[1]}-d: was the index built by another model?")
    total = 0.0
    if theta < 1.0:
        emb = queries.embedding[rows] @ collection.embedding.T  # (q, N)
        total = (1.0 - theta) * minmax_rows(emb)
    if theta > 0.0:
        con = queries.concept_weights[rows] @ collection.concept_vectors.T  # (q, N)
        total = total + theta * minmax_rows(con)
    return total


def rank(queries: Queries, collection: Collection, theta: float, k: int, chunk: int = 256
         ) -> tuple[np.ndarray, np.ndarray]:
    """Top-k videos per query by fused score, a chunk of queries at a time: (Q, k) indices, (Q, k) scores.

    k is capped at the collection size; ties keep ``torch.topk``'s order (see :func:`ulrl.metrics.rank_chunked`).
    """
    if collection.embedding.shape[0] == 0:
        raise SearchError("the collection holds no videos")
    score = lambda rows: fused_scores(queries, collection, theta, rows)  # noqa: E731
    return rank_chunked(score, queries.embedding.shape[0], k, chunk)


# ---------------------------------------------------------------------------------------- explanations


@dataclass(frozen=True)
class Explanation:
    """Why a video was retrieved for a query."""

    matched: list[tuple[str, float, float]]
    """(concept, query weight, video probability) of every selected query concept, heaviest first."""
    contradicting: list[tuple[str, float]]
    """(concept, video probability) of the query's contradicting concepts."""
    video_threshold: float
    """A video 'shows' a concept when its probability exceeds this."""

    def line(self) -> str:
        """``four 0.97✓ upward 0.41✗ | against: downward absent 0.02, slow PRESENT 0.81``."""
        shown = lambda p: "✓" if p > self.video_threshold else "✗"  # noqa: E731
        matched = " ".join(f"{name} {p:.2f}{shown(p)}" for name, _, p in self.matched) or "(no query concepts)"
        if not self.contradicting:
            return matched
        against = ", ".join(f"{name} {'PRESENT' if p > self.video_threshold else 'absent'} {p:.2f}"
                            for name, p in self.contradicting)
        return f"{matched} | against: {against}"


def explain(weights: Tensor, contradicting: Tensor, video_probs: Tensor, concepts: Sequence[str],
            video_threshold: float) -> Explanation:
    """Explanation of one (query, video) pair: weights (K,) c_q, contradicting (K,) bool, video_probs (K,) ŷ_v."""
    chosen = torch.nonzero(weights > 0).flatten().tolist()
    chosen.sort(key=lambda k: (-float(weights[k]), concepts[k]))
    against = sorted(torch.nonzero(contradicting).flatten().tolist(), key=lambda k: concepts[k])
    return Explanation(
        matched=[(concepts[k], float(weights[k]), float(video_probs[k])) for k in chosen],
        contradicting=[(concepts[k], float(video_probs[k])) for k in against],
        video_threshold=video_threshold,
    )
