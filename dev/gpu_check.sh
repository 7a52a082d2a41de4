#!/usr/bin/env bash
# The GPU checks, as one script for a lent H100/H200 (its image has torch + transformers; nothing is installed).
#   bash dev/gpu_check.sh [OUT_DIR]
# Runs every CUDA test, then the forward benchmark on the GPU. CI never has a GPU; nothing depends on this.
set -u
OUT=${1:-${OUT:-/tmp/glm5-gpu}}
mkdir -p "$OUT"
export PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())"
python3 -m pytest -q -m gpu -p no:cacheprovider ${GPU_TESTS:-tests/test_gpu_model.py tests/test_gpu_engine.py tests/test_gpu_train.py tests/test_fp8_model.py} 2>&1 | tee "$OUT/gpu_tests.txt" | tail -40
if [ -z "${SKIP_BENCH:-}" ]; then
  python3 bench/forward.py --device cuda --seqs ${SEQS:-2048 8192 32768} --ours-only ${OURS_ONLY:-131072} --repeats ${REPEATS:-5} \
    --out "$OUT/forward_cuda.json" 2>&1 | tail -12
fi
