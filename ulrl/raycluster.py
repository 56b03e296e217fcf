"""Connecting a job to Ray (an existing cluster when an address is known, else a local one on loopback) and
checking that the cluster can ever hold a training run's workers."""

from __future__ import annotations

import os

from ulrl.config import RayConfig, TrainConfig

MIB = 1024**2
MIN_FREE_CPUS = 1.0
"""Ray Data read tasks need a whole free CPU; without one, training waits forever for its first batch."""


class ResourceError(RuntimeError):
    """The cluster can never hold the requested workers; the message says what to change."""


def cluster_address(cfg: RayConfig) -> str:
    """``ray.address``, else ``RAY_ADDRESS`` (``ray job submit`` sets it); "" (or ``local``) means start one."""
    address = cfg.address or os.environ.get("RAY_ADDRESS", "")
    return "" if address == "local" else address


def prefer_loopback(cfg: RayConfig) -> bool:
    """Before ``import ray``: make a local cluster (no address known) listen on 127.0.0.1 only.

    ``ray.init()`` swaps a loopback node IP for the host's outbound IP and its gRPC servers then listen on
    every interface; ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` selects Ray's single-node mode (its macOS /
    Windows default), in which every listener is on loopback. Returns whether the mode was set; it cannot
    be once Ray is imported (Ray reads the variable at import) or when joining a cluster.
    """
    import sys

    if cluster_address(cfg) or "ray" in sys.modules:
        return False
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    return True


def connect(cfg: RayConfig) -> str:
    """``ray.init`` once per process; returns how it connected (``"address"`` or ``"local"``).

    With an address (:func:`cluster_address`) → join that cluster. Otherwise start a local cluster with
    ``ray.num_cpus`` logical CPUs (0 = all), an object store of ``ray.object_store_mb`` and its dashboard on
    127.0.0.1 (call :func:`prefer_loopback` before importing Ray to keep every other listener there too).
    ``address="local"``: a bare ``ray.init()`` would join whichever head ``ray start`` last recorded in
    /tmp/ray, even one of another user. Ray Data progress bars are turned off for readable job logs.
    """
    import ray
    from ray.data import DataContext

    address = cluster_address(cfg)
    if not ray.is_initialized():
        if address:
            ray.init(address=address)
        else:
            ray.init(
                address="local",
                num_cpus=int(cfg.num_cpus) if cfg.num_cpus else None,
                object_store_memory=cfg.object_store_mb * MIB,
                dashboard_host="127.0.0.1",
                include_dashboard=True,
                runtime_env={"env_vars": {"RAY_DATA_DISABLE_PROGRESS_BARS": "1"}},
            )
    DataContext.get_current().enable_progress_bars = False
    return "address" if address else "local"


def worker_resources(train: TrainConfig) -> dict[str, float]:
    """Resources of one Train worker: ``train.cpus_per_worker`` CPUs, plus one GPU with ``train.use_gpu``."""
    resources = {"CPU": train.cpus_per_worker}
    if train.use_gpu:
        resources["GPU"] = 1
    return resources


def check_resources(train: TrainConfig, cluster: dict[str, float]) -> None:
    """Raise :class:`ResourceError` when the workers (plus one CPU for Ray Data) exceed the cluster's
    *total* resources (``ray.cluster_resources()``): Ray would otherwise wait forever for a placement group
    it can never get. Judged on the nodes present now, so an autoscaling cluster must be scaled up first."""
    need_cpu = train.num_workers * train.cpus_per_worker
    have_cpu = cluster.get("CPU", 0.0)
    if need_cpu + MIN_FREE_CPUS > have_cpu:
        raise ResourceError(
            f"train.num_workers={train.num_workers} × train.cpus_per_worker={train.cpus_per_worker:g} = "
            f"{need_cpu:g} CPUs, plus {MIN_FREE_CPUS:g} for Ray Data, exceeds the cluster's {have_cpu:g} CPUs"
        )
    have_gpu = cluster.get("GPU", 0.0)
    if train.use_gpu and train.num_workers > have_gpu:
        raise ResourceError(
            f"train.num_workers={train.num_workers} with train.use_gpu needs {train.num_workers} GPUs; "
            f"the cluster has {have_gpu:g}"
        )
