"""Evaluation metrics: caption↔video retrieval, AVS AP and xinfAP, TREC run/qrels files, concept decoding.

Inputs may be torch tensors or numpy arrays. Scores are computed in float32, a chunk of queries (or of
concept columns) at a time, and only what each metric needs (ranks, top-k lists) is kept, so a
1k-query × 100k-video evaluation never holds a dense (Q, N) matrix, let alone a float64 one.

Tie conventions (stated per function): caption↔video ranks are optimistic (an item is beaten only by
items scoring strictly higher); concept AP/AUC treat tied scores as one threshold (AP as in
scikit-learn's ``average_precision_score``, AUC with averaged ranks); top-k lists (AVS runs, concept
recall@k) keep ``torch.topk``'s order among tied scores, which is not specified.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import NamedTuple, Union

import numpy as np
import torch

Array = Union[np.ndarray, torch.Tensor]
ScoreFn = Callable[[slice], torch.Tensor]
"""``score_fn(query_slice) -> (q, N)`` scores of those queries against all N items."""


class TrecFormatError(ValueError):
    """A malformed line in a TREC run or qrels file; the message names the file and line."""


def _as_tensor(x: Array, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``x`` as a tensor of ``dtype`` (no copy when it already is one)."""
    if isinstance(x, torch.Tensor):
        return x.to(dtype)
    return torch.as_tensor(np.asarray(x), dtype=dtype)


# ---------------------------------------------------------------- caption ↔ video retrieval


def text_to_video_ranks(
    text_emb: Array, video_emb: Array, caption_video_idx: Array, chunk: int = 256
) -> np.ndarray:
    """(C,) rank of each caption's own video: ``1 + #{videos scoring strictly higher}`` (optimistic ties).

    Score = dot product ``text_emb (C, D) · video_emb (V, D)``; ``caption_video_idx (C,)`` in [0, V).
    """
    text, video = _as_tensor(text_emb), _as_tensor(video_emb)
    target = _as_tensor(caption_video_idx, torch.long).to(text.device)
    _check_targets(target, len(text), len(video))
    ranks = []
    for start in range(0, len(text), chunk):
        sims = text[start : start + chunk] @ video.T  # (c, V)
        own = sims.gather(1, target[start : start + chunk, None])  # (c, 1)
        ranks.append(1 + (sims > own).sum(1))
    return torch.cat(ranks).cpu().numpy()


def video_to_text_ranks(
    text_emb: Array, video_emb: Array, caption_video_idx: Array, chunk: int = 256
) -> tuple[np.ndarray, np.ndarray]:
    """Per video that has captions: (best rank, AP over its captions), each (V',) in video order.

    Captions are ranked by dot product with the video. The j-th best of the video's own captions gets
    rank ``r_j = j + #{other videos' captions scoring strictly higher}`` (own captions win ties), so the
    best rank is ``r_1`` and ``AP = (1/n) Σ_j j / r_j`` over its n captions. Videos without captions
    are left out.
    """
    text, video = _as_tensor(text_emb), _as_tensor(video_emb)
    target = _as_tensor(caption_video_idx, torch.long).to(text.device)
    _check_targets(target, len(text), len(video))
    table = _captions_per_video(target, len(video))  # (V, M) caption ids, -1 = none
    best, ap = [], []
    for start in range(0, len(video), chunk):
        own_idx = table[start : start + chunk]  # (v, M)
        sims = video[start : start + chunk] @ text.T  # (v, C)
        own = sims.gather(1, own_idx.clamp(min=0)).masked_fill(own_idx < 0, -torch.inf)  # (v, M)
        own = own.sort(1, descending=True).values  # best own caption first, padding last
        above_all = sims.shape[1] - torch.searchsorted(sims.sort(1).values, own, right=True)  # (v, M)
        above_own = own.shape[1] - torch.searchsorted(own.flip(1).contiguous(), own, right=True)
        position = torch.arange(1, own.shape[1] + 1, device=own.device)  # j
        rank = position + above_all - above_own  # (v, M)
        valid = position <= (own_idx >= 0).sum(1, keepdim=True)  # (v, M)
        best.append(rank[:, 0])
        ap.append((position / rank.double() * valid).sum(1) / valid.sum(1).clamp(min=1))
    has_caption = (table[:, 0] >= 0).cpu().numpy()
    return torch.cat(best).cpu().numpy()[has_caption], torch.cat(ap).cpu().numpy()[has_caption]


def retrieval_metrics(
    text_emb: Array, video_emb: Array, caption_video_idx: Array, chunk: int = 256
) -> dict[str, float]:
    """MSR-VTT style metrics; each caption matches exactly one video, a video has several captions.

    Keys ``{t2v,v2t}_{r1,r5,r10,medr,meanr,map}`` and ``rsum``. R@K = 100 · mean(rank ≤ K) (percent,
    like the paper's evaluation.py), MedR = ⌊median(rank)⌋, MeanR = mean(rank), ranks from 1 (see
    :func:`text_to_video_ranks`, :func:`video_to_text_ranks`). t2v mAP = mean(1/rank) (one relevant
    video); v2t mAP = mean over videos of the AP over all their captions. ``rsum`` = the six R@K summed,
    the paper's model-selection score.
    """
    t2v = text_to_video_ranks(text_emb, video_emb, caption_video_idx, chunk)
    v2t, v2t_ap = video_to_text_ranks(text_emb, video_emb, caption_video_idx, chunk)
    out = {**_rank_summary(t2v, "t2v"), "t2v_map": float(np.mean(1.0 / t2v))}
    out.update({**_rank_summary(v2t, "v2t"), "v2t_map": float(np.mean(v2t_ap))})
    out["rsum"] = sum(out[f"{d}_r{k}"] for d in ("t2v", "v2t") for k in (1, 5, 10))
    return out


def _rank_summary(ranks: np.ndarray, prefix: str) -> dict[str, float]:
    out = {f"{prefix}_r{k}": 100.0 * float(np.mean(ranks <= k)) for k in (1, 5, 10)}
    out[f"{prefix}_medr"] = float(np.floor(np.median(ranks)))
    out[f"{prefix}_meanr"] = float(np.mean(ranks))
    return out


def _check_targets(target: torch.Tensor, num_captions: int, num_videos: int) -> None:
    if target.shape != (num_captions,) or num_captions == 0:
        raise ValueError(f"caption_video_idx: expected shape ({num_captions},), got {tuple(target.shape)}")
    low, high = int(target.min()), int(target.max())
    if low < 0 or high >= num_videos:
        raise ValueError(f"caption_video_idx: values must lie in [0, {num_videos}), got [{low}, {high}]")


def _captions_per_video(caption_video_idx: torch.Tensor, num_videos: int) -> torch.Tensor:
    """(V, M) caption indices of each video, padded with -1; M = most captions of any video."""
    order = torch.argsort(caption_video_idx, stable=True)  # captions grouped by video
    counts = torch.bincount(caption_video_idx, minlength=num_videos)  # (V,)
    starts = torch.cumsum(counts, 0) - counts
    owner = caption_video_idx[order]
    slot = torch.arange(len(order), device=order.device) - starts[owner]  # position inside its group
    table = torch.full((num_videos, int(counts.max())), -1, dtype=torch.long, device=order.device)
    table[owner, slot] = order
    return table


# ---------------------------------------------------------------- AVS: top-k ranking and AP


def rank_chunked(
    score_fn: ScoreFn, num_queries: int, k: int, chunk: int = 256
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of ``score_fn`` a chunk of queries at a time: (Q, k) int64 indices, (Q, k) float32 scores.

    ``score_fn(slice) -> (q, N)`` may fuse any scores (embedding + concept). Rows are sorted by
    descending score; tied scores keep ``torch.topk``'s unspecified order. k is capped at N.
    """
    if num_queries == 0:
        return np.zeros((0, k), np.int64), np.zeros((0, k), np.float32)
    indices, scores = [], []
    for start in range(0, num_queries, chunk):
        block = score_fn(slice(start, min(start + chunk, num_queries))).float()  # (q, N)
        top = torch.topk(block, min(k, block.shape[1]), dim=1)
        indices.append(top.indices.cpu())
        scores.append(top.values.cpu())
    return torch.cat(indices).numpy(), torch.cat(scores).numpy()


def topk_chunked(
    query_emb: Array,
    video_emb: Array,
    k: int,
    chunk: int = 256,
    score_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k videos per query; ``score_fn(query_block (q, D), video_emb (N, D)) -> (q, N)``, default dot."""
    queries, videos = _as_tensor(query_emb), _as_tensor(video_emb)
    score = score_fn or (lambda q, v: q @ v.T)
    return rank_chunked(lambda rows: score(queries[rows], videos), len(queries), k, chunk)


def average_precision(
    ranked_ids: Sequence, relevant: set, num_relevant: int | None = None, top_n: int = 1000
) -> float:
    """TREC AP of one ranked list: ``(1/R) Σ_{k ≤ top_n, d_k relevant} precision@k``.

    R = ``num_relevant`` or ``len(relevant)``: all relevant items, retrieved or not. 0.0 when R = 0.
    """
    total = len(relevant) if num_relevant is None else num_relevant
    ranked = list(ranked_ids)[:top_n]
    if len(set(ranked)) != len(ranked):
        raise ValueError("ranked_ids holds an item twice")
    hits = np.array([doc in relevant for doc in ranked], dtype=bool).reshape(1, -1)  # (1, k)
    return float(_ap_from_hits(hits, np.array([total]))[0])


def avs_average_precision(
    ranking: Array | ScoreFn, relevant: Array | Sequence[Array], top_n: int = 1000, chunk: int = 256
) -> np.ndarray:
    """(Q,) TREC AP per query (see :func:`average_precision`) over the top ``top_n`` items.

    ``ranking``: (Q, N) float scores, (Q, k) int ranked item indices (negative = empty slot), or a
    ``score_fn(slice) -> (q, N)`` ranked with :func:`rank_chunked`. ``relevant``: a (Q, N) 0/1 matrix or
    Q arrays of relevant item indices.
    """
    num_queries = len(relevant)
    if callable(ranking):
        ranked = rank_chunked(ranking, num_queries, top_n, chunk)[0]
    else:
        table = ranking if isinstance(ranking, torch.Tensor) else torch.as_tensor(np.asarray(ranking))
        if table.is_floating_point():
            ranked = rank_chunked(lambda rows: table[rows], len(table), top_n, chunk)[0]
        else:
            ranked = table[:, :top_n].cpu().numpy().astype(np.int64)
    if len(ranked) != num_queries:
        raise ValueError(f"ranking has {len(ranked)} queries, relevant has {num_queries}")
    return _ap_from_hits(*_hits(ranked, relevant))


def _hits(ranked: np.ndarray, relevant: Array | Sequence[Array]) -> tuple[np.ndarray, np.ndarray]:
    """(Q, k) whether each ranked item is relevant, and (Q,) number of relevant items per query."""
    filled = ranked >= 0
    if isinstance(relevant, (np.ndarray, torch.Tensor)) and relevant.ndim == 2:
        matrix = (relevant.cpu().numpy() if isinstance(relevant, torch.Tensor) else relevant) > 0  # (Q, N)
        hits = np.take_along_axis(matrix, np.where(filled, ranked, 0), axis=1) & filled
        return hits, matrix.sum(1)
    # Key every (query, item) pair as one integer so membership is one vectorised np.isin.
    lists = [np.asarray(r, dtype=np.int64).reshape(-1) for r in relevant]
    width = 1 + max([int(ranked.max(initial=0))] + [int(r.max(initial=0)) for r in lists])
    owner = np.repeat(np.arange(len(lists)), [len(r) for r in lists])
    relevant_keys = np.unique(owner * width + np.concatenate(lists + [np.zeros(0, np.int64)]))
    ranked_keys = np.arange(len(ranked))[:, None] * width + ranked  # (Q, k)
    hits = np.isin(ranked_keys, relevant_keys) & filled
    return hits, np.bincount(relevant_keys // width, minlength=len(lists))


def _ap_from_hits(hits: np.ndarray, num_relevant: np.ndarray) -> np.ndarray:
    """(Q,) AP from (Q, k) hit flags and (Q,) relevant counts; 0 where a query has none."""
    precision = np.cumsum(hits, axis=1) / np.arange(1, hits.shape[1] + 1)  # (Q, k) precision@k
    total = (precision * hits).sum(axis=1)
    return np.where(num_relevant > 0, total / np.maximum(num_relevant, 1), 0.0)


# ---------------------------------------------------------------- infAP / xinfAP (sampled judgments)


class Judgment(NamedTuple):
    """One pooled item of a query's qrels."""

    relevance: int
    """> 0 relevant, 0 judged not relevant, < 0 pooled but not judged (sampled out)."""
    stratum: str = "1"
    """Sampling stratum of the pool; one stratum = plain infAP."""


def inferred_ap(
    ranked_ids: Sequence,
    judgments: Mapping[object, Judgment | tuple[int, str]],
    top_n: int = 1000,
    epsilon: float = 1e-5,
) -> float:
    """xinfAP (Yilmaz, Kanoulas & Aslam, SIGIR 2008) as NIST ``sample_eval.pl`` computes it.

    Per stratum s of the judged pool: pooled_s items, sampled_s judged (relevance ≥ 0), rel_s judged
    relevant. Estimated relevant count R̂ = Σ_s rel_s · pooled_s / sampled_s. For a judged relevant item
    at rank k, with a_s, b_s, c_s the pooled, judged and judged-relevant items of stratum s above it
    (items outside the pool count as not relevant)::

        E[prec@k] = 1/k + (1/k) · Σ_s a_s · (c_s + ε) / (b_s + 3ε)

    (``sample_eval.pl`` uses ε = 1e-5 and 3ε; the 2006 infAP paper writes 2ε; with ε = 0 an empty
    0/0 term counts 0). xinfAP = Σ_{relevant k ≤ top_n} E[prec@k] · pooled_s / sampled_s / min(R̂, top_n)
    (``sample_eval.pl`` rescales by R̂/top_n when R̂ > top_n). Sampling rates come from the qrels.
    With every pooled item judged and ε = 0 this equals :func:`average_precision` when R ≤ top_n.
    """
    ranked = list(ranked_ids)[:top_n]
    if len(set(ranked)) != len(ranked):
        raise ValueError("ranked_ids holds an item twice")
    judged = {doc: Judgment(*j) for doc, j in judgments.items()}
    strata = {s: i for i, s in enumerate(sorted({j.stratum for j in judged.values()}))}
    pooled, sampled, sampled_rel = _stratum_counts(list(judged.values()), strata)
    inverse_rate = np.divide(pooled, sampled, out=np.zeros_like(pooled), where=sampled > 0)  # (S,)
    estimated_relevant = float((sampled_rel * inverse_rate).sum())
    if estimated_relevant == 0 or not ranked:
        return 0.0
    hit = [judged.get(doc) for doc in ranked]
    relevance = np.array([j.relevance if j else 0 for j in hit])  # (k,)
    onehot = np.zeros((len(ranked), len(strata)))  # (k, S) stratum of each pooled ranked item
    rows = np.array([i for i, j in enumerate(hit) if j], dtype=np.int64)
    onehot[rows, np.array([strata[hit[i].stratum] for i in rows], dtype=np.int64)] = 1.0

    def above(flags: np.ndarray) -> np.ndarray:  # (k, S) counts strictly above each rank
        counts = onehot * flags[:, None]
        return np.cumsum(counts, axis=0) - counts

    everyone = np.ones(len(ranked), dtype=bool)
    pooled_above, judged_above, rel_above = (above(f) for f in (everyone, relevance >= 0, relevance > 0))
    denominator = judged_above + 3 * epsilon
    # (k, S) estimated share of relevant items among the pooled ones of each stratum above rank k
    ratio = np.divide(rel_above + epsilon, denominator, out=np.zeros_like(rel_above), where=denominator > 0)
    rank = np.arange(1, len(ranked) + 1)
    expected_precision = (1.0 + (pooled_above * ratio).sum(1)) / rank  # (k,)
    weight = (onehot @ inverse_rate) * (relevance > 0)  # (k,) 1/sampling rate of each relevant hit
    return float((expected_precision * weight).sum() / min(estimated_relevant, top_n))


def inferred_ap_per_query(
    run: Mapping[str, Sequence[str]],
    qrels: Mapping[str, Mapping[str, Judgment]],
    top_n: int = 1000,
    epsilon: float = 1e-5,
) -> dict[str, float]:
    """xinfAP of every query in ``qrels``; a query missing from ``run`` scores 0 (sample_eval drops it)."""
    return {qid: inferred_ap(run.get(qid, []), judged, top_n, epsilon) for qid, judged in qrels.items()}


def _stratum_counts(judged: list[Judgment], strata: dict[str, int]) -> tuple[np.ndarray, ...]:
    """(S,) pooled, judged and judged-relevant counts per stratum."""
    codes = np.array([strata[j.stratum] for j in judged], dtype=np.int64)
    relevance = np.array([j.relevance for j in judged])
    count = lambda flags: np.bincount(codes, weights=flags.astype(float), minlength=len(strata))  # noqa: E731
    return count(np.ones(len(codes), dtype=bool)), count(relevance >= 0), count(relevance > 0)


# ---------------------------------------------------------------- TREC files


def write_trec_run(
    path: str | Path,
    query_ids: Sequence[str],
    ranked_video_ids: Sequence[Sequence[str]],
    scores: Array | None = None,
    tag: str = "ulrl",
    top_n: int | None = None,
) -> None:
    """Write ``qid Q0 docid rank score tag`` lines, rank from 1, at most ``top_n`` per query.

    Scores must not increase down a list. trec_eval/sample_eval re-sort by score and break ties by
    docid, so pass distinct scores, or ``scores=None`` to write ``k − rank + 1`` (order kept exactly).
    The file is written to a temporary name and renamed, so a failure leaves no partial file.
    """
    lines = []
    for q, (qid, docs) in enumerate(zip(query_ids, ranked_video_ids, strict=True)):
        docs = list(docs)[:top_n]
        row = np.arange(len(docs), 0, -1.0) if scores is None else np.asarray(scores[q], float)[: len(docs)]
        if len(row) != len(docs) or not np.isfinite(row).all() or np.any(np.diff(row) > 0):
            raise ValueError(f"query {qid}: scores must be finite, one per item and non-increasing")
        for token in (str(qid), tag, *map(str, docs)):
            if not token or token.split() != [token]:
                raise ValueError(f"query {qid}: id or tag {token!r} is empty or holds whitespace")
        # repr of a Python float is the shortest exact text, so distinct scores stay distinct.
        lines += [f"{qid} Q0 {doc} {r} {float(s)!r} {tag}\n" for r, (doc, s) in enumerate(zip(docs, row), 1)]
    _write_atomic(Path(path), "".join(lines))


def read_run(path: str | Path) -> dict[str, list[str]]:
    """A TREC run as ``{qid: [docid, ...]}``, ordered as trec_eval and sample_eval.pl order it: score
    descending, ties by docid descending."""
    entries: dict[str, list[tuple[float, str]]] = {}
    for lineno, fields in _lines(path):
        if len(fields) != 6:
            message = f"expected 6 columns (qid Q0 docid rank score tag), got {len(fields)}"
            raise TrecFormatError(f"{path}:{lineno}: {message}")
        entries.setdefault(fields[0], []).append((_number(fields[4], float, path, lineno), fields[2]))
    return {qid: [doc for _, doc in sorted(rows, reverse=True)] for qid, rows in entries.items()}


def read_qrels(path: str | Path) -> dict[str, dict[str, Judgment]]:
    """Qrels as ``{qid: {docid: Judgment}}``; every line of a file must have the same format.

    4 columns ``qid iter docid rel`` (trec_eval; one stratum "1", all judged) or 5 columns
    ``qid iter docid stratum rel`` (TRECVID sample_eval.pl; rel = -1 means pooled but not judged).
    Raises :class:`TrecFormatError` naming file and line on a bad column count, a non-integer
    relevance, or a (qid, docid) pair listed twice.
    """
    qrels: dict[str, dict[str, Judgment]] = {}
    width = None
    for lineno, fields in _lines(path):
        width = width or len(fields)
        if len(fields) not in (4, 5) or len(fields) != width:
            expected = "4 or 5" if width not in (4, 5) else str(width)
            raise TrecFormatError(f"{path}:{lineno}: expected {expected} columns, got {len(fields)}")
        stratum = fields[3] if width == 5 else "1"
        judged = qrels.setdefault(fields[0], {})
        if fields[2] in judged:
            raise TrecFormatError(f"{path}:{lineno}: query {fields[0]} lists {fields[2]} twice")
        judged[fields[2]] = Judgment(_number(fields[-1], int, path, lineno), stratum)
    return qrels


def _lines(path: str | Path):
    """(line number, whitespace-split fields) of every non-blank line."""
    with open(path, encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, start=1):
            if line.strip():
                yield lineno, line.split()


def _number(text: str, kind: type, path: str | Path, lineno: int):
    try:
        return kind(text)
    except ValueError:
        raise TrecFormatError(f"{path}:{lineno}: {text!r} is not a valid {kind.__name__}") from None


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


# ---------------------------------------------------------------- concept decoding


def concept_map(probs: Array, labels: Array, mask: Array | None = None, chunk: int = 128) -> float:
    """Mean over concepts (columns with ≥ 1 positive among included entries) of the AP of ranking the
    items by that concept's probability. ``mask`` (N, K): 1 = entry included (e.g. only concepts a
    video's captions never mention). Tied probabilities form one threshold (scikit-learn's AP).
    """
    ap, valid = column_average_precision(probs, labels, mask, chunk)
    return float(ap[valid].mean()) if valid.any() else float("nan")


def concept_map_per_item(probs: Array, labels: Array, mask: Array | None = None, chunk: int = 128) -> float:
    """Mean over items (rows with ≥ 1 positive among included entries) of the AP of ranking that item's
    concepts by probability; ties and ``mask`` as in :func:`concept_map`."""
    ap, valid = column_average_precision(probs.T, labels.T, None if mask is None else mask.T, chunk)
    return float(ap[valid].mean()) if valid.any() else float("nan")


def _column_blocks(probs: Array, labels: Array, mask: Array | None, chunk: int):
    """Yield (c, N) float32 scores and bool labels, one concept per row, ``chunk`` columns at a time.
    Excluded entries (mask 0) get score -inf and label 0, so they rank last and never count."""
    for start in range(0, probs.shape[1], chunk):
        cols = slice(start, start + chunk)
        scores, positive = _as_tensor(probs[:, cols]).T.contiguous(), _as_tensor(labels[:, cols]).T > 0
        if mask is not None:
            keep = _as_tensor(mask[:, cols]).T > 0
            scores, positive = scores.masked_fill(~keep, -torch.inf), positive & keep
        yield scores, positive


def column_average_precision(
    probs: Array, labels: Array, mask: Array | None, chunk: int
) -> tuple[np.ndarray, np.ndarray]:
    """(K,) tie-aware AP of ranking rows by each column's score, (K,) whether the column has a positive.

    AP = (1/P) Σ_{positive i} precision at the last position of i's run of tied scores.
    """
    aps, valid = [], []
    for scores, positive in _column_blocks(probs, labels, mask, chunk):
        ranked, order = scores.sort(dim=1, descending=True)  # (c, N)
        hits = positive.gather(1, order).double()
        ascending = -ranked
        run_end = torch.searchsorted(ascending, ascending, right=True) - 1  # (c, N) end of each tie run
        precision = hits.cumsum(1).gather(1, run_end) / (run_end + 1)
        num_pos = hits.sum(1)
        aps.append((hits * precision).sum(1) / num_pos.clamp(min=1))
        valid.append(num_pos > 0)
    return torch.cat(aps).numpy(), torch.cat(valid).numpy()


def concept_auc(probs: Array, labels: Array, mask: Array | None = None, chunk: int = 128) -> float:
    """Macro ROC AUC over concepts having both classes among included entries (rank-sum form, tied
    scores get their average rank): AUC_k = (Σ_{pos} rank − P(P+1)/2) / (P · N_neg)."""
    aucs = []
    for scores, positive in _column_blocks(probs, labels, mask, chunk):
        ranked, order = scores.sort(dim=1)  # (c, N) ascending; excluded entries (-inf) rank lowest
        run_start = torch.searchsorted(ranked, ranked)
        run_end = torch.searchsorted(ranked, ranked, right=True) - 1
        average_rank = (run_start + run_end).double() / 2 + 1  # (c, N)
        hits = positive.gather(1, order).double()
        num_pos, excluded = hits.sum(1), torch.isneginf(scores).sum(1).double()
        num_neg = scores.shape[1] - excluded - num_pos
        rank_sum = (hits * average_rank).sum(1) - num_pos * excluded  # ranks among included entries only
        auc = (rank_sum - num_pos * (num_pos + 1) / 2) / (num_pos * num_neg)
        aucs.append(auc[(num_pos > 0) & (num_neg > 0)])
    aucs = torch.cat(aucs)
    return float(aucs.mean()) if len(aucs) else float("nan")


def concept_recall_at_k(probs: Array, labels: Array, k: int = 10, chunk: int = 4096) -> float:
    """Mean over items with ≥ 1 label of |top-k decoded ∩ labels| / min(|labels|, k) — the paper's
    validation decoding score (the reference code also averages in label-less items as 0; we skip them)."""
    recalls = []
    for start in range(0, probs.shape[0], chunk):
        rows = slice(start, start + chunk)
        scores, positive = _as_tensor(probs[rows]), _as_tensor(labels[rows]) > 0  # (n, K)
        top = torch.topk(scores, min(k, scores.shape[1]), dim=1).indices  # (n, k)
        matches = positive.gather(1, top).sum(1)  # (n,)
        num_labels = positive.sum(1)
        recalls.append((matches / num_labels.clamp(max=k).clamp(min=1))[num_labels > 0])
    recalls = torch.cat(recalls)
    return float(recalls.mean()) if len(recalls) else float("nan")


def contradiction_rate(
    probs: Array, contradiction: Array, threshold: float = 0.5, chunk: int = 1024
) -> float:
    """Share of items whose decoded set {k : p_k > threshold} holds both a and b for some pair with
    C[a, b] = 1 in the (K, K) ``contradiction`` matrix (either direction; the diagonal is ignored)."""
    pairs = _as_tensor(contradiction, torch.bool)
    pairs = torch.triu(pairs | pairs.T, diagonal=1).nonzero()  # (P, 2) unordered pairs a < b
    flagged = 0
    for start in range(0, probs.shape[0], chunk):
        decoded = _as_tensor(probs[start : start + chunk]) > threshold  # (n, K)
        flagged += int((decoded[:, pairs[:, 0]] & decoded[:, pairs[:, 1]]).any(1).sum())
    return flagged / probs.shape[0] if probs.shape[0] else float("nan")
