#!/usr/bin/env bash
# One GPU call (any single-GPU kind; no Ray, no carry needed): does fusing each layer's element-wise
# chains with torch.compile (actors/model/fused.py) pay inside the CUDA graphs? The CUDA tests of the
# graph runner (incl. a graph captured over the compiled kernels, and the greedy speculative loop with
# graphed target and draft, which runs the on-device greedy chain drafting), then
# benchmarks/graph_steps.py --compile on the Llama-3.2-1B and 3.1-8B shapes at batch 1, 8, 32: eager,
# graph and fused-graph steps alternating, device times, and a kernel profile of a batch-1 decode
# step with and without fusion. About 6 minutes on one H100. Results: $OUT/steps/ and logs.
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/gpu.txt"
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_graph_runner.py tests/test_fused.py > "$OUT/test_cuda.txt" 2>&1
tail -3 "$OUT/test_cuda.txt"
timeout 400 python3 benchmarks/graph_steps.py --models llama-3.2-1b,llama-3.1-8b --batches 1,8,32 --compile \
  --out "$OUT/steps" > "$OUT/steps.log" 2>&1
grep -E "ms|kernels" "$OUT/steps.log" | tail -30
