#!/usr/bin/env bash
# GPU check for a lent GPU machine: prints the GPU, then times a few DDP (nccl, world size 1) + bf16 training
# steps of the paper-sized ITV model and compares them with a bf16 GEMM (benchmarks/gpu_check.py has the
# details and the flags). Where no CUDA device is visible it prints a "no GPU" line and exits 0.
#
#   benchmarks/gpu_check.sh                                   # paper shapes: B=128, T=64, F=4096, K=10000
#   benchmarks/gpu_check.sh --steps 50 --batch 256 --json outputs/gpu_check.json
#
# Needs torch (CUDA build), numpy and pyyaml; the package is used from this checkout, not installed.
set -euo pipefail
cd "$(dirname "$0")/.."

# The first interpreter whose torch sees CUDA; else the first with torch (which then reports "no GPU").
pick_python() {
  local candidate status fallback=""
  for candidate in "${PYTHON:-}" .venv/bin/python python3 python; do
    [ -n "$candidate" ] && command -v "$candidate" >/dev/null 2>&1 || continue
    # exit 0: torch sees CUDA; 3: torch without CUDA; anything else: no usable torch.
    status=0
    "$candidate" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 3)' 2>/dev/null || status=$?
    if [ "$status" -eq 0 ]; then echo "$candidate"; return; fi
    if [ "$status" -eq 3 ] && [ -z "$fallback" ]; then fallback=$candidate; fi
  done
  echo "$fallback"
}

PY=$(pick_python)
if [ -z "$PY" ]; then
  echo "no GPU check: no Python interpreter with torch found (set PYTHON=...)"
  exit 0
fi
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
# One process: NCCL's bootstrap and gloo need only the loopback interface.
export NCCL_SOCKET_IFNAME="${NCCL_SOCKET_IFNAME:-lo}" GLOO_SOCKET_IFNAME="${GLOO_SOCKET_IFNAME:-lo}"
exec "$PY" benchmarks/gpu_check.py "$@"
