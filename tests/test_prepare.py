"""The prepare job end to end: tiny moving-digits into a local folder and into moto S3, and its exit codes."""

from __future__ import annotations

import json
import re
import urllib.request
from pathlib import Path

import boto3
import polars as pl
import pyarrow.parquet as pq
import pytest

import jobs.prepare
from jobs.prepare import main
from test_store import BAD_CASES, bad_case
from ulrl.store import StoreError, open_store

TINY = str(Path(__file__).parents[1] / "jobs" / "configs" / "tiny.yaml")


def run_failing(argv: list[str], capsys) -> str:
    """Run the job, expect exit status 2, return its one-line stderr message."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    return err


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny") / "store"
    return root, main(["--config", TINY, f"store.uri={root}"])


def test_tiny_store_reads_back_with_pyarrow_and_polars(tiny):
    root, manifest = tiny
    assert {s: v["videos"] for s, v in manifest["splits"].items()} == {"train": 96, "val": 32, "test": 48}
    for split, counts in manifest["splits"].items():
        videos = pq.read_table(root / split / "videos")
        captions = pl.read_parquet(root / split / "captions" / "*.parquet")
        assert videos.num_rows == counts["videos"] and captions.height == counts["captions"]
        assert sorted(videos["video_index"].to_pylist()) == list(range(counts["videos"]))
        assert captions["video_id"].is_in(videos["video_id"].to_pylist()).all()
    assert pl.read_parquet(root / "test" / "queries.parquet").height == 8
    assert manifest["query_splits"] == ["test"] and manifest["has_true_labels"] is True
    assert manifest["frame_dim"] == 32 and manifest["feature_dtype"] == "float16"
    assert json.loads((root / "manifest.json").read_text())["created_by"]["data"]["digits"]["canvas"] == 24
    assert not list(root.glob(".tmp-*"))


def test_captions_mention_only_part_of_the_true_attributes(tiny):
    store = open_store(str(tiny[0]))
    videos = store.read_table("train", "videos", ["concept_ids", "true_concept_ids"]).to_pylist()
    partial = [set(v["concept_ids"]) & set(v["true_concept_ids"]) < set(v["true_concept_ids"]) for v in videos]
    assert sum(partial) >= 0.6 * len(videos)  # captions are sparse: the labels miss true attributes
    assert all(v["true_concept_ids"] for v in videos)
    assert len(store.concepts) > 100  # filler words make a realistic bank, not just the attributes


def test_wordnet_pairs_hold_the_benchmark_antonyms(tiny):
    pairs = set(open_store(str(tiny[0])).pairs)
    for a, b in (("left", "right"), ("fast", "slow"), ("black", "white"), ("big", "small")):
        assert (a, b) in pairs and (b, a) in pairs
    assert ("upward", "downward") in pairs or ("up", "down") in pairs


def test_existing_store_exits_2_and_stays(tiny, capsys):
    root, manifest = tiny
    err = run_failing(["--config", TINY, f"store.uri={root}"], capsys)
    assert f"{root} already holds a store" in err and "store.overwrite=true" in err
    assert json.loads((root / "manifest.json").read_text()) == manifest


def test_config_and_source_errors_exit_2(tmp_path, capsys):
    assert "unknown config key 'store.urii'" in run_failing(["--config", TINY, "store.urii=x"], capsys)
    err = run_failing(["--config", TINY, f"store.uri={tmp_path}", "data.digits.canvas=8"], capsys)
    assert "data.digits.canvas" in err
    assert not (tmp_path / "manifest.json").exists()


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_input_exits_2_with_one_line(tmp_path, capsys, monkeypatch, case):
    splits, overrides, _, pattern = bad_case(tmp_path, case)
    monkeypatch.setattr(jobs.prepare, "read_source", lambda cfg: splits)  # inject the bad raw input
    root = tmp_path / "store"
    err = run_failing(["--config", TINY, f"store.uri={root}", "data.concept_min_freq=2", *overrides], capsys)
    assert re.search(pattern, err), err
    assert not (root / "manifest.json").exists() and not list(root.glob(".tmp-*"))


# ---------------------------------------------------------------------------------------------- S3 (moto)


def _keys(bucket: str, prefix: str) -> list[str]:
    listing = boto3.client("s3").list_objects_v2(Bucket=bucket, Prefix=prefix)
    return [item["Key"] for item in listing.get("Contents", [])]


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_prepare_to_s3_and_read_back(s3_bucket, capsys):
    uri = f"s3://{s3_bucket}/stores/tiny"
    manifest = main(["--config", TINY, f"store.uri={uri}", "store.shard_rows=40"])
    store = open_store(uri)
    assert store.manifest == manifest and len(manifest["splits"]["train"]["video_files"]) == 3
    for split, counts in manifest["splits"].items():
        assert store.read_table(split, "videos").num_rows == counts["videos"]
        assert store.read_table(split, "captions").num_rows == counts["captions"]
    keys = _keys(s3_bucket, "stores/tiny/")
    assert "stores/tiny/manifest.json" in keys and "stores/tiny/test/qrels.parquet" in keys
    assert not [k for k in keys if "/.tmp-" in k]
    assert "already holds a store" in run_failing(["--config", TINY, f"store.uri={uri}"], capsys)


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_unreachable_s3_endpoint_exits_2(s3_server, monkeypatch, capsys):
    from conftest import free_port

    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    err = run_failing(["--config", TINY, "store.uri=s3://nowhere/tiny"], capsys)
    assert f"store s3://nowhere/tiny: cannot reach the storage endpoint {endpoint}" in err


def _set_moto_auth(endpoint: str, after_requests: str) -> None:
    """moto checks credentials after this many requests ("inf": never, its default). Process-wide in moto."""
    request = urllib.request.Request(f"{endpoint}/moto-api/reset-auth", data=after_requests.encode(),
                                     method="POST", headers={"Content-Type": "text/plain"})  # fmt: skip
    urllib.request.urlopen(request).read()


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_wrong_s3_credentials_exit_2_and_write_nothing(s3_server, s3_bucket, monkeypatch, capsys):
    iam = boto3.client("iam")
    user = f"prepare-{s3_bucket}"
    iam.create_user(UserName=user)
    policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
    iam.put_user_policy(UserName=user, PolicyName="s3", PolicyDocument=json.dumps(policy))
    key = iam.create_access_key(UserName=user)["AccessKey"]
    uri = f"s3://{s3_bucket}/tiny"
    _set_moto_auth(s3_server, "0")
    try:
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key["SecretAccessKey"])
        with pytest.raises(StoreError, match="no store at"):  # the right keys get through to the bucket
            open_store(uri)
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAWRONGWRONGWRONG0")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
        err = run_failing(["--config", TINY, f"store.uri={uri}"], capsys)
    finally:
        _set_moto_auth(s3_server, "inf")
    assert f"store {uri}: access denied: check the AWS credentials" in err
    monkeypatch.undo()
    assert _keys(s3_bucket, "tiny/") == []


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_bad_input_on_s3_leaves_no_object(s3_bucket, tmp_path, capsys, monkeypatch):
    splits, _, _, pattern = bad_case(tmp_path, "NaN feature")  # fails after train and a val shard were staged
    monkeypatch.setattr(jobs.prepare, "read_source", lambda cfg: splits)
    uri = f"s3://{s3_bucket}/bad"
    err = run_failing(["--config", TINY, f"store.uri={uri}", "data.concept_min_freq=2", "store.shard_rows=2"], capsys)
    assert re.search(pattern, err), err
    assert _keys(s3_bucket, "bad/") == []
