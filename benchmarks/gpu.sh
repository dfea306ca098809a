#!/usr/bin/env bash
# jaxdiff's GPU checks in one command, sized for a lent nvidia-h200 (the device tool: 15 minutes of
# device time a session, 10 a command). That machine's image has JAX (0.11, CUDA 13), flax, optax,
# diffrax, chex, equinox, jaxtyping, pytest-xdist and PyTorch 2.11, but neither diffusers nor
# beartype (the tests' conftest) nor grain nor nbmake, and no network: those travel as wheels.
#
#   here, once:  bash benchmarks/gpu.sh fetch        # wheels into .whl/ (git-ignored)
#   there:       the device tool's run, carry [".whl"], command "bash benchmarks/gpu.sh",
#                timeout_s 590
#
# Every step shares one deadline (JAXDIFF_GPU_BUDGET seconds, default 540), so the script ends
# before the command's limit and a slow step leaves time to the ones after it only as far as its
# own cap allows. In order of what the comparison needs most:
#   small/    small_unet: jaxdiff against diffusers' UNet2DModel with the same weights, eager and
#             torch.compile, float32 and bfloat16 (training and DDIM sampling images/s)
#   cifar10/  ddpm_cifar10 (35.7M): the same, eager (inductor would take minutes per precision)
#   tests.log the GPU's name; U-Net, port and training tests on the GPU (4 workers)
#   loader/   the image loader feeding small_unet's training (data-wait fraction), no grain
# Each writes <device>.json (the .md files are removed: $OUT returns 8 files at most; rebuild them
# with benchmarks.run.markdown). bench.log has every row as it is measured ("[images] row {...}"),
# so a run cut short keeps what it measured. Commit the results as benchmarks/results/gpu-*.
# JAXDIFF_BENCH_IMAGES adds overrides to every run (benchmarks/images.py).
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

images() {  # images <dir> <cap seconds> <JAXDIFF_BENCH_IMAGES>
  local t
  t=$(cap "$2")
  echo "== images $1 ($3), ${t} s at most, at ${SECONDS} s"
  [ "$t" -gt 20 ] || { echo "skipped: no time left"; return; }
  # PyTorch shares the GPU in the same process: JAX preallocates 45%, not 75%
  XLA_PYTHON_CLIENT_MEM_FRACTION=0.45 JAXDIFF_BENCH_IMAGES="$3 ${JAXDIFF_BENCH_IMAGES:-}" \
    timeout -k 5 "$t" python3 -m benchmarks --only images --out "$OUT/$1" 2>&1
  echo "== images $1: exit $? at ${SECONDS} s"
}

{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import jax, flax, torch, diffusers, jaxdiff; print('jax', jax.__version__, \
jax.devices(), 'flax', flax.__version__); print('torch', torch.__version__, \
torch.cuda.is_available(), 'diffusers', diffusers.__version__)"
  images small 240 "configs=small compile=small loader=0 grain=0"
  images cifar10 130 "configs=cifar10 compile=none loader=0 grain=0"
} 2>&1 | tee "$OUT/bench.log"

# Correctness on the GPU (the conv2d transposes off CPU, attention, group norm, the diffusers
# port, bf16 training against float32); four workers, each JAX a fifth of the GPU's memory.
t=$(cap 110)
{
  echo "== tests, ${t} s at most, at ${SECONDS} s"
  [ "$t" -gt 20 ] && XLA_PYTHON_CLIENT_MEM_FRACTION=0.2 timeout -k 5 "$t" python3 -m pytest -q \
    -o addopts="" -p no:cacheprovider -n 4 --durations=8 \
    tests/test_nets.py tests/test_bench_images.py tests/test_unet_training.py 2>&1
  echo "== tests: exit $? at ${SECONDS} s"
} | tee "$OUT/tests.log"

images loader 200 "configs= loader=1 grain=0" 2>&1 | tee -a "$OUT/bench.log"
rm -f "$OUT"/*/*.md
echo "== done at ${SECONDS} s"
