"""Evaluate a trained model on a store split, log it to MLflow, register it and index the collection.

    python -m jobs.evaluate --config jobs/configs/tiny.yaml [key=value ...]
    python -m jobs.evaluate --config jobs/configs/digits.yaml eval.model_uri=models:/ulrl@champion
    ray job submit --working-dir . -- python -m jobs.evaluate --config jobs/configs/digits.yaml

The model is ``eval.model_uri`` if set, else ``eval.checkpoint``, else the best checkpoint of run ``train.name``.
Writes ``eval.output_dir``/metrics.json, TREC run files and plots, one MLflow run in the training experiment,
a registered model version (checkpoints only; alias per ``registry.promote``) and ``<store>/index/<eval.split>/``
for ``jobs.search``. Bad input prints one ``error:`` line and exits with status 2.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from jobs._cli import job_parser
from ulrl.checkpoint import CheckpointError
from ulrl.config import ConfigError, load_config
from ulrl.model import ModelDimsError
from ulrl.store import StoreError

SUMMARY_KEYS = (
    ("t2v R@1/5/10", ("t2v_r1", "t2v_r5", "t2v_r10")), ("t2v MedR / mAP", ("t2v_medr", "t2v_map")),
    ("v2t R@1/5/10", ("v2t_r1", "v2t_r5", "v2t_r10")), ("v2t MedR / mAP", ("v2t_medr", "v2t_map")),
    ("AVS mean AP: emb / concept / fused", ("avs_map_emb", "avs_map_concept", "avs_map_fused")),
    ("AVS best θ", ("avs_best_theta",)),
    ("concept mAP: captions / true / unmentioned",
     ("concept_map_caption", "concept_map_true", "concept_map_unmentioned")),
    ("contradiction rate: videos / captions", ("contradiction_rate_video", "contradiction_rate_caption")),
)  # fmt: skip
"""Rows of the printed summary: label and metric keys (rows whose keys are all absent are skipped)."""


def summary(scalars: dict[str, Any]) -> str:
    """The headline figures of ``scalars`` (metrics.json's ``metrics`` or the MLflow run's) as aligned lines."""
    lines = []
    for label, keys in SUMMARY_KEYS:
        if not any(key in scalars for key in keys):
            continue
        values = ["n/a" if scalars.get(key) is None else f"{scalars[key]:.4g}" for key in keys]
        lines.append(f"  {label:<44} {' / '.join(values)}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return job_parser("evaluate", __doc__).parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from ulrl.evaluate import EvaluationError, evaluate
    from ulrl.registry import RegistryError

    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        result = evaluate(cfg)
    except (ConfigError, StoreError, EvaluationError, RegistryError, CheckpointError, ModelDimsError) as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    print(f"results on split '{cfg.eval.split}' (metrics.json in {result.output_dir}):")
    print(summary(result.report["metrics"]), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
