#!/usr/bin/env bash
# Goodput-adaptive speculation and serving load on one GPU (issue 5): the Llama-3.2-1B shape with an
# emulated-α draft, cluster target-only vs colocated overlap with fixed k and adaptive k, closed loop
# at concurrency 1, 8 and 32, then open-loop Poisson arrivals at 4, 8, 16 and 32 requests/s (24
# requests per rate, seeded) with goodput at TTFT <= 200 ms and TPOT <= 20 ms. The run's cost curve
# is written as cost_table-Llama-3.2-1B.json; a second, short run gives adaptive k that measured
# table instead of the policy's prior (closed loop and the same Poisson sweep). About 6.5 minutes on
# one H100 (first run ~4.5, second ~1.5; at most 8 by the timeouts). Writes under $OUT (bench/, bench-table/).
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH RAY_AUTH_MODE=disabled NCCL_NVLS_ENABLE=0
common=(--prompts .demo/specbench-dev.jsonl --tokenizer .demo/tokenizer --categories writing,summarization
        --per-category 2 --max-tokens 48 --repetitions 3 --shape-dir /tmp/shapes
        --arrival-rates 4,8,16,32 --arrival-requests 24 --slo-ttft-ms 200 --slo-tpot-ms 20)
timeout 330 python3 -m cluster.cli bench "${common[@]}" --adaptive both --concurrency 1,8,32 --time-limit-s 280 \
  --cost-batches 1,8,32 --cost-tokens 1,2,4,8,16,32,64 \
  --model "shape:1B@oracle:0.8:self:4#cost-curve,cluster-target-only,cluster-colocated-overlap" \
  --name adaptive --out "$OUT/bench" 2> "$OUT/bench.log"
tail -40 "$OUT/bench.log"
table="$OUT/bench/cost_table-Llama-3.2-1B.json"
if [ -f "$table" ]; then
  timeout 130 python3 -m cluster.cli bench "${common[@]}" --adaptive on --concurrency 1,8,32 --time-limit-s 100 \
    --cluster-cost-table "$table" \
    --model "shape:1B@oracle:0.8:self:4#cluster-colocated-overlap" \
    --name adaptive-table --out "$OUT/bench-table" 2> "$OUT/bench-table.log"
  tail -20 "$OUT/bench-table.log"
fi
