"""Losses against values worked out by hand in the tests (math.log / math.exp), plus naive loop oracles."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from ulrl.config import LossConfig, NegativesConfig
from ulrl.distributed import gather_rows, gather_with_grad, world
from ulrl.losses import (
    LOSS_KEYS,
    GlobalNegatives,
    LossInputError,
    concept_cooccurrence,
    gather_negatives,
    likelihood_loss,
    negative_concepts,
    total_loss,
    triplet_loss,
    unlikelihood_loss,
)


def softplus(x: float) -> float:
    """log(1 + e^x): −log(1 − σ(x)) for a negative concept, and −log σ(−x)."""
    return math.log(1.0 + math.exp(x))


def neg_log_sigmoid(x: float) -> float:
    """−log σ(x) = log(1 + e^{−x}): BCE of a positive concept."""
    return math.log(1.0 + math.exp(-x))


# ------------------------------------------------------------------------------------------ triplet

# Unit vectors; s[i][j] = v_i · t_j:
#   v0=(1,0)   : t0 .8, t1 0,  t2 1
#   v1=(0,1)   : t0 .6, t1 1,  t2 0
#   v2=(.6,.8) : t0 .96, t1 .8, t2 .6        positives (diagonal): .8, 1, .6
VIDEOS = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
TEXTS = torch.tensor([[0.8, 0.6], [0.0, 1.0], [1.0, 0.0]])


def test_triplet_max_violation_by_hand():
    # v→t rows:    0: max(.2+0-.8, .2+1-.8)=.4     1: max(.2+.6-1, .2+0-1)→0
    #              2: max(.2+.96-.6, .2+.8-.6)=.56
    # t→v columns: 0: max(.2+.6-.8, .2+.96-.8)=.36  1: max(.2+0-1, .2+.8-1)→0
    #              2: max(.2+1-.6, .2+0-.6)=.6
    expected = 0.4 + 0.0 + 0.56 + 0.36 + 0.0 + 0.6
    assert triplet_loss(VIDEOS, TEXTS).item() == pytest.approx(expected, abs=1e-6)
    assert triplet_loss(VIDEOS, TEXTS, reduction="mean").item() == pytest.approx(expected / 3, abs=1e-6)


def test_triplet_sum_of_violations_by_hand():
    # v→t: .4 + 0 + (.56 + .4);  t→v: .36 + 0 + .6
    expected = 0.4 + 0.56 + 0.4 + 0.36 + 0.6
    got = triplet_loss(VIDEOS, TEXTS, max_violation=False).item()
    assert got == pytest.approx(expected, abs=1e-6)


def test_triplet_same_video_pairs_are_not_negatives():
    same = torch.eye(3, dtype=torch.bool)
    same[0, 2] = same[2, 0] = True  # pairs 0 and 2 are two captions of one video
    # v→t: row 0 only j=1 → 0; row 2 only j=1 → .2+.8-.6=.4
    # t→v: column 0 only i=1 → .2+.6-.8=0; column 2 only i=1 → 0
    assert triplet_loss(VIDEOS, TEXTS, same_video=same).item() == pytest.approx(0.4, abs=1e-6)


def test_triplet_every_column_excluded_gives_zero():
    same = torch.ones(3, 3, dtype=torch.bool)
    assert triplet_loss(VIDEOS, TEXTS, same_video=same).item() == 0.0


def _random_pairs(batch: int, dim: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    video = F.normalize(torch.randn(batch, dim, generator=gen), dim=-1)
    text = F.normalize(torch.randn(batch, dim, generator=gen), dim=-1)
    return video, text


@pytest.mark.parametrize("max_violation", [True, False])
def test_triplet_split_over_ranks_sums_to_whole_batch(max_violation):
    video, text = _random_pairs(5)
    video_index = torch.tensor([0, 1, 0, 2, 3])
    same = video_index[:, None] == video_index[None, :]
    whole = triplet_loss(video, text, max_violation=max_violation, same_video=same)
    parts = [
        triplet_loss(
            video[rows],
            text[rows],
            max_violation=max_violation,
            same_video=same[rows],
            negatives_video=video,
            negatives_text=text,
            offset=rows.start,
        )
        for rows in (slice(0, 3), slice(3, 5))  # two "ranks" of uneven size
    ]
    torch.testing.assert_close(parts[0] + parts[1], whole)


def test_triplet_world_size_one_equals_local():
    video, text = _random_pairs(4)
    index = torch.tensor([0, 1, 1, 2])
    negatives = gather_negatives(video, text, index)
    assert negatives.offset == 0 and negatives.video_emb is video
    same = index[:, None] == negatives.video_index[None, :]
    local = triplet_loss(video, text, same_video=same)
    global_ = triplet_loss(video, text, same_video=same, negatives_video=video, negatives_text=text, offset=0)
    torch.testing.assert_close(global_, local)


def test_triplet_bad_input_raises():
    with pytest.raises(LossInputError, match="same_video"):
        triplet_loss(VIDEOS, TEXTS, same_video=torch.ones(2, 2, dtype=torch.bool))
    with pytest.raises(LossInputError, match="together"):
        triplet_loss(VIDEOS, TEXTS, negatives_video=VIDEOS)
    with pytest.raises(LossInputError, match="reduction"):
        triplet_loss(VIDEOS, TEXTS, reduction="avg")


# ------------------------------------------------------------------------------------------ likelihood

LIK_LOGITS = torch.tensor([[2.0, -1.0, 0.5], [5.0, 5.0, 5.0], [1.0, -2.0, 0.0], [-3.0, 4.0, 1.0]])
LIK_LABELS = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])


def _lik_by_hand(lam: float = 0.2) -> tuple[float, float]:
    # sample 0: P = {0}, N = {1, 2}
    first = lam * neg_log_sigmoid(2.0) + (1 - lam) * (softplus(-1.0) + softplus(0.5)) / 2
    # sample 2: every concept positive, the empty negative mean adds 0
    third = lam * (neg_log_sigmoid(1.0) + neg_log_sigmoid(-2.0) + neg_log_sigmoid(0.0)) / 3
    return first, third  # samples 1 and 3 have no positive: left out


def test_likelihood_two_invalid_samples_sum_only_the_valid_ones():
    first, third = _lik_by_hand()
    got = likelihood_loss(LIK_LOGITS, LIK_LABELS, lam=0.2).item()
    assert got == pytest.approx(first + third, rel=1e-6)


def test_likelihood_mean_divides_by_valid_samples():
    first, third = _lik_by_hand(lam=0.3)
    got = likelihood_loss(LIK_LOGITS, LIK_LABELS, lam=0.3, reduction="mean").item()
    assert got == pytest.approx((first + third) / 2, rel=1e-6)


def test_likelihood_no_valid_sample_is_zero_not_nan():
    labels = torch.zeros(2, 3)
    logits = torch.randn(2, 3, requires_grad=True)
    for reduction in ("sum", "mean"):
        loss = likelihood_loss(logits, labels, reduction=reduction)
        assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros(2, 3))


def test_likelihood_shape_mismatch_raises():
    with pytest.raises(LossInputError, match="labels"):
        likelihood_loss(torch.zeros(2, 3), torch.zeros(2, 4))


# ------------------------------------------------------------------------------------------ unlikelihood

# Concepts: 0 man, 1 woman, 2 indoor, 3 outdoor, 4 dog (no antonym).
# C[a, b] = 1: man↔woman, indoor↔outdoor, and man→outdoor (one-way, to tell anchors from pairs).
CONTRA = torch.zeros(5, 5)
for a, b in [(0, 1), (1, 0), (2, 3), (3, 2), (0, 3)]:
    CONTRA[a, b] = 1.0
UL_LABELS = torch.tensor(
    [
        [1.0, 0.0, 1.0, 0.0, 0.0],  # man, indoor: anchors {man, indoor}
        [1.0, 1.0, 0.0, 0.0, 0.0],  # man & woman both positive: only man→outdoor is active
        [0.0, 0.0, 0.0, 0.0, 1.0],  # dog only: no contradicting pair
        [1.0, 1.0, 1.0, 1.0, 1.0],  # all positive: every antonym is labelled
    ]
)
UL_LOGITS = torch.tensor(
    [
        [0.3, 1.0, -0.5, 2.0, -0.7],
        [0.0, 0.0, 0.0, -1.5, 0.0],
        [9.0, 9.0, 9.0, 9.0, 9.0],
        [9.0, 9.0, 9.0, 9.0, 9.0],
    ]
)
# sample 0: u_man = ℓ_woman + ℓ_outdoor, u_indoor = ℓ_outdoor, |A| = 2 anchors (3 pairs)
UL_FIRST = (softplus(1.0) + 2 * softplus(2.0)) / 2
# sample 1: u_man = ℓ_outdoor (woman is labelled), woman's antonym man is labelled: |A| = 1
UL_SECOND = softplus(-1.5)


def test_unlikelihood_by_hand():
    got = unlikelihood_loss(UL_LOGITS, UL_LABELS, CONTRA).item()
    assert got == pytest.approx(UL_FIRST + UL_SECOND, rel=1e-6)
    got = unlikelihood_loss(UL_LOGITS, UL_LABELS, CONTRA, reduction="mean").item()
    assert got == pytest.approx((UL_FIRST + UL_SECOND) / 2, rel=1e-6)


def test_unlikelihood_extra_negatives_are_one_more_anchor():
    extra = torch.zeros(4, 5)
    extra[0, 4] = 1.0  # dog pushed down in sample 0: (ℓ_woman + 2ℓ_outdoor + ℓ_dog) / 3
    extra[1, 0] = 1.0  # man is positive in sample 1: ignored, no extra anchor
    extra[2, 0] = 1.0  # sample 2 had no pair; now one pseudo-anchor: ℓ_man / 1
    first = (softplus(1.0) + 2 * softplus(2.0) + softplus(-0.7)) / 3
    third = softplus(9.0)
    got = unlikelihood_loss(UL_LOGITS, UL_LABELS, CONTRA, extra_negatives=extra).item()
    assert got == pytest.approx(first + UL_SECOND + third, rel=1e-6)
    none = unlikelihood_loss(UL_LOGITS, UL_LABELS, CONTRA, extra_negatives=torch.zeros(4, 5))
    assert none.item() == pytest.approx(UL_FIRST + UL_SECOND, rel=1e-6)


def test_unlikelihood_matches_naive_loops():
    gen = torch.Generator().manual_seed(3)
    labels = (torch.rand(6, 7, generator=gen) < 0.4).float()
    contra = (torch.rand(7, 7, generator=gen) < 0.3).float().fill_diagonal_(0)
    logits = torch.randn(6, 7, generator=gen) * 3
    total = 0.0
    for i in range(6):
        g, z = labels[i].tolist(), logits[i].tolist()
        terms = [
            sum(contra[a, b].item() * (1 - g[b]) * softplus(z[b]) for b in range(7)) * g[a] for a in range(7)
        ]
        anchors = sum(
            1 for a in range(7) if g[a] == 1 and any(contra[a, b] == 1 and g[b] == 0 for b in range(7))
        )
        if anchors:
            total += sum(terms) / anchors
    assert unlikelihood_loss(logits, labels, contra).item() == pytest.approx(total, rel=1e-5)


def test_unlikelihood_bad_contradiction_shape_raises():
    with pytest.raises(LossInputError, match="contradiction"):
        unlikelihood_loss(UL_LOGITS, UL_LABELS, torch.zeros(4, 4))


def test_gradients_finite_at_extreme_logits():
    logits = torch.tensor([[50.0, -50.0, 50.0, -50.0, 50.0], [-50.0, 50.0, -50.0, 50.0, -50.0]])
    logits.requires_grad_()
    labels = torch.tensor([[1.0, 0.0, 0.0, 1.0, 0.0], [1.0, 0.0, 1.0, 0.0, 1.0]])
    unlikely = unlikelihood_loss(logits, labels, CONTRA, extra_negatives=1 - labels)
    loss = likelihood_loss(logits, labels) + unlikely
    loss.backward()
    assert torch.isfinite(loss) and loss.item() > 10  # confidently wrong logits cost ~50, not log(1e-5)
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------ negatives


def test_negative_concepts_antonym_and_none_are_zeros():
    for strategy in ("antonym", "none"):
        mask = negative_concepts(strategy, UL_LABELS, k=3)
        assert mask.shape == UL_LABELS.shape and mask.dtype == torch.float32 and mask.sum() == 0


def test_negative_concepts_random_counts_positives_and_seed():
    labels = torch.zeros(4, 20)
    labels[0, :5] = 1
    labels[1, :18] = 1  # only 2 candidates: gets both, not k
    labels[3, ::2] = 1

    def draw(seed: int) -> torch.Tensor:
        return negative_concepts("random", labels, k=4, generator=torch.Generator().manual_seed(seed))

    mask = draw(7)
    assert mask.shape == (4, 20)
    assert (mask * labels).sum() == 0
    assert mask.sum(1).tolist() == [4.0, 2.0, 4.0, 4.0]
    assert torch.equal(mask, draw(7))
    assert not torch.equal(mask, draw(8))


def test_negative_concepts_hard_takes_top_scored_non_positives():
    logits = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0], [0.0, 1.0, 2.0, 3.0, 4.0]])
    labels = torch.tensor([[1.0, 0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0, 0.0]])
    mask = negative_concepts("hard", labels, logits=logits, k=2)
    assert mask.tolist() == [[0, 1, 1, 0, 0], [0, 0, 1, 0, 1]]


def test_negative_concepts_exclusive_never_cooccurring():
    train_labels = torch.tensor([[1.0, 1.0, 0, 0, 0, 0], [0, 1.0, 1.0, 0, 0, 0], [0, 0, 0, 1.0, 1.0, 0]])
    cooccurrence = concept_cooccurrence(train_labels)
    assert cooccurrence[0].tolist() == [True, True, False, False, False, False]
    assert cooccurrence[1].tolist() == [True, True, True, False, False, False]
    labels = torch.tensor([[1.0, 0, 0, 0, 0, 0], [0, 1.0, 0, 0, 0, 0], [0, 0, 0, 1.0, 0, 0]])
    gen = torch.Generator().manual_seed(0)
    mask = negative_concepts("exclusive", labels, k=10, cooccurrence=cooccurrence, generator=gen)
    # exclusive sets: concept 0 → {2,3,4,5}; concept 1 → {3,4,5}; concept 3 → {0,1,2,5}
    assert mask.tolist() == [[0, 0, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1], [1, 1, 1, 0, 0, 1]]
    few = negative_concepts("exclusive", labels, k=2, cooccurrence=cooccurrence, generator=gen)
    assert few.sum(1).tolist() == [2.0, 2.0, 2.0] and (few <= mask).all()


def test_negative_concepts_bad_input_raises():
    with pytest.raises(LossInputError, match="strategy"):
        negative_concepts("nearest", UL_LABELS)
    with pytest.raises(LossInputError, match="logits"):
        negative_concepts("hard", UL_LABELS)
    with pytest.raises(LossInputError, match="cooccurrence"):
        negative_concepts("exclusive", UL_LABELS)


# ------------------------------------------------------------------------------------------ total


def _model_output(batch: int = 4, concepts: int = 5, seed: int = 1) -> dict[str, torch.Tensor]:
    video, text = _random_pairs(batch, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    return {
        "video_emb": video.requires_grad_(),
        "text_emb": text.requires_grad_(),
        "video_concept_logits": torch.randn(batch, concepts, generator=gen).requires_grad_(),
        "text_concept_logits": torch.randn(batch, concepts, generator=gen).requires_grad_(),
    }


BATCH = {"concept_labels": UL_LABELS, "video_index": torch.tensor([10, 11, 10, 12])}


def test_total_loss_keys_terms_and_alpha():
    out = _model_output()
    cfg = LossConfig(ul_alpha=0.5)
    terms = total_loss(out, BATCH, CONTRA, cfg)
    assert tuple(terms) == LOSS_KEYS
    same = BATCH["video_index"][:, None] == BATCH["video_index"][None, :]
    triplet = triplet_loss(out["video_emb"], out["text_emb"], same_video=same)
    torch.testing.assert_close(terms["triplet"], triplet)
    torch.testing.assert_close(terms["lik_text"], likelihood_loss(out["text_concept_logits"], UL_LABELS))
    ul_video = unlikelihood_loss(out["video_concept_logits"], UL_LABELS, CONTRA)
    torch.testing.assert_close(terms["ul_video"], ul_video)
    ul = terms["ul_video"] + terms["ul_text"]
    expected = terms["triplet"] + terms["lik_video"] + terms["lik_text"] + 0.5 * ul
    torch.testing.assert_close(terms["loss"], expected)
    heavier = total_loss(out, BATCH, CONTRA, dataclasses.replace(cfg, ul_alpha=1.5))["loss"]
    torch.testing.assert_close(heavier - terms["loss"], terms["ul_video"] + terms["ul_text"])
    assert terms["ul_video"] > 0


def test_total_loss_same_video_mask_changes_triplet():
    out = _model_output()
    text = out["text_emb"].detach().clone()
    text[2] = out["video_emb"][0].detach()  # caption 2 (video 10): hardest negative of video 0 (also 10)
    out["text_emb"] = text.requires_grad_()
    masked = total_loss(out, BATCH, CONTRA, LossConfig())["triplet"]
    distinct = {**BATCH, "video_index": torch.arange(4)}
    unmasked = total_loss(out, distinct, CONTRA, LossConfig())["triplet"]
    torch.testing.assert_close(unmasked, triplet_loss(out["video_emb"], out["text_emb"]))
    assert not torch.allclose(masked, unmasked)


@pytest.mark.parametrize(
    "cfg",
    [
        LossConfig(likelihood=False, unlikelihood=False),
        LossConfig(negatives=NegativesConfig(strategy="none")),
    ],
)
def test_total_loss_disabled_terms_are_zero_and_backward_works(cfg):
    out = _model_output()
    terms = total_loss(out, BATCH, CONTRA, cfg)
    assert terms["ul_video"].item() == 0.0 and terms["ul_text"].item() == 0.0
    if not cfg.likelihood:
        assert terms["lik_video"].item() == 0.0 and terms["lik_text"].item() == 0.0
    terms["loss"].backward()
    for name, tensor in out.items():
        assert tensor.grad is not None and torch.isfinite(tensor.grad).all(), name


def test_total_loss_sampled_negatives_deterministic_under_seed():
    cfg = LossConfig(negatives=NegativesConfig(strategy="random", k=2))
    out = _model_output()
    first = total_loss(out, BATCH, CONTRA, cfg, generator=torch.Generator().manual_seed(5))
    again = total_loss(out, BATCH, CONTRA, cfg, generator=torch.Generator().manual_seed(5))
    antonym_only = total_loss(out, BATCH, CONTRA, LossConfig())
    torch.testing.assert_close(first["loss"], again["loss"])
    assert first["ul_video"] != antonym_only["ul_video"]
    exclusive = dataclasses.replace(cfg, negatives=NegativesConfig(strategy="exclusive", k=2))
    cooccurrence = concept_cooccurrence(UL_LABELS)
    terms = total_loss(out, BATCH, CONTRA, exclusive, cooccurrence=cooccurrence, generator=torch.Generator())
    assert torch.isfinite(terms["loss"])


def test_total_loss_global_negatives_world_size_one_equals_local():
    out = _model_output()
    local = total_loss(out, BATCH, CONTRA, LossConfig())
    gathered = total_loss(out, BATCH, CONTRA, LossConfig(global_negatives=True))
    explicit = GlobalNegatives(out["video_emb"], out["text_emb"], BATCH["video_index"], 0)
    passed = total_loss(out, BATCH, CONTRA, LossConfig(), negatives=explicit)
    for key in LOSS_KEYS:
        torch.testing.assert_close(gathered[key], local[key])
        torch.testing.assert_close(passed[key], local[key])


def test_distributed_helpers_are_identity_on_one_process():
    tensor = torch.randn(3, 2, requires_grad=True)
    assert world() == (0, 1)
    assert gather_with_grad(tensor) is tensor
    (first, second), offset = gather_rows(tensor, tensor[:, 0])
    assert first is tensor and offset == 0 and second.shape == (3,)


# ------------------------------------------------------------------------------------------ two ranks


def _two_rank_worker(rank: int, init_file: str, result_file: str) -> None:
    import os

    import torch.distributed as dist

    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    video, text = _random_pairs(5)
    index = torch.tensor([0, 1, 0, 2, 3])
    rows = slice(0, 3) if rank == 0 else slice(3, 5)  # uneven batches
    local_video = video[rows].clone().requires_grad_()
    negatives = gather_negatives(local_video, text[rows], index[rows])
    same = index[rows][:, None] == negatives.video_index[None, :]
    loss = triplet_loss(
        local_video,
        text[rows],
        same_video=same,
        negatives_video=negatives.video_emb,
        negatives_text=negatives.text_emb,
        offset=negatives.offset,
    )
    loss.backward()
    summed = loss.detach().clone()
    dist.all_reduce(summed)
    if rank == 0:
        torch.save({"sum": summed, "offset": negatives.offset, "grad": local_video.grad}, result_file)
    dist.destroy_process_group()


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_two_gloo_ranks_global_negatives_sum_to_whole_batch(tmp_path):
    import torch.multiprocessing as mp

    result = tmp_path / "result.pt"
    mp.spawn(_two_rank_worker, args=(str(tmp_path / "init"), str(result)), nprocs=2, join=True)
    got = torch.load(result)
    video, text = _random_pairs(5)
    index = torch.tensor([0, 1, 0, 2, 3])
    whole = triplet_loss(video, text, same_video=index[:, None] == index[None, :])
    torch.testing.assert_close(got["sum"], whole)
    # rank 0's gradient flows through its own rows only (positives, rows and its slot of the columns)
    local = video[:3].clone().requires_grad_()
    columns = torch.cat([local, video[3:]])
    same = index[:3, None] == index[None, :]
    triplet_loss(local, text[:3], same_video=same, negatives_video=columns, negatives_text=text).backward()
    assert got["offset"] == 0
    torch.testing.assert_close(got["grad"], local.grad)
