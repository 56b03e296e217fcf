"""ITV model: shapes, masking exactness, edge cases, gradients, dims and checkpoints (tiny dims, CPU, seconds)."""

from __future__ import annotations

import dataclasses
import io

import pytest
import torch
import torch.nn.functional as F

from ulrl.config import ModelConfig
from ulrl.model import (
    ModelDims,
    ModelDimsError,
    ModelInputError,
    bag_of_words,
    build_model,
    masked_max,
    masked_mean,
    valid_lengths,
)

DIMS = ModelDims(frame_dim=6, clip_dim=3, vocab_size=20, num_concepts=7, sentence_dim=5)
# Kernel 5 is longer than most test videos, so the short-sequence path runs in every test.
CFG = ModelConfig(
    embed_dim=8,
    video_rnn_size=4,
    video_kernel_sizes=[2, 3, 5],
    video_num_filters=3,
    word_dim=5,
    text_rnn_size=4,
    text_kernel_sizes=[2, 4],
    text_num_filters=3,
    dropout=0.2,
)
OUT_KEYS = {"video_emb", "text_emb", "video_concept_logits", "text_concept_logits"}


def tiny_model(text_encoder: str = "multilevel", clip_dim: int = 3, seed: int = 0):
    torch.manual_seed(seed)
    dims = dataclasses.replace(DIMS, clip_dim=clip_dim)
    return build_model(dataclasses.replace(CFG, text_encoder=text_encoder), dims)


def make_batch(frame_lengths, token_lengths, clip_dim: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    """A collated batch with zero padding, as data.py produces it."""
    gen = torch.Generator().manual_seed(seed)
    size, frames_max, tokens_max = len(frame_lengths), max(frame_lengths), max(token_lengths)
    frame_mask = torch.arange(frames_max) < torch.tensor(frame_lengths).unsqueeze(1)  # (B, T)
    token_mask = torch.arange(tokens_max) < torch.tensor(token_lengths).unsqueeze(1)  # (B, L)
    batch = {
        "frames": torch.randn(size, frames_max, DIMS.frame_dim, generator=gen) * frame_mask.unsqueeze(-1),
        "frame_mask": frame_mask,
        "tokens": torch.randint(1, DIMS.vocab_size, (size, tokens_max), generator=gen) * token_mask,
        "token_mask": token_mask,
        "sentence_features": torch.randn(size, DIMS.sentence_dim, generator=gen),
        "concept_labels": (torch.rand(size, DIMS.num_concepts, generator=gen) < 0.4).float(),
    }
    if clip_dim:
        batch["clip_features"] = torch.randn(size, clip_dim, generator=gen)
    return batch


def pad_with_garbage(batch: dict[str, torch.Tensor], extra: int) -> dict[str, torch.Tensor]:
    """Append ``extra`` masked-out steps holding large random values / random token ids."""
    out = dict(batch)
    size = batch["frames"].shape[0]
    junk_frames = 100 * torch.randn(size, extra, DIMS.frame_dim)
    junk_tokens = torch.randint(0, DIMS.vocab_size, (size, extra))
    no = torch.zeros(size, extra, dtype=torch.bool)
    out["frames"] = torch.cat([batch["frames"], junk_frames], dim=1)
    out["frame_mask"] = torch.cat([batch["frame_mask"], no], dim=1)
    out["tokens"] = torch.cat([batch["tokens"], junk_tokens], dim=1)
    out["token_mask"] = torch.cat([batch["token_mask"], no], dim=1)
    return out


def assert_outputs_close(got: dict, want: dict, atol: float = 1e-5) -> None:
    for key in OUT_KEYS:
        torch.testing.assert_close(got[key], want[key], atol=atol, rtol=1e-5, msg=key)


# ---------------------------------------------------------------------------------------------- helpers


def test_masked_mean_and_max_by_hand():
    x = torch.tensor([[[1.0, -2.0], [3.0, 5.0], [float("nan"), 100.0]], [[7.0, 8.0], [9.0, 9.0], [0.0, 0.0]]])
    mask = torch.tensor([[True, True, False], [False, False, False]])
    torch.testing.assert_close(masked_mean(x, mask), torch.tensor([[2.0, 1.5], [0.0, 0.0]]))
    torch.testing.assert_close(masked_max(x, mask), torch.tensor([[3.0, 5.0], [0.0, 0.0]]))


def test_valid_lengths_rejects_a_mask_that_is_not_left_aligned():
    assert valid_lengths(torch.tensor([[True, True, False], [False, False, False]])).tolist() == [2, 0]
    with pytest.raises(ModelInputError, match="left-aligned"):
        valid_lengths(torch.tensor([[True, False, True]]))


def test_bag_of_words_matches_naive_count():
    gen = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, 6, (4, 9), generator=gen)  # pad id 0 also appears inside the valid part
    mask = torch.arange(9) < torch.tensor([9, 4, 0, 7]).unsqueeze(1)
    expected = torch.zeros(4, 6)
    for b in range(4):
        for t in range(9):
            if mask[b, t] and tokens[b, t] != 0:
                expected[b, tokens[b, t]] += 1
    torch.testing.assert_close(bag_of_words(tokens, mask, 6), expected)


# ---------------------------------------------------------------------------------------------- outputs


@pytest.mark.parametrize("text_encoder", ["multilevel", "sentence"])
@pytest.mark.parametrize("clip_dim", [0, 3])
def test_forward_keys_shapes_dtypes_and_unit_norm(text_encoder, clip_dim):
    model = tiny_model(text_encoder, clip_dim)
    batch = make_batch([4, 1, 6], [3, 5, 2], clip_dim=clip_dim)
    for mode in (model.train, model.eval):
        mode()
        out = model(batch)
        assert set(out) == OUT_KEYS
        for key, width in [("video_emb", 8), ("text_emb", 8), ("video_concept_logits", 7)]:
            assert out[key].shape == (3, width) and out[key].dtype == torch.float32, key
        assert out["text_concept_logits"].shape == (3, 7)
        torch.testing.assert_close(out["video_emb"].norm(dim=1), torch.ones(3))
        torch.testing.assert_close(out["text_emb"].norm(dim=1), torch.ones(3))
        assert all(torch.isfinite(v).all() for v in out.values())


@pytest.mark.parametrize("text_encoder", ["multilevel", "sentence"])
def test_extra_padding_does_not_change_outputs(text_encoder):
    """Masks are honoured by the frame mean, the packed biGRU and the CNN max alike."""
    model = tiny_model(text_encoder).eval()
    batch = make_batch([5, 2, 7, 1], [3, 6, 1, 2])
    with torch.no_grad():
        assert_outputs_close(model(pad_with_garbage(batch, extra=6)), model(batch))


def test_each_sample_is_encoded_independently_of_the_batch():
    """Oracle: every sample alone, trimmed to its own length (no padding at all), gives the batch row."""
    model = tiny_model().eval()
    frame_lengths, token_lengths = [5, 2, 7, 1], [3, 6, 1, 4]
    batch = make_batch(frame_lengths, token_lengths)
    with torch.no_grad():
        together = model(batch)
        for i, (n_frames, n_tokens) in enumerate(zip(frame_lengths, token_lengths)):
            alone = {
                "frames": batch["frames"][i : i + 1, :n_frames],
                "frame_mask": batch["frame_mask"][i : i + 1, :n_frames],
                "clip_features": batch["clip_features"][i : i + 1],
                "tokens": batch["tokens"][i : i + 1, :n_tokens],
                "token_mask": batch["token_mask"][i : i + 1, :n_tokens],
            }
            assert_outputs_close(model(alone), {k: v[i : i + 1] for k, v in together.items()})


# ---------------------------------------------------------------------------------------------- edge cases


def test_one_frame_video_and_empty_caption_are_finite_in_train_and_eval():
    model = tiny_model()
    batch = make_batch([1, 1], [0, 3])  # kernel 5 > 1 frame; caption 0 is all padding
    for mode in (model.train, model.eval):
        mode()
        out = model(batch)
        assert all(torch.isfinite(v).all() for v in out.values())
        torch.testing.assert_close(out["text_emb"].norm(dim=1), torch.ones(2))


def test_empty_sequences_are_one_zero_step():
    """Documented rule: no valid step ≡ one valid step holding a zero vector (pad token / zero frame)."""
    model = tiny_model().eval()
    empty = make_batch([3, 3], [3, 3])
    empty["frame_mask"][0] = False
    empty["token_mask"][0] = False
    one_zero = make_batch([3, 3], [3, 3])
    one_zero["frames"][0] = 0.0
    one_zero["frame_mask"][0] = torch.tensor([True, False, False])
    one_zero["tokens"][0] = 0
    one_zero["token_mask"][0] = torch.tensor([True, False, False])
    no_steps = dict(empty, tokens=empty["tokens"][:, :0], token_mask=empty["token_mask"][:, :0])
    with torch.no_grad():
        out_empty, out_one = model(empty), model(one_zero)
        assert_outputs_close(out_empty, out_one)
        # a batch padded to zero token steps encodes like the all-padding caption
        torch.testing.assert_close(model(no_steps)["text_emb"][0], out_empty["text_emb"][0])


# ---------------------------------------------------------------------------------------------- training


@pytest.mark.parametrize("text_encoder", ["multilevel", "sentence"])
def test_gradients_reach_every_parameter(text_encoder):
    model = tiny_model(text_encoder).train()
    batch = make_batch([4, 1, 6, 3], [3, 5, 2, 1])
    out = model(batch)
    labels = batch["concept_labels"]
    loss = (
        -(out["video_emb"] * out["text_emb"]).sum()
        + F.binary_cross_entropy_with_logits(out["video_concept_logits"], labels, reduction="sum")
        + F.binary_cross_entropy_with_logits(out["text_concept_logits"], labels, reduction="sum")
    )
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == [], f"parameters without gradient: {missing}"


# ---------------------------------------------------------------------------------------------- dims, config


def test_model_dims_from_manifest_and_back():
    manifest = {**DIMS.to_dict(), "schema_version": 1, "source": "moving-digits"}
    assert ModelDims.from_manifest(manifest) == DIMS
    assert ModelDims.from_manifest(DIMS.to_dict()) == DIMS


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"vocab_size": None}, "no key 'vocab_size'"),
        ({"frame_dim": "256"}, "'frame_dim' must be an int"),
        ({"clip_dim": True}, "'clip_dim' must be an int"),
        ({"num_concepts": -1}, "'num_concepts' must be an int"),
    ],
)
def test_model_dims_from_manifest_errors_name_the_key(change, message):
    manifest = DIMS.to_dict()
    for key, value in change.items():
        if value is None:
            del manifest[key]
        else:
            manifest[key] = value
    with pytest.raises(ModelDimsError, match=message):
        ModelDims.from_manifest(manifest)


def test_build_model_rejects_config_that_does_not_fit_the_data():
    with pytest.raises(ModelDimsError, match="sentence_dim=0"):
        build_model(dataclasses.replace(CFG, text_encoder="sentence"), dataclasses.replace(DIMS, sentence_dim=0))
    with pytest.raises(ModelDimsError, match="not one of"):
        build_model(dataclasses.replace(CFG, text_encoder="bert"), DIMS)


def test_bad_inputs_raise_clear_errors():
    model = tiny_model().eval()
    batch = make_batch([2, 3], [1, 3])
    with pytest.raises(ModelInputError, match="clip_features missing"):
        model.encode_video(batch["frames"], batch["frame_mask"])
    with pytest.raises(ModelInputError, match=r"frames: expected shape \(\*, \*, 6\)"):
        model.encode_video(batch["frames"][..., :4], batch["frame_mask"], batch["clip_features"])
    with pytest.raises(ModelInputError, match="left-aligned"):
        model.encode_text(batch["tokens"], batch["token_mask"].flip(1))
    sentence_model = tiny_model("sentence").eval()
    with pytest.raises(ModelInputError, match="sentence_features missing"):
        sentence_model.encode_text(batch["tokens"], batch["token_mask"])


def test_state_dict_round_trip():
    model = tiny_model(seed=0)
    batch = make_batch([4, 2, 5], [3, 1, 4])
    with torch.no_grad():
        model.train()(batch)  # move BatchNorm running statistics away from their initial values
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    restored = tiny_model(seed=1)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    with torch.no_grad():
        assert_outputs_close(restored.eval()(batch), model.eval()(batch), atol=0.0)


def test_paper_size_parameter_count():
    """Default (paper-size) config, counted against a hand formula; built on the meta device (no memory)."""
    cfg = ModelConfig()
    dims = ModelDims(frame_dim=4096, clip_dim=0, vocab_size=10_000, num_concepts=11_147, sentence_dim=0)
    with torch.device("meta"):
        model = build_model(cfg, dims)

    def gru(inp, hid):  # per direction: 3 gates × (W_ih, W_hh, b_ih, b_hh)
        return 2 * 3 * hid * (inp + hid + 2)

    def cnn(hid, kernels, filters):
        return sum(filters * (2 * hid * k + 1) for k in kernels)

    embed = cfg.embed_dim
    video_in = 2 * cfg.video_rnn_size + 4 * cfg.video_num_filters + dims.frame_dim
    text_in = 2 * cfg.text_rnn_size + 3 * cfg.text_num_filters + dims.vocab_size
    expected = (
        gru(dims.frame_dim, cfg.video_rnn_size)
        + cnn(cfg.video_rnn_size, cfg.video_kernel_sizes, cfg.video_num_filters)
        + video_in * embed + 2 * embed
        + dims.vocab_size * cfg.word_dim
        + gru(cfg.word_dim, cfg.text_rnn_size)
        + cnn(cfg.text_rnn_size, cfg.text_kernel_sizes, cfg.text_num_filters)
        + text_in * embed + 2 * embed
        + embed * dims.num_concepts + 2 * dims.num_concepts
    )  # fmt: skip
    count = sum(p.numel() for p in model.parameters())
    print(f"\nITV parameters at paper size (F=4096, V=10000, K=11147): {count:,}")
    assert count == expected
