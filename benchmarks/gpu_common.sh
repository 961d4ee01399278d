# Sourced by the multi-call GPU scripts (benchmarks/gpu_2gpu_*.sh, gpu_real_pair_run.sh).
# Installs the offline Ray wheels once per machine into /tmp/site (a warm machine keeps them between
# calls), sets the environment, and offers `pack`, which tars everything written under $OUT/run into
# $OUT/results.tgz (the device tool returns at most 8 files, so one archive per call).
set -u
export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH RAY_AUTH_MODE=disabled NCCL_NVLS_ENABLE=0 \
  TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
mkdir -p "$OUT/run"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
if [ -d .demo ]; then mkdir -p /tmp/demo && cp -r .demo/. /tmp/demo/; fi
if ! python3 -c "import ray" 2>/dev/null; then
  echo "no Ray on this machine (a cold machine without .whl in carry): nothing to run"; exit 3
fi
pack() { tar czf "$OUT/results.tgz" -C "$OUT/run" . ; }
stamp() { echo "[$(date +%H:%M:%S)] $*" | tee -a "$OUT/run/stages.log"; }
