#!/usr/bin/env bash
# Goodput-adaptive speculation on one GPU: the Llama-3.2-1B shape with an emulated-α draft, cluster
# target-only vs colocated overlap with fixed k and adaptive k, at concurrency 1, 8 and 32.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH RAY_AUTH_MODE=disabled NCCL_NVLS_ENABLE=0
timeout 330 python3 -m cluster.cli bench --prompts .demo/specbench-dev.jsonl --tokenizer .demo/tokenizer \
  --categories writing,summarization --per-category 2 --max-tokens 48 --repetitions 3 --adaptive both \
  --shape-dir /tmp/shapes --concurrency 1,8,32 --time-limit-s 270 \
  --model "shape:1B@oracle:0.8:self:4#cluster-target-only,cluster-colocated-overlap" \
  --name adaptive --out "$OUT/bench" 2> "$OUT/bench.log"
tail -30 "$OUT/bench.log"
