#!/usr/bin/env bash
# jaxdiff's GPU checks, sized for a lent nvidia-h200 (the device tool: 15 minutes of device time a
# session, 10 a command). That machine's image has JAX (0.11, CUDA 13), flax, optax, diffrax,
# chex, equinox, jaxtyping, pytest-xdist and PyTorch 2.11, but neither diffusers nor beartype (the
# tests' conftest) nor grain nor nbmake, and no network: those travel as wheels.
#
#   here, once:  bash benchmarks/gpu.sh fetch            # wheels into .whl/ (git-ignored)
#   there:       the device tool's run, carry [".whl"], command "bash benchmarks/gpu.sh [STEP...]",
#                timeout_s 590
#
# Steps, in the default order (what the record still lacks first; see
# benchmarks/results/gpu-nvidia-h200-images.md for what 2026-12-04 measured):
#   tests       U-Net, port and training tests on the GPU, 4 workers, -v (2026-12-04: 5 failed,
#               unnamed: the run was cut before pytest's summary; that was under TF32, before
#               conftest.py pinned float32 products off CPU; JAXDIFF_TEST_TF32=1 for the old way)
#   small-cg    small_unet float32 against torch.compile(mode="reduce-overhead") in channels_last: CUDA graphs,
#               PyTorch's best for a launch-bound net
#   small-bf16  small_unet bfloat16 (jaxdiff's dtype= against torch.autocast), eager and compile
#   cifar10-bf16  ddpm_cifar10 bfloat16, eager (inductor takes minutes per precision), 3 repeats
#   cifar10-sample  ddpm_cifar10 float32 sampling only (its training row was measured), 3 repeats
#   loader      the image loader alone and feeding small_unet's training (data-wait fraction)
#   small       small_unet float32, eager and torch.compile's default mode (measured 2026-12-04)
#   cifar10     ddpm_cifar10 float32 and bfloat16, training and sampling, eager (all of it again)
# Every step shares one deadline (JAXDIFF_GPU_BUDGET seconds, default 540) and has a cap of its
# own, so the script ends before the command's limit. A session's 15 minutes hold two commands if
# the second follows at once, on the warm machine (2026-12-04: 598 s held for the first, with the
# machine's start; 224 s for the second): then e.g. "JAXDIFF_GPU_BUDGET=215 bash
# benchmarks/gpu.sh cifar10-sample loader" with timeout_s 235, the steps the first did not reach.
# Measured 2026-12-04, compile dominates:
# jaxdiff's first call 26 s (small_unet training chunk), 55 s (ddpm_cifar10), inductor 41 s
# (small_unet training); small float32 with torch.compile took ~120 s, ddpm_cifar10's float32
# training row ~150 s. Each images step writes <step>/<device>.json (the .md files are removed:
# $OUT returns 8 files at most); bench.log has every row as it is measured ("[images] T s row
# {...}"), so a step cut short keeps its rows: python -m benchmarks.from_log turns logs into
# result files. Commit them as benchmarks/results/gpu-*. JAXDIFF_BENCH_IMAGES adds overrides to
# every images step (benchmarks/images.py).
set -uo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = fetch ]; then
  grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
  exec python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
    -d .whl diffusers==0.42.1 importlib_metadata beartype==0.23.1
fi

OUT=${OUT:-/tmp/jaxdiff-gpu}
BUDGET=${JAXDIFF_GPU_BUDGET:-540}
mkdir -p "$OUT"
cap() {  # seconds for the next step: its own cap, or what is left before the deadline
  local left=$((BUDGET - SECONDS))
  echo $((left < $1 ? left : $1))
}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1

timed() {  # timed <label> <cap seconds> <command...>: the command, within what the deadline leaves
  local label=$1 t
  t=$(cap "$2")
  shift 2
  echo "== $label, ${t} s at most, at ${SECONDS} s"
  [ "$t" -gt 20 ] || { echo "skipped: no time left"; return; }
  timeout -k 5 "$t" "$@" 2>&1
  echo "== $label: exit $? at ${SECONDS} s"
}

# The images steps: JAXDIFF_BENCH_IMAGES of each, and its cap in seconds.
declare -A SPEC=(
  [small-cg]="configs=small precision=float32 compile=small compile_mode=reduce-overhead channels_last=1 loader=0"
  [small-bf16]="configs=small precision=bfloat16 compile=small loader=0"
  [cifar10-bf16]="configs=cifar10 precision=bfloat16 compile=none loader=0 repeats=3"
  [cifar10-sample]="configs=cifar10 precision=float32 measure=sample compile=none loader=0 repeats=3"
  [loader]="configs= loader=1 grain=0"
  [small]="configs=small precision=float32 compile=small loader=0"
  [cifar10]="configs=cifar10 compile=none loader=0 repeats=3"
)
declare -A CAP=([small-cg]=200 [small-bf16]=200 [cifar10-bf16]=200 [cifar10-sample]=150
  [loader]=150 [small]=200 [cifar10]=300)

{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "from benchmarks.common import environment; import torch, diffusers; \
print(environment(), 'torch', torch.__version__, torch.cuda.is_available(), \
'diffusers', diffusers.__version__)"
} 2>&1 | tee "$OUT/bench.log"
for step in "${@:-tests small-cg small-bf16 cifar10-bf16 cifar10-sample loader small}"; do
  for s in $step; do
    if [ "$s" = tests ]; then
      # the GPU's correctness: conv2d's transposes off CPU, attention, group norm, the diffusers
      # port, bf16 training against float32; four workers, each JAX a fifth of the memory
      XLA_PYTHON_CLIENT_MEM_FRACTION=0.2 timed tests 180 python3 -m pytest -v -o addopts="" \
        -p no:cacheprovider -p no:benchmark -n 4 --durations=10 \
        tests/test_nets.py tests/test_bench_images.py tests/test_unet_training.py \
        | tee "$OUT/tests.log"
    elif [ -n "${SPEC[$s]:-}" ]; then
      # PyTorch shares the GPU in the same process: JAX preallocates 45%, not 75%
      XLA_PYTHON_CLIENT_MEM_FRACTION=0.45 JAXDIFF_BENCH_IMAGES="${SPEC[$s]} ${JAXDIFF_BENCH_IMAGES:-}" \
        timed "images $s (${SPEC[$s]})" "${CAP[$s]}" python3 -m benchmarks --only images \
        --out "$OUT/$s" | tee -a "$OUT/bench.log"
    else
      echo "unknown step $s (tests ${!SPEC[*]})"
    fi
  done
done
rm -f "$OUT"/*/*.md
echo "== done at ${SECONDS} s"
