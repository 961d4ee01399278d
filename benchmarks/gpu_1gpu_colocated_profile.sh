#!/usr/bin/env bash
# One call on ONE GPU (nvidia-h100-x1 or nvidia-h200), carry [".whl", ".demo"]: the colocated
# 8B-shape target + 1B-shape draft (emulated alpha = 0.8, k = 4, batch 1) with the step profile
# (outrider_step_phase_seconds_total: engine, target and draft phases per step), against the
# cluster's target-only in the same run. ROWS overrides the scenarios (default: target-only,
# colocated turns and overlap); RUN_AHEAD=both adds each row without the workers' run-ahead (the
# target's plain decodes, the draft's chains drafted ahead). About 3 minutes on an H100 (5 with
# RUN_AHEAD=both; LIMIT=S caps the bench at S seconds). Results: $OUT/results.tgz (profile/, log).
source benchmarks/gpu_common.sh
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/run/gpu.txt"
rows=${ROWS:-cluster-target-only,cluster-colocated-turns,cluster-colocated-overlap}
stamp "colocated profile (8B target, 1B draft): $rows"
limit=240; [ "${RUN_AHEAD:-on}" = both ] && limit=330; limit=${LIMIT:-$limit}
timeout $((limit + 40)) python3 -m cluster.cli bench --prompts /tmp/demo/specbench-dev.jsonl --tokenizer /tmp/demo/tokenizer \
  --categories writing,summarization --max-tokens 48 --repetitions 3 --shape-dir /tmp/shapes --no-plots --fused-kernels \
  --per-category 1 --concurrency 1 --time-limit-s $limit --run-ahead "${RUN_AHEAD:-on}" \
  --model "shape:8B@oracle:0.8:shape:1B#$rows" --name colocated-profile --out "$OUT/run/profile" 2> "$OUT/run/profile.log"
grep -E "\->|rror|skip" "$OUT/run/profile.log" | tail -12
sed -n '/Per timed repetition/,$p' "$OUT/run/profile/results.md" | head -24
stamp "done"; pack
