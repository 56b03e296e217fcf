"""Feature store writer and reader on small hand-built raw splits (local folders; S3 is in test_prepare.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ulrl.concepts import UnknownConceptError
from ulrl.config import load_config
from ulrl.raw import RawSplit, VideoChunk
from ulrl.store import (ColumnError, FeatureError, IdError, StoreError, StoreExistsError, open_store,
                        write_store)  # fmt: skip

# Words whose lemma is the word itself, so the expected concepts can be written down by hand.
ATTRIBUTES = (("fast", "slow"), ("big", "small"), ("black", "white"))
FRAME_DIM = 6
TINY = str(Path(__file__).parents[1] / "jobs" / "configs" / "tiny.yaml")


def video_attributes(number: int) -> list[str]:
    """Video ``number``'s true attributes: one word of each antonym pair, from the bits of ``number``."""
    return [pair[(number >> bit) & 1] for bit, pair in enumerate(ATTRIBUTES)]


def make_split(name: str, numbers: list[int], chunk: int = 3, **overrides) -> RawSplit:
    """Videos ``v<number>`` with 2..5 frames and two captions each, every caption naming two attributes."""
    rng = np.random.default_rng(len(numbers) + sum(numbers))
    ids = [f"v{n}" for n in numbers]
    frames = overrides.pop("frames", [rng.normal(size=(2 + n % 4, FRAME_DIM)).astype(np.float32) for n in numbers])
    attributes = [video_attributes(n) for n in numbers]
    texts = [f"a {a[k]} digit on a {a[2]} screen" for a in attributes for k in range(2)]
    captions = overrides.pop("captions", pl.DataFrame({
        "caption_id": [f"{v}#enc#{k}" for v in ids for k in range(2)],
        "video_id": [v for v in ids for _ in range(2)],
        "text": texts,
    }))  # fmt: skip

    def chunks():
        for start in range(0, len(ids), chunk):
            end = start + chunk
            yield VideoChunk(ids[start:end], frames[start:end], None, attributes[start:end])

    return RawSplit(name, chunks, captions, **overrides)


def make_splits(**per_split) -> dict[str, RawSplit]:
    splits = {"train": make_split("train", list(range(16))), "val": make_split("val", list(range(100, 106)))}
    splits.update(per_split)
    return splits


def config(root: Path, *overrides: str):
    return load_config(TINY, [f"store.uri={root}", "data.concept_min_freq=2", *overrides])


# ---------------------------------------------------------------------------------------------- round trip


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    root = tmp_path_factory.mktemp("store")
    splits = make_splits()
    manifest = write_store(config(root, "store.shard_rows=5"), splits, "unit-test")
    return root, splits, manifest


def test_manifest_counts_match_rows_read_with_pyarrow_and_polars(written):
    root, _, manifest = written
    assert json.loads((root / "manifest.json").read_text()) == manifest
    for split, counts in manifest["splits"].items():
        videos = pq.read_table(root / split / "videos")
        assert videos.num_rows == counts["videos"]
        captions = pl.read_parquet(root / split / "captions" / "*.parquet")
        assert captions.height == counts["captions"] == 2 * counts["videos"]
        on_disk = sorted(f"{split}/videos/{p.name}" for p in (root / split / "videos").iterdir())
        assert sorted(counts["video_files"]) == on_disk
    assert manifest["splits"]["train"]["video_files"] == [f"train/videos/part-0000{i}.parquet" for i in range(4)]
    assert (manifest["frame_dim"], manifest["clip_dim"], manifest["sentence_dim"]) == (FRAME_DIM, 0, 0)
    assert manifest["has_true_labels"] is True and manifest["query_splits"] == []
    assert not list(root.glob(".tmp-*"))


def test_rows_hold_the_input(written):
    root, splits, _ = written
    store = open_store(str(root))
    videos = store.read_table("train", "videos").to_pylist()
    expected_frames = [f for chunk in splits["train"].video_chunks() for f in chunk.frames]
    assert [v["video_index"] for v in videos] == list(range(16))
    assert [v["video_id"] for v in videos] == [f"v{n}" for n in range(16)]
    for video, frames in zip(videos, expected_frames):
        assert video["num_frames"] == len(frames)
        np.testing.assert_array_equal(np.array(video["frames"], dtype=np.float16), frames.astype(np.float16))
    frames_type = store.read_table("train", "videos").schema.field("frames").type
    assert frames_type == pa.list_(pa.list_(pa.float16(), FRAME_DIM))


def test_concepts_labels_and_tokens(written):
    root, _, _ = written
    store = open_store(str(root))
    name = store.concepts.__getitem__
    captions = store.read_table("train", "captions").to_pylist()
    for caption in captions:
        words = caption["text"].split()
        assert [store.vocab[i] for i in caption["token_ids"]] == [w if w in store.vocab else "<unk>" for w in words]
        # every attribute word and "digit"/"screen" is a concept; "a"/"on" are stopwords
        assert {name(i) for i in caption["concept_ids"]} == set(words) - {"a", "on"}
    for video in store.read_table("train", "videos").to_pylist():
        own = [c for c in captions if c["video_id"] == video["video_id"]]
        assert video["concept_ids"] == sorted({i for c in own for i in c["concept_ids"]})  # union of its captions
        assert video["caption_token_ids"] == [c["token_ids"] for c in own]
        number = int(video["video_id"][1:])
        assert {name(i) for i in video["true_concept_ids"]} == set(video_attributes(number))
    assert store.concept_frequency[store.concepts.index("digit")] == 32  # two captions × 16 train videos


def test_pairs_and_contradiction_matrix(written):
    store = open_store(str(written[0]))
    for a, b in ATTRIBUTES:
        assert (a, b) in store.pairs and (b, a) in store.pairs
    contradiction = store.contradiction()
    assert contradiction.shape == (len(store.concepts),) * 2
    np.testing.assert_array_equal(contradiction, contradiction.T)
    assert contradiction.sum() == len(store.pairs)
    assert contradiction[store.concepts.index("fast"), store.concepts.index("slow")] == 1


def test_queries_float32_and_search_only_split(tmp_path):
    queries = pl.DataFrame({"query_id": ["q1", "q2"], "text": ["fast digit", "black screen"]})
    qrels = pl.DataFrame({"query_id": ["q1", "q2"], "video_id": ["v201", "v200"], "relevance": [1, 1]})
    empty = pl.DataFrame(schema={"caption_id": pl.String, "video_id": pl.String, "text": pl.String})
    test = make_split("test", [200, 201, 202], captions=empty, queries=queries, qrels=qrels)
    manifest = write_store(config(tmp_path, "store.feature_dtype=float32"), make_splits(test=test), "unit-test")
    store = open_store(str(tmp_path))
    assert manifest["query_splits"] == ["test"] and manifest["splits"]["test"]["captions"] == 0
    assert store.read_table("test", "qrels").to_pylist()[0] == {"query_id": "q1", "video_id": "v201", "relevance": 1}
    assert store.read_table("test", "queries").num_rows == 2
    frames = [f for chunk in test.video_chunks() for f in chunk.frames]
    stored = store.read_table("test", "videos").to_pylist()
    np.testing.assert_array_equal(np.array(stored[1]["frames"], dtype=np.float32), frames[1])  # exact in float32


# ---------------------------------------------------------------------------------------------- existing stores


def test_existing_store_is_refused_then_replaced_only_with_overwrite(tmp_path):
    extra = make_split("extra", [300, 301])
    first = write_store(config(tmp_path), make_splits(extra=extra), "first")
    with pytest.raises(StoreExistsError, match=r"already holds a store.*store\.overwrite=true"):
        write_store(config(tmp_path), make_splits(), "second")
    assert open_store(str(tmp_path)).manifest == first
    # bad input under overwrite=true fails before publishing: the old store stays valid
    bad = make_splits(val=make_split("val", [100, 101], frames=[np.zeros((2, FRAME_DIM)), np.zeros((2, 5))]))
    with pytest.raises(FeatureError):
        write_store(config(tmp_path, "store.overwrite=true"), bad, "bad")
    assert open_store(str(tmp_path)).manifest == first
    second = write_store(config(tmp_path, "store.overwrite=true"), make_splits(), "second")
    assert open_store(str(tmp_path)).manifest == second and second["source"] == "second"
    assert not (tmp_path / "extra").joinpath("videos").exists()  # the old store's split went with it
    assert not list(tmp_path.glob(".tmp-*"))


def test_open_store_errors(tmp_path):
    with pytest.raises(StoreError, match=r"no store at .*: run python -m jobs.prepare"):
        open_store(str(tmp_path))
    write_store(config(tmp_path), make_splits(), "unit-test")
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    (tmp_path / "manifest.json").write_text(json.dumps({**manifest, "schema_version": 99}))
    with pytest.raises(StoreError, match="schema_version 99 is not supported"):
        open_store(str(tmp_path))
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match="has no split 'nope'"):
        open_store(str(tmp_path)).read_table("nope", "videos")


# ---------------------------------------------------------------------------------------------- bad input


def _frames(numbers, bad_index, bad):
    frames = [np.ones((3, FRAME_DIM), dtype=np.float32) * n for n in numbers]
    frames[bad_index] = bad
    return frames


def _captions(numbers):
    return make_split("x", numbers).captions


def _set_row(frame, column, row, value):
    """``frame`` with ``column`` at ``row`` replaced by ``value``."""
    replaced = pl.when(pl.int_range(pl.len()) == row).then(pl.lit(value)).otherwise(pl.col(column))
    return frame.with_columns(replaced.alias(column))


TRAIN = list(range(16))
VAL = [100, 101, 102, 103]
QUERY = pl.DataFrame({"query_id": ["q"], "text": ["fast"]})


def _pair_file(tmp_path: Path) -> list[str]:
    (tmp_path / "pairs.txt").write_text("fast<->slow\nbig<->tiny\n")
    return [f"data.contradiction_file={tmp_path / 'pairs.txt'}"]


# name -> (splits, tmp_path -> extra overrides, exception class, regex the one-line message must match)
BAD_CASES = {
    "misnamed column": (
        make_splits(train=make_split("train", TRAIN, captions=_captions(TRAIN).rename({"video_id": "vid"}))), None,
        ColumnError, r"split 'train' captions: missing column 'video_id' \(has: caption_id, vid, text\)"),
    "unexpected column": (
        make_splits(val=make_split("val", [100], captions=_captions([100]).with_columns(pl.lit(1).alias("extra")))),
        None, ColumnError, r"split 'val' captions: unexpected column 'extra'"),
    "null text": (
        make_splits(train=make_split("train", TRAIN, captions=_set_row(_captions(TRAIN), "text", 7, None))), None,
        ColumnError, r"split 'train' captions row 7: 'text' is null"),
    "feature dim mismatch": (
        make_splits(val=make_split("val", VAL, frames=_frames(VAL, 3, np.zeros((3, 5))))),
        None, FeatureError, r"split 'val' video 'v103': frame_dim is 5, but earlier .* have 6"),
    "NaN feature": (
        make_splits(val=make_split("val", VAL, frames=_frames(VAL, 3, np.array([[0.0] * FRAME_DIM, [np.nan] * 6])))),
        None, FeatureError, r"split 'val' video 'v103': frame 1 holds NaN or inf"),
    "inf feature": (
        make_splits(val=make_split("val", [100], frames=_frames([100], 0, np.full((2, FRAME_DIM), np.inf)))), None,
        FeatureError, r"split 'val' video 'v100': frame 0 holds NaN or inf"),
    "float16 overflow": (
        make_splits(val=make_split("val", [100], frames=_frames([100], 0, np.full((2, FRAME_DIM), 1e6)))), None,
        FeatureError, r"video 'v100': values beyond the float16 range; set store.feature_dtype=float32"),
    "video without captions": (
        make_splits(val=make_split("val", [100, 101], captions=_captions([100]))), None,
        IdError, r"split 'val' video 'v101': the video has no captions"),
    "captions for unknown videos": (
        make_splits(val=make_split("val", [100], captions=_captions([100, 105]))), None,
        IdError, r"split 'val' captions row 2: caption 'v105#enc#0' is for unknown video 'v105'"),
    "duplicate video id": (
        make_splits(val=make_split("val", [100, 15], captions=_captions([100, 15]).with_columns(
            pl.concat_str(pl.lit("val-"), pl.col("caption_id")).alias("caption_id")))), None,
        IdError, r"split 'val' video 'v15': duplicate video id \(already in split 'train'\)"),
    "duplicate caption id": (
        make_splits(train=make_split("train", TRAIN, captions=_set_row(_captions(TRAIN), "caption_id", 5, "v0#enc#1"))),
        None, IdError, r"split 'train' captions rows 1 and 5: duplicate caption id 'v0#enc#1'"),
    "caption id in two splits": (
        make_splits(val=make_split("val", [100], captions=_set_row(_captions([100]), "caption_id", 0, "v3#enc#0"))),
        None, IdError, r"caption id 'v3#enc#0' appears in split 'train' and split 'val'"),
    "unknown concept in pair file": (
        make_splits(), _pair_file, UnknownConceptError, r"pairs.txt:2: concept 'tiny' is not in the concept bank"),
    "qrels for unknown video": (
        make_splits(test=make_split("test", [200], queries=QUERY, qrels=pl.DataFrame(
            {"query_id": ["q"], "video_id": ["v999"], "relevance": [1]}))), None,
        IdError, r"split 'test' qrels row 0: unknown video_id 'v999'"),
}  # fmt: skip


def bad_case(tmp_path: Path, name: str) -> tuple[dict, list[str], type, str]:
    """(splits, overrides, exception class, message regex) of one bad-input case."""
    splits, extra, error, pattern = BAD_CASES[name]
    return splits, extra(tmp_path) if extra else [], error, pattern


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_input_raises_one_clear_error_and_leaves_no_store(tmp_path, case):
    splits, overrides, error, pattern = bad_case(tmp_path, case)
    root = tmp_path / "store"
    with pytest.raises(error, match=pattern) as info:
        write_store(config(root, "store.shard_rows=2", *overrides), splits, "unit-test")
    assert "\n" not in str(info.value)
    assert not root.exists()  # the run created the folder, so it takes it away again
