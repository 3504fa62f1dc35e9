#!/usr/bin/env bash
# One task of a SLURM job (one task per host): maps SLURM's variables to the ones
# wakea_jax.parallel.distributed reads, then runs the command given as arguments.
#
#   srun launch/slurm_task.sh python -m wakea_jax.train --config=... --workdir=...
#
#   JAX_COORDINATOR_ADDRESS  first host of the step's node list, port 61440 + SLURM_JOB_ID % 4096
#                            (JAX's own SLURM convention; JAX_COORDINATOR_PORT overrides the port,
#                            an exported JAX_COORDINATOR_ADDRESS overrides both)
#   JAX_NUM_PROCESSES        SLURM_NTASKS
#   JAX_PROCESS_ID           SLURM_PROCID
#
# DRY_RUN=1 (or --dry_run as the first argument) prints the variables and the command instead.
set -euo pipefail

dry_run=${DRY_RUN:-0}
if [[ ${1:-} == --dry_run ]]; then
  dry_run=1
  shift
fi

# shellcheck source=launch/quote.sh
source "$(dirname "${BASH_SOURCE[0]}")/quote.sh"   # quote

# The first host of a SLURM node list: node7, node[003-010,12],gpu1 -> node7, node003.
first_host() {
  local list=$1 prefix rest
  if command -v scontrol >/dev/null 2>&1; then
    local hosts
    mapfile -t hosts < <(scontrol show hostnames "$list")
    echo "${hosts[0]}"
    return
  fi
  prefix=${list%%[\[,]*}
  if [[ ${list:${#prefix}:1} == "[" ]]; then
    rest=${list:${#prefix}+1}
    echo "${prefix}${rest%%[-,\]]*}"
  else
    echo "$prefix"
  fi
}

: "${SLURM_JOB_ID:?not inside a SLURM job}" "${SLURM_NTASKS:?}" "${SLURM_PROCID:?}"
nodes=${SLURM_STEP_NODELIST:-${SLURM_JOB_NODELIST:?}}
port=${JAX_COORDINATOR_PORT:-$((61440 + SLURM_JOB_ID % 4096))}
export JAX_COORDINATOR_ADDRESS=${JAX_COORDINATOR_ADDRESS:-$(first_host "$nodes"):$port}
export JAX_NUM_PROCESSES=$SLURM_NTASKS
export JAX_PROCESS_ID=$SLURM_PROCID

if [[ $dry_run == 1 ]]; then
  echo "JAX_COORDINATOR_ADDRESS=$JAX_COORDINATOR_ADDRESS JAX_NUM_PROCESSES=$JAX_NUM_PROCESSES" \
       "JAX_PROCESS_ID=$JAX_PROCESS_ID"
  quote "$@"
  exit 0
fi
exec "$@"
