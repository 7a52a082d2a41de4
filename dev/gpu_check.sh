#!/usr/bin/env bash
# The GPU checks, as one script for an H100/H200 (its image has torch + transformers; nothing is installed
# from a registry: wheels placed in .whl/ and carried along are installed to /tmp/site, e.g. the transformers
# version pyproject.toml pins, so the oracle is the same as on the CPU).
#   bash dev/gpu_check.sh [OUT_DIR]
#   GENERATE=0 FORWARD=1 bash dev/gpu_check.sh      # choose the benchmarks (default: generate only)
#   SPECULATIVE=1 MODEL=runs/latest/model bash dev/gpu_check.sh   # + MTP speculation on CUDA (captured cycles);
#                                                   # runs/ is git-ignored: carry the model directory along
# Runs every CUDA test, then the benchmarks on the GPU. CI never has a GPU; nothing depends on this.
set -u
OUT=${1:-${OUT:-/tmp/glm5-gpu}}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())"
timeout ${TEST_TIMEOUT:-300} python3 -m pytest -q -m gpu -p no:cacheprovider \
  ${GPU_TESTS:-tests/test_gpu_engine.py tests/test_gpu_model.py tests/test_gpu_train.py tests/test_fp8_model.py tests/test_lowbit.py} 2>&1 \
  | tee "$OUT/gpu_tests.txt" | tail -40
if [ "${GENERATE:-1}" = 1 ]; then
  for dtype in float32 bfloat16; do
    timeout ${BENCH_TIMEOUT:-150} python3 bench/generate.py --device cuda --dtype $dtype --reps ${REPEATS:-3} \
      --out "$OUT/generate_cuda_$dtype.json" 2>&1 | tee "$OUT/generate_cuda_$dtype.txt" | grep -v "^  runs"
  done
fi
if [ "${FORWARD:-0}" = 1 ]; then
  python3 bench/forward.py --device cuda --seqs ${SEQS:-2048 8192 32768} --ours-only ${OURS_ONLY:-131072} --repeats ${REPEATS:-5} \
    --out "$OUT/forward_cuda.json" 2>&1 | tail -12
fi
if [ "${SPECULATIVE:-0}" = 1 ]; then
  timeout ${BENCH_TIMEOUT:-300} python3 bench/speculative.py --device cuda --model ${MODEL:-runs/latest/model} \
    --k 1 2 3 --batch 1 4 --reps ${REPEATS:-3} --out "$OUT/speculative_cuda.json" 2>&1 | tail -12
fi
