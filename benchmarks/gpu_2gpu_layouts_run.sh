#!/usr/bin/env bash
# One call on a 2-GPU host (nvidia-h200-x2), carry [".whl", ".demo"]: issue 3's measurement with
# every layout in ONE bench process — the Llama-3.1-8B shape with an emulated alpha = 0.8 draft of
# the Llama-3.2-1B shape, k = 4, batch 1: our reference loop, cluster target-only, colocated taking
# turns / with overlap (bounded by the verify), the draft on the other GPU taking turns / with
# overlap, each over NCCL and over gloo (--draft-link both; each link's round trip is reported);
# then goodput-adaptive k on the 1B shape (measured cost table) at 1, 8 and 32 against target-only
# (re-measures the arrival-deferral and off-decision fixes); then the 2-GPU CUDA tests.
# About 9 minutes. Results: $OUT/results.tgz (bench/, adaptive/, logs).
source benchmarks/gpu_common.sh
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/run/gpu.txt"
common=(--prompts /tmp/demo/specbench-dev.jsonl --tokenizer /tmp/demo/tokenizer --categories writing,summarization
        --max-tokens 48 --repetitions 3 --shape-dir /tmp/shapes --no-plots)
stamp "layouts (8B target, 1B draft)"
timeout 300 python3 -m cluster.cli bench "${common[@]}" --per-category 1 --concurrency 1 --time-limit-s 250 --draft-link both \
  --model "shape:8B@oracle:0.8:shape:1B#ours-target-only,ours-spec,cluster-target-only,cluster-colocated-turns,cluster-colocated-overlap,cluster-separate-turns,cluster-separate-overlap" \
  --name layouts --out "$OUT/run/bench" 2> "$OUT/run/bench.log"
grep -E "\->|rror|skip" "$OUT/run/bench.log" | tail -20; pack
stamp "adaptive (1B)"
timeout 170 python3 -m cluster.cli bench "${common[@]}" --per-category 2 --adaptive both --concurrency 1,8,32 \
  --time-limit-s 140 --cost-batches 1,8,32 --cost-tokens 1,2,4,8,16,32,64 --cluster-cost-table measured \
  --model "shape:1B@oracle:0.8:self:4#cost-curve,cluster-target-only,cluster-colocated-overlap" \
  --name adaptive --out "$OUT/run/adaptive" 2> "$OUT/run/adaptive.log"
grep -E "\->|rror|skip" "$OUT/run/adaptive.log" | tail -12; pack
stamp "2-GPU CUDA tests"
timeout 100 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py -k "nccl" > "$OUT/run/test_cuda_2gpu.txt" 2>&1
tail -3 "$OUT/run/test_cuda_2gpu.txt"
stamp "done"; pack
