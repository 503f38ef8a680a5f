#!/usr/bin/env bash
# The GPU proof of issues 5 and 6, in one command on a machine with an NVIDIA GPU and torch, Triton
# and the CUDA toolkit already installed (no network needed): build the extension with its CUDA
# kernels for this GPU, run the CUDA tests and the op tests, the benchmark suite with every
# provider, then the peak training memory of each method under its GTA5 -> Cityscapes config.
# Results: benchmarks/results/cuda-<gpu>.{json,md,png} and memory-cuda-<gpu>.{json,md}; logs under
# $LOGS (default: a temp folder). --quick shortens the op benchmarks (the memory runs stay full-size).
#   bash benchmarks/gpu.sh [--quick]
set -euo pipefail
cd "$(dirname "$0")/.."
logs="${LOGS:-$(mktemp -d)}"
arch="$(python3 -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')"
# --no-deps: the GPU image has torch and Triton; the package's other dependencies are only needed
# by the trainer and the evaluation tests, not by the ops
TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-$arch}" MAX_JOBS="${MAX_JOBS:-16}" \
  python3 -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | tee "$logs/build.log"
python3 -m udafast.info | tee "$logs/info.log"
python3 -m pytest -q tests/test_cuda.py 2>&1 | tee "$logs/test_cuda.log"
python3 -m pytest -q tests/test_class_thresholds.py tests/test_topk_per_class.py tests/test_prototype_softmax.py \
  tests/test_class_feature_sums.py tests/test_sce_loss.py tests/test_kl_loss.py tests/test_backend.py tests/test_reference.py 2>&1 | tee "$logs/test_ops.log"
python3 -m benchmarks --device cuda "$@" 2>&1 | tee "$logs/benchmarks.log"
# the trainer also needs udafast's other dependencies (cityscapesscripts' label tables among them)
python3 -m benchmarks.memory --device cuda 2>&1 | tee "$logs/memory.log"
echo "logs in $logs"
