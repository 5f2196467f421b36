#!/usr/bin/env bash
# The checks a GPU adds to the CPU suite, each a printed table (run from the repository root, with kvbench
# installed): the oracle matrix in bfloat16 on CUDA and the compiled step against eager (benchmarks/gpu_check.py),
# then compiled kvbench against eager kvbench, HF generate eager and HF generate with its static cache compiled,
# at the 7B shape with random weights (no download). About 15 minutes on one H100.
set -euo pipefail
python -m benchmarks.gpu_check --device cuda --dtype bfloat16
echo
kvbench bench --model r1-qwen-7b --random-weights --dtype bfloat16 --device cuda \
    -p streaming_llm,knorm,snapkv-d,h2o,tova -b 512 --batch-size 1,8 --prompt-len 128 --gen-len 512 \
    --compile -f markdown
