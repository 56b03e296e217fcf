"""The moving-digits benchmark: shapes, determinism, caption sparsity and honesty, qrels, visible motion."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from ulrl.config import DigitsConfig
from ulrl.digits import (
    ATTRIBUTE_WORDS,
    FILLER,
    DigitsError,
    FrameFeaturizer,
    VideoSpec,
    image_pools,
    moving_digits,
    render_video,
    sample_specs,
)

SMALL = DigitsConfig(train_videos=300, val_videos=20, test_videos=120, min_frames=3, max_frames=7,
                     feature_dim=48, num_queries=12, seed=3)
NAMES = "zero one two three four five six seven eight nine".split()
# Written out by hand (not read from the module) so a drifting synonym table is caught.
WORDS = {
    "left": {"left", "leftward"}, "right": {"right", "rightward"},
    "upward": {"upward", "upwards", "up"}, "downward": {"downward", "downwards", "down"},
    "fast": {"fast", "quick", "quickly", "rapid", "rapidly", "speedy", "swiftly"},
    "slow": {"slow", "slowly", "sluggish", "leisurely"},
    "big": {"big", "large", "huge"}, "small": {"small", "little", "tiny"},
    "black": {"black", "dark"}, "white": {"white", "bright", "light"},
    "single": {"single", "lone", "solitary"}, "multiple": {"multiple", "pair"},
    **{name: {name} for name in NAMES},
}
FAMILIES = [("left", "right", "upward", "downward"), ("slow", "fast"), ("small", "big"), ("black", "white"),
            ("single", "multiple")]


def materialise(split):
    """video_id → (frames (T, F), true attributes)."""
    out = {}
    for chunk in split.video_chunks():
        assert chunk.true_attributes is not None and chunk.clip_features is None
        for vid, frames, attrs in zip(chunk.video_ids, chunk.frames, chunk.true_attributes):
            out[vid] = (frames, attrs)
    return out


@pytest.fixture(scope="module")
def bench():
    splits = moving_digits(SMALL)
    return splits, {name: materialise(split) for name, split in splits.items()}


def mentions(text: str) -> set[str]:
    tokens = set(text.split())
    return {value for value, words in WORDS.items() if tokens & words}


def test_synonym_table_matches_and_filler_never_says_an_attribute():
    assert {k: set(v) for k, v in ATTRIBUTE_WORDS.items()} == WORDS
    attribute_words = set().union(*WORDS.values())
    filler_words = {w for phrases, _ in FILLER.values() for phrase in phrases for w in phrase.split()}
    assert len(filler_words) >= 300
    assert not filler_words & attribute_words


def test_split_sizes_frames_and_features(bench):
    splits, videos = bench
    assert list(splits) == ["train", "val", "test"]
    for name, n in [("train", 300), ("val", 20), ("test", 120)]:
        assert len(videos[name]) == n
        captions = splits[name].captions
        assert captions.columns == ["caption_id", "video_id", "text"]
        assert captions.height == 2 * n and captions["caption_id"].n_unique() == 2 * n
        assert set(captions["video_id"]) == set(videos[name])
        for frames, attrs in videos[name].values():
            assert frames.dtype == np.float32 and frames.shape[1] == 48
            assert SMALL.min_frames <= len(frames) <= SMALL.max_frames
            assert np.isfinite(frames).all()
    lengths = {len(f) for f, _ in videos["train"].values()}
    assert lengths == set(range(3, 8))  # every length occurs
    train = np.concatenate([f for f, _ in videos["train"].values()])
    assert abs(train.mean()) < 0.3 and 0.6 < train.std() < 1.4  # standardised, not raw pixels
    assert len(np.unique(train.round(3), axis=0)) > 0.9 * len(train)  # not a lookup table of labels
    assert splits["train"].queries is None and splits["test"].queries is not None


def test_true_attributes_are_canonical(bench):
    _, videos = bench
    for _, attrs in (v for split in videos.values() for v in split.values()):
        for family in FAMILIES:
            assert sum(a in family for a in attrs) == 1
        names = [a for a in attrs if a in NAMES]
        assert len(names) == len(set(names)) == (1 if "single" in attrs else 2)
        assert len(attrs) == 5 + len(names)


def test_same_seed_same_benchmark_other_seed_differs(bench):
    splits, videos = bench
    again = moving_digits(SMALL)
    for name in splits:
        assert again[name].captions.equals(splits[name].captions)
        second = materialise(again[name])
        assert list(second) == list(videos[name])
        for vid, (frames, attrs) in second.items():
            np.testing.assert_array_equal(frames, videos[name][vid][0])
            assert attrs == videos[name][vid][1]
    assert again["test"].queries.equals(splits["test"].queries)
    assert again["test"].qrels.equals(splits["test"].qrels)
    other = moving_digits(dataclasses.replace(SMALL, seed=4, val_videos=0, test_videos=0))
    assert not other["train"].captions["text"].equals(splits["train"].captions["text"])


def test_captions_mention_some_true_attributes_and_nothing_false(bench):
    splits, videos = bench
    union: dict[str, set[str]] = {}
    said_share = []
    for name in splits:
        for vid, text in splits[name].captions.select("video_id", "text").iter_rows():
            truth = set(videos[name][vid][1])
            said = mentions(text)
            assert said, text
            assert said <= truth, (text, truth)
            union.setdefault(vid, set()).update(said)
            said_share.append(len(said) / len(truth))
    strict = np.mean([union[vid] < set(videos[name][vid][1]) for name in videos for vid in videos[name]])
    assert strict > 0.5
    # Each slot is said with probability 0.35, plus the forced one when none is drawn.
    assert 0.3 < np.mean(said_share) < 0.5


def test_vocabulary_is_rich_enough_for_a_large_concept_bank(bench):
    splits, _ = bench
    counts: dict[str, int] = {}
    for text in splits["train"].captions["text"]:
        for word in text.split():
            counts[word] = counts.get(word, 0) + 1
    assert sum(c >= 5 for c in counts.values()) >= 150  # 600 captions here; the default 6,000 give ~400


def test_canonical_attributes_survive_the_concept_pipeline(bench):
    """Every true-attribute word is its own concept (no lemma change, no stopword), reaches the bank from
    the captions, and each attribute family's antonyms become contradiction pairs."""
    from ulrl import concepts
    from ulrl.wordnet import WordNetMissingError

    try:
        concepts.concept_words("left")
    except WordNetMissingError:
        pytest.skip("WordNet is not installed")
    splits, _ = bench
    canonical = [value for family in FAMILIES for value in family] + NAMES
    assert all(concepts.concept_words(word) == [word] for word in canonical)
    bank = concepts.build_concept_bank(splits["train"].captions["text"], min_freq=5)
    assert set(canonical) <= set(bank)
    pairs = set(concepts.wordnet_antonym_pairs(bank))
    for a, b in [("left", "right"), ("upward", "downward"), ("slow", "fast"), ("small", "big"),
                 ("black", "white"), ("single", "multiple")]:
        assert (a, b) in pairs and (b, a) in pairs
    filler = {w for phrases, _ in FILLER.values() for phrase in phrases for w in phrase.split()}
    attribute_words = set().union(*WORDS.values())
    assert not any(a in attribute_words and b in filler for a, b in pairs)


def test_qrels_list_every_matching_video(bench):
    splits, videos = bench
    queries, qrels = splits["test"].queries, splits["test"].qrels
    assert queries.height == SMALL.num_queries and queries["query_id"].n_unique() == queries.height
    assert queries["text"].n_unique() == queries.height
    assert set(qrels["relevance"]) == {1}
    for query_id, text in queries.iter_rows():
        wanted = mentions(text)
        assert 2 <= len(wanted) <= 3, text
        expected = {vid for vid, (_, attrs) in videos["test"].items() if wanted <= set(attrs)}
        got = set(qrels.filter(qrels["query_id"] == query_id)["video_id"])
        assert got == expected and expected, text


def test_splits_use_disjoint_digit_images():
    pools = image_pools(SMALL.seed)
    rows = {split: set(np.concatenate(pools[split]).tolist()) for split in pools}
    assert not rows["train"] & rows["test"] and not rows["train"] & rows["val"] and not rows["val"] & rows["test"]
    assert len(rows["train"] | rows["val"] | rows["test"]) == 1797
    for split in ("train", "test"):
        for spec in sample_specs(SMALL, split, 50, pools[split]):
            assert set(spec.image_ids) <= rows[split]


def spec(**changes) -> VideoSpec:
    base = VideoSpec(video_id="v", image_ids=(5,), labels=(5,), direction="right", speed="slow", size="small",
                     background="black", num_frames=6, origins=((4, 2),))
    return dataclasses.replace(base, **changes)


def test_rendering_moves_scales_and_inverts_as_specified():
    frames = render_video(spec(), 32)
    assert frames.shape == (6, 32, 32)
    for t in range(6):
        np.testing.assert_array_equal(frames[t], np.roll(frames[0], t, axis=1))
    fast_up = render_video(spec(direction="upward", speed="fast"), 32)
    np.testing.assert_array_equal(fast_up[2], np.roll(fast_up[0], -6, axis=0))
    np.testing.assert_array_equal(frames[0], render_video(spec(direction="left"), 32)[0])
    big = render_video(spec(size="big"), 32)
    assert big[0].sum() == pytest.approx(4 * frames[0].sum())
    np.testing.assert_allclose(render_video(spec(background="white"), 32), 1.0 - frames)


def test_motion_direction_and_speed_show_in_features():
    featurizer = FrameFeaturizer(64, seed=0)
    calibration = sample_specs(SMALL, "train", 64, image_pools(0)["train"])
    noise = np.random.default_rng(9)
    featurizer.calibrate(np.concatenate([render_video(video, 32, noise) for video in calibration]))

    def features(noise_seed: int, **changes) -> np.ndarray:
        return featurizer(render_video(spec(**changes), 32, np.random.default_rng(noise_seed)))

    right, right_again = features(0), features(1)  # same video, different pixel noise
    noise = np.abs(right - right_again)[1:].mean()
    assert np.abs(right - features(0, direction="left"))[1:].mean() > 3 * noise  # measured 4.6×
    assert np.abs(right - features(0, speed="fast"))[1:].mean() > 2 * noise  # measured 3.1×
    assert np.abs(right - features(0, image_ids=(15,))).mean() > 3 * noise  # another five: 5.4×
    np.testing.assert_array_equal(right[0], features(0, direction="left")[0])  # frame 0 is shared


@pytest.mark.parametrize("key,value", [("canvas", 8), ("min_frames", 30), ("mention_prob", 1.5),
                                       ("test_videos", -1)])
def test_bad_settings_name_the_key(key, value):
    with pytest.raises(DigitsError, match=f"data.digits.{key}"):
        moving_digits(dataclasses.replace(SMALL, **{key: value}))
