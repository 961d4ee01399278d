"""Step profile on CPU: one greedy request (200 tokens) through a local cluster of a tiny random
checkpoint (4 layers): target-only, a self:4 draft (the target itself: everything accepted)
taking turns, and a self:2 draft (partial acceptance) taking turns and with overlap, all at k = 4,
each with run-ahead off and on (the target's plain decodes; the draft's chains drafted ahead).
Prints tok/s, wall per engine step and the milliseconds per step of each phase
(``outrider_step_phase_seconds_total``).

    python benchmarks/cpu_step_profile.py            # ~2 minutes on 2 cores

Control plane figures only: a tiny model's forward is not a GPU's.
"""

import asyncio
import sys
import tempfile
import time
from pathlib import Path

import ray

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from tiny_models import write_tiny_checkpoint  # noqa: E402

from actors.spec.types import SamplingParams  # noqa: E402
from cluster.cluster import Cluster  # noqa: E402
from cluster.config import ClusterConfig  # noqa: E402


def profile(cluster: Cluster) -> tuple[float, float, dict]:
    async def one():
        stream = await cluster.generate(list(range(3, 40)), SamplingParams(max_tokens=200), ignore_eos=True)
        return await stream.result()

    asyncio.run(one())  # warm-up
    cluster.wait_idle(10)
    before = cluster.metrics_snapshot()
    t0 = time.perf_counter()
    out = asyncio.run(one())
    wall = time.perf_counter() - t0
    cluster.wait_idle(10)
    after = cluster.metrics_snapshot()
    steps = after["outrider_engine_steps_total"] - before["outrider_engine_steps_total"]
    name = "outrider_step_phase_seconds_total"
    phases = {key: (value - before[name][key]) / steps * 1e3 for key, value in after[name].items()
              if value > before[name][key]}
    return len(out.token_ids) / wall, wall / steps * 1e3, phases


def main() -> None:
    checkpoint = write_tiny_checkpoint(Path(tempfile.mkdtemp()) / "tiny", num_layers=4)
    ray.init(num_cpus=2, num_gpus=2, include_dashboard=False, log_to_driver=False)
    for draft, overlap in ((None, False), ("self:4", False), ("self:2", False), ("self:2", True)):
        for ahead in (False, True):
            fields = {"target": str(checkpoint), "kv_budget_tokens": 2048, "cpus_per_worker": 0,
                      "run_ahead": ahead, "adaptive": False, "overlap": overlap}
            if draft:
                fields.update(draft=draft, num_draft_tokens=4)
            with Cluster.start(ClusterConfig(**fields)) as cluster:
                tok_s, step_ms, phases = profile(cluster)
            print(f"draft={draft}{' overlap' if overlap else ''} run_ahead={'on' if ahead else 'off'}: "
                  f"{tok_s:.0f} tok/s, {step_ms:.2f} ms per step")
            for key in sorted(phases, key=lambda k: (k.split("role=")[1], k)):
                print(f"    {key.split('role=')[1]:6s} {key.split(',')[0][6:]:15s} {phases[key]:.3f}")


if __name__ == "__main__":
    main()
