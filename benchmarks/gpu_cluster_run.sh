#!/usr/bin/env bash
# One GPU-host call for the cluster engine (issue 3) with CUDA graphs in the workers, and the Hugging
# Face baselines of issue 5: CUDA tests, then one `outrider bench` process on the Llama-3.2-1B and
# 3.1-8B shapes, in this order (the time limit cuts the end first):
#   1B: cost curve (also written as cost_table-Llama-3.2-1B.json), our reference loop, the cluster
#       target-only / colocated taking turns / colocated with overlap (separate-GPU rows on >= 2 GPUs);
#   1B: Hugging Face generate target-only, prompt lookup, assisted, and static cache + torch.compile
#       (reduce-overhead; its compile, about 1-2 min cold, runs in the untimed warm-up and is reported
#       apart) — a second section of the same model, so a slow compile cannot cost the cluster rows;
#   8B: our reference loop, HF target-only, cluster target-only and colocated turns, if time is left.
# About 8 minutes on one H100 (install ~0.3, tests ~1.5, bench <= 6.5 by its time limit).
# Needs the offline wheels in .whl/ (../shared/tools/gpu-wheels.sh .whl gguf matplotlib) and the
# Spec-Bench prompts + a tokenizer in .demo/. Writes under $OUT.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH RAY_AUTH_MODE=disabled NCCL_NVLS_ENABLE=0
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/gpu.txt"
timeout 120 python3 -m pytest -q tests/test_cuda.py tests/test_graph_runner.py > "$OUT/test_cuda.txt" 2>&1
tail -3 "$OUT/test_cuda.txt"
common=(--prompts .demo/specbench-dev.jsonl --tokenizer .demo/tokenizer --categories writing,summarization
        --per-category 1 --max-tokens 48 --repetitions 3 --adaptive "${ADAPTIVE:-off}" --shape-dir /tmp/shapes
        --cost-batches 1,8,32 --cost-tokens 1,2,4,8,16,32,64)
timeout 380 python3 -m cluster.cli bench "${common[@]}" --concurrency 1,8 --time-limit-s 330 \
  --model "shape:1B@oracle:0.8:self:4#cost-curve,ours-target-only,ours-spec,cluster-target-only,cluster-colocated-turns,cluster-colocated-overlap,cluster-separate-turns,cluster-separate-overlap" \
  --model "shape:1B@oracle:0.8:self:4#hf-target-only,hf-lookup,hf-assisted,hf-compiled" \
  --model "shape:8B@oracle:0.8:shape:1B#ours-target-only,hf-target-only,cluster-target-only,cluster-colocated-turns" \
  --name bench --out "$OUT/bench" 2> "$OUT/bench.log"
tail -30 "$OUT/bench.log"
