"""Training objectives of ITV (Wu et al., TOIS 2023, Sec. 3) as pure functions on embeddings and logits.

    L = L_tri + [L_lik(z^v) + L_lik(z^t)] + α · [L_ul(z^v) + L_ul(z^t)]

Shapes: B local pairs, D embedding size, K concepts, N rows gathered from all ranks (global negatives).
Labels g ∈ {0,1}^K are video-level multi-hot vectors; P = {k : g_k = 1} is the positive set.

Concept terms take decoder *logits* z, never probabilities: log σ(z) and log(1 − σ(z)) come from
``binary_cross_entropy_with_logits`` and ``logsigmoid``, finite for every finite z, where the reference
code's ``log(p + 1e-5)`` is biased and saturates. Degenerate samples (no positive concept, no contradicted
pair) are masked out of the batch reduction rather than deleted from an index list.

Reductions: ``"sum"`` adds the per-sample terms of the valid samples (the paper); ``"mean"`` divides that
sum by the number of valid samples, clamped to at least 1, so an all-invalid batch gives 0 and not NaN.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ulrl.config import LossConfig
from ulrl.distributed import gather_rows

LOSS_KEYS = ("triplet", "lik_video", "lik_text", "ul_video", "ul_text", "loss")
STRATEGIES = ("antonym", "random", "hard", "exclusive", "none")


class LossInputError(ValueError):
    """Inputs of a loss with inconsistent shapes or an unknown option; the message names the argument."""


@dataclass(frozen=True)
class GlobalNegatives:
    """Every rank's pairs, gathered in rank order, to score the local rows against (global negatives)."""

    video_emb: Tensor  # (N, D)
    text_emb: Tensor  # (N, D)
    video_index: Tensor  # (N,)
    offset: int  # position of this rank's first row among the N


def gather_negatives(video_emb: Tensor, text_emb: Tensor, video_index: Tensor) -> GlobalNegatives:
    """All-gather the batch over torch.distributed ranks; on one process the local batch with offset 0."""
    (videos, texts, index), offset = gather_rows(video_emb, text_emb, video_index)
    return GlobalNegatives(videos, texts, index, offset)


# ------------------------------------------------------------------------------------------ matching


def triplet_loss(
    video_emb: Tensor,
    text_emb: Tensor,
    margin: float = 0.2,
    max_violation: bool = True,
    reduction: str = "sum",
    same_video: Tensor | None = None,
    negatives_video: Tensor | None = None,
    negatives_text: Tensor | None = None,
    offset: int = 0,
) -> Tensor:
    """VSE++ hinge loss in both directions (Sec. 3.1); pair i is ``(video_emb[i], text_emb[i])``.

    With s(v, t) = vᵀt (the embeddings are L2-normalised) and E_i the excluded columns of pair i,

        ℓ_i^{v→t} = max_{j ∉ E_i} [Δ + s(v_i, t_j) − s(v_i, t_i)]_+
        ℓ_i^{t→v} = max_{j ∉ E_i} [Δ + s(v_j, t_i) − s(v_i, t_i)]_+
        L_tri     = Σ_i (ℓ_i^{v→t} + ℓ_i^{t→v})        ("mean": divided by B)

    ``max_violation=False`` sums over j instead of taking the hardest negative. E_i holds the positive
    itself and every j with ``same_video[i, j]`` (two captions of one video are not negatives of each
    other); a row with every column excluded contributes 0.

    Global negatives: pass the N gathered rows as ``negatives_video`` / ``negatives_text`` (N, D) and
    ``offset``, the index of this rank's first row among them (see :func:`gather_negatives`). The B local
    rows are then scored against all N columns, column ``offset + i`` being pair i's positive, and
    ``same_video`` must be (B, N). With one rank (the gathered rows are the local ones, offset 0) this is
    the local loss exactly; summing the per-rank losses of a split batch gives the loss of the whole batch.

    Args:
        video_emb, text_emb: (B, D) local pairs.
        same_video: optional bool (B, B), or (B, N) with negatives; its diagonal may be True.
    Returns:
        Scalar tensor.
    """
    _check_reduction(reduction)
    columns_video, columns_text = _columns(video_emb, text_emb, negatives_video, negatives_text, offset)
    rows, columns = video_emb.shape[0], columns_text.shape[0]
    excluded = _excluded_columns(rows, columns, offset, same_video, video_emb.device)  # (B, N)
    positive = (video_emb * text_emb).sum(-1, keepdim=True)  # (B, 1): s(v_i, t_i)
    video_to_text = video_emb @ columns_text.T  # (B, N): s(v_i, t_j)
    text_to_video = text_emb @ columns_video.T  # (B, N): s(v_j, t_i)
    per_pair = _hinge(video_to_text, positive, excluded, margin, max_violation)  # (B,)
    per_pair = per_pair + _hinge(text_to_video, positive, excluded, margin, max_violation)
    return _reduce(per_pair, torch.ones_like(per_pair, dtype=torch.bool), reduction)


def _columns(video_emb, text_emb, negatives_video, negatives_text, offset: int) -> tuple[Tensor, Tensor]:
    """The (N, D) video and text columns the local rows are scored against, after shape checks."""
    if video_emb.shape != text_emb.shape or video_emb.dim() != 2:
        shapes = f"video_emb {tuple(video_emb.shape)} and text_emb {tuple(text_emb.shape)}"
        raise LossInputError(f"{shapes} must both be (B, D)")
    if (negatives_video is None) != (negatives_text is None):
        raise LossInputError("negatives_video and negatives_text must be given together")
    if negatives_video is None:
        return video_emb, text_emb
    if negatives_video.shape != negatives_text.shape or offset + video_emb.shape[0] > negatives_text.shape[0]:
        rows, shape = video_emb.shape[0], tuple(negatives_text.shape)
        raise LossInputError(f"negatives {shape} do not hold the {rows} local rows at offset {offset}")
    return negatives_video, negatives_text


def _excluded_columns(rows: int, columns: int, offset: int, same_video: Tensor | None, device) -> Tensor:
    """(rows, columns) bool: the positive column of each row, plus ``same_video``."""
    index = torch.arange(rows, device=device)
    excluded = torch.zeros(rows, columns, dtype=torch.bool, device=device)
    excluded[index, index + offset] = True
    if same_video is not None:
        if same_video.shape != excluded.shape:
            raise LossInputError(f"same_video is {tuple(same_video.shape)}, expected {tuple(excluded.shape)}")
        excluded |= same_video.to(device=device, dtype=torch.bool)
    return excluded


def _hinge(scores: Tensor, positive: Tensor, excluded: Tensor, margin: float, max_violation: bool) -> Tensor:
    cost = (margin + scores - positive).clamp_min(0).masked_fill(excluded, 0.0)  # (B, N)
    return cost.max(dim=1).values if max_violation else cost.sum(dim=1)


# ------------------------------------------------------------------------------------------ concepts


def likelihood_loss(logits: Tensor, labels: Tensor, lam: float = 0.2, reduction: str = "sum") -> Tensor:
    """Class-sensitive BCE that favours the positive concepts (Sec. 3.2).

    Per sample, with ℓ_k = BCE(z_k, g_k) = −g_k log σ(z_k) − (1 − g_k) log(1 − σ(z_k)):

        L_lik = λ · (1/|P|) Σ_{k∈P} ℓ_k + (1 − λ) · (1/|N|) Σ_{k∉P} ℓ_k

    Each set is averaged over its own size, so the few positives are not drowned by the ~K negatives.
    Samples with |P| = 0 are left out of the reduction; an all-positive sample (|N| = 0) gets 0 from its
    empty negative mean.

    Args:
        logits: (B, K) decoder logits z.  labels: (B, K) 0/1 concept labels g.
    Returns:
        Scalar: Σ over samples with a positive ("mean": divided by their count, at least 1).
    """
    _check_reduction(reduction)
    _check_concepts(logits, labels)
    z = logits.float()
    positive = (labels > 0.5).float()  # (B, K)
    bce = F.binary_cross_entropy_with_logits(z, labels.to(z.dtype), reduction="none")  # (B, K)
    positive_mean = _masked_mean(bce, positive)  # (B,)
    negative_mean = _masked_mean(bce, 1.0 - positive)  # (B,)
    per_sample = lam * positive_mean + (1.0 - lam) * negative_mean  # (B,)
    return _reduce(per_sample, positive.sum(1) > 0, reduction)


def unlikelihood_loss(
    logits: Tensor,
    labels: Tensor,
    contradiction: Tensor,
    reduction: str = "sum",
    extra_negatives: Tensor | None = None,
) -> Tensor:
    """Unlikelihood on concepts that contradict a positive one (Sec. 3.3), plus optional sampled negatives.

    Per sample, with C the (K, K) 0/1 contradiction matrix (C[a, b] = 1: b contradicts a) and
    ℓ_b = −log(1 − σ(z_b)) = −logsigmoid(−z_b):

        u_a  = g_a Σ_b C[a, b] (1 − g_b) ℓ_b
        L_ul = Σ_a u_a / |A|,   A = {a : g_a = 1 and C[a, b] (1 − g_b) = 1 for some b}

    |A| counts the anchors (positives with an unlabelled antonym), not the pairs; samples with A = ∅ are
    left out. The (B, K, K) tensor of active pairs is never built (K ~ 10k); two (B, K) @ (K, K) matmuls:

        Σ_a u_a = Σ_b (g C)_b (1 − g_b) ℓ_b          |A| = Σ_a g_a · 1[(C (1 − g)ᵀ)_a > 0]

    ``extra_negatives`` n (B, K), from :func:`negative_concepts`: the sample itself acts as one more
    anchor whose contradicting set is n, i.e. C gains one row:

        L_ul = (Σ_a u_a + Σ_b n_b (1 − g_b) ℓ_b) / (|A| + 1[Σ_b n_b (1 − g_b) > 0])

    so antonyms and sampled negatives share one normaliser in which every anchor weighs the same, and a
    sample with sampled negatives but no antonym pair still counts. With n = None or 0 this is the
    paper's formula exactly. A concept both contradicted and sampled is pushed down by both terms.

    Returns:
        Scalar: Σ over samples with an active anchor ("mean": divided by their count, at least 1).
    """
    _check_reduction(reduction)
    _check_concepts(logits, labels)
    k = labels.shape[1]
    if contradiction.shape != (k, k):
        raise LossInputError(f"contradiction is {tuple(contradiction.shape)}, expected ({k}, {k})")
    z = logits.float()
    nll = -F.logsigmoid(-z)  # (B, K): −log(1 − σ(z))
    positive = (labels > 0.5).float()  # (B, K)
    unlabelled = 1.0 - positive
    contra = contradiction.to(device=z.device, dtype=torch.float32)
    with torch.autocast(device_type=z.device.type, enabled=False):  # exact 0/1 counts, never bf16
        pushed = (positive @ contra) * unlabelled  # (B, K): Σ_a g_a C[a, b] (1 − g_b)
        anchors = (positive * ((unlabelled @ contra.T) > 0)).sum(1)  # (B,)
    total = (pushed * nll).sum(1)  # (B,)
    if extra_negatives is not None:
        _check_concepts(extra_negatives, labels, "extra_negatives")
        sampled = extra_negatives.to(z.dtype) * unlabelled  # (B, K)
        total = total + (sampled * nll).sum(1)
        anchors = anchors + (sampled.sum(1) > 0).float()
    return _reduce(total / anchors.clamp_min(1), anchors > 0, reduction)


# ------------------------------------------------------------------------------- negative concepts


def negative_concepts(
    strategy: str,
    labels: Tensor,
    logits: Tensor | None = None,
    k: int = 10,
    cooccurrence: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """(B, K) float 0/1 mask of negative concepts pushed down beyond the antonyms; never a positive.

    - ``antonym``, ``none``: zeros (the contradiction matrix alone does the work; ``none`` also turns the
      unlikelihood term off in :func:`total_loss`).
    - ``random``: k concepts drawn uniformly among the non-positives of each sample.
    - ``hard``: the k non-positive concepts with the highest (detached) ``logits``.
    - ``exclusive``: up to k concepts drawn uniformly among those that never co-occur with any of the
      sample's positives in the training labels; ``cooccurrence`` is the (K, K) bool/count matrix
      (:func:`concept_cooccurrence`). A sample without positives excludes nothing.

    Random draws are one ``torch.rand`` of (B, K) scores from ``generator`` followed by a masked top-k,
    so a seeded generator gives the same mask. Samples with fewer than k candidates get all of them.
    """
    if strategy not in STRATEGIES:
        raise LossInputError(f"negative strategy {strategy!r} is not one of {', '.join(STRATEGIES)}")
    if k < 0:
        raise LossInputError(f"negatives k must be non-negative, got {k}")
    positive = labels > 0.5  # (B, K)
    if strategy in ("antonym", "none"):
        return torch.zeros(labels.shape, dtype=torch.float32, device=labels.device)
    if strategy == "hard":
        if logits is None:
            raise LossInputError("negative strategy 'hard' needs logits")
        _check_concepts(logits, labels)
        return _top_k_mask(logits.detach().float(), ~positive, k)
    allowed = ~positive
    if strategy == "exclusive":
        if cooccurrence is None:
            raise LossInputError("negative strategy 'exclusive' needs a cooccurrence matrix")
        with torch.autocast(device_type=labels.device.type, enabled=False):
            touched = positive.float() @ cooccurrence.to(labels.device, torch.float32)  # (B, K)
        allowed &= touched == 0
    return _top_k_mask(_uniform_scores(labels, generator), allowed, k)


def concept_cooccurrence(labels: Tensor) -> Tensor:
    """(K, K) bool: concepts a and b are both positive in at least one row of the (N, K) training labels."""
    positive = (labels > 0.5).float()  # (N, K)
    return (positive.T @ positive) > 0


def _uniform_scores(labels: Tensor, generator: torch.Generator | None) -> Tensor:
    device = generator.device if generator is not None else labels.device
    return torch.rand(labels.shape, generator=generator, device=device).to(labels.device)  # (B, K)


def _top_k_mask(scores: Tensor, allowed: Tensor, k: int) -> Tensor:
    """1 at the (at most) k highest-scored allowed entries of each row."""
    masked = scores.masked_fill(~allowed, float("-inf"))  # (B, K)
    index = masked.topk(min(k, scores.shape[1]), dim=1).indices  # (B, k)
    chosen = torch.zeros_like(allowed).scatter_(1, index, True)
    return (chosen & allowed).float()  # rows with fewer than k candidates picked some disallowed: drop them


# ------------------------------------------------------------------------------------------ total


def total_loss(
    out: Mapping[str, Tensor],
    batch: Mapping[str, Tensor],
    contradiction: Tensor,
    cfg: LossConfig,
    cooccurrence: Tensor | None = None,
    generator: torch.Generator | None = None,
    negatives: GlobalNegatives | None = None,
) -> dict[str, Tensor]:
    """All terms of the objective, with fixed keys :data:`LOSS_KEYS`:

        loss = triplet + lik_video + lik_text + α · (ul_video + ul_text)

    ``out`` is the model's forward dict (``video_emb``, ``text_emb``, ``video_concept_logits``,
    ``text_concept_logits``); ``batch`` gives ``concept_labels`` (B, K) and ``video_index`` (B,), from
    which the same-video mask of the triplet term is built. Disabled terms (``cfg.likelihood`` or
    ``cfg.unlikelihood`` false, strategy ``none``) are zeros attached to the logits' graph, so backward
    and DDP see every parameter. Global negatives: ``negatives`` if given, else gathered over
    torch.distributed when ``cfg.global_negatives`` (the local batch on one process).
    """
    labels, video_index = batch["concept_labels"], batch["video_index"]
    if negatives is None and cfg.global_negatives:
        negatives = gather_negatives(out["video_emb"], out["text_emb"], video_index)
    terms = {"triplet": _triplet_term(out, video_index, cfg, negatives)}
    for side in ("video", "text"):
        logits = out[f"{side}_concept_logits"]
        terms[f"lik_{side}"] = (
            likelihood_loss(logits, labels, cfg.lam, cfg.reduction) if cfg.likelihood else _zero(logits)
        )
        terms[f"ul_{side}"] = _unlikelihood_term(logits, labels, contradiction, cfg, cooccurrence, generator)
    concept = terms["lik_video"] + terms["lik_text"]
    terms["loss"] = terms["triplet"] + concept + cfg.ul_alpha * (terms["ul_video"] + terms["ul_text"])
    return {key: terms[key] for key in LOSS_KEYS}


def _triplet_term(out, video_index: Tensor, cfg: LossConfig, negatives: GlobalNegatives | None) -> Tensor:
    column_index = video_index if negatives is None else negatives.video_index  # (N,)
    same_video = video_index[:, None] == column_index[None, :]  # (B, N)
    return triplet_loss(
        out["video_emb"],
        out["text_emb"],
        cfg.margin,
        cfg.max_violation,
        cfg.reduction,
        same_video=same_video,
        negatives_video=None if negatives is None else negatives.video_emb,
        negatives_text=None if negatives is None else negatives.text_emb,
        offset=0 if negatives is None else negatives.offset,
    )


def _unlikelihood_term(logits, labels, contradiction, cfg: LossConfig, cooccurrence, generator) -> Tensor:
    strategy = cfg.negatives.strategy
    if not cfg.unlikelihood or strategy == "none":
        return _zero(logits)
    extra = None
    if strategy != "antonym":
        extra = negative_concepts(strategy, labels, logits, cfg.negatives.k, cooccurrence, generator)
    return unlikelihood_loss(logits, labels, contradiction, cfg.reduction, extra)


# ------------------------------------------------------------------------------------------ helpers


def _zero(logits: Tensor) -> Tensor:
    """A 0 that stays on the logits' device and graph (zero gradients, not missing ones)."""
    return (logits.float().sum() * 0.0).abs()  # abs: −0.0 (from a negative sum) would log as "-0.0"


def _masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """(B,) mean of ``values`` over ``mask`` per row; 0 for an empty mask."""
    return (values * mask).sum(1) / mask.sum(1).clamp_min(1)


def _reduce(per_sample: Tensor, valid: Tensor, reduction: str) -> Tensor:
    total = torch.where(valid, per_sample, torch.zeros_like(per_sample)).sum()
    return total if reduction == "sum" else total / valid.sum().clamp_min(1)


def _check_reduction(reduction: str) -> None:
    if reduction not in ("sum", "mean"):
        raise LossInputError(f"reduction {reduction!r} is not one of sum, mean")


def _check_concepts(logits: Tensor, labels: Tensor, name: str = "logits") -> None:
    if logits.dim() != 2 or logits.shape != labels.shape:
        shapes = f"{tuple(logits.shape)} and labels {tuple(labels.shape)}"
        raise LossInputError(f"{name} {shapes} must both be (B, K)")
