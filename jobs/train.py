"""Train the ITV model on a Ray cluster.

    python -m jobs.train --config jobs/configs/tiny.yaml [key=value ...]
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python -m jobs.train --config jobs/configs/tiny.yaml store.uri=s3://bucket/store

Re-running with the same ``train.name`` (and storage) resumes from the run's latest checkpoint. Progress lines
come from rank 0 of the workers; the best checkpoint's URI is printed last. Exit status 2 on a bad config,
a missing store or a cluster too small for the requested workers.
"""

from __future__ import annotations

import argparse
import sys

from jobs._cli import job_parser
from ulrl.config import ConfigError, load_config
from ulrl.raycluster import ResourceError, prefer_loopback
from ulrl.store import StoreError


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return job_parser("train", __doc__).parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    prefer_loopback(cfg.ray)  # before Ray is imported (by ulrl.train_loop)
    from ulrl.train_loop import best_checkpoint_uri, run_training

    try:
        result = run_training(cfg)  # checks the store, then connects to Ray (ulrl.raycluster.connect)
    except (ConfigError, StoreError, ResourceError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"best checkpoint: {best_checkpoint_uri(result) or '(none)'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
