"""Evaluation: hand-computed AP/xinfAP and concept figures, the index files, and ``jobs.evaluate`` / ``jobs.search``
end to end on the tiny store (real local Ray, real sqlite MLflow; integration tests run inside the namespace)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pytest

from ulrl import evaluate as ev
from ulrl import metrics
from ulrl.index import IndexMissingError, VideoIndex, read_index, write_index
from ulrl.store import Store

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "jobs" / "configs" / "tiny.yaml")


class TableStore:
    """Just what load_queries reads of a store: the manifest and whole tables."""

    uri = "memory://test"

    def __init__(self, tables: dict[str, pa.Table]):
        self.manifest, self.tables = {"query_splits": ["test"]}, tables

    def read_table(self, split: str, table: str, columns=None) -> pa.Table:
        return self.tables[table]


def query_store(qrels: list[tuple[str, str, int]]) -> TableStore:
    queries = pa.table({"query_id": ["q1", "q2"], "text": ["a four", "a seven"]})
    qids, vids, rels = zip(*qrels)
    return TableStore({"queries": queries, "qrels": pa.table({"query_id": list(qids), "video_id": list(vids),
                                                              "relevance": pa.array(rels, pa.int32())})})


VIDEOS = np.array(["v0", "v1", "v2", "v3"])


def test_ap_of_a_hand_built_ranking():
    query_set = ev.load_queries(query_store([("q1", "v0", 1), ("q1", "v3", 1), ("q1", "v1", 0), ("q2", "v3", 1)]),
                                "test", VIDEOS)  # fmt: skip
    assert query_set.judgments is None  # complete judgments: plain AP
    ranked = np.array([[2, 0, 1, 3], [1, 2, 0, 3]])
    # q1: relevant at ranks 2 and 4 → (1/2 + 2/4) / 2; q2: relevant at rank 4 → (1/4) / 1
    np.testing.assert_allclose(ev._query_ap(query_set, ranked, VIDEOS, top_n=4), [0.5, 0.25])
    # cut at 3: q1 keeps rank 2 only but still divides by its 2 relevant videos; q2 finds nothing
    np.testing.assert_allclose(ev._query_ap(query_set, ranked[:, :3], VIDEOS, top_n=3), [0.25, 0.0])


def test_sampled_qrels_use_inferred_ap():
    # v2 was pooled but not judged: one stratum, 4 pooled, 3 judged, 2 relevant → R̂ = 2·4/3.
    # ranking v2 v0 v1 v3: E[prec@2] = 1/2 + 1/2·1·(0+ε)/(0+3ε) = 2/3; E[prec@4] = 1/4 + 1/4·3·(1/2) = 5/8
    # xinfAP = (2/3 + 5/8) · 4/3 / (8/3) = 31/48
    store = query_store([("q1", "v0", 1), ("q1", "v3", 1), ("q1", "v1", 0), ("q1", "v2", -1), ("q2", "v3", 1)])
    query_set = ev.load_queries(store, "test", VIDEOS)
    assert query_set.judgments is not None
    got = ev._query_ap(query_set, np.array([[2, 0, 1, 3], [3, 0, 1, 2]]), VIDEOS, top_n=4)
    np.testing.assert_allclose(got, [31 / 48, 1.0], rtol=1e-4)


def test_qrels_naming_an_unknown_video_fail_with_the_row():
    with pytest.raises(ev.EvaluationError, match="row 1: unknown video v9"):
        ev.load_queries(query_store([("q1", "v0", 1), ("q1", "v9", 1)]), "test", VIDEOS)


def encoded(probs: list[list[float]]) -> ev.Encoded:
    probs = np.array(probs, np.float32)
    n = len(probs)
    return ev.Encoded(np.array([f"x{i}" for i in range(n)]), np.arange(n), np.zeros((n, 2), np.float32), probs)


def test_concept_figures_by_hand():
    videos = encoded([[0.9, 0.7], [0.5, 0.3], [0.7, 0.1], [0.1, 0.6]])  # (4 videos, 2 concepts)
    captions = encoded([[0.8, 0.9], [0.2, 0.9]])
    caption_labels = np.array([[1, 0], [0, 0], [0, 0], [0, 0]], np.float32)  # only v0's captions mention c0
    true_labels = np.array([[1, 0], [1, 0], [0, 0], [0, 1]], np.float32)
    contradiction = np.array([[0, 1], [1, 0]], np.float32)
    scalars, per_concept = ev.concept_report(videos, captions, caption_labels, true_labels, contradiction)
    # true, c0: v0 .9 ✓, v2 .7, v1 .5 ✓ → (1 + 2/3)/2; c1: v0 .7, v3 .6 ✓ → 1/2
    assert per_concept["true"] == pytest.approx([5 / 6, 0.5])
    # unmentioned: (v0, c0) is masked out; c0 ranks v2 .7, v1 .5 ✓ → 1/2
    assert per_concept["unmentioned"] == pytest.approx([0.5, 0.5])
    assert per_concept["caption"][0] == pytest.approx(1.0) and per_concept["caption"][1] is None  # c1 never mentioned
    assert scalars["concept_map_true"] == pytest.approx((5 / 6 + 0.5) / 2)
    assert scalars["concept_map_unmentioned"] == pytest.approx(0.5)
    assert scalars["concept_map_caption"] == pytest.approx(1.0)
    assert scalars["contradiction_rate_video"] == pytest.approx(0.25)  # only v0 decodes both (p > 0.5)
    assert scalars["contradiction_rate_caption"] == pytest.approx(0.5)


def test_scorer_thetas_always_hold_both_single_scorers():
    assert ev.scorer_thetas([0.3, 0.5, 0.3]) == [0.0, 0.3, 0.5, 1.0]
    assert ev.finite(float("nan")) is None and ev.finite(0.25) == 0.25


def local_store(root: Path) -> Store:
    return Store(str(root), pafs.LocalFileSystem(), str(root), {}, [], [], [], [])


def test_index_round_trip_replaces_parts(tmp_path):
    store = local_store(tmp_path)
    rng = np.random.default_rng(0)
    index = VideoIndex({"fingerprint": "abc", "best_theta": 0.3}, np.array([f"v{i}" for i in range(5)]),
                       rng.normal(size=(5, 3)).astype(np.float32), rng.random((5, 4)).astype(np.float32))  # fmt: skip
    assert write_index(store, "test", index, rows_per_file=2).endswith("/index/test")
    names = sorted(p.name for p in (tmp_path / "index" / "test").iterdir())
    assert names == ["index.json", "part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    back = read_index(store, "test")
    assert back.ids.tolist() == index.ids.tolist() and back.meta["fingerprint"] == "abc"
    np.testing.assert_array_equal(back.embedding, index.embedding)
    np.testing.assert_array_equal(back.probs, index.probs)
    write_index(store, "test", VideoIndex({}, index.ids[:2], index.embedding[:2], index.probs[:2]), rows_per_file=2)
    assert sorted(p.name for p in (tmp_path / "index" / "test").iterdir()) == ["index.json", "part-00000.parquet"]
    with pytest.raises(IndexMissingError, match="jobs.evaluate"):
        read_index(store, "val")


def test_evaluation_plots_are_written(tmp_path):
    from ulrl.plots import evaluation_plots

    report = {"avs": {"measure": "AP", "best_theta": 0.5, "thetas": [0.0, 0.5, 1.0],
                      "mean_by_theta": {"0.00": 0.2, "0.50": 0.3, "1.00": 0.1},
                      "per_query": {"q1": {"text": "a four", "0.00": 0.1, "0.50": 0.4, "1.00": 0.0},
                                    "q2": {"text": "a seven", "0.00": 0.3, "0.50": 0.2, "1.00": 0.2}}},
              "per_concept_ap": {"caption": {"four": 0.5, "seven": 0.25}}}  # fmt: skip
    files = evaluation_plots(tmp_path, report)
    assert [f.name for f in files] == ["avs_per_query_ap.png", "avs_theta_curve.png", "concept_ap_caption.png"]
    assert all(f.read_bytes()[:4] == b"\x89PNG" for f in files)


# ---------------------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def trained(tmp_path_factory, ray_cluster):
    """One tiny store and one short training run for the whole module: (folder, overrides)."""
    from jobs.prepare import main as prepare_main
    from ulrl.config import load_config
    from ulrl.train_loop import run_training

    root = tmp_path_factory.mktemp("evaluate")
    overrides = [f"store.uri={root / 'store'}", f"tracking.uri=sqlite:///{root / 'mlflow.db'}",
                 f"eval.output_dir={root / 'eval'}", "train.epochs=2"]  # fmt: skip
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)  # MLflow's default artifact root is ./mlruns of the process
        prepare_main(["--config", TINY, *overrides])
        run_training(load_config(TINY, overrides))
    return root, overrides


def eval_run(root: Path):
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("ulrl-moving-digits")
    runs = client.search_runs([experiment.experiment_id], "tags.`ulrl.kind` = 'evaluate'", order_by=["start_time ASC"])
    train = client.search_runs([experiment.experiment_id], "attributes.run_name = 'tiny'")
    return client, runs, train


@pytest.mark.integration
@pytest.mark.timeout(900)
def test_evaluate_job_writes_and_logs_everything(trained, monkeypatch, capsys):
    from jobs.evaluate import main

    root, overrides = trained
    monkeypatch.chdir(root)
    assert main(["--config", TINY, *overrides]) == 0
    report = json.loads((root / "eval" / "metrics.json").read_text())
    scalars = report["metrics"]
    for key in ("t2v_r1", "t2v_r5", "t2v_r10", "t2v_medr", "t2v_meanr", "t2v_map", "v2t_r1", "v2t_medr", "v2t_map",
                "avs_map_emb", "avs_map_concept", "avs_map_fused", "avs_best_theta", "concept_map_unmentioned",
                "concept_auc_true", "contradiction_rate_video", "contradiction_rate_caption"):  # fmt: skip
        assert scalars[key] is not None, key
    assert "t2v R@1/5/10" in capsys.readouterr().out

    # the run files rank as metrics.json says: recompute each query's AP from the file and the qrels
    from ulrl.store import open_store

    store = open_store(str(root / "store"))
    qrels = store.read_table("test", "qrels").to_pylist()
    relevant = {q: {r["video_id"] for r in qrels if r["query_id"] == q and r["relevance"] > 0}
                for q in report["avs"]["per_query"]}
    for theta in ("0.00", "0.30", "0.50", "1.00"):
        run = metrics.read_run(root / "eval" / f"run_theta{theta}.trec")
        assert set(run) == set(relevant) and all(len(docs) == 48 for docs in run.values())  # top_n = 48 = all
        for qid, docs in run.items():
            recomputed = metrics.average_precision(docs, relevant[qid])
            assert report["avs"]["per_query"][qid][theta] == pytest.approx(recomputed)
    assert len(list((root / "eval" / "plots").glob("*.png"))) == 5

    client, runs, train = eval_run(root)
    assert len(runs) == 1 and len(train) == 1  # the evaluation sits in the training's experiment
    run = runs[0]
    assert run.data.tags["train_run_id"] == train[0].info.run_id
    assert run.data.tags["checkpoint"] == report["model"]["checkpoint"]
    assert run.data.metrics == pytest.approx({k: v for k, v in scalars.items() if v is not None})
    logged = {a.path for a in client.list_artifacts(run.info.run_id, "evaluation")}
    assert {"evaluation/metrics.json", "evaluation/run_theta0.50.trec", "evaluation/plots"} <= logged
    version = client.get_model_version_by_alias("ulrl", "champion")
    assert version.run_id == run.info.run_id and version.tags["fingerprint"] == report["model"]["fingerprint"]
    index = json.loads((root / "store" / "index" / "test" / "index.json").read_text())
    assert index["fingerprint"] == version.tags["fingerprint"]


@pytest.mark.integration
@pytest.mark.timeout(900)
def test_registered_model_scores_the_same_and_search_ranks_as_evaluate(trained, monkeypatch, capsys):
    from jobs.evaluate import main as evaluate_main
    from jobs.search import main as search_main

    root, overrides = trained
    monkeypatch.chdir(root)
    if not (root / "eval" / "metrics.json").exists():
        assert evaluate_main(["--config", TINY, *overrides]) == 0
    first = json.loads((root / "eval" / "metrics.json").read_text())
    registered = [*overrides, f"eval.output_dir={root / 'eval-registered'}", "eval.model_uri=models:/ulrl@champion"]
    assert evaluate_main(["--config", TINY, *registered]) == 0
    second = json.loads((root / "eval-registered" / "metrics.json").read_text())
    assert second["model"]["fingerprint"] == first["model"]["fingerprint"]
    assert second["metrics"] == pytest.approx(first["metrics"])
    capsys.readouterr()

    best = f"{first['avs']['best_theta']:.2f}"
    qid, entry = next(iter(first["avs"]["per_query"].items()))
    assert search_main(["--config", TINY, "-q", entry["text"], "-k", "5", "--theta", best, "--json", *overrides]) == 0
    answer = json.loads(capsys.readouterr().out)
    hits = answer["answers"][0]["hits"]
    expected = metrics.read_run(root / "eval" / f"run_theta{best}.trec")[qid][:5]
    assert [h["video_id"] for h in hits] == expected  # one ranking code path
    assert all(" " in h["explanation"] and ("✓" in h["explanation"] or "✗" in h["explanation"]) for h in hits)
    assert answer["answers"][0]["concepts"], "the query's words should select concepts"


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_bad_inputs_exit_with_one_error_line(trained, monkeypatch, capsys):
    from jobs.evaluate import main as evaluate_main
    from jobs.search import main as search_main

    root, overrides = trained
    monkeypatch.chdir(root)
    assert evaluate_main(["--config", TINY, *overrides, "eval.split=nope"]) == 2
    assert "split 'nope'" in capsys.readouterr().err
    assert search_main(["--config", TINY, "-q", "a four", *overrides, "eval.split=val"]) == 2
    assert "no index of split 'val'" in capsys.readouterr().err


@pytest.mark.integration
@pytest.mark.timeout(900)
def test_store_and_mlflow_artifacts_on_s3(trained, s3_server, s3_bucket, monkeypatch, capsys):
    """The cluster layout: store (and so the index and MLflow artifacts) on S3, the checkpoint given explicitly."""
    import boto3

    from jobs.evaluate import main as evaluate_main
    from jobs.search import main as search_main
    from ulrl.config import load_config
    from ulrl.store import open_store, resolve_uri

    root, overrides = trained
    monkeypatch.chdir(root)
    s3, prefix = resolve_uri(f"s3://{s3_bucket}/tiny")
    local = root / "store"
    pafs.copy_files(str(local), prefix, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=s3)
    checkpoint = ev.default_checkpoint(load_config(TINY, overrides))  # the local run's best
    on_s3 = [f"store.uri=s3://{s3_bucket}/tiny", f"tracking.uri=sqlite:///{root / 's3-mlflow.db'}",
             "tracking.experiment=ulrl-s3", f"eval.output_dir={root / 'eval-s3'}", f"eval.checkpoint={checkpoint}"]
    assert evaluate_main(["--config", TINY, *on_s3]) == 0
    store = open_store(f"s3://{s3_bucket}/tiny")
    index = read_index(store, "test")
    assert len(index.ids) == 48 and index.meta["checkpoint"] == checkpoint
    listing = boto3.client("s3", endpoint_url=s3_server).list_objects_v2(Bucket=s3_bucket, Prefix="tiny/mlflow/")
    keys = [entry["Key"] for entry in listing["Contents"]]
    assert any(k.endswith("artifacts/bundle/model.pt") for k in keys)  # the registered model lives on S3
    assert any(k.endswith("evaluation/metrics.json") for k in keys)
    capsys.readouterr()
    assert search_main(["--config", TINY, "-q", "a big digit", "-k", "3", "--json", *on_s3]) == 0
    assert len(json.loads(capsys.readouterr().out)["answers"][0]["hits"]) == 3
