"""Offline checks of the cluster configs (ray_cluster.yaml, cluster/*.yaml) and of benchmarks/gpu_check.

The cluster launcher config goes through the installed Ray's own schema and config preparation (with every
socket call patched to fail, so "offline" is checked, not assumed); the KubeRay RayJob and the runtime env are
parsed and their entrypoints run through the real config loader; the working-dir excludes go through Ray's
own packager. Nothing here starts Ray; only the last test (integration) runs training steps, on the CPU.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import re
import shlex
import socket
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

from ulrl.config import ModelConfig, load_config, parse_overrides

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_YAML = ROOT / "ray_cluster.yaml"
RAYJOB_YAML = ROOT / "cluster" / "rayjob-train.yaml"
RUNTIME_ENV_YAML = ROOT / "cluster" / "runtime_env.yaml"
GPU_CHECK = ROOT / "benchmarks" / "gpu_check.py"
COMMAND_KEYS = ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
                "head_start_ray_commands", "worker_start_ray_commands")  # fmt: skip
SECRET_NAME = re.compile(r"SECRET|PASSWORD|TOKEN|ACCESS_KEY|CREDENTIAL", re.IGNORECASE)
SECRET_TEXT = re.compile(r"AKIA[0-9A-Z]{16}|secret_access_key\W{1,3}[A-Za-z0-9/+]{30,}", re.IGNORECASE)
"""An AWS access key id, or a secret key of real length (placeholders such as ``=...`` pass)."""


def _yaml(path: Path):
    return yaml.safe_load(path.read_text())


def _pyproject_dependencies() -> list[str]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]


def ray_pin() -> str:
    """The ``==`` version of ray in pyproject.toml."""
    (spec,) = [d for d in _pyproject_dependencies() if re.match(r"ray(\[|=)", d)]
    return re.search(r"==\s*([\w.]+)", spec).group(1)


def torch_pin() -> str:
    """The torch version the Makefile installs (``TORCH_CPU ?= torch==X``)."""
    return re.search(r"TORCH_CPU \?= torch==([\w.]+)", (ROOT / "Makefile").read_text()).group(1)


def _package_name(requirement: str) -> str:
    return re.split(r"[\[<>=!~ ;]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def job_command(argv: list[str]) -> tuple[str, str | None, list[str]]:
    """``python -m jobs.X [--config F] k=v ...`` → (module, config file, overrides)."""
    start = argv.index("-m") + 1
    module, rest = argv[start], argv[start + 1:]
    config = rest[rest.index("--config") + 1] if "--config" in rest else None
    overrides = [arg for arg in rest if "=" in arg and not arg.startswith("-")]
    return module, config, overrides


def check_job_command(argv: list[str]):
    """The module is a file under jobs/, the config file exists, every override is a valid key; → config."""
    module, config, overrides = job_command(argv)
    assert module.startswith("jobs."), f"{module} is not a module under jobs/"
    assert (ROOT / (module.replace(".", "/") + ".py")).is_file(), f"{module}: no such file under jobs/"
    if config is not None:
        assert (ROOT / config).is_file(), f"--config {config} does not exist"
    return load_config(ROOT / config if config else None, overrides)


def header_commands(path: Path) -> list[str]:
    """Commands in the leading comment block: lines ``#   cmd``, joined across trailing backslashes."""
    commands, current = [], ""
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        if not line.startswith("#   "):
            continue
        text = line[4:].split("  #", 1)[0].strip()
        current = f"{current} {text.rstrip(chr(92)).strip()}".strip()
        if not text.endswith("\\"):
            commands.append(current)
            current = ""
    return commands


@pytest.fixture
def no_network(monkeypatch):
    """Every way out of the process through a socket raises."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args[:2]}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


@pytest.fixture(scope="module")
def cluster_raw() -> dict:
    return _yaml(CLUSTER_YAML)


@pytest.fixture(scope="module")
def cluster_prepared(cluster_raw) -> dict:
    from ray.autoscaler._private.util import prepare_config

    return prepare_config(copy.deepcopy(cluster_raw))


# --------------------------------------------------------------------------------------- ray_cluster.yaml


def test_cluster_yaml_matches_installed_ray_schema(cluster_raw):
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(cluster_raw, schema)
    broken = {**cluster_raw, "setup_comands": []}  # the validator is live: a typo key fails
    with pytest.raises(jsonschema.ValidationError, match="setup_comands"):
        jsonschema.validate(broken, schema)


def test_cluster_yaml_passes_ray_prepare_and_validate_offline(cluster_raw, no_network):
    from ray.autoscaler._private.util import prepare_config, validate_config

    with pytest.raises(AssertionError, match="network access"):  # the guard is in place
        socket.getaddrinfo("ec2.us-east-1.amazonaws.com", 443)
    validate_config(prepare_config(copy.deepcopy(cluster_raw)))
    wrong_head = {**copy.deepcopy(cluster_raw), "head_node_type": "no.such.type"}
    with pytest.raises(ValueError, match="head_node_type"):
        validate_config(prepare_config(wrong_head))


def test_head_trains_nothing_and_gpu_workers_exist(cluster_prepared):
    types = cluster_prepared["available_node_types"]
    head = types[cluster_prepared["head_node_type"]]
    assert head["resources"]["CPU"] == 0 and head["resources"]["driver"] >= 1
    workers = [t for name, t in types.items() if name != cluster_prepared["head_node_type"]]
    assert workers, "no worker node type"
    for worker in workers:
        assert re.match(r"g[56]\.", worker["node_config"]["InstanceType"]), "worker type is not a g5/g6 GPU"
        assert 0 <= worker["min_workers"] <= worker["max_workers"] <= cluster_prepared["max_workers"]


def test_docker_image_is_the_pinned_ray(cluster_raw):
    pin = ray_pin()
    assert ray.__version__ == pin, f"installed ray {ray.__version__} != pyproject pin {pin}"
    docker = cluster_raw["docker"]
    images = [docker[k] for k in ("image", "head_image", "worker_image") if k in docker]
    images += [t["docker"]["worker_image"] for t in cluster_raw["available_node_types"].values()
               if "worker_image" in t.get("docker", {})]  # fmt: skip
    assert images
    for image in images:
        assert re.fullmatch(rf"rayproject/ray:{re.escape(pin)}-py3\d+(-gpu|-cpu)?", image), image


def test_dashboard_stays_on_loopback(cluster_prepared):
    """After Ray merges its AWS defaults (whose head command binds 0.0.0.0), no command exposes the dashboard."""
    commands = [cmd for key in COMMAND_KEYS for cmd in cluster_prepared[key]]
    assert any("ray start --head" in cmd for cmd in cluster_prepared["head_start_ray_commands"])
    for cmd in commands:
        assert "0.0.0.0" not in cmd, cmd
        for host in re.findall(r"--dashboard-host[= ](\S+)", cmd):
            assert host in ("127.0.0.1", "localhost"), cmd


def test_token_auth_on_every_node(cluster_prepared):
    mounts = cluster_prepared["file_mounts"]
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        (start,) = [cmd for cmd in cluster_prepared[key] if "ray start" in cmd]
        before = start.split("ray start")[0]
        assert "RAY_AUTH_MODE=token" in before, f"{key}: ray start without RAY_AUTH_MODE=token"
        token_path = re.search(r"RAY_AUTH_TOKEN_PATH=(\S+)", before).group(1)
        assert any(token_path.startswith(remote.rstrip("/") + "/") for remote in mounts), (
            f"{token_path} is not inside a file_mounts target, so nodes would not share the token"
        )
    commands = [cmd for key in COMMAND_KEYS for cmd in cluster_prepared[key]]
    assert not any("RAY_AUTH_MODE=disabled" in cmd for cmd in commands)


def test_user_values_are_marked(cluster_raw):
    lines = CLUSTER_YAML.read_text().splitlines()
    for key in ("region:", "availability_zone:", "ImageId:", "Arn:", "MLFLOW_TRACKING_URI="):
        hits = [line for line in lines if key in line]
        assert hits and all("CHANGE ME" in line for line in hits), f"{key} lines must say # CHANGE ME"
    assert "s3://CHANGE-ME-bucket" in CLUSTER_YAML.read_text()


def test_header_commands_are_real(cluster_raw):
    commands = header_commands(CLUSTER_YAML)
    assert any(cmd.startswith("ray up") and "ray_cluster.yaml" in cmd for cmd in commands)
    assert any(cmd.startswith("ray dashboard ray_cluster.yaml") for cmd in commands)
    (submit,) = [cmd for cmd in commands if cmd.startswith("ray job submit")]
    argv = shlex.split(submit.replace("$MLFLOW_TRACKING_URI", "http://mlflow.example:5000"))
    assert argv[argv.index("--address") + 1] == "http://127.0.0.1:8265"
    assert argv[argv.index("--working-dir") + 1] == "."
    assert (ROOT / argv[argv.index("--runtime-env") + 1]).is_file()
    assert json.loads(argv[argv.index("--entrypoint-resources") + 1]) == {"driver": 1}
    cfg = check_job_command(argv[argv.index("--") + 1:])
    assert cfg.train.use_gpu and cfg.store.uri.startswith("s3://")


# --------------------------------------------------------------------------------------- KubeRay RayJob


@pytest.fixture(scope="module")
def rayjob() -> dict:
    return _yaml(RAYJOB_YAML)


def _containers(rayjob: dict) -> list[dict]:
    spec = rayjob["spec"]["rayClusterSpec"]
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    return [c for group in groups for c in group["template"]["spec"]["containers"]]


def _runtime_env(rayjob: dict) -> dict:
    return yaml.safe_load(rayjob["spec"]["runtimeEnvYAML"])


def test_rayjob_manifest_shape(rayjob):
    pin, spec = ray_pin(), rayjob["spec"]
    assert (rayjob["apiVersion"], rayjob["kind"]) == ("ray.io/v1", "RayJob")
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
    assert spec["rayClusterSpec"]["rayVersion"] == pin
    assert spec["rayClusterSpec"]["authOptions"]["mode"] == "token"
    assert spec["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    for container in _containers(rayjob):
        assert re.fullmatch(rf"rayproject/ray:{re.escape(pin)}-py3\d+(-gpu|-cpu)?", container["image"])


def test_rayjob_gpu_workers_fit_the_training_config(rayjob):
    cfg = check_job_command(shlex.split(rayjob["spec"]["entrypoint"]))
    gpus = 0
    for group in rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"]:
        (container,) = group["template"]["spec"]["containers"]
        limits, requests = container["resources"]["limits"], container["resources"]["requests"]
        assert int(limits["nvidia.com/gpu"]) >= 1 and requests["nvidia.com/gpu"] == limits["nvidia.com/gpu"]
        # ulrl.raycluster.check_resources: a worker's CPUs plus at least one for Ray Data on the node.
        assert cfg.train.cpus_per_worker + 1 <= float(limits["cpu"])
        gpus += group["replicas"] * int(limits["nvidia.com/gpu"])
    assert cfg.train.use_gpu and cfg.train.num_workers <= gpus


def test_rayjob_entrypoint_and_runtime_env(rayjob):
    from ray.runtime_env import RuntimeEnv

    cfg = check_job_command(shlex.split(rayjob["spec"]["entrypoint"]))
    env = _runtime_env(rayjob)
    RuntimeEnv(**env)  # Ray's own validation of the runtime env fields
    assert re.fullmatch(r"s3://[^ ]+\.zip", env["working_dir"])
    assert env["env_vars"]["MLFLOW_TRACKING_URI"] == cfg.tracking.uri
    packages = env["pip"]["packages"]
    assert f"torch=={torch_pin()}" in packages
    wanted = {_package_name(d) for d in _pyproject_dependencies()} - {"ray"}
    assert wanted <= {_package_name(p) for p in packages}, "runtime env pip misses pyproject dependencies"


def literal_secrets(node, where: str = "") -> list[str]:
    """Paths of env entries with a secret-looking name and a literal value, and secret-looking env_vars."""
    found = []
    if isinstance(node, dict):
        if "name" in node and "value" in node and SECRET_NAME.search(str(node["name"])):
            found.append(f"{where}.{node['name']}")
        for key, value in node.items():
            if key == "env_vars" and isinstance(value, dict):
                found += [f"{where}.env_vars.{k}" for k in value if SECRET_NAME.search(k)]
            found += literal_secrets(value, f"{where}.{key}")
    elif isinstance(node, list):
        for i, item in enumerate(node):
            found += literal_secrets(item, f"{where}[{i}]")
    return found


def test_no_literal_secrets(rayjob):
    documents = {"rayjob": rayjob, "runtimeEnvYAML": _runtime_env(rayjob), "runtime_env": _yaml(RUNTIME_ENV_YAML)}
    for name, document in documents.items():
        assert literal_secrets(document) == [], name
    for path in (CLUSTER_YAML, RAYJOB_YAML, RUNTIME_ENV_YAML):
        assert not SECRET_TEXT.search(path.read_text()), path
    for container in _containers(rayjob):
        assert any("secretRef" in source for source in container.get("envFrom", [])), container["name"]
    leaky = copy.deepcopy(rayjob)  # the scanner is live: a literal key is found
    _containers(leaky)[0].setdefault("env", []).append({"name": "AWS_SECRET_ACCESS_KEY", "value": "x"})
    assert literal_secrets(leaky)


# --------------------------------------------------------------------------------------- runtime env


def test_runtime_env_yaml_is_valid():
    from ray.runtime_env import RuntimeEnv

    env = _yaml(RUNTIME_ENV_YAML)
    RuntimeEnv(**env)
    assert env["working_dir"] == "."
    assert "MLFLOW_TRACKING_URI" in env["env_vars"]


def test_runtime_env_excludes_leave_data_out(tmp_path):
    """Ray's own packager, .gitignore ignored, keeps the code and drops venv, data, outputs, MLflow files."""
    from ray._private.runtime_env.packaging import create_package

    kept = ["ulrl/data.py", "ulrl/model.py", "jobs/train.py", "jobs/configs/digits.yaml", "pyproject.toml"]
    dropped = [".venv/bin/python", "data/store/manifest.json", "outputs/eval/metrics.json", "mlflow.db",
               "mlruns/0/meta.yaml", ".git/HEAD", "ulrl/__pycache__/model.pyc", "ulrl.egg-info/PKG-INFO"]
    tree = tmp_path / "repo"
    for relative in kept + dropped:
        (tree / relative).parent.mkdir(parents=True, exist_ok=True)
        (tree / relative).write_text("x")
    package = tmp_path / "package.zip"
    create_package(str(tree), package, include_gitignore=False, excludes=_yaml(RUNTIME_ENV_YAML)["excludes"])
    assert sorted(zipfile.ZipFile(package).namelist()) == sorted(kept)


def test_working_dir_upload_of_this_checkout_is_small(tmp_path):
    """What `ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml` would upload from here."""
    from ray._private.ray_constants import get_runtime_env_default_excludes
    from ray._private.runtime_env.packaging import create_package

    excludes = get_runtime_env_default_excludes() + _yaml(RUNTIME_ENV_YAML)["excludes"]
    package = tmp_path / "package.zip"
    create_package(str(ROOT), package, include_gitignore=True, excludes=excludes)
    infos = zipfile.ZipFile(package).infolist()
    largest = sorted(infos, key=lambda i: i.file_size)[-3:]
    assert package.stat().st_size < 20 * 2**20, [(i.filename, i.file_size) for i in largest]
    assert not any(i.filename.startswith((".venv/", "data/", ".git/")) for i in infos)


def test_docs_example_config_loads(tmp_path):
    """The AVS config docs/scale.md tells users to write is a valid config (keys, types, quoted names)."""
    block = re.search(r"```yaml\n(.*?)```", (ROOT / "docs" / "scale.md").read_text(), re.S).group(1)
    (tmp_path / "my-avs.yaml").write_text(block)
    cfg = load_config(tmp_path / "my-avs.yaml")
    assert cfg.data.source == "avs" and cfg.train.use_gpu and cfg.store.uri.startswith("s3://")
    assert len(cfg.data.avs.features) == 2 and all("," in name for name in cfg.data.avs.features)


# --------------------------------------------------------------------------------------- gpu_check


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", GPU_CHECK)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


TINY_MODEL = ["model.embed_dim=16", "model.video_rnn_size=8", "model.text_rnn_size=6", "model.word_dim=5",
              "model.video_num_filters=4", "model.text_num_filters=3"]  # fmt: skip


def tiny_model_config():
    from ulrl.config import JobConfig, apply_overrides

    return apply_overrides(JobConfig(), parse_overrides(TINY_MODEL))


def test_flop_model_matches_torch_flop_counter(gpu_check):
    """The analytic forward FLOPs equal what torch counts on the CPU (where the GRU runs as addmm)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from ulrl.losses import total_loss

    cfg = tiny_model_config()
    shape = gpu_check.Shape(batch=6, frames=7, frame_dim=12, clip_dim=3, words=5, vocab=30, concepts=20,
                            positives=3, antonym_pairs=5)  # fmt: skip
    generator = torch.Generator().manual_seed(0)
    batch, contradiction = gpu_check.synthetic_batch(shape, generator), gpu_check.contradiction_matrix(shape, generator)
    model = gpu_check.build_model(cfg.model, shape.dims())
    with FlopCounterMode(display=False) as counted_model:
        out = model(batch)
    with FlopCounterMode(display=False) as counted_loss:
        total_loss({k: v.detach() for k, v in out.items()}, batch, contradiction, cfg.loss)
    lengths = batch["frame_mask"].sum(1), batch["token_mask"].sum(1)
    model_part = gpu_check.model_flops(cfg.model, shape.dims(), lengths[0], shape.frames, lengths[1], shape.words)
    assert sum(model_part.values()) == counted_model.get_total_flops()
    assert sum(gpu_check.loss_flops(shape.batch, 16, shape.concepts).values()) == counted_loss.get_total_flops()


def _gru(inputs: int, hidden: int) -> int:
    return 2 * (3 * hidden * (inputs + hidden) + 6 * hidden)  # two directions: W_ih, W_hh, b_ih, b_hh


def _convs(channels: int, filters: int, kernels: list[int]) -> int:
    return sum(channels * filters * k + filters for k in kernels)


def expected_parameters(cfg: ModelConfig, frame_dim: int, vocab: int, concepts: int) -> int:
    """Naive count for the multilevel model without clip features (linears without bias, BN weight+bias)."""
    embed = cfg.embed_dim
    video_out = 2 * cfg.video_rnn_size + len(cfg.video_kernel_sizes) * cfg.video_num_filters
    text_out = 2 * cfg.text_rnn_size + len(cfg.text_kernel_sizes) * cfg.text_num_filters
    video = (_gru(frame_dim, cfg.video_rnn_size) + _convs(2 * cfg.video_rnn_size, cfg.video_num_filters,
             cfg.video_kernel_sizes) + (video_out + frame_dim) * embed + 2 * embed)  # fmt: skip
    text = (vocab * cfg.word_dim + _gru(cfg.word_dim, cfg.text_rnn_size) + _convs(2 * cfg.text_rnn_size,
            cfg.text_num_filters, cfg.text_kernel_sizes) + (text_out + vocab) * embed + 2 * embed)  # fmt: skip
    return video + text + embed * concepts + 2 * concepts


@pytest.mark.parametrize("vocab,concepts", [(10000, 10000), (20000, 11147)])
def test_parameter_count_of_the_paper_model(gpu_check, vocab, concepts):
    cfg = ModelConfig()
    dims = gpu_check.ModelDims(4096, 0, vocab, concepts, 0)
    assert gpu_check.parameter_count(cfg, dims) == expected_parameters(cfg, 4096, vocab, concepts)
    assert gpu_check.parameter_count(cfg, dims) == 76_015_104 + 2548 * vocab + 2050 * concepts  # docs/scale.md


def test_collate_probe_feeds_the_real_collate(gpu_check):
    """--collate-only times ulrl.data.TrainCollate on store-shaped rows; they collate to the model's batch."""
    import torch

    from ulrl.data import TrainCollate

    shape = gpu_check.Shape(batch=4, frames=6, frame_dim=8, words=5, vocab=30, concepts=20, positives=3)
    table = gpu_check.arrow_videos(shape, torch.Generator().manual_seed(0))
    batch = TrainCollate(0, 0, shape.frames, shape.words, shape.concepts, shape.frame_dim)(table)
    assert batch["frames"].shape[0] == 4 and batch["frames"].shape[2] == 8 and batch["frames"].shape[1] <= 6
    assert batch["concept_labels"].sum(1).tolist() == [3.0] * 4
    assert batch["token_mask"].any(1).all()
    rates = gpu_check.collate_rate(shape, seed=0, min_seconds=0.01)
    assert rates["collate_samples_per_second"] > 0


def test_gpu_check_without_a_gpu_says_so_and_succeeds():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the script would measure it")
    done = subprocess.run([str(ROOT / "benchmarks" / "gpu_check.sh")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1].startswith("no GPU")


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_gpu_check_cpu_path_trains(gpu_check, tmp_path):
    """The same DDP path with gloo on the CPU: two steps, finite loss, numbers consistent with the FLOP model."""
    out = tmp_path / "result.json"
    argv = [sys.executable, str(GPU_CHECK), "--cpu", "--steps", "2", "--warmup", "1", "--batch", "8",
            "--frames", "6", "--frame-dim", "16", "--words", "5", "--vocab", "30", "--concepts", "20",
            "--positives", "3", "--antonym-pairs", "5", "--json", str(out), *TINY_MODEL]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=280)
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(out.read_text())
    assert result["backend"] == "gloo" and result["bf16"] is False
    assert math.isfinite(result["loss"]) and result["samples_per_second"] > 0
    assert result["parameters"] == expected_parameters(tiny_model_config().model, 16, 30, 20)
    assert result["allreduce_bytes_fp32"] == 4 * result["parameters"]
    assert "samples/s" in done.stdout and "TFLOP/s" in done.stdout

