#!/usr/bin/env bash
# One call on ONE GPU (nvidia-h100-x1 or nvidia-h200), carry [".whl", ".demo"]: issue 5's single-GPU
# targets in one go, for when no multi-GPU kind is lent.
#  1. Llama-3.1-8B shape, emulated alpha = 0.8 draft of the Llama-3.2-1B shape, k = 4, batch 1: our
#     reference loop target-only and speculative, HF generate, the cluster's target-only and the
#     colocated draft taking turns and with overlap (floor fraction of every row);
#  2. goodput-adaptive k on the Llama-3.2-1B shape (self:4 oracle draft, alpha = 0.8) at concurrency
#     1, 8, 32 and 64 (colocated, taking turns: the colocated default since 2026-12-07; overlap before)
#     against the cluster's target-only, fixed and adaptive k, with this run's measured cost curve
#     wired into the policy (--cluster-cost-table measured).
# Every row uses --fused-kernels (each layer's element-wise chains through torch.compile, the
# configuration of the 2026-12-07 results); UNFUSED=1 drops it. CAPTURE_AT_START=1 has the adaptive
# section's workers capture their decode/verify graphs at start. About 5 minutes on an H100
# (2026-12-06: 3m53s unfused, 4m33s fused). Results: $OUT/results.tgz (colocated/, adaptive/, logs);
# per-rep graph captures, decisions and oracle re-records in adaptive/results.json.
source benchmarks/gpu_common.sh
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/run/gpu.txt"
extra=(--fused-kernels); [ "${UNFUSED:-0}" = 1 ] && extra=()
common=(--prompts /tmp/demo/specbench-dev.jsonl --tokenizer /tmp/demo/tokenizer --categories writing,summarization
        --max-tokens 48 --repetitions 3 --shape-dir /tmp/shapes --no-plots "${extra[@]}")
stamp "colocated (8B target, 1B draft)"
timeout 250 python3 -m cluster.cli bench "${common[@]}" --per-category 1 --concurrency 1 --time-limit-s 210 \
  --model "shape:8B@oracle:0.8:shape:1B#ours-target-only,ours-spec,hf-target-only,cluster-target-only,cluster-colocated-turns,cluster-colocated-overlap" \
  --name colocated --out "$OUT/run/colocated" 2> "$OUT/run/colocated.log"
grep -E "\->|rror|skip" "$OUT/run/colocated.log" | tail -12; pack
stamp "adaptive (1B)"
timeout 270 python3 -m cluster.cli bench "${common[@]}" --per-category 2 --adaptive both --concurrency 1,8,32,64 ${CAPTURE_AT_START:+--capture-at-start} \
  --time-limit-s 240 --cost-batches 1,8,32,64 --cost-tokens 1,2,4,8,16,32,64 --cluster-cost-table measured \
  --model "shape:1B@oracle:0.8:self:4#cost-curve,cluster-target-only,cluster-colocated-turns" \
  --name adaptive --out "$OUT/run/adaptive" 2> "$OUT/run/adaptive.log"
grep -E "\->|rror|skip" "$OUT/run/adaptive.log" | tail -16
stamp "done"; pack
