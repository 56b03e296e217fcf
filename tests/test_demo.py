"""The one-command demo on the tiny config: every stage runs, and the printed figures are the MLflow run's."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from jobs.demo import MARKER, DemoError, fresh_workdir

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "jobs" / "configs" / "tiny.yaml")


def test_workdir_is_emptied_only_when_it_is_the_demos(tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(DemoError, match="not made by the demo"):
        fresh_workdir(foreign)
    assert (foreign / "notes.txt").exists()
    ours = fresh_workdir(tmp_path / "demo")
    (ours / "old-output").write_text("x")
    assert fresh_workdir(ours) == ours and sorted(p.name for p in ours.iterdir()) == [MARKER]


@pytest.mark.integration
@pytest.mark.timeout(900)
def test_demo_prints_the_figures_of_its_mlflow_run(ray_cluster, tmp_path, monkeypatch, capsys):
    from mlflow import MlflowClient

    from jobs.demo import main
    from jobs.evaluate import summary

    monkeypatch.chdir(tmp_path)
    workdir = tmp_path / "work"
    assert main(["--config", TINY, "--workdir", str(workdir), "train.epochs=2"]) == 0
    out = capsys.readouterr().out
    for step in ("1/4 prepare", "2/4 train", "3/4 evaluate", "4/4 search", "[demo] times:"):
        assert step in out, step
    run_id = re.search(r"figures of MLflow run (\w+)", out).group(1)
    logged = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}").get_run(run_id).data.metrics
    assert summary(logged) in out  # the printed table is the run's figures
    written = json.loads((workdir / "eval" / "metrics.json").read_text())["metrics"]
    assert logged == pytest.approx({k: v for k, v in written.items() if v is not None})
    for label in ("t2v R@1/5/10", "AVS mean AP: emb / concept / fused", "concept mAP", "contradiction rate"):
        assert label in out, label
    assert re.search(r"^\s+1\. digits-test-\d+\s+[\d.]+\s+\S", out, re.MULTILINE), "the sample search printed no hit"
    assert not (tmp_path / "mlruns").exists()  # artifacts stay in the demo's folder
