#!/usr/bin/env bash
# A multi-host run as N processes on this machine: CPU, fake devices, gloo over loopback. For
# debugging a multi-host job on a laptop; every process runs the same command, as on a cluster.
#
#   NUM_PROCESSES=2 DEVICES_PER_PROCESS=2 launch/local.sh \
#       --config=configs/sft.py:test --config.train.steps=4 --workdir=/tmp/wakea_multihost
#   launch/local.sh --dry_run --config=...   # print the per-process commands only
#
# Sets JAX_COORDINATOR_ADDRESS (127.0.0.1, a free port), JAX_NUM_PROCESSES and JAX_PROCESS_ID.
# Process i writes LOG_DIR/process_i.log (LOG_DIR defaults to /tmp/wakea_local.<pid>).
# MODULE picks the binary (default wakea_jax.train), PYTHON the interpreter.
set -euo pipefail

dry_run=${DRY_RUN:-0}
if [[ ${1:-} == --dry_run ]]; then
  dry_run=1
  shift
fi
cd "$(dirname "$0")/.."
python=${PYTHON:-python}
num_processes=${NUM_PROCESSES:-2}
devices=${DEVICES_PER_PROCESS:-2}
log_dir=${LOG_DIR:-/tmp/wakea_local.$$}
port=${JAX_COORDINATOR_PORT:-$("$python" -c \
  'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}

# shellcheck source=launch/quote.sh
source "$(dirname "${BASH_SOURCE[0]}")/quote.sh"   # quote

pids=()
if [[ $dry_run == 0 ]]; then
  mkdir -p "$log_dir"
fi
for ((i = 0; i < num_processes; i++)); do
  cmd=(env "JAX_COORDINATOR_ADDRESS=127.0.0.1:$port" "JAX_NUM_PROCESSES=$num_processes"
       "JAX_PROCESS_ID=$i" JAX_PLATFORMS=cpu
       "XLA_FLAGS=--xla_force_host_platform_device_count=$devices"
       "$python" -m "${MODULE:-wakea_jax.train}" "$@")
  if [[ $dry_run == 1 ]]; then
    echo "$(quote "${cmd[@]}") > $log_dir/process_$i.log 2>&1 &"
  else
    "${cmd[@]}" > "$log_dir/process_$i.log" 2>&1 &
    pids+=("$!")
  fi
done
if [[ $dry_run == 1 ]]; then
  exit 0
fi

echo "$num_processes processes, logs in $log_dir"
for ((left = num_processes; left > 0; left--)); do
  if ! wait -n; then
    # The others would wait for the lost process until JAX's heartbeat timeout.
    kill "${pids[@]}" 2>/dev/null || true
    tail -n 20 "$log_dir"/process_*.log >&2
    echo "a process failed; logs in $log_dir" >&2
    exit 1
  fi
done
echo "all $num_processes processes finished"
