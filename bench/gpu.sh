#!/usr/bin/env bash
# One lent GPU, one call: install the carried wheels (.whl/: deepspeed and what it needs, which the device image
# lacks; the pinned transformers and peft), print versions and the SDPA kernels, then bench.py's table. Every row
# is also written to $OUT/bench.log as it is measured, so a call cut off at its limit still returns what ran.
# Each case runs in its own process, so one case's memory (or an out-of-memory) never spills into the next.
#   device run: bash bench/gpu.sh CASE [CASE ...]     (with carry: [".whl"]; BENCH_ARGS="--steps 5 --warmup 2")
# A 1560 x 1 step takes about 0.3 s on an H100: time 20 or more of them, or one slow moment moves the row.
# Where the device idles: BENCH_ARGS="--steps 20 --warmup 3 --profile 3 --profile_dir \$OUT/traces" (a summary line
# and the top ops in the output, whole traces back as files).
set -uo pipefail
OUT="${OUT:-/tmp/out}"
mkdir -p "$OUT"
[ -d /tmp/site/deepspeed ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, peft, deepspeed; print('torch', torch.__version__, 'transformers', \
transformers.__version__, 'peft', peft.__version__, 'deepspeed', deepspeed.__version__)"
# DeepSpeed's JIT build of FusedAdam cannot parse the arch "9.0a" that the image's torch lists for Hopper.
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST//9.0a/9.0}"
for case in "$@"; do
  python3 bench/bench.py --output "$OUT/RESULTS.md" ${BENCH_ARGS:-} --cases "$case" 2>&1 | tee -a "$OUT/bench.log" \
    | grep "^| \|^SDPA\|Error\|memory GiB\|set-up peak\|host peak\|profile"
done
