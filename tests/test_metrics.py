"""Metrics against naive loop oracles written here, hand-computed values, and TREC file round trips."""

from __future__ import annotations

import math
import statistics

import numpy as np
import pytest
import torch

from ulrl import metrics
from ulrl.metrics import Judgment, TrecFormatError

SEEDS = [0, 1, 2, 3]


# ---------------------------------------------------------------- naive oracles


def naive_ap(ranked, relevant, num_relevant=None):
    """TREC AP by walking the list."""
    total = len(relevant) if num_relevant is None else num_relevant
    hits, precision_sum = 0, 0.0
    for k, doc in enumerate(ranked, start=1):
        if doc in relevant:
            hits += 1
            precision_sum += hits / k
    return precision_sum / total if total else 0.0


def naive_retrieval(sims, caption_video):
    """Explicit optimistic rankings: sort by score descending, the caller's own items first among ties."""
    num_captions, num_videos = sims.shape
    t2v = []
    for c in range(num_captions):
        order = sorted(range(num_videos), key=lambda v: (-sims[c, v], v != caption_video[c]))
        t2v.append(order.index(caption_video[c]) + 1)
    v2t, v2t_ap = [], []
    for v in range(num_videos):
        own = {c for c in range(num_captions) if caption_video[c] == v}
        if not own:
            continue
        order = sorted(range(num_captions), key=lambda c: (-sims[c, v], c not in own))
        v2t.append(min(order.index(c) for c in own) + 1)
        v2t_ap.append(naive_ap(order, own))
    out = {}
    for name, ranks in (("t2v", t2v), ("v2t", v2t)):
        for k in (1, 5, 10):
            out[f"{name}_r{k}"] = 100.0 * sum(r <= k for r in ranks) / len(ranks)
        out[f"{name}_medr"] = float(math.floor(statistics.median(ranks)))
        out[f"{name}_meanr"] = sum(ranks) / len(ranks)
    out["t2v_map"] = sum(1 / r for r in t2v) / len(t2v)
    out["v2t_map"] = sum(v2t_ap) / len(v2t_ap)
    out["rsum"] = sum(out[f"{d}_r{k}"] for d in ("t2v", "v2t") for k in (1, 5, 10))
    return out


def naive_tied_ap(scores, labels):
    """AP with each distinct score one threshold: Σ_t (positives at t / P) · precision(score ≥ t)."""
    positives = sum(labels)
    if positives == 0:
        return None
    ap = 0.0
    for t in sorted(set(scores), reverse=True):
        at_or_above = [i for i in range(len(scores)) if scores[i] >= t]
        hits_above = sum(labels[i] for i in at_or_above)
        hits_at = sum(labels[i] for i in range(len(scores)) if scores[i] == t)
        ap += hits_at / positives * hits_above / len(at_or_above)
    return ap


def naive_auc(scores, labels):
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    if not pos or not neg:
        return None
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def naive_column_mean(fn, probs, labels, mask):
    """Mean of fn over columns, using only included entries; columns where fn gives None are skipped."""
    values = []
    for k in range(probs.shape[1]):
        rows = [i for i in range(probs.shape[0]) if mask is None or mask[i, k]]
        value = fn([float(probs[i, k]) for i in rows], [int(labels[i, k]) for i in rows])
        if value is not None:
            values.append(value)
    return sum(values) / len(values)


def naive_sample_eval(ranked, judgments, top_n, epsilon):
    """A line-by-line walk in the manner of NIST sample_eval.pl (dicts, one rank at a time)."""
    pooled, judged, judged_rel = {}, {}, {}
    for relevance, stratum in judgments.values():
        pooled[stratum] = pooled.get(stratum, 0) + 1
        judged[stratum] = judged.get(stratum, 0) + (relevance >= 0)
        judged_rel[stratum] = judged_rel.get(stratum, 0) + (relevance > 0)
    est_rel = sum(judged_rel[s] * pooled[s] / judged[s] for s in pooled if judged[s])
    docs, sampled, rels = {}, {}, {}
    sap = {}
    for rank, doc in enumerate(ranked[:top_n], start=1):
        relevance, stratum = judgments.get(doc, (0, None))
        if relevance > 0:
            prec_above = 0.0
            for s in docs:
                denom = sampled.get(s, 0) + 3 * epsilon
                if docs[s] and denom:
                    prec_above += docs[s] * (rels.get(s, 0) + epsilon) / denom
            sap[stratum] = sap.get(stratum, 0.0) + 1 / rank + prec_above / rank
            rels[stratum] = rels.get(stratum, 0) + 1
        if doc in judgments:
            docs[stratum] = docs.get(stratum, 0) + 1
            sampled[stratum] = sampled.get(stratum, 0) + (relevance >= 0)
    if est_rel == 0:
        return 0.0
    ap = sum((judged_rel[s] * pooled[s] / judged[s] / est_rel) * (sap.get(s, 0.0) / judged_rel[s])
             for s in pooled if judged[s] and judged_rel[s])
    return ap * est_rel / top_n if est_rel > top_n else ap


# ---------------------------------------------------------------- caption ↔ video retrieval


def test_retrieval_hand_computed():
    video_emb = np.array([[1.0, 0.0], [0.0, 1.0]])
    text_emb = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    out = metrics.retrieval_metrics(text_emb, video_emb, np.array([0, 1, 0]))
    # t2v ranks [1, 1, 2]; caption 2 ties caption 1 on video 1, strict-greater keeps video 1's rank at 1.
    assert out["t2v_r1"] == pytest.approx(200 / 3)
    assert (out["t2v_r5"], out["t2v_medr"]) == (100.0, 1.0)
    assert out["t2v_meanr"] == pytest.approx(4 / 3)
    assert out["t2v_map"] == pytest.approx((1 + 1 + 0.5) / 3)
    # v2t: video 0's own captions at ranks 1 and 2 (AP 1); video 1's at rank 1.
    assert (out["v2t_r1"], out["v2t_medr"], out["v2t_meanr"], out["v2t_map"]) == (100.0, 1.0, 1.0, 1.0)
    assert out["rsum"] == pytest.approx(200 / 3 + 500)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("chunk", [1, 3, 256])
def test_retrieval_matches_naive_oracle_with_ties(seed, chunk):
    rng = np.random.default_rng(seed)
    num_videos = 9
    # Small integer embeddings: exact float32 dot products and many tied scores.
    video_emb = rng.integers(-1, 2, size=(num_videos, 3)).astype(np.float32)
    caption_video = rng.integers(0, num_videos - 1, size=23)  # the last video has no caption
    text_emb = rng.integers(-1, 2, size=(23, 3)).astype(np.float32)
    got = metrics.retrieval_metrics(torch.from_numpy(text_emb), video_emb, caption_video, chunk=chunk)
    want = naive_retrieval(text_emb @ video_emb.T, caption_video.tolist())
    assert got.keys() == want.keys()
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=1e-9), key


def test_retrieval_rejects_out_of_range_caption_video():
    with pytest.raises(ValueError, match="caption_video_idx"):
        metrics.retrieval_metrics(np.ones((2, 3)), np.ones((2, 3)), np.array([0, 2]))


# ---------------------------------------------------------------- AVS AP


def test_average_precision_hand_computed():
    ranked = ["a", "x", "b", "y", "z", "c", "w"]
    assert metrics.average_precision(ranked, {"a", "b", "c", "d"}) == pytest.approx((1 + 2 / 3 + 3 / 6) / 4)
    assert metrics.average_precision(ranked, {"a", "b", "c", "d"}, top_n=3) == pytest.approx((1 + 2 / 3) / 4)
    assert metrics.average_precision(ranked, {"a"}, num_relevant=2) == pytest.approx(0.5)
    assert metrics.average_precision(ranked, set()) == 0.0
    with pytest.raises(ValueError, match="twice"):
        metrics.average_precision(["a", "a"], {"a"})


@pytest.mark.parametrize("seed", SEEDS)
def test_avs_average_precision_all_input_forms_match_oracle(seed):
    rng = np.random.default_rng(seed)
    num_queries, num_items, top_n = 7, 20, 6
    scores = rng.normal(size=(num_queries, num_items))  # float64, continuous: no ties
    relevant = [rng.choice(num_items, size=rng.integers(0, 6), replace=False) for _ in range(num_queries)]
    matrix = np.zeros((num_queries, num_items), dtype=bool)
    for q, rel in enumerate(relevant):
        matrix[q, rel] = True
    order = np.argsort(-scores, axis=1)
    want = [naive_ap(order[q, :top_n].tolist(), set(relevant[q].tolist())) for q in range(num_queries)]
    as_fn = lambda rows: torch.from_numpy(scores[rows]).float()  # noqa: E731
    for ranking in (scores, torch.from_numpy(scores), as_fn, order):
        for rel in (relevant, matrix, torch.from_numpy(matrix)):
            got = metrics.avs_average_precision(ranking, rel, top_n=top_n, chunk=3)
            np.testing.assert_allclose(got, want, atol=1e-12)


def test_avs_average_precision_skips_empty_slots_and_duplicate_relevant():
    ranked = np.array([[3, -1, 1], [-1, -1, -1]])
    got = metrics.avs_average_precision(ranked, [np.array([1, 3, 3]), np.array([0])])
    np.testing.assert_allclose(got, [(1 + 2 / 3) / 2, 0.0])


@pytest.mark.parametrize("chunk", [1, 4, 100])
def test_topk_chunked_matches_sort(chunk):
    rng = np.random.default_rng(5)
    queries, videos = rng.normal(size=(10, 4)), rng.normal(size=(30, 4))
    indices, scores = metrics.topk_chunked(queries, videos, k=7, chunk=chunk)
    sims = (queries.astype(np.float32) @ videos.astype(np.float32).T)
    np.testing.assert_array_equal(indices, np.argsort(-sims, axis=1)[:, :7])
    assert scores.dtype == np.float32 and indices.dtype == np.int64
    np.testing.assert_allclose(scores, np.take_along_axis(sims, indices, 1), rtol=1e-5)
    negated, _ = metrics.topk_chunked(queries, videos, k=40, chunk=chunk, score_fn=lambda q, v: -(q @ v.T))
    np.testing.assert_array_equal(negated, np.argsort(sims, axis=1))  # k capped at N


# ---------------------------------------------------------------- infAP / xinfAP


def test_inferred_ap_hand_single_stratum():
    # Pool a..f, judged a (rel), c (not), e (rel): p = 3/6, R̂ = 2 · 2 = 4.
    judgments = {"a": (1, "1"), "b": (-1, "1"), "c": (0, "1"), "d": (-1, "1"), "e": (1, "1"), "f": (-1, "1")}
    ranked = ["a", "x", "b", "c", "e", "d"]
    # a: E[prec@1] = 1. e at rank 5: 3 pooled above, 2 judged, 1 relevant: 1/5 + (1/5) · 3 · 1/2 = 1/2.
    assert metrics.inferred_ap(ranked, judgments, epsilon=0.0) == pytest.approx((1 * 2 + 0.5 * 2) / 4)
    e5 = 1 / 5 + (1 / 5) * 3 * (1 + 1e-5) / (2 + 3e-5)
    assert metrics.inferred_ap(ranked, judgments) == pytest.approx((1 * 2 + e5 * 2) / 4, abs=1e-12)


def test_inferred_ap_hand_two_strata():
    # Stratum 1 fully judged (a rel, b not); stratum 2 half judged (c rel, e not, d f unjudged).
    judgments = {"a": Judgment(1, "1"), "b": Judgment(0, "1"), "c": Judgment(1, "2"), "d": Judgment(-1, "2"),
                 "e": Judgment(0, "2"), "f": Judgment(-1, "2")}
    ranked = ["d", "b", "c", "a", "e", "z"]
    # R̂ = 1 + 1 · 4/2 = 3. c (rank 3, weight 2): above d (s2, unjudged), b (s1, judged not relevant).
    # a (rank 4, weight 1): above s2 {d, c}: 1 judged, 1 relevant; s1 {b}: 1 judged, 0 relevant.
    assert metrics.inferred_ap(ranked, judgments, epsilon=0.0) == pytest.approx((2 * (1 / 3) + 3 / 4) / 3)
    eps = 1e-5
    e3 = 1 / 3 + (1 / 3) * (1 * eps / (3 * eps) + 1 * eps / (1 + 3 * eps))
    e4 = 1 / 4 + (1 / 4) * (2 * (1 + eps) / (1 + 3 * eps) + 1 * eps / (1 + 3 * eps))
    assert metrics.inferred_ap(ranked, judgments) == pytest.approx((2 * e3 + e4) / 3, abs=1e-12)


@pytest.mark.parametrize("seed", SEEDS)
def test_inferred_ap_equals_ap_with_full_judgments(seed):
    rng = np.random.default_rng(seed)
    docs = [f"shot{i}" for i in range(60)]
    pool = rng.choice(60, size=35, replace=False)
    judgments = {docs[i]: Judgment(int(rng.random() < 0.3), str(rng.integers(1, 4))) for i in pool}
    relevant = {d for d, j in judgments.items() if j.relevance > 0}
    ranked = [docs[i] for i in rng.permutation(60)]
    for top_n in (20, 60):
        want = metrics.average_precision(ranked, relevant, top_n=top_n)
        exact = metrics.inferred_ap(ranked, judgments, top_n=top_n, epsilon=0.0)
        assert exact == pytest.approx(want, abs=1e-12)
        assert metrics.inferred_ap(ranked, judgments, top_n=top_n) == pytest.approx(want, abs=1e-4)


@pytest.mark.parametrize("seed", SEEDS)
def test_inferred_ap_matches_sample_eval_walk(seed):
    rng = np.random.default_rng(seed + 10)
    docs = [f"shot{i}" for i in range(80)]
    judgments = {}
    for i in rng.choice(80, size=50, replace=False):
        stratum = str(rng.integers(1, 4))
        sampled = rng.random() < {"1": 1.0, "2": 0.5, "3": 0.2}[stratum]
        judgments[docs[i]] = (int(rng.random() < 0.4) if sampled else -1, stratum)
    ranked = [docs[i] for i in rng.permutation(80)]
    for top_n, eps in ((30, 1e-5), (80, 1e-5), (80, 0.0), (3, 1e-5)):
        want = naive_sample_eval(ranked, judgments, top_n, eps)
        got = metrics.inferred_ap(ranked, judgments, top_n=top_n, epsilon=eps)
        assert got == pytest.approx(want, abs=1e-12)


def test_inferred_ap_rescales_when_estimated_relevant_exceeds_top_n():
    judgments = {f"d{i}": Judgment(1) for i in range(5)}
    assert metrics.inferred_ap(["d0", "d1"], judgments, top_n=2, epsilon=0.0) == pytest.approx(1.0)
    assert metrics.inferred_ap(["q"], {"d": Judgment(0)}) == 0.0


# ---------------------------------------------------------------- TREC files


QRELS_5 = """\
q1 0 v1 1 1
q1 0 v2 1 0
q1 0 v3 2 -1
q1 0 v4 2 1

q2 0 v2 1 1
q2 0 v5 1 0
"""


def test_trec_run_round_trip_with_sampled_qrels(tmp_path):
    qrels_path = tmp_path / "avs.qrels"
    qrels_path.write_text(QRELS_5)
    qrels = metrics.read_qrels(qrels_path)
    assert qrels["q1"]["v3"] == Judgment(-1, "2") and qrels["q2"]["v5"] == Judgment(0, "1")
    ranked = [["v3", "v4", "v1", "v9"], ["v5", "v2"], ["v1"]]
    scores = np.array([[0.9, 0.9, 0.5, 0.1], [2.0, 1.0, 0, 0], [3.0, 0, 0, 0]], dtype=np.float32)
    run_path = tmp_path / "out" / "run.txt"
    metrics.write_trec_run(run_path, ["q1", "q2", "q3"], ranked, scores, tag="test", top_n=3)
    lines = run_path.read_text().splitlines()
    assert lines[0] == f"q1 Q0 v3 1 {float(np.float32(0.9))!r} test" and len(lines) == 6
    run = metrics.read_run(run_path)
    # The tie at 0.9 is re-sorted by docid descending, as trec_eval and sample_eval do.
    assert run == {"q1": ["v4", "v3", "v1"], "q2": ["v5", "v2"], "q3": ["v1"]}
    per_query = metrics.inferred_ap_per_query(run, qrels)
    q1 = metrics.inferred_ap(["v4", "v3", "v1"], qrels["q1"])
    assert per_query == {"q1": q1, "q2": pytest.approx(0.5, abs=1e-4)}
    metrics.write_trec_run(run_path, ["q1"], [["v3", "v4"]])  # scores=None keeps the order exactly
    assert metrics.read_run(run_path) == {"q1": ["v3", "v4"]}


def test_read_qrels_four_columns(tmp_path):
    path = tmp_path / "q.txt"
    path.write_text("1 0 a 1\n1 0 b 0\n2 0 a 2\n")
    want = {"1": {"a": Judgment(1, "1"), "b": Judgment(0, "1")}, "2": {"a": Judgment(2, "1")}}
    assert metrics.read_qrels(path) == want


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("q1 0 v1 1\nq1 0 v2\n", r":2: expected 4 columns, got 3"),
        ("q1 0 v1 1 1\nq1 0 v2 1\n", r":2: expected 5 columns, got 4"),
        ("q1 v1 1\n", r":1: expected 4 or 5 columns, got 3"),
        ("q1 0 v1 yes\n", r":1: 'yes' is not a valid int"),
        ("q1 0 v1 1\n\nq1 0 v1 0\n", r":3: query q1 lists v1 twice"),
    ],
)
def test_read_qrels_malformed_names_file_and_line(tmp_path, text, message):
    path = tmp_path / "bad.qrels"
    path.write_text(text)
    with pytest.raises(TrecFormatError, match="bad.qrels" + message):
        metrics.read_qrels(path)


def test_read_run_malformed(tmp_path):
    path = tmp_path / "bad.run"
    path.write_text("q1 Q0 v1 1 0.5 tag\nq1 Q0 v2 2 high tag\n")
    with pytest.raises(TrecFormatError, match=r"bad.run:2: 'high' is not a valid float"):
        metrics.read_run(path)


def test_write_trec_run_rejects_bad_input_without_writing(tmp_path):
    path = tmp_path / "run.txt"
    with pytest.raises(ValueError, match="non-increasing"):
        metrics.write_trec_run(path, ["q1", "q2"], [["a"], ["b", "c"]], [[1.0], [0.5, 0.7]])
    with pytest.raises(ValueError, match="whitespace"):
        metrics.write_trec_run(path, ["q 1"], [["a"]])
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- concept decoding


def _concept_case(seed):
    rng = np.random.default_rng(seed)
    probs = np.round(rng.random((13, 7)), 1)  # one decimal: many ties
    labels = rng.random((13, 7)) < 0.3
    labels[:, 0] = False  # a concept with no positive is skipped
    mask = rng.random((13, 7)) < 0.7
    return probs, labels, mask


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("chunk", [1, 3, 128])
def test_concept_map_matches_oracle_with_ties(seed, chunk):
    probs, labels, mask = _concept_case(seed)
    for m in (None, mask):
        want = naive_column_mean(naive_tied_ap, probs, labels, m)
        assert metrics.concept_map(probs, labels, m, chunk=chunk) == pytest.approx(want, abs=1e-6)
        want_items = naive_column_mean(naive_tied_ap, probs.T, labels.T, None if m is None else m.T)
        got_items = metrics.concept_map_per_item(torch.from_numpy(probs), torch.from_numpy(labels),
                                                 None if m is None else torch.from_numpy(m), chunk=chunk)
        assert got_items == pytest.approx(want_items, abs=1e-6)


def test_concept_map_agrees_with_sklearn():
    from sklearn.metrics import average_precision_score

    probs, labels, _ = _concept_case(7)
    columns = [k for k in range(7) if labels[:, k].any()]
    want = np.mean([average_precision_score(labels[:, k], probs[:, k]) for k in columns])
    assert metrics.concept_map(probs, labels) == pytest.approx(want, abs=1e-6)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("chunk", [2, 128])
def test_concept_auc_matches_pairwise_oracle(seed, chunk):
    probs, labels, mask = _concept_case(seed)
    for m in (None, mask):
        want = naive_column_mean(naive_auc, probs, labels, m)
        assert metrics.concept_auc(probs, labels, m, chunk=chunk) == pytest.approx(want, abs=1e-9)


def test_concept_recall_at_k_hand_and_oracle():
    probs = np.array([[0.9, 0.8, 0.1, 0.7], [0.1, 0.2, 0.3, 0.4], [0.5, 0.6, 0.7, 0.8]])
    labels = np.array([[1, 0, 1, 0], [0, 0, 0, 0], [0, 0, 0, 1]])
    # Row 0: top-2 {0, 1} holds 1 of min(2, 2); row 1 has no label (skipped); row 2: 1 of min(1, 2).
    assert metrics.concept_recall_at_k(probs, labels, k=2) == pytest.approx((0.5 + 1.0) / 2)
    rng = np.random.default_rng(3)
    probs, labels = rng.random((50, 30)), rng.random((50, 30)) < 0.2
    want = []
    for i in range(50):
        top = sorted(range(30), key=lambda k: -probs[i, k])[:10]
        if labels[i].sum():
            want.append(sum(labels[i, k] for k in top) / min(labels[i].sum(), 10))
    assert metrics.concept_recall_at_k(probs, labels, k=10, chunk=7) == pytest.approx(np.mean(want))


@pytest.mark.parametrize("seed", SEEDS)
def test_contradiction_rate_matches_oracle(seed):
    rng = np.random.default_rng(seed)
    probs = rng.random((40, 8))
    contradiction = np.zeros((8, 8))
    contradiction[0, 1] = contradiction[2, 5] = contradiction[6, 3] = 1  # one direction only
    contradiction[4, 4] = 1  # diagonal: ignored
    pairs = [(0, 1), (2, 5), (6, 3)]
    want = sum(any(probs[i, a] > 0.6 and probs[i, b] > 0.6 for a, b in pairs) for i in range(40)) / 40
    assert metrics.contradiction_rate(probs, contradiction, threshold=0.6, chunk=7) == pytest.approx(want)


def test_contradiction_rate_hand_computed():
    probs = torch.tensor([[0.9, 0.8, 0.1], [0.9, 0.2, 0.7], [0.1, 0.6, 0.1], [0.4, 0.5, 0.9]])
    contradiction = torch.tensor([[0, 1, 0], [1, 0, 0], [0, 0, 0]])
    assert metrics.contradiction_rate(probs, contradiction) == pytest.approx(1 / 4)
    assert metrics.contradiction_rate(probs, torch.zeros(3, 3)) == 0.0
