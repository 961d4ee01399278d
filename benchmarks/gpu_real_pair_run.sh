#!/usr/bin/env bash
# Third call on the same warm 2-GPU host: the real pair. The demo GGUF (98 MB) is over one call's
# 64 MiB carry, so it travels in two chunks: .real-b in the second call (copied to /tmp/real by
# benchmarks/gpu_take_chunk.sh) and .real-c (the rest, plus the gguf wheel) in this one. The file is
# checked against its sha256 when converted (OUTRIDER_DEMO_GGUF), then SmolLM2-135M-Instruct runs
# per Spec-Bench category at batch 1: our target-only and speculative rows (prompt lookup and a
# self-speculative draft), HF generate and prompt lookup, and the cluster target-only and draft on
# its own GPU with overlap, greedy-checked. About 6 minutes. Results: $OUT/results.tgz.
source benchmarks/gpu_common.sh
mkdir -p /tmp/real && cp .real-c/part-* /tmp/real/
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .real-c/*.whl
cat /tmp/real/part-* > /tmp/real/model.gguf; ls -l /tmp/real | tee "$OUT/run/real_files.txt"
export OUTRIDER_DEMO_GGUF=/tmp/real/model.gguf OUTRIDER_CACHE=/tmp/outrider-cache
stamp "real pair"
timeout 420 python3 -m cluster.cli bench --prompts /tmp/demo/specbench-dev.jsonl --per-category 1 --max-tokens 64 \
  --repetitions 3 --concurrency 1 --time-limit-s 360 \
  --model "demo@lookup,self:24#ours-target-only,ours-spec,hf-target-only,hf-lookup,cluster-target-only,cluster-separate-overlap" \
  --cluster-draft self:24 --name real-pair --out "$OUT/run/real" --no-plots 2> "$OUT/run/real.log"
grep -E "\->|rror|skip" "$OUT/run/real.log" | tail -20
stamp "done"; pack
