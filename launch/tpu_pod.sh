#!/usr/bin/env bash
# A multi-host wakea_jax run on a Cloud TPU VM pod slice: copies this checkout to every worker,
# installs it, then runs the same command on all workers at once.
#
#   TPU_NAME=my-v5e-32 ZONE=us-west4-a launch/tpu_pod.sh \
#       --config=configs/sft.py:quickstart --workdir=gs://BUCKET/runs/sft
#   launch/tpu_pod.sh --dry_run --config=... --workdir=...   # print the gcloud commands only
#
# On TPU VMs JAX finds the coordinator, the process count and this worker's id from the TPU
# metadata; WAKEA_DISTRIBUTED=1 tells wakea_jax.parallel.distributed to initialise with it.
# --workdir should be a gs:// path (or another filesystem every worker shares).
# Environment: TPU_NAME, ZONE (required), PROJECT (optional), MODULE (default
# wakea_jax.train), SETUP=0 to skip the copy and install, DRY_RUN=1 like --dry_run.
set -euo pipefail

dry_run=${DRY_RUN:-0}
if [[ ${1:-} == --dry_run ]]; then
  dry_run=1
  shift
fi
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
remote_dir=wakea_jax
gcloud=(gcloud compute tpus tpu-vm)
where=("$TPU_NAME" "--zone=$ZONE" ${PROJECT:+"--project=$PROJECT"} --worker=all)

# shellcheck source=launch/quote.sh
source "$(dirname "${BASH_SOURCE[0]}")/quote.sh"   # quote

run() {
  if [[ $dry_run == 1 ]]; then
    quote "$@"
  else
    "$@"
  fi
}

if [[ ${SETUP:-1} == 1 ]]; then
  archive=$(mktemp -u /tmp/wakea_jax.XXXXXX).tar.gz
  run git -C "$(cd "$(dirname "$0")/.." && pwd)" archive --format=tar.gz -o "$archive" HEAD
  run "${gcloud[@]}" scp "$archive" "${where[0]}:/tmp/wakea_jax.tar.gz" "${where[@]:1}"
  run rm -f "$archive"
  run "${gcloud[@]}" ssh "${where[@]}" --command="rm -rf $remote_dir && mkdir $remote_dir && \
tar -xzf /tmp/wakea_jax.tar.gz -C $remote_dir && \
python3 -m pip install -q -e ./$remote_dir \"jax[tpu]\""
fi

# Every worker runs this; the arguments are quoted once more for the remote shell.
args=$(quote "$@")
run "${gcloud[@]}" ssh "${where[@]}" \
  --command="cd $remote_dir && WAKEA_DISTRIBUTED=1 python3 -m ${MODULE:-wakea_jax.train} $args"
