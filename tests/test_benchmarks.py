"""The benchmarks' plumbing: statistics against hand values and oracles, the reference re-implementation
against the shipped losses, the timing helpers, the result files and their rendering, and (integration)
``python -m benchmarks.run --tiny`` end to end. Nothing here is timed."""

from __future__ import annotations

import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks import common, quality, ranking, report, scaling, stats, train_step
from benchmarks.quality_eval import contradiction_flags
from benchmarks.reference import (loop_mean, reference_likelihood, reference_triplet,
                                  reference_unlikelihood)  # fmt: skip
from ulrl.losses import likelihood_loss, triplet_loss, unlikelihood_loss
from ulrl.metrics import contradiction_rate
from ulrl.model import masked_mean

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------- stats


def _exact_sign_flip_p(diff: np.ndarray) -> float:
    """Oracle: enumerate every sign vector with itertools."""
    observed = abs(diff.mean())
    means = [abs(np.mean(np.array(signs) * diff)) for signs in itertools.product((1, -1), repeat=len(diff))]
    return float(np.mean([m >= observed - 1e-12 for m in means]))


def test_randomisation_test_small_samples_are_exact():
    assert stats.randomisation_test([1, 2, 3], [0, 0, 0]) == pytest.approx(0.25)  # only ±(1,1,1) reach 2
    assert stats.randomisation_test([1, -1], [0, 0]) == 1.0  # mean difference 0
    assert stats.randomisation_test([0.5, 0.5], [0.5, 0.5]) == 1.0
    diff = np.random.default_rng(3).normal(0.2, 1.0, 9)
    assert stats.randomisation_test(diff, np.zeros(9)) == pytest.approx(_exact_sign_flip_p(diff))


def test_randomisation_test_sampled_is_close_to_exact():
    diff = np.random.default_rng(5).normal(0.3, 1.0, 17)  # above EXACT_MAX_N: sampled
    exact = _exact_sign_flip_p(diff)
    assert stats.randomisation_test(diff, np.zeros(17), resamples=20_000) == pytest.approx(exact, abs=0.015)


def test_student_t_tail_matches_closed_forms():
    for t in (0.0, 0.7, 2.0, 9.0):
        assert stats.student_t_sf(t, 1) == pytest.approx(0.5 - math.atan(t) / math.pi, abs=1e-12)  # Cauchy
        assert stats.student_t_sf(t, 2) == pytest.approx(0.5 * (1 - t / math.sqrt(t * t + 2)), abs=1e-12)


def test_paired_t_test_hand_value_and_degenerate_cases():
    result = stats.paired_t_test([1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 0.0, 0.0])
    t = 2.5 / (math.sqrt(5 / 3) / 2)  # mean 2.5, sd √(5/3), n 4
    assert result["t"] == pytest.approx(t)
    assert result["p"] == pytest.approx(2 * stats.student_t_sf(t, 3), rel=1e-9)
    assert stats.paired_t_test([1, 2], [1, 2])["p"] == 1.0
    assert stats.paired_t_test([2, 3], [1, 2])["p"] == 0.0  # constant non-zero difference


# ---------------------------------------------------------------------------------------------- reference design


def test_reference_losses_compute_the_shipped_objective():
    generator = torch.Generator().manual_seed(0)
    logits = torch.rand(6, 10, generator=generator) * 6 - 3  # (B, K) moderate: the 1e-5 guard barely matters
    labels = (torch.rand(6, 10, generator=generator) < 0.3).float()
    labels[2] = 0.0  # a sample without positives: left out by both
    contradiction = torch.zeros(10, 10)
    contradiction[[0, 1, 3], [1, 0, 4]] = 1.0
    contradiction[4, 3] = 1.0
    assert reference_likelihood(logits, labels, 0.2) == pytest.approx(float(likelihood_loss(logits, labels, 0.2)), rel=1e-3)
    assert reference_unlikelihood(logits, labels, contradiction) == pytest.approx(
        float(unlikelihood_loss(logits, labels, contradiction)), rel=1e-3)
    video = torch.nn.functional.normalize(torch.randn(6, 8, generator=generator), dim=1)
    text = torch.nn.functional.normalize(torch.randn(6, 8, generator=generator), dim=1)
    assert reference_triplet(video, text, 0.2) == pytest.approx(float(triplet_loss(video, text, 0.2)), abs=1e-6)


def test_loop_mean_equals_masked_mean():
    x = torch.randn(4, 7, 3)
    lengths = [7, 1, 4, 2]
    mask = torch.arange(7)[None] < torch.tensor(lengths)[:, None]
    assert torch.allclose(loop_mean(x, lengths), masked_mean(x, mask), atol=1e-6)


def test_tiny_train_step_benchmark_fills_its_record():
    record = train_step.run("tiny", torch.device("cpu"))
    res, shape = record.results, train_step.TINY
    # the decoder alone: (B, D) @ (D, K) for both sides, forward + 2 backward matmuls (input and weight grads)
    decoder = 3 * 2 * 2 * shape.batch * shape.model.embed_dim * shape.concepts
    assert res["step_flops"] > decoder
    assert res["gemm_flops"] == 2 * res["gemm_side"] ** 3
    assert set(res["seconds"]) == {"ours", "reference", "gemm", "recurrence"}
    assert res["speedup_vs_reference"]["ratio_of_medians"] > 0
    assert record.goals[0].goal == "train step vs reference design"


# ---------------------------------------------------------------------------------------------- timing, files


def test_interleaved_alternates_case_order():
    calls: list[str] = []
    samples = common.interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=3, warmup=1)
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"]
    assert [len(v) for v in samples.values()] == [3, 3]


def test_speedup_and_summary_hand_values():
    ratio = common.speedup([4.0, 6.0, 9.0], [2.0, 2.0, 3.0])
    assert ratio["ratio_of_medians"] == pytest.approx(3.0)
    assert ratio["median_paired_ratio"] == pytest.approx(3.0)
    assert (ratio["min_paired_ratio"], ratio["max_paired_ratio"]) == (2.0, 3.0)
    assert common.summary([3.0, 1.0, 2.0])["median"] == 2.0


def test_write_record_holds_machine_versions_and_no_absolute_repo_path(tmp_path):
    record = common.Record("demo", "tiny", {"n": 1}, results={"value": np.float64(1.5)},
                           goals=[common.Goal("g", "> 1", 1.5, True)])
    data = json.loads(common.write_record(record, tmp_path).read_text())
    assert data["machine"]["cores"] == os.cpu_count() and "cpu_model" in data["machine"]
    assert data["versions"]["torch"] == torch.__version__
    assert data["results"]["value"] == 1.5 and data["goals"][0]["met"] is True
    assert str(REPO) not in json.dumps(data)


def test_scaling_schedule_and_efficiency_hand_values():
    assert scaling.schedule((1, 2), 3) == [1, 2, 2, 1, 1, 2]
    runs = [{"workers": n, "dataset": "streaming", "samples_per_s": rate}
            for n, rate in ((1, 100.0), (2, 150.0), (2, 170.0), (1, 80.0), (4, 300.0))]
    result = scaling.efficiencies(runs, (1, 2, 4), "streaming")  # medians: 90, 160, 300
    assert result["2"]["speedup"] == pytest.approx(160 / 90)
    assert result["2"]["efficiency"] == pytest.approx(160 / (2 * 90))
    assert result["4"]["efficiency"] == pytest.approx(300 / (4 * 90))


# ---------------------------------------------------------------------------------------------- ranking


def test_fused_ranking_at_theta_zero_ranks_like_the_bare_embedding_case():
    from ulrl.search import rank

    queries, collection = ranking.synthetic_index(5, 200, 16, 12)
    cases = ranking.case_functions(queries, collection, top=20)
    bare = cases["bare_embedding"]()
    fused_indices, _ = rank(queries, collection, 0.0, 20)
    assert np.array_equal(fused_indices, bare.indices.numpy())
    concat = cases["bare"]()  # one matmul over [emb | concepts] = emb·emb + c_q·ŷ'
    naive = queries.embedding[2] @ collection.embedding.T + queries.concept_weights[2] @ collection.concept_vectors.T
    assert torch.allclose(concat.values[2], naive.topk(20).values, atol=1e-5)


def test_ranking_benchmark_in_process_and_rendered(tmp_path):
    record = ranking.run("tiny", in_process=True)
    result = record.results["per_videos"]["300"]
    assert set(result["memory_mib"]) == set(ranking.CASES)
    assert result["fused_vs_bare"]["ratio_of_medians"] > 0
    common.write_record(record, tmp_path)
    common.write_record(train_step.run("tiny", torch.device("cpu")), tmp_path)
    text = report.render(tmp_path)
    assert "### Goals" in text and "8 × 300" in text and "speedup vs reference" in text


def test_update_doc_keeps_the_prose_around_the_generated_block(tmp_path):
    doc = tmp_path / "bench.md"
    doc.write_text(f"# Title\n\nprose before\n\n{report.BEGIN}\nold table\n{report.END}\n\nprose after\n")
    report.update_doc("new table", doc)
    text = doc.read_text()
    assert "old table" not in text and "new table" in text
    assert text.startswith("# Title\n\nprose before") and text.endswith("prose after\n")


# ---------------------------------------------------------------------------------------------- quality


def test_contradiction_flags_agree_with_the_shipped_rate():
    probs = np.random.default_rng(0).random((50, 6)).astype(np.float32)
    contradiction = np.zeros((6, 6), np.float32)
    contradiction[0, 1] = contradiction[1, 0] = contradiction[2, 5] = contradiction[5, 2] = 1
    flags = contradiction_flags(probs, contradiction)
    assert flags.mean() == pytest.approx(contradiction_rate(probs, contradiction))
    expected = ((probs[:, 0] > 0.5) & (probs[:, 1] > 0.5)) | ((probs[:, 2] > 0.5) & (probs[:, 5] > 0.5))
    assert np.array_equal(flags, expected)


def test_best_negatives_reads_the_sweep_table(tmp_path):
    missing = quality.best_negatives(tmp_path / "none.csv")
    assert missing[0] == "neg_hard" and missing[1]["loss.ul_alpha"] == 0.1
    sweep = tmp_path / "sweep.csv"
    sweep.write_text("rank,loss.negatives.strategy,loss.ul_alpha,best_val_rsum\n"
                     "2,random,0.3,50\n1,exclusive,0.05,60\n")
    name, overrides, _ = quality.best_negatives(sweep)
    assert name == "neg_exclusive" and overrides["loss.ul_alpha"] == 0.05
    sweep.write_text("loss.negatives.strategy,best_val_rsum\nrandom,50\nhard,70\nexclusive,nan\n")
    assert quality.best_negatives(sweep)[0] == "neg_hard"  # no rank column: highest score


def _fake_run(r1: float, rate: float, query_ap: list[float], flags: list[bool]) -> dict:
    metrics = {key: 0.5 for key in quality.METRICS}
    metrics.update(t2v_r1=r1, contradiction_rate_video=rate)
    ap = {t: query_ap for t in ("0.00", "0.50", "1.00")}
    return {"metrics": metrics, "query_ap": ap, "contradiction_flags": flags}


def test_quality_aggregate_tests_and_goal():
    evaluations = {
        "likelihood": [_fake_run(10.0, 0.8, [0.2, 0.4, 0.6], [True, True]), _fake_run(12.0, 0.6, [0.2, 0.4, 0.4], [True, False])],
        "ul_0.1": [_fake_run(10.0, 0.2, [0.3, 0.5, 0.7], [False, False]), _fake_run(11.5, 0.2, [0.3, 0.5, 0.5], [False, True])],
    }
    summary = {name: quality.aggregate(runs) for name, runs in evaluations.items()}
    assert summary["likelihood"]["t2v_r1"]["mean"] == 11.0
    assert summary["likelihood"]["t2v_r1"]["std"] == pytest.approx(math.sqrt(2.0))
    rows = quality.significance(evaluations)
    assert [r["measure"] for r in rows][-1] == "contradiction (per video)" and len(rows) == 4
    assert rows[0]["mean_diff"] == pytest.approx(0.1) and rows[0]["p_randomisation"] == pytest.approx(0.25)
    goal = quality.unlikelihood_goal(summary)  # rate 0.7 → 0.2 (×0.29), R@1 11.0 → 10.75
    assert goal.met and goal.measured == pytest.approx(0.286, abs=1e-3)
    summary["ul_0.1"]["t2v_r1"]["mean"] = 9.0
    assert not quality.unlikelihood_goal(summary).met


# ---------------------------------------------------------------------------------------------- end to end


@pytest.mark.integration
@pytest.mark.timeout(1800)
def test_tiny_run_of_the_ray_benchmarks(tmp_path):
    """``python -m benchmarks.run --tiny`` for the Ray benchmarks writes complete result files."""
    out = tmp_path / "results"
    command = [sys.executable, "-m", "benchmarks.run", "--tiny", "--only", "data_feed,scaling,quality",
               "--out", str(out), "--work-dir", str(tmp_path / "work"), "--no-doc"]  # fmt: skip
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=1700)
    assert done.returncode == 0, done.stderr[-3000:]
    feed = json.loads((out / "data_feed.json").read_text())
    assert feed["results"]["rows"]["ray_data"] > 0 and 0 <= feed["results"]["training"]["wait_share"] <= 1
    scaling = json.loads((out / "scaling.json").read_text())
    assert [(r["workers"], r["dataset"]) for r in scaling["results"]["runs"]] == [
        (1, "streaming"), (1, "materialized"), (2, "streaming"), (2, "materialized")]
    for dataset in ("streaming", "materialized"):
        assert scaling["results"][dataset]["1"]["efficiency"] == 1.0 and scaling["results"][dataset]["2"]["efficiency"] > 0
    result = json.loads((out / "quality.json").read_text())
    assert set(result["results"]["variants"]) == {"likelihood", "ul_0.1"}
    assert {t["measure"] for t in result["results"]["tests"]} >= {"contradiction (per video)"}
    assert result["goals"] and "R@1" in report.render(out)
