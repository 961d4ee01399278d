#!/usr/bin/env bash
# One call on ONE GPU (nvidia-h100-x1 or nvidia-h200), carry [".whl", ".demo"]: the target's run-ahead
# (async scheduling one step deep, actors/target_worker.py) against issue 5's single-GPU targets.
#  1. target-only decode at batch 1 on the Llama-3.2-1B and Llama-3.1-8B shapes, fused kernels: our
#     reference loop, HF generate, and the cluster without and with run-ahead (--run-ahead both);
#  2. goodput-adaptive k on the 1B shape (self:4 oracle draft, alpha = 0.8) at concurrency 1, 8, 32, 64
#     against the cluster's target-only, fixed and adaptive k, run-ahead on (the default), with this
#     run's measured (graph-replayed) cost curve wired into the policy; per-rep graph captures,
#     draft proposal wall time and run-ahead counts in adaptive/results.json.
# Order by priority (each section packs its results, so a cut-short call still returns them):
# tests, 1B target-only, adaptive, 8B target-only. UNFUSED=1 drops --fused-kernels; CAPTURE_AT_START=1
# has the adaptive section's workers capture their decode/verify graphs at start. SECTIONS (default
# "tests 1B adaptive 8B") picks sections, e.g. SECTIONS=adaptive; ADAPTIVE_S (default 200) is the
# adaptive section's time limit. ~8 minutes for all.
# Results: $OUT/results.tgz.
source benchmarks/gpu_common.sh
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/run/gpu.txt"
sections=" ${SECTIONS:-tests 1B adaptive 8B} "
want() { [[ "$sections" == *" $1 "* ]]; }
if want tests; then
  stamp "run-ahead tests on the GPU (CUDA graphs, device-fed pipelined steps)"
  timeout 60 python3 -m pytest -q -p no:cacheprovider tests/test_run_ahead.py > "$OUT/run/test_run_ahead.txt" 2>&1
  tail -3 "$OUT/run/test_run_ahead.txt"
fi
extra=(--fused-kernels); [ "${UNFUSED:-0}" = 1 ] && extra=()
common=(--prompts /tmp/demo/specbench-dev.jsonl --tokenizer /tmp/demo/tokenizer --categories writing,summarization
        --max-tokens 48 --repetitions 3 --shape-dir /tmp/shapes --no-plots "${extra[@]}")
target_only() {  # $1 = shape
  stamp "target-only $1"
  timeout 110 python3 -m cluster.cli bench "${common[@]}" --per-category 1 --concurrency 1 --time-limit-s 95 \
    --run-ahead both --model "shape:$1#ours-target-only,hf-target-only,cluster-target-only" \
    --name "target-only-$1" --out "$OUT/run/target-only-$1" 2> "$OUT/run/target-only-$1.log"
  grep -E "\->|rror|skip" "$OUT/run/target-only-$1.log" | tail -8; pack
}
want 1B && target_only 1B
if want adaptive; then
stamp "adaptive (1B)"
adaptive_s=${ADAPTIVE_S:-200}  # the section's time limit (SECTIONS=adaptive alone can afford ~450)
timeout $((adaptive_s + 20)) python3 -m cluster.cli bench "${common[@]}" --per-category 2 --adaptive both --concurrency 1,8,32,64 ${CAPTURE_AT_START:+--capture-at-start} \
  --time-limit-s "$adaptive_s" --cost-batches 1,8,32,64 --cost-tokens 1,2,4,8,16,32,64 --cluster-cost-table measured \
  --model "shape:1B@oracle:0.8:self:4#cost-curve,cluster-target-only,cluster-colocated-overlap" \
  --name adaptive --out "$OUT/run/adaptive" 2> "$OUT/run/adaptive.log"
grep -E "\->|rror|skip" "$OUT/run/adaptive.log" | tail -16; pack
fi
want 8B && target_only 8B
stamp "done"; pack
