"""What every benchmark shares: the machine it ran on, interleaved timing, and the result file.

Timing on a shared, noisy machine: no absolute time is quoted as a result (except on a GPU). Each
benchmark times its cases *side by side in one process*, interleaving the repetitions (A B, B A, A B, ...)
so slow drifts of the machine's load hit every case alike, and reports the ratio of medians together
with the median of the per-repetition ratios (each repetition's cases ran seconds apart).

Result file ``benchmarks/results/<name>.json`` (``quick/<name>.json`` for ``--quick``, ``tiny/`` for ``--tiny``)::

    {"benchmark", "mode", "command", "started_at", "seconds", "machine", "versions", "params",
     "results", "goals": [{"goal", "target", "measured", "met", "why"}]}
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"


class BenchmarkError(RuntimeError):
    """A benchmark cannot run as asked (missing store, bad size); the message says what to change."""


# ---------------------------------------------------------------------------------------------- machine


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _ram_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return float("nan")


def load_average() -> list[float]:
    """1-, 5- and 15-minute load averages (empty where the OS has none)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def machine_info() -> dict[str, Any]:
    """Cores, RAM, CPU model (from /proc/cpuinfo), GPU name if torch sees one, and the load right now."""
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cpu_model": _cpu_model(), "cores": os.cpu_count(), "ram_gib": _ram_gib(), "gpu": gpu,
        "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
        "load_average": load_average(),
    }  # fmt: skip


def versions() -> dict[str, str]:
    """Python and library versions, and the git commit of the checkout (``+dirty`` with local changes)."""
    import numpy
    import pyarrow
    import ray
    import torch

    return {
        "python": platform.python_version(), "torch": torch.__version__, "ray": ray.__version__,
        "pyarrow": pyarrow.__version__, "numpy": numpy.__version__, "git": _git_commit(),
    }  # fmt: skip


def _git_commit() -> str:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10).stdout

    try:
        commit = git("rev-parse", "--short", "HEAD").strip()
        return commit + ("+dirty" if git("status", "--porcelain", "--untracked-files=no").strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def command_line() -> str:
    """How this process was started, as a shell line relative to the repo (``python -m benchmarks.run ...``)."""
    argv = sys.argv[1:]
    main = sys.argv[0]
    module = "benchmarks.run" if main.endswith(("run.py", "-m")) else Path(main).stem
    return " ".join(["python -m", module, *map(shlex.quote, argv)])


# ---------------------------------------------------------------------------------------------- timing


def interleaved(cases: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1,
                sync: Callable[[], None] | None = None) -> dict[str, list[float]]:
    """Seconds per call of each case, ``repeats`` times, the cases alternating in order and reversed order.

    ``warmup`` untimed rounds run first (allocator, kernel choice, caches). ``sync`` (e.g. a CUDA
    synchronize) runs before each clock read, so asynchronous work is charged to its own case.
    """
    names = list(cases)
    wait = sync or (lambda: None)
    for _ in range(warmup):
        for name in names:
            cases[name]()
    samples: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(repeats):
        for name in names if rep % 2 == 0 else reversed(names):
            wait()
            start = time.perf_counter()
            cases[name]()
            wait()
            samples[name].append(time.perf_counter() - start)
    return samples


def summary(seconds: list[float]) -> dict[str, float]:
    """Median, quartiles and extremes of repeated timings."""
    ordered = sorted(seconds)
    quartiles = statistics.quantiles(ordered, n=4) if len(ordered) > 1 else [ordered[0]] * 3
    return {"median": statistics.median(ordered), "q1": quartiles[0], "q3": quartiles[2],
            "min": ordered[0], "max": ordered[-1], "n": len(ordered)}  # fmt: skip


def speedup(slow: list[float], fast: list[float]) -> dict[str, float]:
    """How many times faster ``fast`` is: ratio of medians, and median/min/max of per-repetition ratios."""
    paired = sorted(s / f for s, f in zip(slow, fast))
    return {"ratio_of_medians": statistics.median(slow) / statistics.median(fast),
            "median_paired_ratio": statistics.median(paired), "min_paired_ratio": paired[0],
            "max_paired_ratio": paired[-1]}  # fmt: skip


# ---------------------------------------------------------------------------------------------- results


@dataclass
class Goal:
    """A target from the project brief, what was measured, and (when missed) why."""

    goal: str
    target: str
    measured: float
    met: bool
    why: str = ""


@dataclass
class Record:
    """One benchmark's result file, filled in by the benchmark and written by :func:`write_record`."""

    benchmark: str
    mode: str
    params: dict[str, Any]
    results: dict[str, Any] = field(default_factory=dict)
    goals: list[Goal] = field(default_factory=list)
    started: float = field(default_factory=time.time)
    load_at_start: list[float] = field(default_factory=load_average)


def results_dir(mode: str, root: Path | None = None) -> Path:
    base = RESULTS_DIR if root is None else Path(root)
    return base if mode == "full" else base / mode


def write_record(record: Record, out_dir: Path) -> Path:
    """Write ``<out_dir>/<benchmark>.json`` atomically (a temp file renamed into place)."""
    machine = machine_info()
    machine["load_average_at_start"] = record.load_at_start
    payload = {
        "benchmark": record.benchmark, "mode": record.mode, "command": command_line(),
        "started_at": datetime.fromtimestamp(record.started, timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(time.time() - record.started, 1), "machine": machine, "versions": versions(),
        "params": record.params, "results": record.results, "goals": [vars(goal) for goal in record.goals],
    }  # fmt: skip
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{record.benchmark}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=_jsonable) + "\n")
    tmp.replace(path)
    return path


def _jsonable(value: Any) -> Any:
    """numpy scalars/arrays and paths in results become plain JSON."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def read_record(path: Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())
