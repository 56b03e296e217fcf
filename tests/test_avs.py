"""AVS collections in the BigFile layout, written by the test, read by ulrl.avs and imported by jobs.prepare."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from jobs.prepare import main
from ulrl.avs import AvsFormatError, open_bigfile, read_avs, read_collection
from ulrl.config import AvsConfig
from ulrl.store import open_store

TINY = str(Path(__file__).parents[1] / "jobs" / "configs" / "tiny.yaml")
WORDS = ("fast", "slow", "big", "small", "black", "white")
RGB_DIM, FLOW_DIM, MOTION_DIM = 4, 3, 2


def write_bigfile(folder: Path, ids: list[str], matrix: np.ndarray) -> None:
    """``shape.txt``, ``id.txt`` (one line, space-separated) and ``feature.bin`` (float32 rows)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "shape.txt").write_text(f"{len(ids)} {matrix.shape[1]}")
    (folder / "id.txt").write_text(" ".join(ids))
    matrix.astype(np.float32).tofile(folder / "feature.bin")


def frame_features(frame_id: str, dim: int, offset: float) -> np.ndarray:
    """A frame's feature row, recognisable from its id (video number, frame number) — the test's oracle."""
    video, frame = (int(part) for part in frame_id.removeprefix("video").split("_"))
    return offset + video + frame / 100 + np.arange(dim) / 1000


def write_collection(root: Path, name: str, numbers: list[int], captions: bool = True) -> dict[str, list[str]]:
    """Videos ``video<n>`` with 2 + n % 3 frames; rgb and flow frame features (rows shuffled differently),
    motion clip features, and two captions per video. Returns video2frames."""
    video2frames = {f"video{n}": [f"video{n}_{k}" for k in range(2 + n % 3)] for n in numbers}
    frame_ids = [f for frames in video2frames.values() for f in frames]
    features = root / name / "FeatureData"
    for feature, dim, offset, order in (("rgb", RGB_DIM, 0.0, frame_ids), ("flow", FLOW_DIM, 0.5, frame_ids[::-1])):
        write_bigfile(features / feature, order, np.stack([frame_features(f, dim, offset) for f in order]))
    (features / "rgb" / "video2frames.txt").write_text(repr(video2frames))
    write_bigfile(features / "motion", list(video2frames)[::-1],
                  np.stack([np.full(MOTION_DIM, float(n)) for n in numbers[::-1]]))
    if captions:
        lines = [f"video{n}#enc#{k} a {WORDS[(n + k) % 6]} digit on a {WORDS[(n + 2) % 6]} screen"
                 for n in numbers for k in range(2)]  # fmt: skip
        (root / name / "TextData").mkdir(parents=True)
        (root / name / "TextData" / f"{name}.caption.txt").write_text("\n".join(lines) + "\n")
    return video2frames


@pytest.fixture
def collection(tmp_path) -> Path:
    """train (12 videos), val (4), and a search-only test collection (5) with TREC topics and qrels."""
    root = tmp_path / "avs"
    write_collection(root, "trainset", list(range(12)))
    write_collection(root, "valset", list(range(20, 24)))
    write_collection(root, "testset", list(range(30, 35)), captions=False)
    (root / "topics.txt").write_text("1001 a fast digit\n1002 a digit on a black screen\n")
    (root / "qrels.txt").write_text("1001 0 video30 1\n1001 0 video31 0\n1002 0 video34 1\n")
    return root


def avs_overrides(root: Path, store: Path) -> list[str]:
    return [
        f"store.uri={store}", "data.source=avs", f"data.avs.root={root}", "data.avs.train_collection=trainset",
        "data.avs.val_collection=valset", "data.avs.test_collection=testset", "data.avs.features=[rgb, flow]",
        "data.avs.clip_features=[motion]", f"data.avs.queries={root / 'topics.txt'}",
        f"data.avs.qrels={root / 'qrels.txt'}", "data.concept_min_freq=2", "store.feature_dtype=float32",
    ]  # fmt: skip


def avs_config(root: Path) -> AvsConfig:
    return AvsConfig(root=str(root), train_collection="trainset", val_collection="valset", features=["rgb", "flow"],
                     clip_features=["motion"])  # fmt: skip


def test_reader_concatenates_features_per_frame_and_streams_chunks(collection):
    split = read_collection(collection, "trainset", "train", ["rgb", "flow"], ["motion"], chunk_videos=5)
    chunks = list(split.video_chunks())
    assert [len(c.video_ids) for c in chunks] == [5, 5, 2]
    assert split.captions.height == 24 and split.captions["caption_id"][1] == "video0#enc#1"
    assert split.captions["text"][0] == "a fast digit on a big screen"
    video_ids = [v for c in chunks for v in c.video_ids]
    frames = [f for c in chunks for f in c.frames]
    assert video_ids == [f"video{n}" for n in range(12)]
    for n, video_frames in enumerate(frames):
        expected = np.stack([np.concatenate([frame_features(f"video{n}_{k}", RGB_DIM, 0.0),
                                             frame_features(f"video{n}_{k}", FLOW_DIM, 0.5)])
                             for k in range(2 + n % 3)])  # fmt: skip
        np.testing.assert_allclose(video_frames, expected, rtol=1e-6)  # (T, RGB_DIM + FLOW_DIM)
    np.testing.assert_array_equal(np.concatenate([c.clip_features for c in chunks])[:, 0], np.arange(12))
    assert isinstance(open_bigfile(collection / "trainset" / "FeatureData" / "rgb").matrix, np.memmap)


def test_prepare_imports_the_collection(collection, tmp_path, capsys):
    manifest = main(["--config", TINY, *avs_overrides(collection, tmp_path / "store")])
    assert manifest["source"] == "avs"
    assert (manifest["frame_dim"], manifest["clip_dim"]) == (RGB_DIM + FLOW_DIM, MOTION_DIM)
    assert {s: (v["videos"], v["captions"]) for s, v in manifest["splits"].items()} == {
        "train": (12, 24), "val": (4, 8), "test": (5, 0)}
    assert manifest["query_splits"] == ["test"] and manifest["has_true_labels"] is False
    store = open_store(str(tmp_path / "store"))
    videos = store.read_table("val", "videos").to_pylist()
    assert [v["num_frames"] for v in videos] == [2 + n % 3 for n in range(20, 24)]
    np.testing.assert_allclose(videos[1]["frames"][0][:RGB_DIM], frame_features("video21_0", RGB_DIM, 0.0), rtol=1e-6)
    assert [v["clip_features"] for v in videos] == [[float(n)] * MOTION_DIM for n in range(20, 24)]
    assert store.read_table("test", "qrels").num_rows == 3
    assert ("fast", "slow") in store.pairs
    assert "[prepare] done" in capsys.readouterr().out


def test_read_avs_skips_empty_collections_and_checks_query_files(collection):
    assert list(read_avs(avs_config(collection))) == ["train", "val"]
    topics = str(collection / "topics.txt")
    with pytest.raises(AvsFormatError, match="data.avs.queries/qrels need data.avs.test_collection"):
        read_avs(replace(avs_config(collection), queries=topics))
    with pytest.raises(AvsFormatError, match=r"data\.avs\.qrels: .*missing\.txt not found"):
        read_avs(replace(avs_config(collection), test_collection="testset", queries=topics,
                         qrels=str(collection / "missing.txt")))  # fmt: skip


# ---------------------------------------------------------------------------------------------- bad files


def _truncate(root: Path) -> str:
    path = root / "valset" / "FeatureData" / "flow" / "feature.bin"
    path.write_bytes(path.read_bytes()[:-5])
    return rf"flow/feature\.bin: \d+ bytes, expected rows\*dim\*4 = 13\*3\*4 = 156 \(truncated\)"


def _nan_row(root: Path) -> str:
    path = root / "valset" / "FeatureData" / "rgb" / "feature.bin"
    matrix = np.fromfile(path, dtype=np.float32).reshape(-1, RGB_DIM)
    matrix[4, 2] = np.nan
    matrix.tofile(path)
    return r"valset/FeatureData/rgb/feature\.bin: row 4 \(id 'video21_0'\) holds NaN or inf"


def _other_frame_ids(root: Path) -> str:
    folder = root / "valset" / "FeatureData" / "flow"
    ids = (folder / "id.txt").read_text().split()
    (folder / "id.txt").write_text(" ".join(["video99_0", *ids[1:]]))
    return r"flow/id\.txt: frame ids differ from .*rgb/id\.txt .*must share their frame ids"


def _id_count(root: Path) -> str:
    (root / "trainset" / "FeatureData" / "rgb" / "shape.txt").write_text("99 4")
    return r"trainset/FeatureData/rgb/id\.txt: \d+ ids but shape\.txt says 99 rows"


def _unknown_video(root: Path) -> str:
    with (root / "valset" / "TextData" / "valset.caption.txt").open("a") as handle:
        handle.write("video77#enc#0 a fast digit\n")
    return r"valset\.caption\.txt: caption 'video77#enc#0' is for video 'video77', which has no frames"


def _duplicate_caption(root: Path) -> str:
    with (root / "trainset" / "TextData" / "trainset.caption.txt").open("a") as handle:
        handle.write("video3#enc#1 a slow digit\n")
    return r"trainset\.caption\.txt:25: duplicate caption id 'video3#enc#1' \(first on line 8\)"


def _malformed_caption(root: Path) -> str:
    with (root / "trainset" / "TextData" / "trainset.caption.txt").open("a") as handle:
        handle.write("video3-enc-1 a slow digit\n")
    return r"trainset\.caption\.txt:25: expected '<video_id>#enc#<n> <caption>'"


def _code_in_video2frames(root: Path) -> str:
    marker = root / "pwned"
    (root / "trainset" / "FeatureData" / "rgb" / "video2frames.txt").write_text(
        f"__import__('pathlib').Path({str(marker)!r}).touch()")
    return r"rgb/video2frames\.txt: not a Python dict literal"


def _pair_file(root: Path) -> str:
    (root / "pairs.txt").write_text("// curated\nfast<->slow\nwhite<->purple\n")
    return r"pairs\.txt:3: concept 'purple' is not in the concept bank"


def _bad_qrels(root: Path) -> str:
    (root / "qrels.txt").write_text("1001 0 video30 1\n1001 video31\n")
    return r"qrels\.txt:2: expected '<query_id> 0 <video_id> <relevance>'"


BAD_FILES = {f.__name__.strip("_"): f for f in (_truncate, _nan_row, _other_frame_ids, _id_count, _unknown_video,
                                               _duplicate_caption, _malformed_caption, _code_in_video2frames,
                                               _pair_file, _bad_qrels)}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_collection_exits_2_naming_the_file_and_leaves_no_store(collection, tmp_path, capsys, case):
    pattern = BAD_FILES[case](collection)
    store = tmp_path / "store"
    overrides = avs_overrides(collection, store) + [f"data.contradiction_file={collection / 'pairs.txt'}"] * (
        case == "pair_file")
    with pytest.raises(SystemExit) as info:
        main(["--config", TINY, *overrides])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    assert re.search(pattern, err), err
    assert not (store / "manifest.json").exists() and not list(store.glob(".tmp-*"))
    assert not (collection / "pwned").exists()
