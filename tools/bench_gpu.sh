#!/usr/bin/env bash
# GPU benchmark of the bf16 + cuDNN-attention path, in under 8 minutes on one H100/H200:
#   (a) nvidia-smi's GPU, jax's devices, cuDNN version, assumed peaks
#   (a2) cuDNN attention against the native kernel in float32, values and gradients, at the
#       llama3.2-1b head shapes (tools/bench_gpu.py --section=parity)
#   (b) train-step MFU, llama3.2-1b shapes, bf16 compute, attention=cudnn, 8 x 2048 packed,
#       remat "dots" (tools/bench_gpu.py --section=train)
#   (c) decode tokens/s through sampling.Sampler, batch 64, prompt 128, 256 new tokens
#       (tools/bench_gpu.py --section=decode)
#   (d) one GRPO step of the real learner, llama3.2-1b shapes, attention=cudnn, 2 prompts x 8
#       completions, 64 prompt + 128 new tokens, KL on (tools/bench_grpo.py)
# Each section is its own process with its own time limit (the limits add up to 510 s), so a
# failure or a hang costs only that section; the script goes on and exits 1 if any failed.
#
#   bash tools/bench_gpu.sh            # on the GPU machine
#   bash tools/bench_gpu.sh --smoke    # anywhere (CPU): toy sizes, float32, attention=xla;
#                                      # what tests/tools/test_bench_gpu.py runs
#
# Installs nothing (the GPU machine has no network). It needs a Python that imports this
# repository's requirements and a CUDA build of the same jax version (setup.cfg: jax 0.10.x,
# e.g. `pip install "jax[cuda12]==$(python -c 'import jax; print(jax.__version__)')"` done
# beforehand). Python: $PYTHON, else .venv/bin/python, else python3.
# Measured 2026-12-05 on an H100 (README, "On a GPU") with that machine's own jax 0.11.2
# (CUDA 13) and, carried as wheels and put first on PYTHONPATH: flax 0.12.12 (0.12.8 needs
# jax 0.10), optax 0.2.8, chex 0.1.92, orbax-checkpoint 0.12.8, grain 0.2.18, array_record
# 0.8.6, clu 0.0.12, ml_collections 1.1.0, portpicker 1.6.0; `--smoke` passes with the
# same set on a CPU jax 0.11.2, which is how it was checked before the lease. To repeat it:
#   here:  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#            --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
#            -d .whl flax==0.12.12 optax==0.2.8 chex==0.1.92 orbax-checkpoint==0.12.8 \
#            grain==0.2.18 array_record==0.8.6 clu==0.0.12 ml_collections==1.1.0 portpicker==1.6.0
#   there: python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl &&
#          PYTHONPATH=/tmp/site PYTHON=python3 bash tools/bench_gpu.sh
set -u -o pipefail
cd "$(dirname "$0")/.."

smoke=0
case "${1:-}" in
  "") ;;
  --smoke) smoke=1 ;;
  *) echo "usage: bash tools/bench_gpu.sh [--smoke]" >&2; exit 2 ;;
esac

py="${PYTHON:-}"
if [ -z "$py" ]; then
  if [ -x .venv/bin/python ]; then py=.venv/bin/python; else py=python3; fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ! "$py" -c "import jax, flax, wakea_jax" 2>/dev/null; then
  echo "bench_gpu: $py cannot import jax, flax and wakea_jax; point PYTHON at a venv with the" \
       "repository's requirements (and jax[cuda12] for the GPU run). Nothing is installed here." >&2
  exit 2
fi
if [ "$smoke" = 0 ]; then
  backend="$("$py" -c "import jax; print(jax.default_backend())" 2>/dev/null)"
  if [ "$backend" != "gpu" ]; then
    echo "bench_gpu: jax sees no GPU (default backend '$backend'): this Python needs a CUDA" \
         "jax (jax[cuda12] of the installed jax version) and a visible NVIDIA GPU; or run" \
         "'bash tools/bench_gpu.sh --smoke' for the CPU check." >&2
    exit 2
  fi
  # One process per section: let each use nearly all of the GPU's memory.
  export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}"
fi

start=$SECONDS
failed=()
section() {   # section NAME LIMIT_S COMMAND...
  local name=$1 limit=$2
  shift 2
  echo
  echo "=== $name (limit ${limit} s) ==="
  timeout --kill-after=10 "$limit" "$@"
  local rc=$?
  if [ "$rc" -ne 0 ]; then
    [ "$rc" -eq 124 ] && echo "=== $name: timed out after ${limit} s ===" \
                      || echo "=== $name: FAILED (exit $rc) ==="
    failed+=("$name")
  fi
}

echo "bench_gpu $([ "$smoke" = 1 ] && echo "--smoke (toy sizes on whatever jax sees)")"
if commit="$(git rev-parse --short HEAD 2>/dev/null)"; then
  git diff --quiet HEAD 2>/dev/null || commit="$commit + local changes"
else
  commit="unknown (not a git checkout)"
fi
echo "commit $commit, python $py"
if grep -q "fused_attention" wakea_jax/models/layers.py; then
  echo "layers.Attention reads ModelConfig.attention: yes"
else
  echo "layers.Attention reads ModelConfig.attention: NO (attention=cudnn has no effect; see" \
       "models/fused_attention.py)"
fi
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,power.limit \
    --format=csv
else
  echo "nvidia-smi: not found"
fi

bench=(tools/bench_gpu.py)
if [ "$smoke" = 1 ]; then
  model=(--preset=tiny --dtype=float32 --attention=xla)
  section info 60 "$py" "${bench[@]}" --section=info
  section parity 120 "$py" "${bench[@]}" --section=parity "${model[@]}" --parity_seq=64
  section train 120 "$py" "${bench[@]}" --section=train "${model[@]}" --batch=2 --seq=64 \
    --steps=2 --remat=none
  section decode 120 "$py" "${bench[@]}" --section=decode "${model[@]}" --decode_batch=4 \
    --prompt=16 --new=8
  section grpo 180 "$py" tools/bench_grpo.py --preset=tiny \
    --model=vocab_size=1024,num_layers=1,attention=xla --prompts=2 --group=2 \
    --prompt_tokens=24 --new=4 --steps=1 --modes=auto
else
  model=(--preset=llama3.2-1b --dtype=bfloat16 --attention=cudnn)
  section info 40 "$py" "${bench[@]}" --section=info
  section parity 60 "$py" "${bench[@]}" --section=parity "${model[@]}" --parity_seq=1024
  section train 155 "$py" "${bench[@]}" --section=train "${model[@]}" --batch=8 --seq=2048 \
    --steps=5 --remat=dots
  section decode 80 "$py" "${bench[@]}" --section=decode "${model[@]}" --decode_batch=64 \
    --prompt=128 --new=256
  section grpo 175 "$py" tools/bench_grpo.py --preset=llama3.2-1b \
    --model=dtype=bfloat16,attention=cudnn --prompts=2 --group=8 --prompt_tokens=64 \
    --new=128 --steps=1 --kl_beta=0.04 --modes=auto
fi

echo
echo "bench_gpu: total $((SECONDS - start)) s; ${#failed[@]} section(s) failed${failed[*]:+: ${failed[*]}}"
[ "${#failed[@]}" -eq 0 ]
