#!/usr/bin/env bash
# jaxdiff's GPU checks in one command, sized for a lent nvidia-h200 (the device tool: 15 minutes of
# device time a session, 10 a command). That machine's image has JAX (0.11, CUDA 13), flax, optax,
# diffrax, chex, equinox, pytest-xdist and PyTorch 2.11, but neither diffusers nor grain nor
# nbmake, and no network: diffusers travels as wheels. Two steps:
#
#   here, once:  bash benchmarks/gpu.sh fetch        # diffusers' wheels into .whl/ (git-ignored)
#   there:       the device tool's run, carry [".whl"], command "bash benchmarks/gpu.sh",
#                timeout_s 590
#
# It writes $OUT/tests.log (the GPU's name; U-Net, port and training tests on the GPU), the images
# benchmark ($OUT/{small,cifar10}/<device>.json and .md: U-Net training and DDIM sampling, jaxdiff
# against diffusers' UNet2DModel with the same weights, eager and torch.compile, float32 and
# bfloat16; the loader rows with small) and $OUT/bench.log. Commit the results as benchmarks/results/gpu-*.json and .md.
# JAXDIFF_BENCH_IMAGES overrides the benchmark's sizes (benchmarks/images.py).
set -uo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = fetch ]; then
  grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
  exec python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
    -d .whl diffusers==0.42.1 importlib_metadata
fi

OUT=${OUT:-/tmp/jaxdiff-gpu}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import jax, torch; print('jax', jax.__version__, jax.devices()); \
print('torch', torch.__version__, torch.cuda.is_available())"
  # Correctness on the GPU first (the conv2d transposes off CPU, attention, group norm, the
  # diffusers port, bf16 training against float32): 3 minutes at most.
  timeout 180 python3 -m pytest -q -o addopts="" -p no:cacheprovider -n 4 \
    tests/test_nets.py tests/test_bench_images.py tests/test_unet_training.py 2>&1 | tail -30
} 2>&1 | tee "$OUT/tests.log"

# The images benchmark at its GPU sizes, one config per run so that a run cut short leaves the
# other's results ($OUT/small/, $OUT/cifar10/): grain is not installed there, the loader rows run
# with small_unet, torch.compile for small_unet only (inductor compiles each config and precision
# for minutes). 7 minutes at most. Later JAXDIFF_BENCH_IMAGES pairs override earlier ones.
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.45  # PyTorch shares the GPU in the same process
for cfg in small cifar10; do
  loader=$([ "$cfg" = small ] && echo 1 || echo 0)
  JAXDIFF_BENCH_IMAGES="configs=$cfg grain=0 compile=small loader=$loader ${JAXDIFF_BENCH_IMAGES:-}" \
    timeout 210 python3 -m benchmarks --only images --out "$OUT/$cfg" 2>&1 | tail -40
done | tee "$OUT/bench.log"
