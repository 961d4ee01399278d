#!/usr/bin/env bash
# Short 2-GPU call (nvidia-h200-x2, carry [".whl", ".demo"]) after the draft link got one NCCL group
# per direction and an eager handshake: the 2-GPU CUDA tests (draft on its own GPU over NCCL with and
# without overlap, TP=2 target), then the 8B shape with the 1B-shape oracle draft (alpha = 0.8, k = 4)
# at batch 1: cluster target-only, draft on its own GPU taking turns and with overlap. About 4 minutes.
source benchmarks/gpu_common.sh
export NCCL_DEBUG=WARN
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/run/gpu.txt"
stamp "2-GPU CUDA tests"
timeout 100 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py -k "nccl" > "$OUT/run/test_cuda_2gpu.txt" 2>&1
tail -5 "$OUT/run/test_cuda_2gpu.txt"; pack
stamp "bench"
timeout 200 python3 -m cluster.cli bench --prompts /tmp/demo/specbench-dev.jsonl --tokenizer /tmp/demo/tokenizer \
  --categories writing,summarization --per-category 1 --max-tokens 48 --repetitions 3 --shape-dir /tmp/shapes \
  --concurrency 1 --time-limit-s 150 \
  --model "shape:8B@oracle:0.8:shape:1B#cluster-target-only,cluster-separate-overlap,cluster-separate-turns" \
  --name 2gpu-separate --out "$OUT/run/bench" --no-plots 2> "$OUT/run/bench.log"
grep -E "\->|rror|skip" "$OUT/run/bench.log" | tail -20
stamp "done"; pack
