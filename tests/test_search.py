"""Query concept selection, fusion and explanations (ulrl.search) against hand values and naive oracles."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ulrl import search

BANK = ["digit", "big", "small", "move", "upward", "downward", "video", "four", "white", "black"]
#         0       1      2        3       4         5           6        7       8        9


def contradiction(pairs: list[tuple[str, str]]) -> torch.Tensor:
    matrix = torch.zeros(len(BANK), len(BANK))
    for a, b in pairs:
        matrix[BANK.index(a), BANK.index(b)] = matrix[BANK.index(b), BANK.index(a)] = 1.0
    return matrix


def test_minmax_rows_by_hand():
    scores = torch.tensor([[1.0, 3.0, 5.0], [2.0, 2.0, 2.0], [-1.0, 0.0, -3.0]])
    expected = torch.tensor([[0.0, 0.5, 1.0], [0.0, 0.0, 0.0], [2 / 3, 1.0, 0.0]])
    torch.testing.assert_close(search.minmax_rows(scores), expected)


def test_lexical_concepts_are_exact_lemma_matches_without_generic_ones():
    index = {name: k for k, name in enumerate(BANK)}
    # digits→digit, moving→move (WordNet lemmas); "video" is generic; "fast" is not in the bank
    assert search.lexical_concepts("Two big DIGITS moving upward, fast, in a video", index) == [0, 1, 3, 4]
    matrix = search.lexical_matrix(["a white four", "nothing here"], BANK)
    assert matrix.dtype == torch.bool and matrix.shape == (2, len(BANK))
    assert matrix[0].nonzero().flatten().tolist() == [7, 8] and not matrix[1].any()


def test_query_weights_match_a_naive_oracle():
    generator = torch.Generator().manual_seed(0)
    probs = torch.rand(5, len(BANK), generator=generator)
    probs[0, 4], probs[1, 6], probs[2, 2] = 0.99, 0.999, 0.995  # exactly at, generic above, plain above
    lexical = torch.rand(5, len(BANK), generator=generator) > 0.8
    lexical[0, 4] = lexical[1, 6] = lexical[2, 2] = False
    generic = search.generic_mask(BANK)
    got = search.query_concept_weights(probs, lexical, 0.99, generic)
    for q in range(5):
        for k, name in enumerate(BANK):
            if lexical[q, k]:
                expected = 1.0  # the typed word counts as certain, whatever the decoder says
            elif probs[q, k] >= 0.99 and name not in search.GENERIC_CONCEPTS:
                expected = float(probs[q, k])
            else:
                expected = 0.0
            assert float(got[q, k]) == pytest.approx(expected), (q, name)
    assert float(got[0, 4]) == pytest.approx(0.99) and float(got[2, 2]) == pytest.approx(0.995)
    assert float(got[1, 6]) == 0.0  # generic: never decoded


def test_video_vectors_zero_at_and_below_the_threshold():
    probs = torch.tensor([[0.2, 0.5, 0.5001, 0.9]])
    torch.testing.assert_close(search.video_concept_vectors(probs, 0.5), torch.tensor([[0.0, 0.0, 0.5001, 0.9]]))


def test_contradicting_concepts_are_antonyms_of_selected_that_are_not_selected():
    matrix = contradiction([("big", "small"), ("upward", "downward"), ("white", "black")])
    selected = torch.zeros(2, len(BANK), dtype=torch.bool)
    selected[0, [1, 4, 5]] = True  # big, upward, downward: downward is wanted, so not "against"
    selected[1, [8]] = True
    got = search.contradicting_concepts(selected, matrix)
    assert [BANK[k] for k in got[0].nonzero().flatten()] == ["small"]
    assert [BANK[k] for k in got[1].nonzero().flatten()] == ["black"]


def random_case(seed: int, queries: int = 7, videos: int = 40, dim: int = 6):
    generator = torch.Generator().manual_seed(seed)
    q_emb = torch.nn.functional.normalize(torch.randn(queries, dim, generator=generator), dim=1)
    v_emb = torch.nn.functional.normalize(torch.randn(videos, dim, generator=generator), dim=1)
    keep = torch.rand(queries, len(BANK), generator=generator) > 0.6
    weights = torch.rand(queries, len(BANK), generator=generator) * keep
    probs = torch.rand(videos, len(BANK), generator=generator)
    return search.Queries(q_emb, weights), search.Collection.from_probs(v_emb, probs, 0.5), probs


def naive_fused(queries: search.Queries, collection: search.Collection, probs: torch.Tensor, theta: float
                ) -> np.ndarray:
    """Python loops: raw scores, min-max per query over the collection, weighted sum."""
    out = np.zeros((queries.embedding.shape[0], collection.embedding.shape[0]))
    for q in range(out.shape[0]):
        emb = [float(queries.embedding[q] @ v) for v in collection.embedding]
        con = [sum(float(w) * (float(p) if p > 0.5 else 0.0) for w, p in zip(queries.concept_weights[q], row))
               for row in probs]
        norm = lambda s: [(x - min(s)) / (max(s) - min(s)) if max(s) > min(s) else 0.0 for x in s]  # noqa: E731
        out[q] = [(1 - theta) * e + theta * c for e, c in zip(norm(emb), norm(con))]
    return out


@pytest.mark.parametrize("theta", [0.0, 0.3, 0.5, 1.0])
def test_fused_scores_match_the_naive_oracle(theta):
    queries, collection, probs = random_case(1)
    got = search.fused_scores(queries, collection, theta).numpy()
    np.testing.assert_allclose(got, naive_fused(queries, collection, probs, theta), rtol=1e-5, atol=1e-6)


def test_theta_zero_ranks_by_embedding_and_one_by_concepts():
    queries, collection, _ = random_case(2)
    k = collection.embedding.shape[0]
    emb_order = torch.argsort(queries.embedding @ collection.embedding.T, dim=1, descending=True).numpy()
    con = queries.concept_weights @ collection.concept_vectors.T  # (Q, N)
    ranked_emb, _ = search.rank(queries, collection, 0.0, k)
    ranked_con, scores_con = search.rank(queries, collection, 1.0, k)
    np.testing.assert_array_equal(ranked_emb, emb_order)
    # concept scores may tie (e.g. at 0): compare the score sequence, and the order where scores are distinct
    np.testing.assert_allclose(np.sort(con.numpy(), axis=1)[:, ::-1], np.take_along_axis(con.numpy(), ranked_con, 1))
    assert np.all(np.diff(scores_con, axis=1) <= 0)


def test_chunked_ranking_equals_one_chunk_and_caps_k():
    queries, collection, _ = random_case(3, queries=9)
    whole = search.rank(queries, collection, 0.3, 5, chunk=256)
    chunked = search.rank(queries, collection, 0.3, 5, chunk=2)
    np.testing.assert_array_equal(whole[0], chunked[0])
    np.testing.assert_allclose(whole[1], chunked[1])
    assert search.rank(queries, collection, 0.3, 1000)[0].shape == (9, 40)


def test_bad_inputs_raise_search_errors():
    queries, collection, _ = random_case(4)
    with pytest.raises(search.SearchError, match="theta"):
        search.fused_scores(queries, collection, 1.5)
    other = search.Collection(torch.zeros(3, 4), torch.zeros(3, len(BANK)))
    with pytest.raises(search.SearchError, match="another model"):
        search.rank(queries, other, 0.5, 2)
    with pytest.raises(search.SearchError, match="lexical"):
        search.query_concept_weights(torch.zeros(2, 3), torch.zeros(2, 4, dtype=torch.bool), 0.99)


def test_explanation_lists_matches_with_video_probabilities_and_contradictions():
    weights = torch.zeros(len(BANK))
    weights[[7, 4, 1]] = torch.tensor([1.0, 0.995, 1.0])  # four, upward, big
    against = torch.zeros(len(BANK), dtype=torch.bool)
    against[[5, 2]] = True  # downward, small
    video = torch.full((len(BANK),), 0.1)
    video[[7, 4, 1, 5, 2]] = torch.tensor([0.97, 0.41, 0.88, 0.02, 0.81])
    explanation = search.explain(weights, against, video, BANK, 0.5)
    assert [m[0] for m in explanation.matched] == ["big", "four", "upward"]  # heaviest first, then by name
    assert explanation.line() == ("big 0.88✓ four 0.97✓ upward 0.41✗ | against: downward absent 0.02, "
                                  "small PRESENT 0.81")  # fmt: skip
    assert search.explain(torch.zeros(len(BANK)), torch.zeros(len(BANK), dtype=bool), video, BANK, 0.5).line() == \
        "(no query concepts)"
