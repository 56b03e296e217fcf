"""Run the benchmarks: ``python -m benchmarks.run [--quick] [--only NAME,...]``.

Writes ``benchmarks/results/<name>.json`` (``--quick``: ``benchmarks/results/quick/<name>.json``) after each
benchmark and then the tables of ``docs/benchmarks.md``. Benchmarks, cheapest first: ``train_step``,
``ranking`` (no Ray), ``data_feed``, ``scaling``, ``quality`` (a local Ray cluster; run inside a
loopback-only namespace, see the Makefile's ``bench`` target). ``--tiny`` shrinks every size to a smoke test
of the plumbing (tests/test_benchmarks.py); its numbers mean nothing.

Every process uses ``--threads`` torch threads (default 1, what a Ray Train worker gets), so timings do not
depend on how busy the other cores are.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

BENCHMARKS = ("train_step", "ranking", "data_feed", "scaling", "quality")
RAY_BENCHMARKS = ("data_feed", "scaling", "quality")
WORK_DIR = "data/bench"
"""Stores and training runs of the Ray benchmarks (git ignores ``data/``)."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.splitlines()[0])
    sizes = parser.add_mutually_exclusive_group()
    sizes.add_argument("--quick", action="store_true", help="small sizes, a few minutes")
    sizes.add_argument("--tiny", action="store_true", help="smoke-test sizes (numbers meaningless)")
    parser.add_argument("--only", default=",".join(BENCHMARKS), help=f"comma-separated subset of {','.join(BENCHMARKS)}")
    parser.add_argument("--out", type=Path, help="results folder (default benchmarks/results[/quick])")
    parser.add_argument("--work-dir", default=WORK_DIR, help="stores and runs of the Ray benchmarks (folder or s3://)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--workers", default="1,2", help="worker counts of the scaling benchmark, first = baseline")
    parser.add_argument("--gpu", action="store_true", help="Ray benchmarks train on one GPU per worker")
    parser.add_argument("--no-doc", action="store_true", help="do not rewrite docs/benchmarks.md")
    parser.add_argument("--print-json", action="store_true",
                        help="also print each result file as one line (for `ray job logs` of a cluster run)")
    args = parser.parse_args(argv)
    args.mode = "tiny" if args.tiny else "quick" if args.quick else "full"
    args.names = [name.strip() for name in args.only.split(",") if name.strip()]
    try:
        args.worker_counts = tuple(int(n) for n in args.workers.split(","))
    except ValueError:
        parser.error(f"--workers: expected comma-separated integers, got {args.workers!r}")
    unknown = sorted(set(args.names) - set(BENCHMARKS))
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    return args


def log(message: str) -> None:
    print(f"[bench] {message}", flush=True)


def run_local(name: str, mode: str, threads: int):
    if name == "train_step":
        from benchmarks import train_step

        return train_step.run(mode)
    from benchmarks import ranking

    return ranking.run(mode, threads)


def run_ray(names: list[str], args: argparse.Namespace, save) -> None:
    """Build (or find) the digits store, start Ray once, run the Ray benchmarks in order."""
    import ray

    from benchmarks.stores import bench_config, ensure_store
    from ulrl.config import RayConfig
    from ulrl.raycluster import connect

    mode = args.mode
    cfg = bench_config(mode, args.work_dir, {"train.use_gpu": True, "train.cpus_per_worker": 1.0} if args.gpu else None)
    ensure_store(cfg, log=log)
    connect(RayConfig(object_store_mb=512))
    try:
        for name in names:
            log(f"{name} ({mode})")
            if name == "data_feed":
                from benchmarks import data_feed

                save(data_feed.run(mode, cfg))
            elif name == "scaling":
                from benchmarks import scaling

                save(scaling.run(mode, cfg, args.worker_counts))
            else:
                from benchmarks import quality

                save(quality.run(mode, cfg, log=log))
    finally:
        ray.shutdown()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from ulrl.config import RayConfig
    from ulrl.raycluster import prefer_loopback

    prefer_loopback(RayConfig())  # before anything imports Ray: a local cluster listens on loopback only
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    import torch

    from benchmarks.common import read_record, results_dir, write_record
    from benchmarks.report import render, update_doc

    torch.set_num_threads(args.threads)
    out_dir = args.out or results_dir(args.mode)
    started = time.perf_counter()

    def save(record) -> None:
        path = write_record(record, out_dir)
        for goal in record.goals:
            log(f"{goal.goal}: {goal.measured} (target {goal.target}) {'met' if goal.met else 'NOT met'}")
        log(f"wrote {path}")
        if args.print_json:
            print(f"[bench-json] {json.dumps(read_record(path))}", flush=True)

    for name in (n for n in BENCHMARKS if n in args.names and n not in RAY_BENCHMARKS):
        log(f"{name} ({args.mode})")
        save(run_local(name, args.mode, args.threads))
    ray_names = [n for n in BENCHMARKS if n in args.names and n in RAY_BENCHMARKS]
    if ray_names:
        run_ray(ray_names, args, save)
    if not args.no_doc:
        update_doc(render(out_dir.parent if out_dir.name in ("quick", "tiny") else out_dir))
        log("updated docs/benchmarks.md")
    log(f"done in {time.perf_counter() - started:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
