#!/usr/bin/env bash
# One batched GPU session: everything a lent GPU machine should run, in one go, because
# device time is scarce (30 min a session).  Run from the repo root ON the GPU machine:
#
#   bash bench/gpu_session.sh            # writes into $OUT (or ./gpu-out)
#
# The lent machines have torch and triton preinstalled and no network, so the pure-Python
# dependencies travel with the working tree as wheels in ./wheels (an ignored folder, carried
# with the device tool's `carry`).  Make them on the development machine with:
#
#   pip download --only-binary=:all: --python-version 3.X -d wheels \
#       diffusers transformers huggingface_hub safetensors tokenizers tqdm matplotlib pytest
#
# (3.X = the GPU machine's Python; check with `python3 --version` there first.)
set -uo pipefail
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
{ date -u +%FT%TZ; nvidia-smi; python3 --version; python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } > "$OUT/device.txt" 2>&1

if [ -d wheels ]; then
  python3 -m pip install --quiet --no-index --find-links wheels diffusers transformers safetensors tqdm matplotlib pytest 2>&1 | tail -3
fi
python3 -m pip install --quiet --no-deps --no-build-isolation -e . 2>&1 | tail -3

# 1. the kernel on the real device: numerics, CUDA graphs, inductor (fast, fails loudly)
python3 -m pytest tests/kernels/test_cuda.py -q 2>&1 | tee "$OUT/test_cuda.txt" | tail -3
# 2. the benchmark: every suite, results appended/written under bench/results (commit them)
instantstyle bench --suite all --results-dir bench/results --json > "$OUT/bench.json" 2> "$OUT/bench.txt"
cp -r bench/results "$OUT/results"
tail -40 "$OUT/bench.txt"
# 3. the whole suite last (CPU-heavy parts included), if time remains
timeout 900 python3 -m pytest -q -x 2>&1 | tee "$OUT/pytest.txt" | tail -3
