#!/usr/bin/env bash
# Second call on the same warm 2-GPU host (its /tmp/site and /tmp/shapes from the first call; a cold
# machine exits at once): the Llama-3.2-1B shape, where the control plane weighs most.
#   1. the step channel against a Ray call per step (--step-transport both, same process), target-only
#      and colocated overlap with fixed k, concurrency 1 and 8;
#   2. goodput-adaptive k: the cost curve (written as cost_table-Llama-3.2-1B.json and fed to the
#      adaptive rows), target-only vs colocated overlap and draft-on-its-own-GPU overlap, fixed and
#      adaptive k, closed loop at 1, 8, 32;
#   3. the Hugging Face baselines on the same 1B weights: generate, prompt lookup, assisted, and
#      static cache + torch.compile (reduce-overhead).
# About 8 minutes. Results: $OUT/results.tgz.
source benchmarks/gpu_common.sh
common=(--prompts /tmp/demo/specbench-dev.jsonl --tokenizer /tmp/demo/tokenizer --categories writing,summarization
        --max-tokens 48 --repetitions 3 --shape-dir /tmp/shapes --no-plots)
stamp "step transport"
timeout 130 python3 -m cluster.cli bench "${common[@]}" --per-category 1 --step-transport both --concurrency 1,8 \
  --time-limit-s 100 --model "shape:1B@oracle:0.8:self:4#cluster-target-only,cluster-colocated-overlap" \
  --name step-transport --out "$OUT/run/transport" 2> "$OUT/run/transport.log"
grep -E "\->|rror|skip" "$OUT/run/transport.log" | tail -12; pack
stamp "adaptive"
timeout 230 python3 -m cluster.cli bench "${common[@]}" --per-category 2 --adaptive both --concurrency 1,8,32 \
  --time-limit-s 190 --cost-batches 1,8,32 --cost-tokens 1,2,4,8,16,32,64 --cluster-cost-table measured \
  --model "shape:1B@oracle:0.8:self:4#cost-curve,cluster-target-only,cluster-colocated-overlap,cluster-separate-overlap" \
  --name adaptive --out "$OUT/run/adaptive" 2> "$OUT/run/adaptive.log"
grep -E "\->|rror|skip" "$OUT/run/adaptive.log" | tail -20; pack
stamp "hf baselines"
timeout 110 python3 -m cluster.cli bench "${common[@]}" --per-category 1 --concurrency 1 --time-limit-s 60 \
  --model "shape:1B@oracle:0.8:self:4#ours-target-only,hf-target-only,hf-lookup,hf-compiled" \
  --name hf-1b --out "$OUT/run/hf" 2> "$OUT/run/hf.log"
grep -E "\->|rror|skip" "$OUT/run/hf.log" | tail -10
stamp "done"; pack
