#!/usr/bin/env bash
# First call on a 2-GPU host (nvidia-h200-x2), carry [".whl", ".demo"]: the NCCL paths (CUDA tests,
# including the draft on its own GPU and a 2-GPU tensor-parallel target), then issue 3's measurement
# and issue 5's multi-GPU target in one bench process: the Llama-3.1-8B shape with an emulated
# alpha = 0.8 draft of the Llama-3.2-1B shape, k = 4 — our reference loop, the cluster target-only,
# colocated taking turns / with overlap, and the draft on the other GPU taking turns / with overlap,
# at concurrency 1 and 8; then HF generate on the same 8B weights; then the 1B shape with a 4-layer
# self-draft on the other GPU. About 9 minutes. Results: $OUT/results.tgz.
source benchmarks/gpu_common.sh
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/run/gpu.txt"
nvidia-smi topo -m >> "$OUT/run/gpu.txt" 2>&1
stamp "CUDA tests"
timeout 140 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py > "$OUT/run/test_cuda.txt" 2>&1
tail -3 "$OUT/run/test_cuda.txt"; pack
stamp "bench"
timeout 370 python3 -m cluster.cli bench --prompts /tmp/demo/specbench-dev.jsonl --tokenizer /tmp/demo/tokenizer \
  --categories writing,summarization --per-category 1 --max-tokens 48 --repetitions 3 --shape-dir /tmp/shapes \
  --concurrency 1,8 --time-limit-s 300 \
  --model "shape:8B@oracle:0.8:shape:1B#ours-target-only,ours-spec,cluster-target-only,cluster-colocated-turns,cluster-colocated-overlap,cluster-separate-turns,cluster-separate-overlap" \
  --model "shape:8B@oracle:0.8:shape:1B#hf-target-only" \
  --model "shape:1B@oracle:0.8:self:4#ours-target-only,cluster-target-only,cluster-separate-turns,cluster-separate-overlap" \
  --name 2gpu --out "$OUT/run/bench" --no-plots 2> "$OUT/run/bench.log"
grep -E "\->|error|Error|skip" "$OUT/run/bench.log" | tail -40
stamp "done"; pack
