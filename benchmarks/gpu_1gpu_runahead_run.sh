#!/usr/bin/env bash
# One call on ONE GPU (nvidia-h100-x1 or nvidia-h200), carry [".whl", ".demo"]: the target's run-ahead
# (async scheduling one step deep, actors/target_worker.py) against issue 5's single-GPU targets.
#  1. target-only decode at batch 1 on the Llama-3.2-1B and Llama-3.1-8B shapes, fused kernels: our
#     reference loop, HF generate, and the cluster without and with run-ahead (--run-ahead both);
#  2. goodput-adaptive k on the 1B shape (self:4 oracle draft, alpha = 0.8) at concurrency 1, 8, 32, 64
#     against the cluster's target-only, fixed and adaptive k, run-ahead on (the default), with this
#     run's measured (graph-replayed) cost curve wired into the policy; per-rep graph captures,
#     draft proposal wall time and run-ahead counts in adaptive/results.json.
# UNFUSED=1 drops --fused-kernels. Budget: ~1.5 + 1.5 + 4 minutes. Results: $OUT/results.tgz.
source benchmarks/gpu_common.sh
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/run/gpu.txt"
stamp "run-ahead tests on the GPU (CUDA graphs, device-fed pipelined steps)"
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_run_ahead.py > "$OUT/run/test_run_ahead.txt" 2>&1
tail -3 "$OUT/run/test_run_ahead.txt"
extra=(--fused-kernels); [ "${UNFUSED:-0}" = 1 ] && extra=()
common=(--prompts /tmp/demo/specbench-dev.jsonl --tokenizer /tmp/demo/tokenizer --categories writing,summarization
        --max-tokens 48 --repetitions 3 --shape-dir /tmp/shapes --no-plots "${extra[@]}")
for shape in 1B 8B; do
  stamp "target-only $shape"
  timeout 120 python3 -m cluster.cli bench "${common[@]}" --per-category 1 --concurrency 1 --time-limit-s 100 \
    --run-ahead both --model "shape:$shape#ours-target-only,hf-target-only,cluster-target-only" \
    --name "target-only-$shape" --out "$OUT/run/target-only-$shape" 2> "$OUT/run/target-only-$shape.log"
  grep -E "\->|rror|skip" "$OUT/run/target-only-$shape.log" | tail -8; pack
done
stamp "adaptive (1B)"
timeout 270 python3 -m cluster.cli bench "${common[@]}" --per-category 2 --adaptive both --concurrency 1,8,32,64 \
  --time-limit-s 240 --cost-batches 1,8,32,64 --cost-tokens 1,2,4,8,16,32,64 --cluster-cost-table measured \
  --model "shape:1B@oracle:0.8:self:4#cost-curve,cluster-target-only,cluster-colocated-overlap" \
  --name adaptive --out "$OUT/run/adaptive" 2> "$OUT/run/adaptive.log"
grep -E "\->|rror|skip" "$OUT/run/adaptive.log" | tail -16
stamp "done"; pack
