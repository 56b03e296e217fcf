"""Build the feature store: ``python -m jobs.prepare --config FILE [key=value ...]``.

Reads the source named by ``data.source`` (the moving-digits benchmark or an AVS collection in BigFile
layout), derives the concept bank, vocabulary and contradiction pairs from the train captions, and writes
the store at ``store.uri`` (local folder or ``s3://bucket/prefix``). Bad input prints one ``error:`` line
and exits with status 2; nothing that looks like a store is left behind.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from ulrl.concepts import PairFileError
from ulrl.config import ConfigError, JobConfig, load_config
from ulrl.raw import RawSplit
from ulrl.store import PrepareError, Store, StoreError, open_store, write_store
from ulrl.wordnet import WordNetMissingError

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "digits.yaml"
"""Used when ``--config`` is not given."""

EXPECTED_ERRORS = (ConfigError, PrepareError, StoreError, PairFileError, WordNetMissingError)
"""Problems of the input or environment: reported as one line, no traceback."""


def read_source(cfg: JobConfig) -> dict[str, RawSplit]:
    """The raw splits of ``data.source``."""
    if cfg.data.source == "avs":
        from ulrl.avs import read_avs

        return read_avs(cfg.data.avs)
    from ulrl.digits import DigitsError, moving_digits

    try:
        return moving_digits(cfg.data.digits)
    except DigitsError as err:
        raise PrepareError(str(err)) from None


def _log(message: str) -> None:
    print(f"[prepare] {message}", flush=True)


def _summary(store: Store, seconds: float) -> str:
    manifest = store.manifest
    splits = manifest["splits"].items()
    rows = "; ".join(f"{name} {s['videos']} videos / {s['captions']} captions" for name, s in splits)
    queries = ", ".join(manifest["query_splits"]) or "none"
    return (f"done in {seconds:.1f}s: {rows}; {manifest['num_concepts']} concepts, {len(store.pairs) // 2} "
            f"contradiction pairs, vocabulary {manifest['vocab_size']}, frame_dim {manifest['frame_dim']}, "
            f"queries on {queries}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m jobs.prepare", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML config (default: digits.yaml)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. store.uri=s3://b/p")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the job; returns the written manifest. Expected errors exit with status 2 (``SystemExit``)."""
    args = parse_args(argv)
    started = time.perf_counter()
    try:
        cfg = load_config(args.config, args.overrides)
        _log(f"reading {cfg.data.source} → {cfg.store.uri}")
        splits = read_source(cfg)
        manifest = write_store(cfg, splits, cfg.data.source, progress=_log)
        store = open_store(cfg.store.uri)  # read back what was published
    except EXPECTED_ERRORS as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    _log(_summary(store, time.perf_counter() - started))
    return manifest


if __name__ == "__main__":
    main()
