"""The served model: bundle files, encoding of free inputs, promotion rules, and a registered model pulled by
alias in a fresh process (real sqlite MLflow; integration tests run inside the loopback-only namespace)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from ulrl.config import apply_overrides, load_config
from ulrl.model import ModelDims, ModelInputError, build_model
from ulrl.registry import (Encoder, ModelBundle, RegistryError, UlrlPyfuncModel, frames_batch, log_and_register,
                           should_promote, state_fingerprint, text_batch)  # fmt: skip

REPO = Path(__file__).resolve().parents[1]
CONCEPTS = ["big", "small", "four", "seven", "white", "black", "upward", "downward", "move", "video"]
VOCAB = ["<pad>", "<unk>", "a", "big", "four", "white", "seven", "moving", "upward", "on", "background", "video"]
PAIRS = [(a, b) for x, y in (("big", "small"), ("white", "black"), ("upward", "downward")) for a, b in ((x, y), (y, x))]
FRAME_DIM = 8


def make_bundle(seed: int = 0, **registry) -> ModelBundle:
    """A small untrained model with a hand-made concept bank (no store needed)."""
    cfg = load_config(REPO / "jobs" / "configs" / "tiny.yaml", ["data.max_frames=16"])
    cfg = apply_overrides(cfg, {f"registry.{k}": v for k, v in registry.items()})
    dims = ModelDims(frame_dim=FRAME_DIM, clip_dim=0, vocab_size=len(VOCAB), num_concepts=len(CONCEPTS), sentence_dim=0)
    torch.manual_seed(seed)
    model = build_model(cfg.model, dims)
    return ModelBundle(cfg, dims, model.state_dict(), CONCEPTS, VOCAB, PAIRS)


# ---------------------------------------------------------------------------------------------- unit


def test_promotion_rules():
    assert should_promote("always", 1.0, 5.0) and not should_promote("never", 9.0, None)
    assert should_promote("auto", 1.0, None)  # nothing comparable holds the alias
    assert should_promote("auto", 5.0, 4.0) and not should_promote("auto", 4.0, 4.0)  # strictly better only
    assert not should_promote("auto", float("nan"), 4.0)


def test_fingerprint_depends_on_weights_only():
    state = make_bundle().state_dict
    reordered = {name: state[name].clone() for name in reversed(list(state))}
    assert state_fingerprint(reordered) == state_fingerprint(state)
    changed = dict(reordered)
    name = next(k for k in changed if changed[k].is_floating_point())
    changed[name] = changed[name].clone()
    changed[name].view(-1)[0] += 1e-3
    assert state_fingerprint(changed) != state_fingerprint(state)
    assert state_fingerprint(make_bundle(seed=1).state_dict) != state_fingerprint(state)


def test_bundle_round_trip(tmp_path):
    bundle = make_bundle()
    loaded = ModelBundle.load(bundle.save(tmp_path / "bundle"))
    assert loaded.cfg == bundle.cfg and loaded.dims == bundle.dims
    assert (loaded.concepts, loaded.vocab, loaded.pairs) == (CONCEPTS, VOCAB, PAIRS)
    assert loaded.fingerprint() == bundle.fingerprint()
    (tmp_path / "bundle" / "vocab.json").unlink()
    with pytest.raises(RegistryError, match="vocab.json"):
        ModelBundle.load(tmp_path / "bundle")


def test_text_and_frame_batches():
    tokens, mask = text_batch(["A big four, moving!", "zebra", ""], VOCAB, max_words=3)
    assert tokens.tolist() == [[2, 3, 4], [1, 0, 0], [0, 0, 0]]  # cut at 3 words; unknown → 1; empty row
    assert mask.tolist() == [[True] * 3, [True, False, False], [False] * 3]
    frames, frame_mask = frames_batch([np.ones((1, FRAME_DIM)), np.full((40, FRAME_DIM), 2.0).tolist()], FRAME_DIM, 16)
    assert frames.shape == (2, 16, FRAME_DIM) and frame_mask.sum(1).tolist() == [1, 16]  # cut at max_frames
    assert float(frames[0, 1:].abs().sum()) == 0.0
    with pytest.raises(ModelInputError, match="row 1"):
        frames_batch([np.ones((2, FRAME_DIM)), np.ones((2, FRAME_DIM + 1))], FRAME_DIM, 16)
    with pytest.raises(ModelInputError, match="row 0"):
        frames_batch([[]], FRAME_DIM, 16)


def test_encoder_selects_typed_concepts_with_weight_one_and_lists_antonyms():
    encoder = Encoder(make_bundle())
    emb, probs, weights = encoder.queries(["a big white video", "zebra"])
    assert emb.shape == (2, 32) and probs.shape == weights.shape == (2, len(CONCEPTS))
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(2))
    selected = {CONCEPTS[k]: float(weights[0, k]) for k in weights[0].nonzero().flatten()}
    decoded = {c for c, p in zip(CONCEPTS, probs[0].tolist()) if p >= 0.99 and c != "video"}
    assert {"big": 1.0, "white": 1.0}.items() <= selected.items() and set(selected) == {"big", "white"} | decoded
    described = encoder.describe(probs, weights)
    assert {"small", "black"} <= set(described[0][1])  # antonyms of the selected concepts


def test_pyfunc_predict_in_process(tmp_path):
    bundle = make_bundle()
    model = UlrlPyfuncModel()
    model.load_context(type("Context", (), {"artifacts": {"bundle": str(bundle.save(tmp_path / "b"))}})())
    out = model.predict(None, pd.DataFrame({"frames": [np.ones((3, FRAME_DIM)), np.ones((30, FRAME_DIM))]}),
                        params={"top_concepts": 2})  # fmt: skip
    assert list(out.columns) == ["embedding", "concepts", "contradicting"]
    assert all(len(c) <= 2 and all(e["probability"] > 0.5 for e in c) for c in out["concepts"])
    with pytest.raises(ModelInputError, match="'text' or a 'frames'"):
        model.predict(None, pd.DataFrame({"caption": ["x"]}))


# ---------------------------------------------------------------------------------------------- MLflow


def new_run(tracking_uri: str, tmp_path: Path) -> str:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("registry-test")
    if experiment is None:
        experiment_id = client.create_experiment("registry-test", artifact_location=str(tmp_path / "artifacts"))
    else:
        experiment_id = experiment.experiment_id
    return client.create_run(experiment_id).info.run_id


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_alias_moves_only_to_better_versions_and_a_fresh_process_pulls_it(tmp_path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    bundle = make_bundle(selection_metric="rsum")
    first = log_and_register(bundle, uri, new_run(uri, tmp_path), {"rsum": 10.0})
    worse = log_and_register(make_bundle(1), uri, new_run(uri, tmp_path), {"rsum": 5.0})
    assert (first.version, first.promoted, worse.version, worse.promoted) == ("1", True, "2", False)
    holder = client.get_model_version_by_alias("ulrl", "champion")
    assert str(holder.version) == "1" and holder.tags["selection_metric"] == "rsum"
    assert float(holder.tags["selection_value"]) == 10.0 and holder.tags["fingerprint"] == bundle.fingerprint()
    forced = log_and_register(make_bundle(2, promote="always"), uri, new_run(uri, tmp_path), {"rsum": 1.0})
    assert forced.promoted and str(client.get_model_version_by_alias("ulrl", "champion").version) == "3"
    with pytest.raises(RegistryError, match="selection_metric"):
        log_and_register(bundle, uri, new_run(uri, tmp_path), {"t2v_r1": 1.0})
    best = log_and_register(bundle, uri, new_run(uri, tmp_path), {"rsum": 10.0})  # beats version 3's 1.0
    assert best.promoted and str(client.get_model_version_by_alias("ulrl", "champion").version) == "4"

    expected = Encoder(bundle)
    texts = ["a big four moving upward", "a white seven on a video background"]
    videos = [np.random.default_rng(0).normal(size=(n, FRAME_DIM)).astype(np.float32) for n in (1, 37)]
    text_emb = expected.queries(texts)[0].numpy()
    video_emb = expected.videos(videos)[0].numpy()
    script = textwrap.dedent(f"""
        import json, sys
        import mlflow, numpy as np, pandas as pd
        mlflow.set_tracking_uri({uri!r})
        model = mlflow.pyfunc.load_model("models:/ulrl@champion")
        texts = model.predict(pd.DataFrame({{"text": {texts!r}}}))
        videos = np.load({str(tmp_path / "videos.npz")!r})
        frames = model.predict(pd.DataFrame({{"frames": [videos["a"], videos["b"].tolist()]}}))
        import ulrl.registry
        json.dump({{"text": texts.to_dict("list"), "frames": frames.to_dict("list"),
                   "module": ulrl.registry.__file__}}, sys.stdout)
    """)
    np.savez(tmp_path / "videos.npz", a=videos[0], b=videos[1])
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    answer = json.loads(done.stdout)
    assert "artifacts/code/ulrl" in answer["module"]  # the code logged with the model (code_paths)
    np.testing.assert_allclose(np.array(answer["text"]["embedding"]), text_emb, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.array(answer["frames"]["embedding"]), video_emb, rtol=1e-5, atol=1e-6)
    first_query = {c["concept"]: c["weight"] for c in answer["text"]["concepts"][0]}
    assert {"big": 1.0, "four": 1.0, "move": 1.0, "upward": 1.0}.items() <= first_query.items()
    assert "downward" in answer["text"]["contradicting"][0] and "small" in answer["text"]["contradicting"][0]
