#!/usr/bin/env bash
# Stop the Ray head started by cluster/local-up.sh: SIGTERM to its `ray start --block` process, which stops
# the GCS, raylet, dashboard and workers it started; after 30 s the whole process group gets SIGKILL.
# Only that process tree is touched (not `ray stop`, which would stop every Ray process of this machine).
# Settings: ULRL_RAY_STATE (outputs/ray-local), as for local-up.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

state=${ULRL_RAY_STATE:-outputs/ray-local}
if [ ! -f "$state/head.pid" ]; then
  echo "no head recorded in $state (nothing to stop)"
  exit 0
fi
pid=$(cat "$state/head.pid")
if kill -0 "$pid" 2>/dev/null; then
  kill -TERM "$pid"
  for _ in $(seq 1 30); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 1
  done
  if kill -0 "$pid" 2>/dev/null; then
    echo "head $pid still running after 30 s: killing its process group" >&2
    kill -KILL -- "-$pid" 2>/dev/null || true
  fi
  echo "stopped Ray head (pid $pid)"
else
  echo "head $pid was not running"
fi
if [ -f "$state/temp_dir.created" ]; then  # only a temp dir that local-up.sh created itself
  rm -rf "$(cat "$state/temp_dir")"
fi
rm -f "$state/head.pid" "$state/temp_dir" "$state/temp_dir.created" "$state/address"
