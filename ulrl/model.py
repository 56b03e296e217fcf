"""The ITV model (paper §2.1): dual multi-level encoders into one common space plus a shared concept decoder.

Video φ(v): level 1 mean of frame features, level 2 biGRU mean-pooled, level 3 1-D CNN over the biGRU outputs
max-pooled, optional level 4 video-level clip features; [L2, L3, L1, L4] → Linear → BN → Dropout → L2-norm.
Text ψ(t), ``multilevel``: [biGRU, CNN, bag-of-words counts] → Linear → BN → Dropout → L2-norm (ITV);
``sentence``: precomputed sentence features → Linear → BN → Dropout → L2-norm (Improved-ITV).
Concepts: one decoder shared by both modalities, Linear(D → K) → BN → Dropout → logits (σ(logits) = ŷ).

Batch contract (``forward``; docs/architecture.md): ``frames`` (B, T, F) float, ``frame_mask`` (B, T) bool,
``clip_features`` (B, C) when ``clip_dim > 0``, ``tokens`` (B, L) int64 with 0 = pad, ``token_mask`` (B, L)
bool, ``sentence_features`` (B, S) when the text encoder is ``sentence``. Masks are left-aligned (valid steps
first); padded positions may hold anything, they never reach an output.

Edge cases, by design:
* A row with no valid step (an all-padding caption, a video with no frame) is encoded as a one-step sequence
  whose single input is a zero vector (length clamped to 1); its outputs are finite.
* Sequences shorter than a CNN kernel: every convolution pads k−1 zero steps on both sides (the "full"
  convolution of dual encoding), so a length-n sequence has n+k−1 windows, each touching ≥ 1 valid step, and
  the max runs over exactly those windows. Batch padding is zeroed first, so it looks like the conv padding
  and the result does not depend on how far a batch is padded.
* BatchNorm is standard: batch statistics in ``train()``, running statistics in ``eval()``. A training batch
  of one sample makes BatchNorm raise ("Expected more than 1 value per channel"); training uses B ≥ 2.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from ulrl.config import ModelConfig

PAD_ID = 0
"""Token id of padding; never counted in the bag of words, zero row of the word embedding."""
TEXT_ENCODERS = ("multilevel", "sentence")


class ModelDimsError(ValueError):
    """The manifest (or dict) that model dimensions are read from is missing a key or holds a bad value."""


class ModelInputError(ValueError):
    """A model input is missing, has the wrong shape, or has a mask that is not left-aligned."""


@dataclass(frozen=True)
class ModelDims:
    """Data-dependent sizes of the model, read from the store manifest (never from the config)."""

    frame_dim: int
    """F: per-frame feature dimension."""
    clip_dim: int
    """C: video-level feature dimension (level 4); 0 = none."""
    vocab_size: int
    """V: text vocabulary size including the pad (0) and unknown (1) ids."""
    num_concepts: int
    """K: concept-bank size."""
    sentence_dim: int
    """S: precomputed sentence-feature dimension; 0 = none."""

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any]) -> ModelDims:
        """Read the five dimensions from a manifest (other keys are ignored); each must be an int ≥ 0."""
        values = {}
        for name in (f.name for f in dataclasses.fields(cls)):
            if name not in manifest:
                raise ModelDimsError(f"manifest has no key '{name}' (needed to build the model)")
            value = manifest[name]
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ModelDimsError(f"manifest key '{name}' must be an int >= 0, got {value!r}")
            values[name] = value
        return cls(**values)

    def to_dict(self) -> dict[str, int]:
        """Plain dict, the form stored next to checkpoint weights (``from_manifest`` reads it back)."""
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------- masks


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Σ_t m_t·x_t / max(Σ_t m_t, 1). x (B, T, D), mask (B, T) bool → (B, D); an empty row gives 0."""
    keep = mask.unsqueeze(-1)  # (B, T, 1)
    total = x.masked_fill(~keep, 0.0).sum(dim=1)  # (B, D); masked_fill, not ×0, so NaN padding cannot leak
    count = keep.sum(dim=1).clamp_min(1).to(x.dtype)  # (B, 1)
    return total / count  # (B, D)


def masked_max(x: Tensor, mask: Tensor) -> Tensor:
    """max_{t: m_t} x_t over dim 1. x (B, T, D), mask (B, T) bool → (B, D); an empty row gives 0."""
    filled = x.masked_fill(~mask.unsqueeze(-1), float("-inf"))  # (B, T, D)
    best = filled.max(dim=1).values  # (B, D)
    return torch.where(mask.any(dim=1, keepdim=True), best, torch.zeros_like(best))  # (B, D)


def length_mask(lengths: Tensor, max_len: int) -> Tensor:
    """m[b, t] = t < lengths[b]. lengths (B,) → (B, max_len) bool on the lengths' device."""
    steps = torch.arange(max_len, device=lengths.device)  # (T,)
    return steps.unsqueeze(0) < lengths.unsqueeze(1)  # (B, T)


def valid_lengths(mask: Tensor) -> Tensor:
    """Valid steps per row, (B, T) bool → (B,) int64; ModelInputError unless the mask is left-aligned."""
    lengths = mask.sum(dim=1)  # (B,)
    # One host sync; cheap next to the one pack_padded_sequence needs for its CPU lengths anyway.
    if not torch.equal(mask, length_mask(lengths, mask.shape[1])):
        raise ModelInputError("mask is not left-aligned: valid steps must come first in every row")
    return lengths


def bag_of_words(tokens: Tensor, token_mask: Tensor, vocab_size: int) -> Tensor:
    """Counts c[b, w] = #{t : m_bt ∧ tokens_bt = w ≠ PAD_ID}. (B, L) int64, (B, L) bool → (B, V) float."""
    counted = token_mask & (tokens != PAD_ID)  # (B, L)
    ids = tokens.masked_fill(~counted, PAD_ID)  # (B, L) masked positions point at the pad column
    counts = torch.zeros(tokens.shape[0], vocab_size, device=tokens.device)  # (B, V)
    return counts.scatter_add_(1, ids, counted.to(counts.dtype))  # (B, V); the pad column only ever gets 0


# ---------------------------------------------------------------------------------------------- blocks


def _xavier_linear(in_dim: int, out_dim: int) -> nn.Linear:
    """Linear without bias (the BatchNorm after it removes any bias), Xavier-uniform as in dual encoding."""
    linear = nn.Linear(in_dim, out_dim, bias=False)
    nn.init.xavier_uniform_(linear.weight)
    return linear


class EmbeddingHead(nn.Module):
    """Mapping into the common space: Linear → BatchNorm1d → Dropout → L2-normalise. (B, I) → (B, D)."""

    def __init__(self, in_dim: int, embed_dim: int, dropout: float) -> None:
        super().__init__()
        self.linear = _xavier_linear(in_dim, embed_dim)
        self.norm = nn.BatchNorm1d(embed_dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, features: Tensor) -> Tensor:
        mapped = self.dropout(self.norm(self.linear(features)))  # (B, D)
        return F.normalize(mapped, dim=-1)  # (B, D), ‖·‖₂ = 1


class RecurrentConvLevels(nn.Module):
    """Levels 2 and 3 of dual encoding over a padded sequence (B, T, I) → (B, 2H + n_k·F_c).

    Level 2: biGRU (H per direction) run on packed sequences, mean over valid steps.
    Level 3: for each kernel size k, Conv1d(2H → F_c, k, padding k−1) + ReLU over the biGRU outputs, max over
    the n+k−1 windows that touch a valid step. Dropout on both levels' outputs (paper: p = 0.2).
    """

    def __init__(
        self, input_dim: int, rnn_size: int, kernel_sizes: list[int], num_filters: int, dropout: float
    ) -> None:
        super().__init__()
        self.rnn = nn.GRU(input_dim, rnn_size, batch_first=True, bidirectional=True)
        self.convs = nn.ModuleList(
            nn.Conv1d(2 * rnn_size, num_filters, kernel_size=k, padding=k - 1) for k in kernel_sizes
        )
        self.dropout = nn.Dropout(dropout)
        self.out_dim = 2 * rnn_size + len(kernel_sizes) * num_filters

    def forward(self, seq: Tensor, mask: Tensor) -> Tensor:
        if seq.shape[1] == 0:  # a batch padded to length 0: give every row one (masked) step
            seq = seq.new_zeros(seq.shape[0], 1, seq.shape[2])  # (B, 1, I)
            mask = mask.new_zeros(mask.shape[0], 1)  # (B, 1)
        lengths = valid_lengths(mask).clamp_min(1)  # (B,); an empty row runs one zero step
        seq = seq.masked_fill(~mask.unsqueeze(-1), 0.0)  # (B, T, I); also zeroes an empty row's step
        hidden = self._run_rnn(seq, lengths)  # (B, T, 2H), exactly 0 past each row's length
        rnn_level = masked_mean(hidden, length_mask(lengths, hidden.shape[1]))  # (B, 2H)
        cnn_level = self._conv_max(hidden, lengths)  # (B, n_k·F_c)
        return torch.cat([self.dropout(rnn_level), self.dropout(cnn_level)], dim=1)  # (B, out_dim)

    def _run_rnn(self, seq: Tensor, lengths: Tensor) -> Tensor:
        # Packing skips padding (exact, and faster on CPU); pack needs the lengths on the host.
        packed = pack_padded_sequence(seq, lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, _ = self.rnn(packed)
        hidden, _ = pad_packed_sequence(out, batch_first=True, total_length=seq.shape[1])  # (B, T, 2H)
        return hidden

    def _conv_max(self, hidden: Tensor, lengths: Tensor) -> Tensor:
        channels_first = hidden.transpose(1, 2)  # (B, 2H, T)
        pooled = [hidden.new_zeros(hidden.shape[0], 0)]  # (B, 0): no kernels configured = no level 3
        for conv in self.convs:
            kernel = conv.kernel_size[0]
            feature_map = F.relu(conv(channels_first)).transpose(1, 2)  # (B, T+k−1, F_c)
            windows = length_mask(lengths + kernel - 1, feature_map.shape[1])  # (B, T+k−1)
            pooled.append(masked_max(feature_map, windows))  # (B, F_c)
        return torch.cat(pooled, dim=1)  # (B, n_k·F_c)


class VideoEncoder(nn.Module):
    """φ(v): [L2 biGRU mean, L3 CNN max, L1 frame mean, L4 clip features] → EmbeddingHead. → (B, D)."""

    def __init__(
        self,
        frame_dim: int,
        clip_dim: int,
        rnn_size: int,
        kernel_sizes: list[int],
        num_filters: int,
        embed_dim: int,
        dropout: float,
    ) -> None:
        super().__init__()
        self.levels = RecurrentConvLevels(frame_dim, rnn_size, kernel_sizes, num_filters, dropout)
        self.head = EmbeddingHead(self.levels.out_dim + frame_dim + clip_dim, embed_dim, dropout)

    def forward(self, frames: Tensor, frame_mask: Tensor, clip_features: Tensor | None) -> Tensor:
        seq_levels = self.levels(frames, frame_mask)  # (B, 2H + n_k·F_c)
        mean_level = masked_mean(frames, frame_mask)  # (B, F)
        parts = [seq_levels, mean_level] + ([clip_features] if clip_features is not None else [])
        return self.head(torch.cat(parts, dim=1))  # (B, D)


class MultilevelTextEncoder(nn.Module):
    """ψ(t), ITV: [L2 biGRU mean, L3 CNN max over word embeddings, L1 bag of words] → EmbeddingHead. → (B, D).

    The word embedding is randomly initialised (the paper starts from Flickr word2vec, which we do not ship).
    """

    def __init__(
        self,
        vocab_size: int,
        word_dim: int,
        rnn_size: int,
        kernel_sizes: list[int],
        num_filters: int,
        embed_dim: int,
        dropout: float,
    ) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.embedding = nn.Embedding(vocab_size, word_dim, padding_idx=PAD_ID)
        self.levels = RecurrentConvLevels(word_dim, rnn_size, kernel_sizes, num_filters, dropout)
        self.head = EmbeddingHead(self.levels.out_dim + vocab_size, embed_dim, dropout)

    def forward(self, tokens: Tensor, token_mask: Tensor) -> Tensor:
        tokens = tokens.masked_fill(~token_mask, PAD_ID)  # (B, L); ids under the mask are ignored
        words = self.embedding(tokens)  # (B, L, W)
        seq_levels = self.levels(words, token_mask)  # (B, 2H + n_k·F_c)
        bow_level = bag_of_words(tokens, token_mask, self.vocab_size).to(words.dtype)  # (B, V)
        return self.head(torch.cat([seq_levels, bow_level], dim=1))  # (B, D)


class SentenceTextEncoder(nn.Module):
    """ψ(t), Improved-ITV: precomputed sentence features (B, S) → EmbeddingHead → (B, D)."""

    def __init__(self, sentence_dim: int, embed_dim: int, dropout: float) -> None:
        super().__init__()
        self.head = EmbeddingHead(sentence_dim, embed_dim, dropout)

    def forward(self, sentence_features: Tensor) -> Tensor:
        return self.head(sentence_features)  # (B, D)


class ConceptDecoder(nn.Module):
    """Shared decoder: Linear(D → K) → BatchNorm1d → Dropout → logits. (B, D) → (B, K).

    Dropout acts on the logits before the sigmoid, as in the reference code (class ``MFC``); we keep it so
    training matches the paper. In eval mode it is the identity.
    """

    def __init__(self, embed_dim: int, num_concepts: int, dropout: float) -> None:
        super().__init__()
        self.linear = _xavier_linear(embed_dim, num_concepts)
        self.norm = nn.BatchNorm1d(num_concepts)
        self.dropout = nn.Dropout(dropout)

    def forward(self, emb: Tensor) -> Tensor:
        return self.dropout(self.norm(self.linear(emb)))  # (B, K)


# ---------------------------------------------------------------------------------------------- model


class ITVModel(nn.Module):
    """Video encoder φ, text encoder ψ (``multilevel`` or ``sentence``) and the shared concept decoder."""

    def __init__(self, dims: ModelDims, cfg: ModelConfig) -> None:
        super().__init__()
        self.dims = dims
        self.text_kind = cfg.text_encoder
        self.video_encoder = VideoEncoder(
            dims.frame_dim, dims.clip_dim, cfg.video_rnn_size, cfg.video_kernel_sizes,
            cfg.video_num_filters, cfg.embed_dim, cfg.dropout,
        )  # fmt: skip
        if cfg.text_encoder == "multilevel":
            self.text_encoder: nn.Module = MultilevelTextEncoder(
                dims.vocab_size, cfg.word_dim, cfg.text_rnn_size, cfg.text_kernel_sizes,
                cfg.text_num_filters, cfg.embed_dim, cfg.dropout,
            )  # fmt: skip
        else:
            self.text_encoder = SentenceTextEncoder(dims.sentence_dim, cfg.embed_dim, cfg.dropout)
        self.concept_decoder = ConceptDecoder(cfg.embed_dim, dims.num_concepts, cfg.dropout)

    def encode_video(
        self, frames: Tensor, frame_mask: Tensor, clip_features: Tensor | None = None
    ) -> Tensor:
        """φ(v): frames (B, T, F), frame_mask (B, T) bool, clip_features (B, C) → (B, D) unit-norm.

        ``clip_features`` is required when ``dims.clip_dim > 0`` and ignored otherwise.
        """
        _check_shape("frames", frames, (None, None, self.dims.frame_dim))
        _check_shape("frame_mask", frame_mask, tuple(frames.shape[:2]))
        clip = None
        if self.dims.clip_dim > 0:
            if clip_features is None:
                raise ModelInputError(
                    f"clip_features missing: the model was built with clip_dim={self.dims.clip_dim}"
                )
            clip = _check_shape("clip_features", clip_features, (frames.shape[0], self.dims.clip_dim))
        return self.video_encoder(frames, frame_mask, clip)  # (B, D)

    def encode_text(
        self, tokens: Tensor | None, token_mask: Tensor | None, sentence_features: Tensor | None = None
    ) -> Tensor:
        """ψ(t): tokens (B, L) int64 + token_mask (B, L) bool (``multilevel``), or sentence_features (B, S)
        (``sentence``; tokens may then be None) → (B, D) unit-norm.
        Inputs the encoder does not use are ignored.
        """
        if self.text_kind == "sentence":
            if sentence_features is None:
                raise ModelInputError("sentence_features missing: the text encoder is 'sentence'")
            _check_shape("sentence_features", sentence_features, (None, self.dims.sentence_dim))
            return self.text_encoder(sentence_features)  # (B, D)
        if tokens is None or token_mask is None:
            raise ModelInputError("tokens and token_mask are required by the 'multilevel' text encoder")
        _check_shape("tokens", tokens, (None, None))
        _check_shape("token_mask", token_mask, tuple(tokens.shape))
        return self.text_encoder(tokens, token_mask)  # (B, D)

    def decode_concepts(self, emb: Tensor) -> Tensor:
        """Concept logits (B, K) from a common-space embedding (B, D); σ(logits) are the probabilities ŷ."""
        return self.concept_decoder(emb)  # (B, K)

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Collated batch → {video_emb, text_emb (B, D); video_concept_logits, text_concept_logits (B, K)}."""
        video_emb = self.encode_video(batch["frames"], batch["frame_mask"], batch.get("clip_features"))
        text_emb = self.encode_text(
            batch.get("tokens"), batch.get("token_mask"), batch.get("sentence_features")
        )
        return {
            "video_emb": video_emb,  # (B, D)
            "text_emb": text_emb,  # (B, D)
            "video_concept_logits": self.decode_concepts(video_emb),  # (B, K)
            "text_concept_logits": self.decode_concepts(text_emb),  # (B, K)
        }


def _check_shape(name: str, tensor: Tensor, expected: tuple[int | None, ...]) -> Tensor:
    """Raise ModelInputError unless ``tensor`` has len(expected) dims matching every non-None size."""
    shape = tuple(tensor.shape)
    if len(shape) != len(expected) or any(e is not None and s != e for s, e in zip(shape, expected)):
        want = "(" + ", ".join("*" if e is None else str(e) for e in expected) + ")"
        raise ModelInputError(f"{name}: expected shape {want}, got {shape}")
    return tensor


def build_model(cfg: ModelConfig, dims: ModelDims) -> ITVModel:
    """Check that the config and the data dimensions fit together, then build the model."""
    kind = cfg.text_encoder
    if kind not in TEXT_ENCODERS:
        raise ModelDimsError(f"model.text_encoder: {kind!r} is not one of {', '.join(TEXT_ENCODERS)}")
    if kind == "sentence" and dims.sentence_dim <= 0:
        raise ModelDimsError("model.text_encoder 'sentence' needs sentence features; sentence_dim=0")
    if kind == "multilevel" and dims.vocab_size <= PAD_ID + 1:
        raise ModelDimsError(f"model.text_encoder 'multilevel' needs vocab_size > 1; got {dims.vocab_size}")
    if dims.frame_dim <= 0 or dims.num_concepts <= 0:
        raise ModelDimsError(f"frame_dim, num_concepts must be > 0; got {dims.frame_dim}, {dims.num_concepts}")
    if min(cfg.video_kernel_sizes + cfg.text_kernel_sizes, default=1) < 1:
        raise ModelDimsError("model.video_kernel_sizes, model.text_kernel_sizes: kernel sizes must be >= 1")
    return ITVModel(dims, cfg)
