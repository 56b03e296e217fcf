"""Search a collection with the registered model: top-k videos, fused scores and why each was retrieved.

    python -m jobs.search --config jobs/configs/digits.yaml --query "a fast four moving upward" [--top-k 10]
    python -m jobs.search --config jobs/configs/tiny.yaml -q "a big white seven" -q "two digits" --theta 0.5 --json

The model is ``eval.model_uri`` or ``models:/<registry.model_name>@<registry.alias>`` (pulled from MLflow at
``tracking.uri``); the collection is the index ``jobs.evaluate`` wrote for ``eval.split`` into the store. The index
must come from the same weights (fingerprint check): after the alias moves, re-run jobs.evaluate. θ defaults to the
best θ evaluate measured on the split's queries, else 0.5. Query concepts and thresholds are the served model's
(``ulrl.search``): concept words of the query in the bank (weight 1) ∪ decoded concepts (p ≥ its query threshold).
Each hit's line lists the query's concepts with the video's probability (✓ above the video threshold) and the
query's contradicting concepts, present or absent in the video.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from typing import Any

import torch

from ulrl.config import ConfigError, JobConfig, load_config
from ulrl.store import StoreError

DEFAULT_THETA = 0.5
"""θ when neither ``--theta`` nor the index's evaluated best θ is available."""


@dataclass(frozen=True)
class Hit:
    rank: int
    video_id: str
    score: float
    explanation: str


@dataclass(frozen=True)
class Answer:
    query: str
    concepts: list[dict[str, Any]]
    """The query's selected concepts (concept, probability, weight), as the served model returns them."""
    contradicting: list[str]
    hits: list[Hit]


def weight_matrix(rows: list[list[dict[str, Any]]], concepts: list[str]) -> torch.Tensor:
    """(Q, K) concept weights c_q rebuilt from ``predict``'s per-row ``concepts`` lists."""
    position = {name: k for k, name in enumerate(concepts)}
    weights = torch.zeros(len(rows), len(concepts))  # (Q, K)
    for q, row in enumerate(rows):
        for entry in row:
            weights[q, position[entry["concept"]]] = float(entry["weight"])
    return weights


def load_model(cfg: JobConfig) -> tuple[Any, str]:
    """The pyfunc model of ``eval.model_uri`` (default: the registry alias) and that URI."""
    import mlflow

    from ulrl.tracking import resolve_tracking_uri

    uri = cfg.eval.model_uri or f"models:/{cfg.registry.model_name}@{cfg.registry.alias}"
    mlflow.set_tracking_uri(resolve_tracking_uri(cfg.tracking.uri))
    try:
        return mlflow.pyfunc.load_model(uri), uri
    except mlflow.exceptions.MlflowException as err:
        raise StoreError(f"cannot load {uri} from {cfg.tracking.uri}: {str(err).splitlines()[0]}") from None


def run_search(cfg: JobConfig, texts: list[str], top_k: int, theta: float | None = None) -> tuple[list[Answer], dict]:
    """Answer ``texts`` against the index of ``eval.split``; returns the answers and a header (model, θ, size)."""
    from ulrl import search
    from ulrl.index import read_index
    from ulrl.store import open_store

    index = read_index(open_store(cfg.store.uri), cfg.eval.split)
    model, uri = load_model(cfg)
    encoder = model.unwrap_python_model().encoder
    bundle = encoder.bundle
    if index.meta.get("fingerprint") != bundle.fingerprint():
        raise search.SearchError(
            f"the index of split '{cfg.eval.split}' was built by {index.meta.get('model')} (weights "
            f"{index.meta.get('fingerprint')}), {uri} has weights {bundle.fingerprint()}: "
            f"run python -m jobs.evaluate eval.model_uri={uri} eval.split={cfg.eval.split}"
        )
    theta = theta if theta is not None else index.meta.get("best_theta")
    theta = DEFAULT_THETA if theta is None else float(theta)
    predicted = model.predict({"text": texts})
    weights = weight_matrix(list(predicted["concepts"]), bundle.concepts)  # (Q, K)
    queries = search.Queries(torch.tensor(list(predicted["embedding"]), dtype=torch.float32), weights)
    threshold = bundle.cfg.eval.video_threshold
    probs = torch.from_numpy(index.probs)  # (N, K)
    collection = search.Collection.from_probs(torch.from_numpy(index.embedding), probs, threshold)
    ranked, scores = search.rank(queries, collection, theta, top_k)
    against = search.contradicting_concepts(weights > 0, encoder.contradiction)  # (Q, K)
    answers = []
    for q, text in enumerate(texts):
        hits = [Hit(r + 1, str(index.ids[v]), float(scores[q, r]),
                    search.explain(weights[q], against[q], probs[v], bundle.concepts, threshold).line())
                for r, v in enumerate(ranked[q])]  # fmt: skip
        answers.append(Answer(text, predicted["concepts"][q], list(predicted["contradicting"][q]), hits))
    header = {"model": uri, "theta": theta, "split": cfg.eval.split, "videos": len(index.ids)}
    return answers, header


def print_answers(answers: list[Answer], header: dict) -> None:
    print(f"{header['model']} · split '{header['split']}' ({header['videos']} videos) · θ = {header['theta']:g}")
    for answer in answers:
        concepts = ", ".join(f"{c['concept']} {c['weight']:.2f}" for c in answer.concepts) or "(none)"
        print(f"\nquery: {answer.query!r}\n  concepts: {concepts}")
        print(f"  contradicting: {', '.join(answer.contradicting) or '(none)'}")
        for hit in answer.hits:
            print(f"  {hit.rank:>3}. {hit.video_id:<24} {hit.score:.3f}  {hit.explanation}")
    sys.stdout.flush()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m jobs.search", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML config file (defaults apply without one)")
    parser.add_argument("-q", "--query", action="append", required=True, help="free-text query (repeatable)")
    parser.add_argument("-k", "--top-k", type=int, default=10, help="hits per query (default 10)")
    parser.add_argument("--theta", type=float, help="fusion weight θ in [0, 1] (default: evaluated best, else 0.5)")
    parser.add_argument("--json", action="store_true", help="print the answers as one JSON document")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from ulrl.index import IndexMissingError
    from ulrl.search import SearchError

    args = parse_args(argv)
    try:
        if args.top_k < 1:
            raise ConfigError("--top-k must be at least 1")
        cfg = load_config(args.config, args.overrides)
        answers, header = run_search(cfg, args.query, args.top_k, args.theta)
    except (ConfigError, StoreError, IndexMissingError, SearchError) as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    if args.json:
        print(json.dumps({**header, "answers": [asdict(a) for a in answers]}, indent=1), flush=True)
    else:
        print_answers(answers, header)
    return 0


if __name__ == "__main__":
    sys.exit(main())
