#!/usr/bin/env bash
# Start a one-node Ray head for `ray job submit`, listening on 127.0.0.1 only.
#
#   cluster/local-up.sh
#   ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
#       python -m jobs.train --config jobs/configs/tiny.yaml
#   cluster/local-down.sh
#
# Loopback only: `--node-ip-address 127.0.0.1` alone is not enough (Ray swaps loopback for the host's
# outbound IP and its gRPC servers then listen on every interface). RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
# puts Ray in its single-node mode (the macOS/Windows default): node IP 127.0.0.1 and every listener on
# loopback. Such a head cannot take other nodes; use cluster YAML for a real cluster.
#
# Authentication: RAY_AUTH_MODE=token (the default here) makes the head require the token in
# ~/.ray/auth_token (created if missing). Clients must then run with RAY_AUTH_MODE=token too; they read the
# same file (or RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH). RAY_AUTH_MODE=disabled turns it off (tests do).
#
# The head runs as `ray start --block` in its own session; its PID, log and temp dir are kept in
# $ULRL_RAY_STATE (default outputs/ray-local, git-ignored), and local-down.sh stops exactly that process tree (never `ray stop`, which would stop
# every Ray process of this machine).
#
# Settings: ULRL_RAY_CPUS (logical CPUs, default: all), ULRL_RAY_OBJECT_STORE_MB (512), ULRL_RAY_PORT (6379),
# ULRL_RAY_DASHBOARD_PORT (8265), ULRL_RAY_STATE (outputs/ray-local), ULRL_RAY_TEMP_DIR (default: a new
# /tmp/ulrl-ray-*, removed by local-down.sh), ULRL_RAY_START_ARGS (more `ray start` flags, e.g. other ports),
# RAY (the ray executable; default .venv/bin/ray, else ray on PATH). Jobs run with the Python next to it.
set -euo pipefail
cd "$(dirname "$0")/.."

state=${ULRL_RAY_STATE:-outputs/ray-local}
port=${ULRL_RAY_PORT:-6379}
dashboard_port=${ULRL_RAY_DASHBOARD_PORT:-8265}
cpus=${ULRL_RAY_CPUS:-$(nproc)}
object_store_mb=${ULRL_RAY_OBJECT_STORE_MB:-512}
ray_bin=${RAY:-$( [ -x .venv/bin/ray ] && echo .venv/bin/ray || command -v ray )}
bin_dir=$(cd "$(dirname "$ray_bin")" && pwd)
export PATH="$bin_dir:$PATH"  # job entrypoints (`python -m jobs.train`) use the head's Python
python_bin=$bin_dir/python
[ -x "$python_bin" ] || python_bin=python3
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-token}
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_USAGE_STATS_ENABLED=0 RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0

if [ -f "$state/head.pid" ] && kill -0 "$(cat "$state/head.pid")" 2>/dev/null; then
  echo "error: a head started from $state is running (pid $(cat "$state/head.pid")); run cluster/local-down.sh" >&2
  exit 1
fi
mkdir -p "$state"
rm -f "$state/temp_dir.created"
if [ -n "${ULRL_RAY_TEMP_DIR:-}" ]; then
  temp_dir=$ULRL_RAY_TEMP_DIR
else
  temp_dir=$(mktemp -d /tmp/ulrl-ray-XXXXXX)  # short: Ray's socket paths live under it
  touch "$state/temp_dir.created"
fi
if [ "$RAY_AUTH_MODE" = token ]; then
  "$ray_bin" get-auth-token --generate >/dev/null
fi

setsid "$ray_bin" start --head --block --disable-usage-stats \
  --node-ip-address 127.0.0.1 --dashboard-host 127.0.0.1 \
  --port "$port" --dashboard-port "$dashboard_port" --num-cpus "$cpus" \
  --object-store-memory $((object_store_mb * 1024 * 1024)) --temp-dir "$temp_dir" ${ULRL_RAY_START_ARGS:-} \
  >"$state/head.log" 2>&1 </dev/null &
pid=$!
echo "$pid" >"$state/head.pid"
echo "$temp_dir" >"$state/temp_dir"
echo "http://127.0.0.1:$dashboard_port" >"$state/address"

# Ready when the job API answers (Ray prints "Ray runtime started" a little earlier).
for _ in $(seq 1 120); do
  if ! kill -0 "$pid" 2>/dev/null; then
    echo "error: ray start exited; last lines of $state/head.log:" >&2
    tail -n 20 "$state/head.log" >&2
    exit 1
  fi
  # any HTTP answer counts (with token auth the API may answer 401 to this anonymous probe)
  if "$python_bin" -c "
import urllib.error, urllib.request
try:
    urllib.request.urlopen('http://127.0.0.1:$dashboard_port/api/version', timeout=2)
except urllib.error.HTTPError:
    pass" 2>/dev/null; then
    prefix=""
    [ "$RAY_AUTH_MODE" = token ] && prefix="RAY_AUTH_MODE=token "
    echo "Ray head running (pid $pid, $cpus CPUs, dashboard http://127.0.0.1:$dashboard_port). Submit with:"
    echo "  ${prefix}ray job submit --address http://127.0.0.1:$dashboard_port --working-dir . -- python -m jobs.train --config jobs/configs/tiny.yaml"
    exit 0
  fi
  sleep 1
done
echo "error: the dashboard did not answer within 120 s; see $state/head.log (stop with cluster/local-down.sh)" >&2
exit 1
