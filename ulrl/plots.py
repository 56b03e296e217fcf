"""Evaluation figures (PNG, matplotlib's Agg backend, no display): per-query AP by scorer, per-concept AP and
the θ curve. Each function writes one file and returns its path; the data they plot is in metrics.json."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

MAX_BARS = 60
"""Bars drawn at most in the per-concept figure (the best and the worst halves when there are more)."""


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)  # no display on cluster nodes; set before pyplot is imported
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    fig.clf()
    return path


def per_query_ap(path: str | Path, query_labels: Sequence[str], ap_by_scorer: Mapping[str, Sequence[float]],
                 measure: str = "AP") -> Path:
    """Grouped bars: one group per query, one bar per scorer (e.g. embedding, concept, fused θ=0.5)."""
    plt = _pyplot()
    count, scorers = len(query_labels), list(ap_by_scorer)
    fig, ax = plt.subplots(figsize=(min(max(6.0, 0.32 * count + 2.0), 18.0), 5.0))
    width = 0.8 / max(len(scorers), 1)
    for i, name in enumerate(scorers):
        values = np.asarray(ap_by_scorer[name], dtype=float)
        ax.bar(np.arange(count) + (i - (len(scorers) - 1) / 2) * width, values, width,
               label=f"{name} (mean {values.mean():.3f})" if count else name)
    ax.set_xticks(np.arange(count), query_labels, rotation=75, ha="right", fontsize=7)
    ax.set_ylabel(measure)
    ax.set_ylim(0, 1)
    ax.set_title(f"{measure} per query")
    ax.legend(fontsize=8)
    path = _save(fig, path)
    plt.close(fig)
    return path


def per_concept_ap(path: str | Path, concepts: Sequence[str], ap: Sequence[float], title: str) -> Path:
    """Horizontal bars of AP per concept, best first; NaN (no positives) left out."""
    plt = _pyplot()
    values = np.asarray(ap, dtype=float)
    keep = [i for i in np.argsort(-np.nan_to_num(values, nan=-1.0)) if not np.isnan(values[i])]
    if len(keep) > MAX_BARS:
        keep = keep[: MAX_BARS // 2] + keep[-MAX_BARS // 2 :]
    fig, ax = plt.subplots(figsize=(6.0, max(2.5, 0.22 * len(keep) + 1.0)))
    ax.barh(np.arange(len(keep)), values[keep], color="tab:green")
    ax.set_yticks(np.arange(len(keep)), [concepts[i] for i in keep], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("AP")
    ax.set_title(title, fontsize=9)
    path = _save(fig, path)
    plt.close(fig)
    return path


def theta_curve(path: str | Path, thetas: Sequence[float], mean_ap: Sequence[float], measure: str = "AP") -> Path:
    """Mean AP against the fusion weight θ (θ = 0: embedding only, θ = 1: concepts only)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.0, 3.5))
    ax.plot(thetas, mean_ap, marker="o")
    title = f"mean {measure} against θ"
    if len(mean_ap):
        best = int(np.argmax(mean_ap))
        ax.plot([thetas[best]], [mean_ap[best]], marker="*", markersize=14, color="tab:red", linestyle="none")
        title += f" (best θ={thetas[best]:g}: {mean_ap[best]:.3f})"
    ax.set_xlabel("θ  (score = (1−θ)·embedding + θ·concept)")
    ax.set_ylabel(f"mean {measure}")
    ax.set_xlim(-0.05, 1.05)
    ax.set_title(title, fontsize=10)
    path = _save(fig, path)
    plt.close(fig)
    return path


def evaluation_plots(folder: Path, report: dict[str, Any]) -> list[Path]:
    """Per-query AP by scorer and the θ curve (with queries), per-concept AP per label set."""
    files = []
    avs = report["avs"]
    if avs is not None:
        best = f"{avs['best_theta']:.2f}"
        scorers = {"embedding (θ=0)": "0.00", "concept (θ=1)": "1.00", f"fused (θ={best})": best}
        per_query = avs["per_query"]
        ap = {label: [per_query[q][key] for q in per_query] for label, key in scorers.items()}
        labels = [f"{q} {per_query[q]['text'][:30]}" for q in per_query]
        files.append(per_query_ap(folder / "avs_per_query_ap.png", labels, ap, avs["measure"]))
        means = [avs["mean_by_theta"][f"{t:.2f}"] for t in avs["thetas"]]
        files.append(theta_curve(folder / "avs_theta_curve.png", avs["thetas"], means, avs["measure"]))
    for name, values in report["per_concept_ap"].items():
        title = f"concept decoding AP per concept ({name} labels)"
        files.append(per_concept_ap(folder / f"concept_ap_{name}.png", list(values), list(values.values()), title))
    return files
