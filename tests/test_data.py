"""The store reader: vectorised transforms against naive per-row oracles, the training collate, schema
checks, and Ray Data reads (local and moto S3) with a two-way streaming split."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from ulrl.config import from_dict
from ulrl.data import (
    DataFormatError,
    TrainCollate,
    caption_choice,
    expand_captions,
    multi_hot,
    pad_frames,
    pad_tokens,
    read_split,
    train_batches,
    train_dataset,
)
from ulrl.store import StoreError

# ------------------------------------------------------------------------------------------- fixtures


def frames_array(videos: list[np.ndarray], dtype=np.float16) -> pa.ListArray:
    """Ragged (T_i, F) arrays → list<fixed_size_list<dtype>[F]>."""
    width = videos[0].shape[1]
    flat = np.concatenate([v.astype(dtype).reshape(-1) for v in videos])
    offsets = np.concatenate([[0], np.cumsum([len(v) for v in videos])]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.FixedSizeListArray.from_arrays(pa.array(flat), width))


def random_videos(rng, n, width, max_len=10):
    return [rng.normal(size=(int(rng.integers(1, max_len + 1)), width)).astype(np.float32) for _ in range(n)]


def video_table(rng, n, frame_dim=4, clip_dim=0, sentence_dim=0, num_concepts=7, captions=(1, 2, 3),
                dtype=np.float16, start=0):
    """Video rows of the store layout; caption j of video i is [2 + i] + [100 + j] * j (traceable, length j + 1)."""
    videos = random_videos(rng, n, frame_dim)
    counts = [captions[i % len(captions)] for i in range(start, start + n)]
    columns = {
        "video_id": pa.array([f"v{start + i}" for i in range(n)]),
        "video_index": pa.array(np.arange(start, start + n), pa.int64()),
        "num_frames": pa.array([len(v) for v in videos], pa.int32()),
        "frames": frames_array(videos, dtype),
        "concept_ids": pa.array([sorted({(start + i) % num_concepts, (start + i) * 3 % num_concepts})
                                 for i in range(n)], pa.list_(pa.int32())),
        "caption_token_ids": pa.array([[[2 + start + i] + [100 + j] * j for j in range(c)]
                                       for i, c in enumerate(counts)], pa.list_(pa.list_(pa.int32()))),
    }
    if clip_dim:
        clip = rng.normal(size=(n, clip_dim)).astype(np.float32)
        columns["clip_features"] = pa.FixedSizeListArray.from_arrays(pa.array(clip.reshape(-1)), clip_dim)
    if sentence_dim:
        columns["caption_sentence_features"] = pa.array(
            [[[float(start + i) + j / 10] * sentence_dim for j in range(c)] for i, c in enumerate(counts)],
            pa.list_(pa.list_(pa.float32())))
    return pa.table(columns), videos


def make_store(root: Path, n_videos=48, files=2, frame_dim=4, clip_dim=0, sentence_dim=0, num_concepts=7,
               filesystem=None, seed=0):
    """A tiny store in the documented layout (manifest written last). ``root`` is a local folder, or a
    ``bucket/prefix`` path when ``filesystem`` is given. Returns (manifest, frames per video)."""
    rng = np.random.default_rng(seed)
    per_file = n_videos // files
    names, all_videos = [], []
    for part in range(files):
        table, videos = video_table(rng, per_file, frame_dim, clip_dim, sentence_dim, num_concepts,
                                    start=part * per_file)
        name = f"train/videos/part-{part:05d}.parquet"  # manifest file names are root-relative
        if filesystem is None:
            (root / "train" / "videos").mkdir(parents=True, exist_ok=True)
        pq.write_table(table, f"{root}/{name}", filesystem=filesystem)
        names.append(name)
        all_videos += videos
    manifest = {"schema_version": 1, "source": "test", "frame_dim": frame_dim, "clip_dim": clip_dim,
                "sentence_dim": sentence_dim, "vocab_size": 200, "num_concepts": num_concepts,
                "feature_dtype": "float16", "has_true_labels": False, "query_splits": [],
                "splits": {"train": {"videos": n_videos, "captions": 0, "video_files": names, "caption_files": []}}}
    metadata = {"concepts.json": {"concepts": [f"c{k}" for k in range(num_concepts)], "frequency": [5] * num_concepts},
                "contradictions.json": {"pairs": [["c0", "c1"], ["c1", "c0"]]},
                "vocab.json": {"words": ["<pad>", "<unk>"] + [f"w{i}" for i in range(198)]},
                "manifest.json": manifest}  # manifest last, as the writer does
    for name, value in metadata.items():
        if filesystem is None:
            (root / name).write_text(json.dumps(value))
        else:
            with filesystem.open_output_stream(f"{root}/{name}") as out:
                out.write(json.dumps(value).encode())
    return manifest, all_videos


def config(**data):
    return from_dict({"train": {"batch_size": 8, "seed": 3}, "data": {"max_frames": 6, "max_words": 4, **data}})


# ------------------------------------------------------------------------------------ naive oracles


def naive_pad(rows: list[np.ndarray], max_len: int):
    """Per-row Python padding: the obvious implementation the vectorised one must match."""
    longest = min(max_len, max(len(r) for r in rows))
    shape = (len(rows), longest) + rows[0].shape[1:]
    out, mask = np.zeros(shape, np.float64), np.zeros((len(rows), longest), bool)
    for b, row in enumerate(rows):
        for t in range(min(len(row), longest)):
            out[b, t] = row[t]
            mask[b, t] = True
    return out, mask


# ------------------------------------------------------------------------------- pure transforms


def test_pad_frames_matches_loop_with_truncation_and_mask():
    rng = np.random.default_rng(0)
    videos = random_videos(rng, 9, 5, max_len=10)
    expected, expected_mask = naive_pad([v.astype(np.float16) for v in videos], max_len=6)
    frames, mask = pad_frames(frames_array(videos), max_frames=6, frame_dim=5)
    assert frames.dtype == np.float32 and frames.shape == (9, 6, 5) and mask.dtype == bool
    np.testing.assert_array_equal(frames, expected.astype(np.float32))
    np.testing.assert_array_equal(mask, expected_mask)
    assert mask.sum() == sum(min(len(v), 6) for v in videos)


def test_pad_frames_sliced_and_chunked_columns():
    rng = np.random.default_rng(1)
    videos = random_videos(rng, 8, 3)
    array = frames_array(videos)
    sliced_frames, sliced_mask = pad_frames(array.slice(3, 4), max_frames=64)
    expected, expected_mask = naive_pad([v.astype(np.float16) for v in videos[3:7]], 64)
    np.testing.assert_array_equal(sliced_frames, expected.astype(np.float32))
    np.testing.assert_array_equal(sliced_mask, expected_mask)
    chunked = pa.chunked_array([array.slice(0, 5), array.slice(5)])
    whole, _ = pad_frames(chunked, max_frames=64)
    np.testing.assert_array_equal(whole, naive_pad([v.astype(np.float16) for v in videos], 64)[0])
    assert whole.shape[1] == max(len(v) for v in videos)  # padded to the batch's longest, not max_frames


def test_pad_frames_rejects_wrong_dim_and_empty_video():
    rng = np.random.default_rng(2)
    with pytest.raises(DataFormatError, match="frame_dim=8"):
        pad_frames(frames_array(random_videos(rng, 2, 4)), 64, frame_dim=8)
    empty = pa.array([[[1.0, 2.0]], []], pa.list_(pa.list_(pa.float32(), 2)))
    with pytest.raises(DataFormatError, match="row 1 has no frames"):
        pad_frames(empty, 64)


def test_pad_tokens_matches_loop():
    captions = [[5, 6, 7, 8, 9, 10], [3], [], [4, 4]]
    array = pa.array(captions, pa.list_(pa.int32()))
    tokens, mask = pad_tokens(array, max_words=4)
    assert tokens.dtype == np.int64 and tokens.shape == (4, 4)
    np.testing.assert_array_equal(tokens, [[5, 6, 7, 8], [3, 0, 0, 0], [0, 0, 0, 0], [4, 4, 0, 0]])
    np.testing.assert_array_equal(mask, tokens > 0)
    tokens, mask = pad_tokens(array.slice(1, 2), max_words=4)  # the two shortest: [3], []
    np.testing.assert_array_equal(tokens, [[3], [0]])
    np.testing.assert_array_equal(mask, [[True], [False]])
    _, mask = pad_tokens(pa.array([[]], pa.list_(pa.int32())), 4)
    assert mask.shape == (1, 1) and not mask.any()  # never zero-width


def test_multi_hot_matches_loop_and_rejects_out_of_range():
    rows = [[0, 3], [], [4, 1, 2], [3]]
    array = pa.array(rows, pa.list_(pa.int32()))
    expected = np.zeros((4, 5), np.float32)
    for b, ids in enumerate(rows):
        for k in ids:
            expected[b, k] = 1.0
    np.testing.assert_array_equal(multi_hot(array, 5), expected)
    np.testing.assert_array_equal(multi_hot(array.slice(2), 5), expected[2:])
    with pytest.raises(DataFormatError, match="id 4 outside"):
        multi_hot(array, 4)


def test_caption_choice_deterministic_uniform_and_epoch_dependent():
    video_index = np.arange(30000)
    counts = np.full(30000, 5)
    first = caption_choice(video_index, counts, seed=0, epoch=0)
    np.testing.assert_array_equal(first, caption_choice(video_index, counts, seed=0, epoch=0))
    # independent of batching: a subset gets the same choices
    np.testing.assert_array_equal(first[123:456], caption_choice(video_index[123:456], counts[123:456], 0, 0))
    assert first.min() == 0 and first.max() == 4
    assert np.all(np.abs(np.bincount(first, minlength=5) - 6000) < 300)  # ±5 % of uniform (σ ≈ 69)
    for other in (caption_choice(video_index, counts, 0, 1), caption_choice(video_index, counts, 1, 0)):
        assert abs(np.mean(other == first) - 0.2) < 0.02  # chance agreement only
    ragged = np.array([1, 2, 3, 7] * 100)
    choice = caption_choice(np.arange(400), ragged, seed=9, epoch=4)
    assert np.all((choice >= 0) & (choice < ragged)) and np.all(choice[ragged == 1] == 0)
    with pytest.raises(DataFormatError, match="video_index 2 has no captions"):
        caption_choice(np.arange(3), np.array([1, 1, 0]), 0, 0)


def test_float16_storage_round_trip(tmp_path):
    rng = np.random.default_rng(3)
    videos = random_videos(rng, 5, 6)
    pq.write_table(pa.table({"frames": frames_array(videos, np.float16)}), tmp_path / "f.parquet")
    column = pq.read_table(tmp_path / "f.parquet")["frames"]
    assert column.type.value_type.value_type == pa.float16()
    frames, mask = pad_frames(column, 64, frame_dim=6)
    for b, video in enumerate(videos):
        np.testing.assert_array_equal(frames[b, : len(video)], video.astype(np.float16).astype(np.float32))
        np.testing.assert_allclose(frames[b, : len(video)], video, rtol=1e-3, atol=1e-3)
        assert not frames[b, len(video):].any() and mask[b].sum() == len(video)


def test_expand_captions_one_row_per_caption():
    table, _ = video_table(np.random.default_rng(4), 7, sentence_dim=2)  # 1, 2, 3, 1, 2, 3, 1 captions
    expanded = expand_captions(table)
    assert expanded.num_rows == 13
    assert "caption_token_ids" not in expanded.column_names and "caption_sentence_features" not in expanded.column_names
    assert expanded["video_index"].to_pylist() == [0, 1, 1, 2, 2, 2, 3, 4, 4, 5, 5, 5, 6]
    assert expanded["token_ids"].to_pylist()[1:3] == [[3], [3, 101]]
    assert expanded["sentence_features"].to_pylist()[2] == pytest.approx([1.1, 1.1])
    assert expanded["frames"].to_pylist()[1] == expanded["frames"].to_pylist()[2] == table["frames"].to_pylist()[1]


def test_train_collate_keys_shapes_and_sampled_caption():
    table, videos = video_table(np.random.default_rng(5), 6, frame_dim=4, clip_dim=3, sentence_dim=2)
    collate = TrainCollate(epoch=1, seed=3, max_frames=6, max_words=4, num_concepts=7, frame_dim=4,
                           clip_dim=3, sentence_dim=2)
    batch = collate(table)
    shapes = {k: (tuple(v.shape), v.dtype) for k, v in batch.items()}
    longest = min(6, max(len(v) for v in videos))
    choice = caption_choice(np.arange(6), np.array([1, 2, 3, 1, 2, 3]), seed=3, epoch=1)
    words = min(4, 1 + choice.max())
    assert shapes == {
        "frames": ((6, longest, 4), torch.float32), "frame_mask": ((6, longest), torch.bool),
        "clip_features": ((6, 3), torch.float32), "tokens": ((6, words), torch.int64),
        "token_mask": ((6, words), torch.bool), "sentence_features": ((6, 2), torch.float32),
        "concept_labels": ((6, 7), torch.float32), "video_index": ((6,), torch.int64)}
    assert set(choice) == {0, 1, 2}  # the seed exercises every caption position
    for b in range(6):
        expected = [2 + b] + [100 + int(choice[b])] * int(choice[b])
        assert batch["tokens"][b][batch["token_mask"][b]].tolist() == expected
        assert batch["sentence_features"][b].tolist() == pytest.approx([b + choice[b] / 10] * 2)
    assert batch["concept_labels"].sum(1).tolist() == [len({b % 7, b * 3 % 7}) for b in range(6)]


def test_train_collate_on_expanded_rows_uses_their_caption():
    table, _ = video_table(np.random.default_rng(6), 3)
    batch = TrainCollate(0, 0, 64, 8, 7, frame_dim=4)(expand_captions(table))
    assert batch["tokens"].tolist() == [[2, 0, 0], [3, 0, 0], [3, 101, 0], [4, 0, 0], [4, 101, 0], [4, 102, 102]]
    assert batch["video_index"].tolist() == [0, 1, 1, 2, 2, 2]
    assert "clip_features" not in batch and "sentence_features" not in batch


def test_read_split_rejects_frame_dim_mismatch_naming_the_file(tmp_path):
    manifest, _ = make_store(tmp_path, n_videos=4, files=2)
    manifest["frame_dim"] = 8
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataFormatError, match=r"part-00000\.parquet: column 'frames' has type"):
        read_split(str(tmp_path), "train")
    with pytest.raises(StoreError, match="no split 'val'"):
        read_split(str(tmp_path), "val")
    with pytest.raises(StoreError, match="no store at"):
        read_split(str(tmp_path / "nowhere"), "train")


# -------------------------------------------------------------------------------------- integration


def consume_split(dataset, cfg, manifest, epochs):
    """Both halves of a ``streaming_split(2, equal=True)`` consumed concurrently, per epoch."""
    shards = dataset.streaming_split(2, equal=True)

    def run(shard, epoch):
        return list(train_batches(shard, epoch, cfg, manifest))

    with ThreadPoolExecutor(2) as pool:
        return [list(pool.map(run, shards, [epoch, epoch])) for epoch in range(epochs)]


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_streaming_split_sees_every_video_once_per_epoch(ray_cluster, tmp_path):
    manifest, videos = make_store(tmp_path, n_videos=48, files=2)  # 24 rows = 3 batches of 8 per shard
    cfg = config()
    epochs = consume_split(train_dataset(str(tmp_path), cfg), cfg, manifest, epochs=2)
    choices = []
    for shards in epochs:
        batches = [b for shard in shards for b in shard]
        assert len(batches) == 6 and all(len(shard) == 3 for shard in shards)
        for batch in batches:
            assert batch["frames"].dtype == torch.float32 and batch["frames"].shape[0] == 8
            assert batch["frames"].shape[2] == 4 and batch["frames"].shape[1] <= 6
            assert batch["tokens"].dtype == torch.int64 and batch["concept_labels"].shape == (8, 7)
            for b, index in enumerate(batch["video_index"].tolist()):
                kept = min(len(videos[index]), 6)
                assert batch["frame_mask"][b].sum() == kept
                torch.testing.assert_close(batch["frames"][b, :kept],
                                           torch.from_numpy(videos[index][:kept].astype(np.float16)).float())
        indices = torch.cat([b["video_index"] for b in batches]).tolist()
        assert sorted(indices) == list(range(48))
        # caption j of a video has j + 1 tokens, so the mask tells which caption was sampled
        lengths = {i: n for b in batches for i, n in zip(b["video_index"].tolist(), b["token_mask"].sum(1).tolist())}
        choices.append([lengths[i] - 1 for i in range(48)])
    assert choices[0] != choices[1]  # a different caption sample each epoch


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_all_mode_yields_every_pair_once(ray_cluster, tmp_path):
    manifest, _ = make_store(tmp_path, n_videos=48, files=2)  # 1+2+3 captions per 3 videos → 96 pairs
    cfg = config(caption_sampling="all")
    (shards,) = consume_split(train_dataset(str(tmp_path), cfg), cfg, manifest, epochs=1)
    pairs = [(i, tuple(t)) for shard in shards for b in shard
             for i, t in zip(b["video_index"].tolist(), b["tokens"].tolist())]
    assert len(pairs) == 96 and len(set(pairs)) == 96


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_read_split_from_s3(ray_cluster, s3_bucket):
    from pyarrow import fs as pafs

    filesystem, _ = pafs.FileSystem.from_uri(f"s3://{s3_bucket}")
    manifest, _ = make_store(f"{s3_bucket}/store", n_videos=10, files=2, clip_dim=3, filesystem=filesystem)
    dataset = read_split(f"s3://{s3_bucket}/store", "train", columns=["video_index", "frames", "clip_features"])
    rows = dataset.take_all()
    assert sorted(r["video_index"] for r in rows) == list(range(10))
    assert dataset.schema().names == ["video_index", "frames", "clip_features"]
