"""Sweep parsing and bookkeeping without a cluster: search space, concurrency, ASHA, result rows, table files."""

from __future__ import annotations

import csv
import math
from types import SimpleNamespace

import pandas as pd
import pytest

from ulrl.config import ConfigError, JobConfig, apply_overrides
from ulrl.tune import (Dimension, SpaceError, checkpoint_location, max_concurrent_trials, param_space, parse_dimension,
                       parse_space, ranked_rows, scheduler, search_algorithm, trial_row, trial_run_name)  # fmt: skip

SPACE = {
    "loss.ul_alpha": {"loguniform": [0.001, 1.0]},
    "loss.lam": {"uniform": [0.1, 0.5]},
    "loss.negatives.strategy": {"choice": ["antonym", "random", "hard", "exclusive", "none"]},
    "loss.negatives.k": {"grid": [5, 20]},
}


def with_space(space, **tune) -> JobConfig:
    return apply_overrides(JobConfig(), {"tune.space": space, **{f"tune.{k}": v for k, v in tune.items()}})


# ------------------------------------------------------------------------------------------ space


def test_parse_space_reads_every_kind():
    dims = parse_space(with_space(SPACE))
    assert [(d.key, d.kind, d.values) for d in dims] == [
        ("loss.ul_alpha", "loguniform", (0.001, 1.0)),
        ("loss.lam", "uniform", (0.1, 0.5)),
        ("loss.negatives.strategy", "choice", ("antonym", "random", "hard", "exclusive", "none")),
        ("loss.negatives.k", "grid", (5, 20)),
    ]


def test_sampled_values_stay_in_range_and_apply_cleanly():
    space = param_space(parse_space(with_space(SPACE)))
    assert space["loss.negatives.k"] == {"grid_search": [5, 20]}
    for _ in range(50):
        alpha, lam = space["loss.ul_alpha"].sample(), space["loss.lam"].sample()
        strategy = space["loss.negatives.strategy"].sample()
        assert 0.001 <= alpha <= 1.0 and 0.1 <= lam <= 0.5
        sampled = {"loss.ul_alpha": alpha, "loss.lam": lam, "loss.negatives.strategy": strategy}
        cfg = apply_overrides(JobConfig(), sampled)
        assert (cfg.loss.ul_alpha, cfg.loss.lam, cfg.loss.negatives.strategy) == (alpha, lam, strategy)
    # log-uniform: about half of the samples fall below the geometric midpoint sqrt(0.001 * 1) ≈ 0.0316
    below = sum(space["loss.ul_alpha"].sample() < math.sqrt(0.001) for _ in range(400))
    assert 140 < below < 260


@pytest.mark.parametrize(
    ("space", "message"),
    [
        ({"loss.ul_alphaa": {"uniform": [0.1, 0.2]}}, "tune.space.loss.ul_alphaa: unknown config key 'loss.ul_alphaa'"),
        ({"nope.lam": {"choice": [1]}}, "tune.space.nope.lam: unknown config key"),
        ({"loss": {"choice": [1]}}, "tune.space.loss: loss: expected a mapping"),
        ({"loss.lam": {"uniform": [0.5, 1.5]}}, "tune.space.loss.lam: loss.lam: must lie in [0, 1]"),
        ({"loss.negatives.strategy": {"choice": ["antonym", "antonyms"]}}, "'antonyms' is not one of"),
        ({"loss.negatives.k": {"uniform": [5, 20]}}, "tune.space.loss.negatives.k: loss.negatives.k: expected int"),
        ({"loss.lam": {"normal": [0.1, 0.2]}}, "tune.space.loss.lam: expected one of {loguniform|uniform|choice|grid"),
        ({"loss.lam": 0.3}, "tune.space.loss.lam: expected one of"),
        ({"loss.lam": {"uniform": [0.1, 0.2], "choice": [0.1]}}, "tune.space.loss.lam: expected one of"),
        ({"loss.lam": {"uniform": [0.3, 0.2]}}, "low < high"),
        ({"loss.lam": {"uniform": [0.3]}}, "low < high"),
        ({"loss.lam": {"uniform": ["a", "b"]}}, "low < high"),
        ({"loss.ul_alpha": {"loguniform": [0.0, 1.0]}}, "loguniform needs low > 0"),
        ({"loss.lam": {"grid": []}}, "grid needs a non-empty list"),
        ({"tune.num_samples": {"grid": [1, 2]}}, "tune.space.tune.num_samples: sweep settings cannot be swept"),
        ({}, "tune.space: empty"),
    ],
)
def test_bad_space_is_an_error_naming_the_key(space, message):
    with pytest.raises(SpaceError) as err:
        parse_space(with_space(space))
    assert message in str(err.value)
    assert isinstance(err.value, ConfigError)


@pytest.mark.parametrize("name", ["", "a b", "x'y", "../up", "-lead"])
def test_sweep_name_must_be_a_plain_word(name):
    with pytest.raises(ConfigError, match="tune.name"):
        parse_space(with_space(SPACE, name=name))
    assert parse_space(with_space(SPACE, name="digits-sweep_2.1"))


def test_probes_are_range_ends_as_floats_or_every_value():
    assert Dimension("a", "uniform", (1, 3)).probes() == [1.0, 3.0]
    assert all(isinstance(v, float) for v in Dimension("a", "uniform", (1, 3)).probes())
    assert Dimension("a", "grid", (5, 20)).probes() == [5, 20]


def test_parse_dimension_keeps_values():
    assert parse_dimension("loss.lam", {"choice": [0.1, 0.3]}) == Dimension("loss.lam", "choice", (0.1, 0.3))


# ------------------------------------------------------------------------------------------ search / schedule


def test_optuna_rejects_grid_keys():
    with pytest.raises(SpaceError, match=r"tune.space.loss.negatives.k: grid is not supported with .*optuna"):
        parse_space(with_space(SPACE, search_alg="optuna"))
    space = {k: v for k, v in SPACE.items() if k != "loss.negatives.k"}
    assert len(parse_space(with_space(space, search_alg="optuna"))) == 3


def test_search_algorithms_carry_the_concurrency_limit():
    random = search_algorithm(with_space(SPACE), concurrency=3)
    assert type(random).__name__ == "BasicVariantGenerator" and random.max_concurrent == 3
    limited = search_algorithm(with_space({"loss.lam": {"uniform": [0.1, 0.5]}}, search_alg="optuna"), concurrency=2)
    assert type(limited).__name__ == "ConcurrencyLimiter" and limited.max_concurrent == 2
    assert type(limited.searcher).__name__ == "OptunaSearch"
    unlimited = search_algorithm(with_space({"loss.lam": {"uniform": [0.1, 0.5]}}, search_alg="optuna"))
    assert type(unlimited).__name__ == "OptunaSearch"


def test_asha_counts_epochs_and_clamps_grace_to_max_epochs():
    cfg = apply_overrides(with_space(SPACE, grace_period=3), {"train.epochs": 6})
    asha = scheduler(cfg)
    assert (asha._time_attr, asha._max_t) == ("epoch", 6)
    assert [bracket._rungs[-1][0] for bracket in asha._brackets] == [3]  # lowest rung = grace period
    assert scheduler(apply_overrides(cfg, {"train.epochs": 2}))._brackets[0]._rungs[-1][0] == 2
    assert scheduler(apply_overrides(cfg, {"tune.asha": False})) is None
    with pytest.raises(ConfigError, match="tune.grace_period"):
        parse_space(apply_overrides(cfg, {"tune.grace_period": 0}))


@pytest.mark.parametrize(
    ("overrides", "cluster", "expected"),
    [
        ({}, {"CPU": 4.0}, 2),  # (4 − 1) / (2 × 0.5 + 0.01) = 2.97
        ({"train.num_workers": 1}, {"CPU": 4.0}, 5),  # 3 / 0.51 = 5.9
        ({"train.num_workers": 1, "tune.driver_cpus": 0.5}, {"CPU": 4.0}, 3),  # 3 / 1.0 exactly
        ({}, {"CPU": 1.5}, 1),  # nothing fits: still 1 (Tune queues it; run_training reports the shortage)
        ({"train.use_gpu": True, "train.num_workers": 2}, {"CPU": 32.0, "GPU": 5.0}, 2),  # GPUs limit: 5 // 2
        ({"tune.max_concurrent_trials": 7}, {"CPU": 2.0}, 7),  # explicit wins
    ],
)
def test_max_concurrent_trials(overrides, cluster, expected):
    assert max_concurrent_trials(apply_overrides(JobConfig(), overrides), cluster) == expected


# ------------------------------------------------------------------------------------------ rows


def fake_result(trial_id, config, history, error=None):
    """What ``trial_row`` reads of a Tune ``Result``: its config, last metrics, report history, error."""
    frame = pd.DataFrame(history) if history else None
    metrics = {"trial_id": trial_id, "time_total_s": 61.5} if history else {}
    return SimpleNamespace(config=config, metrics=metrics, metrics_dataframe=frame,
                           error=error, path=f"/x/run_trial_{trial_id}_0_a=1")  # fmt: skip


def test_trial_row_takes_the_best_report():
    dims = [Dimension("loss.ul_alpha", "loguniform", (0.001, 1.0))]
    history = [
        {"epoch": 1, "val_rsum": 10.0, "val_concept_recall": 0.1, "checkpoint_path": "b/runs/s-1/epoch_0001"},
        {"epoch": 2, "val_rsum": 30.0, "val_concept_recall": 0.3, "checkpoint_path": "b/runs/s-1/epoch_0002"},
        {"epoch": 3, "val_rsum": 20.0, "val_concept_recall": 0.2, "checkpoint_path": "b/runs/s-1/epoch_0003"},
    ]
    row = trial_row(fake_result("t1", {"loss.ul_alpha": 0.05}, history), dims, "s3://b/store")
    assert row == {"trial_id": "t1", "loss.ul_alpha": 0.05, "status": "TERMINATED", "seconds": 61.5, "epochs": 3,
                   "best_val_rsum": 30.0,
                   "best_epoch": 2, "best_val_concept_recall": 0.3, "checkpoint": "s3://b/runs/s-1/epoch_0002"}


def test_trial_row_of_a_trial_that_never_reported():
    row = trial_row(fake_result("t9", {"loss.lam": 0.2}, [], error=RuntimeError("boom")),
                    [Dimension("loss.lam", "uniform", (0.1, 0.5))], "/local")  # fmt: skip
    assert row["trial_id"] == "run_trial_t9_0_a=1" and row["status"] == "ERROR" and row["checkpoint"] == ""
    assert row["epochs"] == 0 and math.isnan(row["best_val_rsum"]) and math.isnan(row["seconds"])


def test_ranked_rows_best_first_nan_last():
    rows = [{"trial_id": "a", "best_val_rsum": 5.0}, {"trial_id": "b", "best_val_rsum": float("nan")},
            {"trial_id": "c", "best_val_rsum": 9.0}, {"trial_id": "d", "best_val_rsum": 5.0}]  # fmt: skip
    ranked = ranked_rows(rows)
    assert [(r["rank"], r["trial_id"]) for r in ranked] == [(1, "c"), (2, "a"), (3, "d"), (4, "b")]


def test_names_and_locations():
    assert trial_run_name("digits-sweep", "ab12c_00003") == "digits-sweep-ab12c_00003"
    assert checkpoint_location("bucket/runs/x/epoch_0001", "s3://bucket/store") == "s3://bucket/runs/x/epoch_0001"
    assert checkpoint_location("/abs/runs/x/epoch_0001", "/abs/store") == "/abs/runs/x/epoch_0001"


# ------------------------------------------------------------------------------------------ job files


def test_sweep_configs_parse():
    from ulrl.config import load_config

    cfg = load_config("jobs/configs/sweep-digits.yaml")
    assert [d.key for d in parse_space(cfg)] == ["loss.ul_alpha", "loss.lam", "loss.negatives.strategy"]
    assert cfg.train.num_workers == 1 and cfg.tune.num_samples == 8


def table_rows():
    return ranked_rows([
        {"trial_id": "b", "loss.ul_alpha": 0.3, "loss.negatives.strategy": "random", "best_val_rsum": 12.5,
         "checkpoint": "/r/b/epoch_0002", "mlflow_run_id": "r2", "val_contradiction_rate_video": 0.25},
        {"trial_id": "a", "loss.ul_alpha": 0.002, "loss.negatives.strategy": "antonym", "best_val_rsum": 20.0,
         "checkpoint": "/r/a/epoch_0001", "mlflow_run_id": "r1", "val_contradiction_rate_video": float("nan")},
    ])  # fmt: skip


def test_write_table_csv_keeps_precision_and_markdown_is_readable(tmp_path):
    from jobs.tune import write_table

    csv_path, md_path = write_table(table_rows(), tmp_path / "out")
    with csv_path.open() as stream:
        rows = list(csv.DictReader(stream))
    assert [r["trial_id"] for r in rows] == ["a", "b"] and rows[0]["rank"] == "1"
    assert rows[0]["loss.ul_alpha"] == "0.002" and rows[0]["val_contradiction_rate_video"] == ""  # NaN → empty
    assert rows[1]["checkpoint"] == "/r/b/epoch_0002"
    assert md_path.read_text().splitlines() == [
        "| rank | trial_id | loss.ul_alpha | loss.negatives.strategy | best_val_rsum | val_contradiction_rate_video |",
        "|---|---|---|---|---|---|",
        "| 1 | a | 0.002 | antonym | 20 |  |",
        "| 2 | b | 0.3 | random | 12.5 | 0.25 |",
    ]


def test_plot_has_one_panel_per_figure_and_key(tmp_path):
    from jobs.tune import plot_sweep

    dims = [Dimension("loss.ul_alpha", "loguniform", (0.001, 1.0)),
            Dimension("loss.negatives.strategy", "choice", ("antonym", "random", "hard"))]  # fmt: skip
    path = plot_sweep(tmp_path / "sweep.png", table_rows(), dims)
    from matplotlib.image import imread

    height, width, _ = imread(path).shape
    assert width == round(3.8 * 2 * 110) and height == round(2.9 * 2 * 110)  # 2 figures (rsum, contradiction) × 2 keys
