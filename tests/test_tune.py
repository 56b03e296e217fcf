"""A Ray Tune sweep end to end on real local Ray, a real moto S3 server (runs, checkpoints, Tune state) and real
sqlite MLflow: two trials on ``jobs/configs/tiny.yaml`` (one worker, one epoch each), nested MLflow runs, the
result table and plot on the parent run, the best trial evaluated on test and registered; then a re-run of the
same sweep name restores it instead of starting over.

Run inside a loopback-only namespace (``make test``).
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest

from jobs.prepare import main as prepare_main
from jobs.tune import main as tune_main
from jobs.tune import run
from ulrl.config import load_config

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "jobs" / "configs" / "tiny.yaml")
SPACE = "tune.space={loss.ul_alpha: {loguniform: [0.001, 1.0]}, loss.negatives.strategy: {grid: [antonym, random]}}"


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory):
    folder = tmp_path_factory.mktemp("stores") / "tiny"
    prepare_main(["--config", TINY, f"store.uri={folder}"])
    return str(folder)


def sweep_config(store: str, bucket: str, tmp_path: Path, *overrides: str):
    return load_config(TINY, [
        f"store.uri={store}", f"train.storage_uri=s3://{bucket}/runs", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
        f"eval.output_dir={tmp_path}/eval", "train.num_workers=1", "train.epochs=1", "tune.num_samples=1",
        "tune.name=tiny-sweep", SPACE, *overrides,
    ])  # fmt: skip


def runs_with(client, cfg, filter_string: str) -> list:
    experiment = client.get_experiment_by_name("ulrl-moving-digits").experiment_id
    return client.search_runs([experiment], filter_string=filter_string)


@pytest.mark.timeout(900)
def test_sweep_nests_trial_runs_tabulates_and_registers_the_best(ray_cluster, tiny_store, s3_bucket, tmp_path):
    from mlflow import MlflowClient

    cfg = sweep_config(tiny_store, s3_bucket, tmp_path)
    report = run(cfg)
    client = MlflowClient(tracking_uri=cfg.tracking.uri)

    # one parent run, finished, with two children whose sampled values differ
    (parent,) = runs_with(client, cfg, "tags.`ulrl.role` = 'sweep'")
    assert parent.info.status == "FINISHED" and parent.info.run_id == report.sweep.parent_run_id
    children = runs_with(client, cfg, f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(children) == 2
    params = [child.data.params for child in children]
    assert {p["loss.negatives.strategy"] for p in params} == {"antonym", "random"}
    assert params[0]["loss.ul_alpha"] != params[1]["loss.ul_alpha"]
    assert all(0.001 <= float(p["loss.ul_alpha"]) <= 1.0 and p["train.epochs"] == "1" for p in params)
    assert {c.info.run_name for c in children} == {f"tiny-sweep-{row['trial_id']}" for row in report.sweep.rows}

    # the table agrees with what each trial logged; rows are ranked by the best val_rsum
    rows = {row["trial_id"]: row for row in report.sweep.rows}
    for child in children:
        row = rows[child.data.tags["ulrl.trial_id"]]
        logged = [m.value for m in client.get_metric_history(child.info.run_id, "val_rsum")]
        assert row["best_val_rsum"] == pytest.approx(max(logged))
        assert row["mlflow_run_id"] == child.info.run_id
        assert row["loss.ul_alpha"] == pytest.approx(float(child.data.params["loss.ul_alpha"]))
        assert row["checkpoint"].startswith(f"s3://{s3_bucket}/runs/tiny-sweep-{row['trial_id']}/")
        assert 0.0 <= row["val_contradiction_rate_video"] <= 1.0 and 0.0 <= row["val_concept_map_caption"] <= 1.0
    ranked = report.sweep.rows
    assert [r["rank"] for r in ranked] == [1, 2] and ranked[0]["best_val_rsum"] >= ranked[1]["best_val_rsum"]

    csv_path, md_path, png_path = report.files
    with csv_path.open() as stream:
        table = list(csv.DictReader(stream))
    assert [r["trial_id"] for r in table] == [r["trial_id"] for r in ranked]
    expected = {"loss.ul_alpha", "loss.negatives.strategy", "best_val_rsum", "val_contradiction_rate_video"}
    assert expected <= set(table[0])
    assert md_path.read_text().count("\n") == 4 and png_path.read_bytes()[:4] == b"\x89PNG"
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "sweep")}
    assert artifacts == {"sweep/sweep.csv", "sweep/sweep.md", "sweep/sweep.png"}

    # the best trial, evaluated on test, is registered and (first version) holds the champion alias
    evaluation = report.evaluation
    assert evaluation.report["split"] == "test" and evaluation.registration.promoted
    champion = client.get_model_version_by_alias("ulrl", "champion")
    assert str(champion.version) == evaluation.registration.version
    assert champion.tags["checkpoint"] == ranked[0]["checkpoint"]
    assert parent.data.tags["best_trial_id"] == ranked[0]["trial_id"]
    assert parent.data.metrics["best_test_rsum"] == pytest.approx(evaluation.report["metrics"]["rsum"])

    # same name again: restored (no new trials, same parent); the re-registered equal model does not take the alias
    again = run(sweep_config(tiny_store, s3_bucket, tmp_path, "tune.eval_trials=false"))
    assert again.sweep.restored and again.sweep.parent_run_id == parent.info.run_id
    assert len(runs_with(client, cfg, f"tags.mlflow.parentRunId = '{parent.info.run_id}'")) == 2
    assert [r["trial_id"] for r in again.sweep.rows] == [r["trial_id"] for r in ranked]
    assert again.evaluation.registration.version != str(champion.version) and not again.evaluation.registration.promoted
    assert client.get_model_version_by_alias("ulrl", "champion").version == champion.version  # unchanged
    assert not math.isnan(again.sweep.rows[0]["best_val_rsum"])


@pytest.mark.timeout(120)
def test_bad_space_fails_before_anything_starts(tiny_store, tmp_path, capsys):
    overrides = [f"store.uri={tiny_store}", f"train.storage_uri={tmp_path}/runs",
                 f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", "tune.space={loss.ul_alfa: {uniform: [0.1, 0.2]}}"]
    assert tune_main(["--config", TINY, *overrides]) == 2
    assert capsys.readouterr().err.strip() == ("error: tune.space.loss.ul_alfa: unknown config key 'loss.ul_alfa'")
    assert tune_main(["--config", TINY, *overrides[:3], "tune.search_alg=optuna",
                      "tune.space={loss.negatives.k: {grid: [5, 20]}}"]) == 2  # fmt: skip
    assert "grid is not supported with tune.search_alg=optuna" in capsys.readouterr().err
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "runs").exists()  # nothing started
