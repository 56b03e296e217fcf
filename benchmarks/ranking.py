"""Benchmark 4: fused ranking (the evaluate/search code path) against a bare matmul + top-k of the same shapes.

For Q queries over N synthetic videos (D-d embeddings, K concepts) and the top ``top`` videos per query:

* ``fused``: :func:`ulrl.search.rank` with θ = 0.5 — embedding and concept scores, each min-max normalised
  per query, fused, top-k, a chunk of 256 queries at a time (what ``jobs.evaluate`` and ``jobs.search`` run);
* ``bare``: ``torch.topk([E_q | C_q] @ [E_v | C_v]ᵀ, top)`` — one matmul over the concatenated D + K
  columns, i.e. the same multiply-adds, and one top-k over the whole (Q, N) matrix;
* ``bare_embedding`` (for scale): the embedding matmul alone + top-k.

Each N runs in its own subprocess (timings interleaved there); each (case, N) peak memory in another one:
the resident set's high-water mark after the inputs exist (``/proc/self/clear_refs`` resets it) minus the
resident set at that moment, so the number is what ranking itself adds on top of its inputs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks.common import REPO_ROOT, BenchmarkError, Goal, Record, interleaved, speedup, summary

TARGET_RATIO = 2.0
"""Brief: fused ranking within 2× of a bare matmul + top-k."""
THETA = 0.5
CASES = ("fused", "bare", "bare_embedding")


@dataclass(frozen=True)
class RankShape:
    queries: int
    videos: tuple[int, ...]
    dim: int
    concepts: int
    top: int
    repeats: int


QUICK = RankShape(queries=200, videos=(2_000, 10_000), dim=256, concepts=300, top=1000, repeats=5)
FULL = RankShape(queries=1_000, videos=(10_000, 100_000), dim=1024, concepts=1000, top=1000, repeats=5)
TINY = RankShape(queries=8, videos=(300,), dim=16, concepts=20, top=50, repeats=1)
SHAPES = {"tiny": TINY, "quick": QUICK, "full": FULL}


def synthetic_index(queries: int, videos: int, dim: int, concepts: int, seed: int = 0):
    """Encoded queries and collection like a trained model's: unit-norm embeddings; video concept vectors with
    ~5 % of entries above the 0.5 threshold (the rest zeroed); 3 selected concepts per query."""
    from ulrl.search import Collection, Queries

    generator = torch.Generator().manual_seed(seed)
    query_emb = torch.nn.functional.normalize(torch.randn(queries, dim, generator=generator), dim=1)  # (Q, D)
    video_emb = torch.nn.functional.normalize(torch.randn(videos, dim, generator=generator), dim=1)  # (N, D)
    video_probs = torch.rand(videos, concepts, generator=generator).pow_(14)  # (N, K): P(p > 0.5) ≈ 5 %
    picked = torch.rand(queries, concepts, generator=generator).topk(3, dim=1).indices  # (Q, 3)
    weights = torch.zeros(queries, concepts).scatter_(1, picked, 1.0)  # (Q, K)
    return Queries(query_emb, weights), Collection.from_probs(video_emb, video_probs, video_threshold=0.5)


def case_functions(queries, collection, top: int, cases: tuple[str, ...] = CASES) -> dict:
    """Callables for ``cases``; the bare ones get their concatenated copies built here, outside the timing."""
    from ulrl.search import rank

    functions = {}
    if "fused" in cases:
        functions["fused"] = lambda: rank(queries, collection, THETA, top)
    if "bare" in cases:
        query_cat = torch.cat([queries.embedding, queries.concept_weights], dim=1)  # (Q, D + K)
        video_cat = torch.cat([collection.embedding, collection.concept_vectors], dim=1)  # (N, D + K)
        functions["bare"] = lambda: torch.topk(query_cat @ video_cat.T, top, dim=1)
    if "bare_embedding" in cases:
        functions["bare_embedding"] = lambda: torch.topk(queries.embedding @ collection.embedding.T, top, dim=1)
    return functions


# ------------------------------------------------------------------------------------------- subprocesses


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise BenchmarkError(f"/proc/self/status has no {field}")


def measure_memory(case: str, queries: int, videos: int, dim: int, concepts: int, top: int) -> dict:
    """MiB the case adds to the resident set above its inputs (run in a fresh process)."""
    index = synthetic_index(queries, videos, dim, concepts)
    function = case_functions(*index, top, cases=(case,))[case]
    before = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark to the current RSS
    function()
    return {"peak_mib": (_status_kib("VmHWM") - before) / 1024, "inputs_rss_mib": before / 1024}


def measure_time(queries: int, videos: int, dim: int, concepts: int, top: int, repeats: int) -> dict:
    """Interleaved timings of every case over one index (run in a fresh process)."""
    index = synthetic_index(queries, videos, dim, concepts)
    samples = interleaved(case_functions(*index, top), repeats, warmup=1)
    return {"seconds": samples}


def _subprocess(args: list[str], threads: int, timeout: float = 1800) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    command = [sys.executable, "-m", "benchmarks.ranking", "--threads", str(threads), *args]
    done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise BenchmarkError(f"ranking subprocess {' '.join(args)} failed: {done.stderr.strip()[-800:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure_size(shape: RankShape, videos: int, threads: int, in_process: bool) -> dict:
    """Timings (interleaved) and memory peaks of every case for one collection size."""
    sizes = (shape.queries, videos, shape.dim, shape.concepts, shape.top)
    if in_process:
        timed = measure_time(*sizes, shape.repeats)["seconds"]
        memory = {case: measure_memory(case, *sizes) for case in CASES}
    else:
        flags = [f"--{name}={value}" for name, value in zip(("queries", "videos", "dim", "concepts", "top"), sizes)]
        timed = _subprocess([*flags, "--time", f"--repeats={shape.repeats}"], threads)["seconds"]
        memory = {case: _subprocess([*flags, "--memory", case], threads) for case in CASES}
    return {
        "seconds": {case: summary(times) for case, times in timed.items()},
        "fused_vs_bare": speedup(timed["fused"], timed["bare"]),
        "fused_vs_bare_embedding": speedup(timed["fused"], timed["bare_embedding"]),
        "memory_mib": memory,
    }


def run(mode: str, threads: int = 1, in_process: bool = False) -> Record:
    """Every size in fresh subprocesses (``in_process``: in this one — same plumbing, polluted memory peaks)."""
    shape = SHAPES[mode]
    record = Record("ranking", mode, {**dataclasses.asdict(shape), "theta": THETA, "torch_threads": threads})
    per_size = {str(videos): measure_size(shape, videos, threads, in_process) for videos in shape.videos}
    record.results = {"per_videos": per_size}
    for videos, result in per_size.items():
        ratio = result["fused_vs_bare"]["ratio_of_medians"]
        record.goals.append(Goal(f"fused ranking vs bare matmul + top-k, {int(videos):,} videos",
                                 f"<= {TARGET_RATIO:g}x", round(ratio, 3), ratio <= TARGET_RATIO,
                                 "" if ratio <= TARGET_RATIO else _why_slow()))  # fmt: skip
    return record


def _why_slow() -> str:
    return ("fusion min-max normalises two (chunk, N) score blocks (min, max, subtract, divide, select: each "
            "costs about one matmul on a CPU) and runs two matmuls where the bare case runs one over the "
            "concatenated columns")


def main(argv: list[str] | None = None) -> None:
    """Subprocess entry: ``--time`` or ``--memory CASE`` for one size; prints one JSON line."""
    parser = argparse.ArgumentParser(description="one ranking measurement (used by benchmarks.run)")
    for name in ("queries", "videos", "dim", "concepts", "top"):
        parser.add_argument(f"--{name}", type=int, required=True)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--time", action="store_true")
    what.add_argument("--memory", choices=CASES)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    sizes = (args.queries, args.videos, args.dim, args.concepts, args.top)
    result = measure_time(*sizes, args.repeats) if args.time else measure_memory(args.memory, *sizes)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
