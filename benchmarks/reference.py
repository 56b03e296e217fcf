"""The reference design's training step, re-implemented for timing only (never shipped, never trained).

It runs the *same modules* as :class:`ulrl.model.ITVModel` (so dims, parameter count and initialisation are
equal) through the hot spots of the released dual-encoding / ITV code (research/paper.md, aesthetics §5):

* level 1 and level 2 pooling: a Python loop over the batch, ``x[i, :len_i].mean(0)`` per sample;
* the video biGRU on the padded batch, without packing (the text biGRU packs, as the reference did);
* level 3: convolutions over the mask-multiplied GRU outputs, max over every position (padding included);
* concept terms: ``sigmoid`` then ``log(p + 1e-5)`` / ``log(1 − p + 1e-5)``;
* the likelihood's and unlikelihood's valid-sample masks built by a Python loop with one host read per sample;
* the triplet diagonal mask built with ``torch.eye`` on the host and moved to the device every step;
* ``.item()`` of every loss term after every step (the reference logs and NaN-checks each one).

Bag-of-words counts are the same vectorised function on both sides: the reference builds them in its
collate, outside the step, so they are not a hot spot of the step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from ulrl.config import LossConfig
from ulrl.model import ITVModel, RecurrentConvLevels, bag_of_words

EPS = 1e-5
"""The reference's additive guard inside log()."""


def loop_mean(x: Tensor, lengths: list[int]) -> Tensor:
    """Per-sample mean of the first ``lengths[i]`` steps: x (B, T, D) → (B, D), one Python iteration per row."""
    out = torch.zeros(x.shape[0], x.shape[2], device=x.device, dtype=x.dtype)  # (B, D)
    for i, length in enumerate(lengths):
        out[i] = x[i, : max(length, 1)].mean(0)
    return out


def _levels(block: RecurrentConvLevels, seq: Tensor, mask: Tensor, lengths: list[int], pack: bool) -> Tensor:
    """Levels 2 and 3 the reference way. seq (B, T, I), mask (B, T) → (B, 2H + n_k·F_c)."""
    if pack:
        packed = pack_padded_sequence(seq, torch.tensor(lengths).clamp_min(1), batch_first=True, enforce_sorted=False)
        hidden, _ = pad_packed_sequence(block.rnn(packed)[0], batch_first=True, total_length=seq.shape[1])
    else:
        hidden, _ = block.rnn(seq)  # (B, T, 2H): padding runs through the recurrence too
    rnn_level = loop_mean(hidden, lengths)  # (B, 2H)
    conv_in = (hidden * mask.unsqueeze(-1).to(hidden.dtype)).transpose(1, 2)  # (B, 2H, T)
    pooled = [F.relu(conv(conv_in)).max(dim=2).values for conv in block.convs]  # n_k × (B, F_c)
    return torch.cat([block.dropout(rnn_level), block.dropout(torch.cat(pooled, dim=1))], dim=1)


def reference_forward(model: ITVModel, batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """The forward dict of ``model`` computed the reference way (multilevel text encoder only)."""
    video, text = model.video_encoder, model.text_encoder
    frame_lengths = batch["frame_mask"].sum(1).tolist()  # host read, as the reference's lengths list
    token_lengths = batch["token_mask"].sum(1).tolist()
    frames = batch["frames"]  # (B, T, F)
    video_parts = [_levels(video.levels, frames, batch["frame_mask"], frame_lengths, pack=False),
                   loop_mean(frames, frame_lengths)]  # fmt: skip
    if batch.get("clip_features") is not None:
        video_parts.append(batch["clip_features"])
    video_emb = video.head(torch.cat(video_parts, dim=1))  # (B, D)
    tokens = batch["tokens"].masked_fill(~batch["token_mask"], 0)  # (B, L)
    words = text.embedding(tokens)  # (B, L, W)
    bow = bag_of_words(tokens, batch["token_mask"], text.vocab_size)  # (B, V)
    text_seq = _levels(text.levels, words, batch["token_mask"], token_lengths, pack=True)
    text_emb = text.head(torch.cat([text_seq, bow], dim=1))  # (B, D)
    return {"video_emb": video_emb, "text_emb": text_emb,
            "video_concept_logits": model.decode_concepts(video_emb),
            "text_concept_logits": model.decode_concepts(text_emb)}  # fmt: skip


# ---------------------------------------------------------------------------------------------- losses


def reference_triplet(video_emb: Tensor, text_emb: Tensor, margin: float) -> Tensor:
    """VSE++ max-violation, summed; diagonal mask from ``torch.eye`` on the host, moved every call."""
    scores = video_emb @ text_emb.T  # (B, B)
    diagonal = scores.diag().view(-1, 1)  # (B, 1)
    cost_text = (margin + scores - diagonal).clamp(min=0)  # (B, B) video → text
    cost_video = (margin + scores - diagonal.T).clamp(min=0)  # (B, B) text → video
    eye = (torch.eye(scores.shape[0]) > 0.5).to(scores.device)
    cost_text = cost_text.masked_fill(eye, 0)
    cost_video = cost_video.masked_fill(eye, 0)
    return cost_text.max(1).values.sum() + cost_video.max(0).values.sum()


def _valid_rows(counts: Tensor) -> list[int]:
    """Rows with a non-zero count, found one host read at a time (the reference's index bookkeeping)."""
    return [i for i in range(counts.shape[0]) if counts[i].item() > 0]


def reference_likelihood(logits: Tensor, labels: Tensor, lam: float) -> Tensor:
    """λ·mean_P ℓ + (1 − λ)·mean_N ℓ on ``sigmoid`` probabilities with the ``+1e-5`` guard, summed."""
    probs = torch.sigmoid(logits)  # (B, K)
    positive_loss = -labels * torch.log(probs + EPS)  # (B, K)
    negative_loss = -(1 - labels) * torch.log(1 - probs + EPS)
    num_pos = labels.sum(1)  # (B,)
    keep = _valid_rows(num_pos)
    num_neg = (1 - labels).sum(1).clamp_min(1)
    per_sample = lam * positive_loss.sum(1) / num_pos.clamp_min(1) + (1 - lam) * negative_loss.sum(1) / num_neg
    return per_sample[keep].sum()


def reference_unlikelihood(logits: Tensor, labels: Tensor, contradiction: Tensor) -> Tensor:
    """Σ_a u_a / |A| per sample on ``log(1 − p + 1e-5)``, valid samples found by a host-read loop, summed."""
    probs = torch.sigmoid(logits)  # (B, K)
    unlabelled = 1 - labels
    pushed = (labels @ contradiction) * unlabelled  # (B, K)
    anchors = (labels * ((unlabelled @ contradiction.T) > 0)).sum(1)  # (B,)
    total = (pushed * -torch.log(1 - probs + EPS)).sum(1)  # (B,)
    keep = _valid_rows(anchors)
    return (total[keep] / anchors[keep]).sum()


def reference_step(model: ITVModel, optimizer: torch.optim.Optimizer, batch: dict[str, Tensor],
                   contradiction: Tensor, cfg: LossConfig, grad_clip: float) -> dict[str, float]:
    """One optimizer step of the reference design; returns every loss term read to the host."""
    optimizer.zero_grad(set_to_none=True)
    out = reference_forward(model, batch)
    labels = batch["concept_labels"]
    terms = {"triplet": reference_triplet(out["video_emb"], out["text_emb"], cfg.margin)}
    for side in ("video", "text"):
        logits = out[f"{side}_concept_logits"]
        terms[f"lik_{side}"] = reference_likelihood(logits, labels, cfg.lam)
        terms[f"ul_{side}"] = reference_unlikelihood(logits, labels, contradiction)
    terms["loss"] = (terms["triplet"] + terms["lik_video"] + terms["lik_text"]
                     + cfg.ul_alpha * (terms["ul_video"] + terms["ul_text"]))  # fmt: skip
    terms["loss"].backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    return {key: value.item() for key, value in terms.items()}  # every term, every step
