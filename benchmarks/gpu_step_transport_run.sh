#!/usr/bin/env bash
# One GPU-host call: the step channel against a Ray actor call per engine step, in the same bench
# process (`--step-transport both`), on the Llama-3.2-1B shape where the control plane weighed most
# (46-48% of an engine step on the H100 before the channel): cluster target-only and colocated
# overlap with an emulated alpha = 0.8 draft, fixed and adaptive k, at concurrency 1 and 8.
# About 4 minutes on one H100. Needs .whl/ and .demo/ as gpu_cluster_run.sh. Writes under $OUT.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH RAY_AUTH_MODE=disabled NCCL_NVLS_ENABLE=0
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/gpu.txt"
timeout 280 python3 -m cluster.cli bench --prompts .demo/specbench-dev.jsonl --tokenizer .demo/tokenizer \
  --categories writing,summarization --per-category 1 --max-tokens 48 --repetitions 3 --shape-dir /tmp/shapes \
  --adaptive both --step-transport both --concurrency 1,8 --time-limit-s 250 \
  --model "shape:1B@oracle:0.8:self:4#cluster-target-only,cluster-colocated-overlap" \
  --name step-transport --out "$OUT/bench" 2> "$OUT/bench.log"
tail -30 "$OUT/bench.log"
