#!/usr/bin/env bash
# Issue 10's GPU checks in one command, for a bare GPU machine with PyTorch (no Hydra, no MLflow, no network).
# Here, from the project's root:   bash benchmarks/gpu_pack.sh   (packs wheels + Fashion-MNIST into .gpu/)
# There (the device tool: carry [".gpu"], ~6-8 min):   bash benchmarks/gpu.sh
# It runs the CUDA-graph tests (tests/test_gpu.py, and tests/test_step.py's CPU double), then benchmarks/gpu.py's
# table: the default run with and without the graph, the notebook grid, 256 jobs. Copies of both land in $OUT.
set -uo pipefail
[ -f .gpu/on-device.sh ] || { echo "no .gpu/: run bash benchmarks/gpu_pack.sh here first, and carry .gpu"; exit 2; }
source .gpu/on-device.sh || exit 2
out=${OUT:-/tmp}
python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_step.py 2>&1 | tee "$out/gpu-tests.txt"
python3 benchmarks/gpu.py --data-root "$PWD/data" --out "$out/gpu-table.md" ${GPU_BENCH_ARGS:-} 2>&1 \
  | tee "$out/gpu-bench.txt"
