#!/usr/bin/env bash
# One GPU-host call for the cluster engine (issue 3) with CUDA graphs in the workers: CUDA tests,
# then `outrider bench` on the Llama-3.2-1B and 3.1-8B shapes — our reference loop and the cluster
# target-only, colocated taking turns and colocated with overlap (separate-GPU rows run when the
# host has >= 2 GPUs). Needs the offline wheels in .whl/ (../shared/tools/gpu-wheels.sh .whl gguf
# matplotlib) and the Spec-Bench prompts + a tokenizer in .demo/. Writes under $OUT.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH RAY_AUTH_MODE=disabled NCCL_NVLS_ENABLE=0
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/gpu.txt"
timeout 200 python3 -m pytest -q tests/test_cuda.py tests/test_graph_runner.py > "$OUT/test_cuda.txt" 2>&1
tail -3 "$OUT/test_cuda.txt"
common=(--prompts .demo/specbench-dev.jsonl --tokenizer .demo/tokenizer --categories writing,summarization
        --per-category 1 --max-tokens 48 --repetitions 3 --adaptive "${ADAPTIVE:-off}" --shape-dir /tmp/shapes)
timeout 330 python3 -m cluster.cli bench "${common[@]}" --concurrency 1,8 --time-limit-s 240 \
  --model "shape:1B@oracle:0.8:self:4#ours-target-only,ours-spec,cluster-target-only,cluster-colocated-turns,cluster-colocated-overlap,cluster-separate-turns,cluster-separate-overlap" \
  --model "shape:8B@oracle:0.8:shape:1B#ours-target-only,ours-spec,cluster-target-only,cluster-colocated-turns" \
  --name bench --out "$OUT/bench" 2> "$OUT/bench.log"
tail -25 "$OUT/bench.log"
