#!/usr/bin/env bash
# One GPU session in one command, at most ~8 minutes: everything a lent GPU machine should run.
# GPU time is scarce and the machine starts bare (torch, triton, transformers, accelerate; no
# diffusers, no network), so:
#
#   1. on the development machine (network): fetch the wheels the GPU image lacks
#        bash src/instantstyle/bench/gpu_session.sh --fetch-wheels        # -> ./wheels (git-ignored; carry it)
#   2. on the GPU machine, from the repo root:
#        bash src/instantstyle/bench/gpu_session.sh                        # results in src/instantstyle/bench/results/ and src/instantstyle/kernels/tuned/
#
# Steps, each with its own time cap so one slow step can't eat the session:
#   install (no network, no deps resolution) -> CUDA tests (op, processors, methods)
#   -> instantstyle tune (tiles + kernel-vs-SDPA table for this arch, shipped in src/instantstyle/kernels/tuned/)
#   -> instantstyle bench --suite all (rows under src/instantstyle/bench/results/<device>.*).
# Commit src/instantstyle/bench/results/ and src/instantstyle/kernels/tuned/ afterwards, with the device name they record.
set -uo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--fetch-wheels" ]; then
  # Pure-Python wheels (py3-none-any): independent of the GPU image's Python version.
  # --no-deps: the image already has diffusers' heavy dependencies (huggingface_hub,
  # safetensors, numpy, Pillow, requests, regex via transformers).
  mkdir -p wheels
  python3 -m pip download --quiet --only-binary=:all: --no-deps -d wheels \
      diffusers importlib_metadata zipp pytest pluggy iniconfig pytest-timeout
  ls wheels
  exit 0
fi

OUT=${OUT:-gpu-out}
mkdir -p "$OUT" src/instantstyle/bench/results src/instantstyle/kernels/tuned
START=$(date +%s)
step() { echo "== $1 ($(( $(date +%s) - START )) s)" | tee -a "$OUT/steps.txt"; }

step device
{ date -u +%FT%TZ; nvidia-smi --query-gpu=name,compute_cap,memory.total,driver_version --format=csv; python3 --version
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } > "$OUT/device.txt" 2>&1
cat "$OUT/device.txt"

step install
if [ -d wheels ]; then
  python3 -m pip install --quiet --no-index --no-deps wheels/*.whl 2>&1 | tail -3
fi
python3 -m pip install --quiet --no-deps --no-build-isolation -e . 2>&1 | tail -3
python3 -c "import diffusers" 2>/dev/null || echo "diffusers missing: processor tests and the unet/processor suites will skip or fail (run --fetch-wheels first)"

# 1. correctness on the real device first (fails loudly, cheap): op, processors, methods
step cuda-tests
# TRITON_INTERPRET=0: the tests' conftest would otherwise interpret the kernel (it only sets a default).
export TRITON_INTERPRET=0
timeout 150 python3 -m pytest -q -x tests/kernels/test_cuda.py 2>&1 | tee "$OUT/test_cuda.txt" | tail -3
timeout 120 python3 -m pytest -q tests/processors tests/pipelines -k cuda 2>&1 | tee "$OUT/test_processors_cuda.txt" | tail -3

# 2. measured tiles and the kernel-vs-SDPA table for this arch: shipped in src/instantstyle/kernels/tuned/
step tune
ARCH=$(python3 -c "import torch; from instantstyle.kernels.tiles import arch_for_capability as a; print(a(*torch.cuda.get_device_capability()))")
timeout 150 instantstyle tune --budget-s 110 --out "src/instantstyle/kernels/tuned/$ARCH.json" 2> "$OUT/tune.txt" | tail -1
tail -5 "$OUT/tune.txt"

# 3. the benchmark after tuning (the launcher reads src/instantstyle/kernels/tuned/ now): rows per device name
step bench
timeout 200 instantstyle bench --suite all --results-dir src/instantstyle/bench/results --json > "$OUT/bench.json" 2> "$OUT/bench.txt"
tail -30 "$OUT/bench.txt"
cp -r src/instantstyle/bench/results "$OUT/results"
cp src/instantstyle/kernels/tuned/*.json "$OUT/" 2>/dev/null

step done
