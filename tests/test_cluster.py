"""The distributed engine through its Python API, on a local Ray cluster with fake GPUs and gloo.

One Ray instance for the module. Greedy output must equal the single-process reference loop's
(target-only: speculation is lossless) for concurrent requests with mixed prompt lengths, late
arrivals, several draft lengths, with overlap on and off; sampled output must follow the target's
exact distribution through the distributed path; abort returns KV on both workers; a killed
draft loses no request; a killed target fails its requests clearly and the engine recovers.
"""

import asyncio
import os
import threading
import time

os.environ["RAY_AUTH_MODE"] = "disabled"
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

import numpy as np
import pytest
import ray
import torch

from actors.model.loader import load_model
from actors.spec.reference import generate as reference_generate
from actors.spec.types import SamplingParams
from cluster.cluster import Cluster
from cluster.config import ClusterConfig
from cluster.scheduler import EngineOverloadedError
from cluster.workers import WorkerFailure
from tests.conftest import wait_for
from tests.tiny_models import write_tiny_checkpoint

VOCAB = 320


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    target = write_tiny_checkpoint(root / "target", arch="llama", num_layers=4, with_tokenizer=True)
    draft = write_tiny_checkpoint(root / "draft", arch="llama", num_layers=2, seed=3, with_tokenizer=True)
    return str(target), str(draft)


@pytest.fixture(scope="module")
def target_model(checkpoints):
    return load_model(checkpoints[0])


def config(target, **fields):
    base = {"target": target, "kv_budget_tokens": 2048, "cpus_per_worker": 0, "step_timeout_s": 30,
            "start_timeout_s": 60, "draft_restart_s": 0.2}
    return ClusterConfig(**{**base, **fields})


def make_prompts(lengths=(3, 17, 9, 40, 5, 23), seed=7):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=gen).tolist() for n in lengths]


def expected(target_model, prompts, params):
    return [r.token_ids for r in reference_generate(target_model, prompts, params)]


def run_concurrently(cluster, prompts, params, stagger_s=0.0, fault=None):
    """Submit every prompt (the later ones after a delay, while the first are mid-generation).

    ``fault=(n, inject)`` calls ``inject()`` once, when the first request has streamed ``n``
    tokens: a fault lands mid-generation however fast the machine is (a wall-clock timer once
    fired after a fast CI machine had finished every request)."""
    fired = threading.Event()

    async def one(i, prompt, p):
        await asyncio.sleep(stagger_s * i)
        stream = await cluster.generate(prompt, p, ignore_eos=True)
        chunks, streamed = [], 0
        async for c in stream:
            chunks.append(c)
            streamed += len(c.token_ids)
            if fault and i == 0 and not fired.is_set() and streamed >= fault[0]:
                fired.set()
                fault[1]()
        out = await stream.result()
        assert sum((c.token_ids for c in chunks), []) == out.token_ids  # streamed = final
        return out

    async def main():
        return await asyncio.gather(*(one(i, pr, p) for i, (pr, p) in enumerate(zip(prompts, params))))

    outputs = asyncio.run(main())  # a fault that fails the run raises here, as it should
    assert fault is None or fired.is_set(), "every request finished before the fault was injected"
    return outputs


def greedy_params(n):
    return [SamplingParams(max_tokens=m) for m in (24, 1, 30, 12, 40, 7)[:n]]


@pytest.mark.parametrize("fields", [
    pytest.param({"draft": "self:2", "num_draft_tokens": 3, "overlap": True, "adaptive": False}, id="self2-k3-overlap"),
    pytest.param({"draft": "self:4", "num_draft_tokens": 4, "overlap": True, "adaptive": False,
                  "capture_at_start": True}, id="exact-draft-overlap-capture-at-start"),
    pytest.param({"draft": "CKPT", "num_draft_tokens": 2, "overlap": False, "adaptive": False,
                  "step_transport": "ray"}, id="ckpt-k2-turns-ray-calls"),
    pytest.param({"draft": "self:3", "num_draft_tokens": 3, "overlap": True, "pre_verify": True,
                  "adaptive": True, "colocate": True, "draft_gpus": 0}, id="colocated-preverify-adaptive"),
    pytest.param({"draft": "self:2", "num_draft_tokens": 4, "overlap": False, "adaptive": True},
                 id="turns-adaptive-draft-ahead"),
])
def test_greedy_equals_target_only_reference(ray_local, checkpoints, target_model, fields):
    fields = {**fields, "draft": checkpoints[1] if fields["draft"] == "CKPT" else fields["draft"]}
    prompts, params = make_prompts(), greedy_params(6)
    want = expected(target_model, prompts, params)
    with Cluster.start(config(checkpoints[0], **fields)) as cluster:
        before = cluster.kv_free_tokens()
        assert set(before) == {"target", "draft"}
        got = run_concurrently(cluster, prompts, params, stagger_s=0.05)
        assert [o.token_ids for o in got] == want
        assert [o.finish_reason for o in got] == ["length"] * len(prompts)
        if fields.get("capture_at_start"):  # asked of both workers; on CPU nothing is captured
            captured = cluster.workers.captured
            assert captured["target"]["shapes"] > 0 and captured["draft"]["shapes"] > 0
            assert captured["target"]["captured"] == captured["draft"]["captured"] == 0
        if fields["draft"] == "self:4":  # the draft is the target: everything is accepted
            assert all(o.stats["mean_accepted_length"] > 3 for o in got if len(o.token_ids) > 12)
        assert cluster.wait_idle(30)
        assert cluster.kv_free_tokens() == before
        text = cluster.metrics_text().decode()
        for name in ("outrider_requests_total", "outrider_spec_acceptance_rate", "outrider_spec_decision_info",
                     "outrider_engine_step_seconds", "outrider_verify_step_seconds", "outrider_kv_cache_usage_ratio"):
            assert name in text
        decision = cluster.metrics_snapshot().get("last_decision")
        assert decision is not None and decision["reason"]  # the decision and its inputs are exposed


def test_oracle_draft_overlap_hits(ray_local, checkpoints, target_model, tmp_path):
    """Emulated acceptance α = 0.9 with overlap: output unchanged, pre-drafted chains are used."""
    import json

    prompts, params = make_prompts()[:4], [SamplingParams(max_tokens=60)] * 4
    want = expected(target_model, prompts, params)
    recorded = tmp_path / "continuations.json"
    recorded.write_text(json.dumps([{"prompt": p, "output": o} for p, o in zip(prompts, want)]))
    with Cluster.start(config(checkpoints[0], draft="oracle:0.9:self:1", num_draft_tokens=3, adaptive=False,
                              oracle_continuations=str(recorded))) as cluster:
        got = run_concurrently(cluster, prompts, params)
        assert [o.token_ids for o in got] == want
        assert all(o.stats["mean_accepted_length"] > 2.0 for o in got)
        hits = cluster.engine.metrics.get("outrider_overlap_speculations_total", outcome="hit")
        assert hits and hits > 0


@pytest.mark.parametrize("run_ahead,overlap", [(True, False), (False, False), (True, True)],
                         ids=["turns-draft-ahead", "turns-no-draft-ahead", "overlap-misses-drafted-ahead"])
def test_draft_ahead_sends_chains_drafted_before_the_step(ray_local, checkpoints, target_model, run_ahead, overlap):
    """The draft drafts a request's next chain as soon as the target's tokens reach it — taking
    turns always, with overlap where the speculation missed: with arrivals, finishes and a fixed k
    the output is the reference's, the chains drafted ahead are sent (most drafting steps, taking
    turns) and the step profile shows that drafting; with run-ahead off none is."""
    prompts, params = make_prompts(), greedy_params(6)
    want = expected(target_model, prompts, params)
    with Cluster.start(config(checkpoints[0], draft="self:2", num_draft_tokens=3, overlap=overlap, adaptive=False,
                              run_ahead=run_ahead)) as cluster:
        got = run_concurrently(cluster, prompts, params, stagger_s=0.05)
        assert [o.token_ids for o in got] == want
        assert cluster.wait_idle(30)
        m = cluster.engine.metrics
        used = m.get("outrider_draft_ahead_used_total")
        drafting = m.get("outrider_spec_steps_total", reason_code="fixed")
        ahead_s = m.get("outrider_step_phase_seconds_total", role="draft", phase="ahead")
        misses = m.get("outrider_overlap_speculations_total", outcome="miss")
        if not run_ahead:
            assert used == 0 and ahead_s == 0
        elif overlap:  # a miss's fresh chain was drafted ahead; a hit's speculation is sent as before
            assert misses > 0 and 0 < used <= misses and ahead_s > 0, (used, misses)
            assert m.get("outrider_overlap_speculations_total", outcome="hit") > 0
        else:
            assert used > drafting / 2 and ahead_s > 0, (used, drafting)


def test_oracle_retrack_from_real_outputs(ray_local, checkpoints, target_model, tmp_path):
    """The bench's honest emulation: an oracle draft given a record the target does not follow
    accepts (almost) nothing; ``retrack_oracle`` with the outputs of a pass makes the next pass
    accept what α = 1 says (everything), output unchanged. A cluster without an oracle re-records
    nothing."""
    import json

    prompts, params = make_prompts()[:3], [SamplingParams(max_tokens=40)] * 3
    want = expected(target_model, prompts, params)
    recorded = tmp_path / "stale.json"
    recorded.write_text(json.dumps([{"prompt": p, "output": [(t + 1) % 256 for t in o]} for p, o in zip(prompts, want)]))
    with Cluster.start(config(checkpoints[0], draft="oracle:1.0:self:1", num_draft_tokens=3, adaptive=False,
                              oracle_continuations=str(recorded))) as cluster:
        first = run_concurrently(cluster, prompts, params)
        assert [o.token_ids for o in first] == want
        assert all(o.stats["mean_accepted_length"] < 1.5 for o in first)
        assert cluster.retrack_oracle([{"prompt": p, "output": o.token_ids} for p, o in zip(prompts, first)]) == 3
        second = run_concurrently(cluster, prompts, params)
        assert [o.token_ids for o in second] == want
        assert all(o.stats["mean_accepted_length"] > 3.5 for o in second)
    with Cluster.start(config(checkpoints[0], draft="self:1", num_draft_tokens=3)) as cluster:
        assert cluster.retrack_oracle([{"prompt": prompts[0], "output": want[0]}]) == 0


def test_bounded_overlap_extends_hits_and_stays_lossless(ray_local, checkpoints, target_model, tmp_path):
    """A verify too short to hide k + 1 draft levels bounds the speculation to the bonus guess and
    one token; a hit is then extended to the k asked for, and the output is the target's."""
    import json

    prompts = make_prompts()[:3]
    params = [SamplingParams(max_tokens=50)] * 3
    want = expected(target_model, prompts, params)
    recorded = tmp_path / "continuations.json"
    recorded.write_text(json.dumps([{"prompt": p, "output": o} for p, o in zip(prompts, want)]))
    with Cluster.start(config(checkpoints[0], draft="oracle:0.9:self:1", num_draft_tokens=4, adaptive=False,
                              oracle_continuations=str(recorded))) as cluster:
        cluster.engine._speculation_budget = lambda: 1e-9  # every speculation: 2 levels
        got = run_concurrently(cluster, prompts, params)
        hits = cluster.engine.metrics.get("outrider_overlap_speculations_total", outcome="hit")
        extended = cluster.engine.metrics.get("outrider_overlap_extended_total")
    assert [o.token_ids for o in got] == want
    assert all(o.stats["mean_accepted_length"] > 2.0 for o in got)
    assert hits and hits > 0 and extended and extended > 0


def test_idle_draft_catches_up_after_many_steps_without_drafting(ray_local, checkpoints, target_model):
    """With k = 0 chosen for every request the draft is not called each step; when drafting
    resumes mid-request it catches up with every token it missed, and output stays the target's."""
    from cluster.speculation_policy import FixedPolicy

    class Spy:  # the policy's inputs: how many tokens the draft missed per request
        def __init__(self, inner):
            self.inner, self.resumes = inner, []

        def choose(self, ids, caps=None, resume=None):
            decision = self.inner.choose(ids, caps, resume)
            self.resumes.append((decision.k, dict(resume or {})))
            return decision

    prompt, params = make_prompts((11,))[0], SamplingParams(max_tokens=80)
    want = expected(target_model, [prompt], [params])[0]
    with Cluster.start(config(checkpoints[0], draft="self:3", num_draft_tokens=3, adaptive=False)) as cluster:
        control = cluster.engine.policy
        control.policy = spy = Spy(FixedPolicy(0))

        async def main():
            stream = await cluster.generate(prompt, params, ignore_eos=True)
            seen = 0
            async for chunk in stream:
                seen += len(chunk.token_ids)
                if seen >= 30:  # > 16 steps without the draft, then speculate again
                    spy.inner = FixedPolicy(3)
            return await stream.result()

        out = asyncio.run(main())
        assert out.token_ids == want
        # the first drafting decision saw what the draft had missed: every token since the first k = 0 step
        k, resume = next((k, r) for k, r in spy.resumes if k > 0)
        (missed,) = resume.values()
        assert 28 <= missed <= 40, spy.resumes
        assert all(not r for k, r in spy.resumes[spy.resumes.index((k, resume)) + 1:])  # caught up since
        assert control.costs.num_observations["catch_up"] >= 1  # the draft reported that catch-up's cost
        lengths = out.stats["accepted_lengths"]
        assert set(lengths[:25]) == {1} and max(lengths) > 1  # drafting resumed and was accepted
        # k = 0 steps ran ahead on the target; the first drafting step after them undid one
        assert cluster.engine.metrics.get("outrider_target_run_ahead_total", outcome="used") > 10
        assert cluster.engine.metrics.get("outrider_target_run_ahead_total", outcome="discarded") >= 1


def test_arrivals_reach_the_draft_only_when_drafting_resumes(ray_local, checkpoints, target_model):
    """While k = 0 for a running batch, new prompts are not prefilled on the draft (a colocated
    draft would spend the target's GPU on it for nothing); they reach it whole with the next step
    that drafts, and every output stays the target's."""
    from cluster.speculation_policy import FixedPolicy

    prompts = make_prompts((11, 19, 7))
    params = [SamplingParams(max_tokens=90), SamplingParams(max_tokens=40), SamplingParams(max_tokens=40)]
    want = expected(target_model, prompts, params)
    with Cluster.start(config(checkpoints[0], draft="self:3", num_draft_tokens=3, adaptive=False)) as cluster:
        control = cluster.engine.policy
        control.policy = FixedPolicy(0)
        metrics = cluster.engine.metrics

        def draft_steps() -> float:
            return metrics.get("outrider_draft_step_seconds_count") or 0.0

        async def main():
            first = await cluster.generate(prompts[0], params[0], ignore_eos=True)
            later, seen, off_steps = [], 0, None
            async for chunk in first:
                seen += len(chunk.token_ids)
                if seen >= 10 and not later:  # arrivals while speculation is off for a running batch
                    later = [await cluster.generate(p, sp, ignore_eos=True) for p, sp in zip(prompts[1:], params[1:])]
                    for stream in later:
                        async for _ in stream:
                            break  # both admitted and prefilled on the target
                if later and off_steps is None and seen >= 30:
                    off_steps = draft_steps()
                    control.policy = FixedPolicy(3)
            return [await first.result()] + [await s.result() for s in later], off_steps

        outs, off_steps = asyncio.run(main())
        assert off_steps is not None and off_steps <= 1  # at most the first prompt's draft prefill
        assert [o.token_ids for o in outs] == want
        assert all(max(o.stats["accepted_lengths"]) > 1 for o in outs)  # all drafted once resumed


def test_target_only_and_late_arrivals(ray_local, checkpoints, target_model):
    prompts, params = make_prompts(), greedy_params(6)
    with Cluster.start(config(checkpoints[0], draft="none")) as cluster:
        before = cluster.kv_free_tokens()
        got = run_concurrently(cluster, prompts, params, stagger_s=0.1)
        assert [o.token_ids for o in got] == expected(target_model, prompts, params)
        assert set(cluster.kv_free_tokens()) == {"target"}
        assert cluster.engine.metrics.get("outrider_target_run_ahead_total", outcome="used") > 10
        assert cluster.wait_idle(30)
        assert cluster.kv_free_tokens() == before  # nothing a run-ahead took is left behind


def test_seeded_sampling_is_the_same_with_and_without_run_ahead(ray_local, checkpoints):
    """Target-only with seeded sampling and staggered arrivals: the outputs do not depend on
    whether the target ran steps ahead (an undone run-ahead restores each request's sampler)."""
    prompts = make_prompts()
    params = [SamplingParams(temperature=0.9, top_k=50, max_tokens=m, seed=100 + i)
              for i, m in enumerate((24, 3, 30, 12, 40, 7))]
    outputs = {}
    for run_ahead in (True, False):
        with Cluster.start(config(checkpoints[0], draft="none", run_ahead=run_ahead)) as cluster:
            outputs[run_ahead] = [o.token_ids for o in run_concurrently(cluster, prompts, params, stagger_s=0.05)]
            used = cluster.engine.metrics.get("outrider_target_run_ahead_total", outcome="used")
            assert (used > 10) if run_ahead else (used == 0)
    assert outputs[True] == outputs[False]


def test_tensor_parallel_target_with_a_draft(ray_local, checkpoints, target_model):
    """Target over 2 (fake) GPUs, tensor-parallel over gloo, plus a draft on a third."""
    prompts, params = make_prompts()[:4], greedy_params(4)
    with Cluster.start(config(checkpoints[0], target_gpus=2, draft="self:2", num_draft_tokens=2,
                              adaptive=False)) as cluster:
        infos = ray.get([w.info.remote() for w in [*cluster.workers.targets, cluster.workers.draft]])
        gpus = [tuple(i["gpu_ids"]) for i in infos]
        assert len(set(gpus)) == 3 and all(len(g) == 1 for g in gpus)  # three distinct GPUs
        got = run_concurrently(cluster, prompts, params, stagger_s=0.05)
        assert [o.token_ids for o in got] == expected(target_model, prompts, params)
        assert max(o.stats["mean_accepted_length"] for o in got) > 1.0


def test_role_pools_put_each_worker_on_its_roles_resource(ray_local, checkpoints, target_model):
    """node_pools per_role (the Helm chart): the bundles ask for outrider_target / outrider_draft."""
    from ray.util.placement_group import placement_group_table

    prompts = make_prompts()[:2]
    params = greedy_params(4)[:2]
    with Cluster.start(config(checkpoints[0], draft="self:2", num_draft_tokens=2, node_pools="per_role")) as cluster:
        (group,) = cluster.workers.placed.groups
        table = placement_group_table(group)
        assert table["strategy"] == "PACK"
        assert [b.get("outrider_target", 0) for b in table["bundles"].values()] == [1, 0]
        assert [b.get("outrider_draft", 0) for b in table["bundles"].values()] == [0, 1]
        got = run_concurrently(cluster, prompts, params)
        assert [o.token_ids for o in got] == expected(target_model, prompts, params)


def test_unreachable_step_channels_fall_back_to_ray_calls(ray_local, checkpoints, target_model, monkeypatch,
                                                          caplog):
    import actors.step_channel

    def refuse(self, host, port, token, **kw):
        raise ConnectionRefusedError(f"refused {host}:{port}")

    monkeypatch.setattr(actors.step_channel.StepChannel, "__init__", refuse)
    prompts = make_prompts()[:2]
    params = greedy_params(4)[:2]
    with caplog.at_level("WARNING", logger="outrider.workers"):
        cluster = Cluster.start(config(checkpoints[0], draft="self:2", num_draft_tokens=2))
    with cluster:
        assert cluster.workers.channels == [] and cluster.workers.draft_channel is None
        got = run_concurrently(cluster, prompts, params)
        assert [o.token_ids for o in got] == expected(target_model, prompts, params)
    assert sum("unreachable" in r.getMessage() and "through Ray instead" in r.getMessage()
               for r in caplog.records) == 2  # the target rank and the draft


def test_role_pools_wait_for_nodes_then_say_what_is_missing(ray_local, checkpoints):
    from placement.spec import PlacementError

    start = time.monotonic()
    with pytest.raises(PlacementError, match=r"needs 3 outrider_target on one node.*waited 2 s for nodes"):
        Cluster.start(config(checkpoints[0], target_gpus=3, node_pools="per_role", start_timeout_s=2))
    assert 1.5 < time.monotonic() - start < 10


@pytest.fixture(scope="module")
def spec_cluster(ray_local, checkpoints):
    with Cluster.start(config(checkpoints[0], draft="self:2", num_draft_tokens=3, max_waiting=8)) as cluster:
        yield cluster


def test_abort_mid_stream_frees_kv_on_both_workers(spec_cluster):
    before = spec_cluster.kv_free_tokens()

    async def main():
        stream = await spec_cluster.generate(make_prompts((30,))[0], SamplingParams(max_tokens=400), ignore_eos=True)
        got = 0
        async for chunk in stream:
            got += len(chunk.token_ids)
            if got >= 5:
                stream.abort()
        return await stream.result()

    out = asyncio.run(main())
    assert out.finish_reason == "abort" and 5 <= len(out.token_ids) < 400
    assert spec_cluster.wait_idle(30)
    assert spec_cluster.kv_free_tokens() == before


def test_stop_strings_and_text(spec_cluster, target_model):
    prompt = make_prompts((12,))[0]
    full = list(spec_cluster.generate_sync(prompt, SamplingParams(max_tokens=30), ignore_eos=True))[-1]
    decoded = spec_cluster.tokenizer.decode(full.token_ids, skip_special_tokens=True)
    if "\ufffd" not in decoded:  # a random tiny model emits invalid UTF-8 byte runs at times
        assert full.text == decoded
    cut = full.text[len(full.text) // 2:][:3]
    if not cut.strip():
        pytest.skip("generated text has no usable stop string")
    out = list(spec_cluster.generate_sync(prompt, SamplingParams(max_tokens=30), stop=[cut], ignore_eos=True))[-1]
    assert out.finish_reason == "stop"
    assert out.text == full.text[: full.text.index(cut)] and cut not in out.text
    assert out.token_ids == full.token_ids[: len(out.token_ids)]


def test_bad_input_and_overload(spec_cluster):
    with pytest.raises(ValueError, match="empty"):
        list(spec_cluster.generate_sync([], SamplingParams()))
    with pytest.raises(ValueError, match="vocabulary"):
        list(spec_cluster.generate_sync([VOCAB + 5], SamplingParams()))
    with pytest.raises(ValueError, match="context"):
        list(spec_cluster.generate_sync([5, 6], SamplingParams(max_tokens=100_000)))
    long = make_prompts((8,))[0]

    async def flood():
        streams = []
        try:
            for _ in range(500):  # the queue is bounded (max_waiting=8): it refuses, never grows
                streams.append(await spec_cluster.generate(long, SamplingParams(max_tokens=60), ignore_eos=True))
        finally:
            for s in streams:
                s.abort()
        return streams

    with pytest.raises(EngineOverloadedError, match="retry"):
        asyncio.run(flood())
    assert spec_cluster.wait_idle(60)


def test_killed_draft_loses_no_request(ray_local, checkpoints, target_model):
    prompts, params = make_prompts(), [SamplingParams(max_tokens=60)] * 6
    want = expected(target_model, prompts, params)
    with Cluster.start(config(checkpoints[0], draft="self:2", num_draft_tokens=3, adaptive=False)) as cluster:
        draft = cluster.workers.draft

        def kill_draft():
            ray.kill(draft, no_restart=False)
            # the engine must notice while requests still run (an idle engine notices at its next step)
            assert wait_for(lambda: not cluster.engine.draft_up, 30), "the draft's death went unnoticed"

        got = run_concurrently(cluster, prompts, params, fault=(4, kill_draft))
        assert [o.token_ids for o in got] == want
        assert wait_for(lambda: cluster.engine.draft_up), "the restarted draft was not reconnected"
        got = run_concurrently(cluster, prompts[:2], params[:2])
        assert [o.token_ids for o in got] == want[:2]
        assert max(o.stats["mean_accepted_length"] for o in got) > 1.0  # speculating again


def test_killed_target_fails_clearly_then_recovers(ray_local, checkpoints, target_model):
    prompts, params = make_prompts(), [SamplingParams(max_tokens=200)] * 6
    with Cluster.start(config(checkpoints[0], draft="self:2", num_draft_tokens=2)) as cluster:
        target = cluster.workers.targets[0]
        start = time.monotonic()
        with pytest.raises(WorkerFailure, match="target"):
            run_concurrently(cluster, prompts, params, fault=(4, lambda: ray.kill(target, no_restart=False)))
        assert time.monotonic() - start < 30
        short = [SamplingParams(max_tokens=10)] * 2
        got = run_concurrently(cluster, prompts[:2], short)
        assert [o.token_ids for o in got] == expected(target_model, prompts[:2], short)


def _freeze(actor) -> None:
    """Stop (SIGSTOP) an actor's process: alive but silent, the hardest failure to notice."""
    import signal

    os.kill(ray.get(actor.info.remote())["pid"], signal.SIGSTOP)


def test_silent_draft_does_not_hang(ray_local, checkpoints, target_model):
    prompts, params = make_prompts()[:3], [SamplingParams(max_tokens=40)] * 3
    want = expected(target_model, prompts, params)
    with Cluster.start(config(checkpoints[0], draft="self:2", num_draft_tokens=2, adaptive=False,
                              step_timeout_s=4)) as cluster:
        start = time.monotonic()
        got = run_concurrently(cluster, prompts, params, fault=(3, lambda: _freeze(cluster.workers.draft)))
        assert [o.token_ids for o in got] == want  # finished target-only after the link deadline
        assert time.monotonic() - start < 20
        assert wait_for(lambda: cluster.engine.draft_up)  # the frozen draft was killed and restarted


def test_silent_target_fails_requests_then_recovers(ray_local, checkpoints, target_model):
    prompts, params = make_prompts()[:3], [SamplingParams(max_tokens=300)] * 3
    with Cluster.start(config(checkpoints[0], draft="self:2", num_draft_tokens=2, step_timeout_s=4)) as cluster:
        assert cluster.health() == (True, "serving")
        start = time.monotonic()
        with pytest.raises(WorkerFailure, match="did not answer"):
            run_concurrently(cluster, prompts, params, fault=(3, lambda: _freeze(cluster.workers.targets[0])))
        assert time.monotonic() - start < 20
        serving, why = cluster.health()
        assert (serving and why == "serving") or why.startswith("recovering"), why
        short = [SamplingParams(max_tokens=8)] * 2
        got = run_concurrently(cluster, prompts[:2], short)
        assert [o.token_ids for o in got] == expected(target_model, prompts[:2], short)


# ----------------------------------------------------------------- sampling through the cluster
SMALL_VOCAB = 6
PROMPT = [1, 4, 2, 5]
NUM_SAMPLES = 3000


def test_sampling_is_lossless_through_the_cluster(ray_local, tmp_path_factory):
    from tests.test_spec_lossless_sampling import (
        chi_square_pvalue,
        exact_joint,
        noise_tv,
        total_variation,
    )

    root = tmp_path_factory.mktemp("v6")
    target = write_tiny_checkpoint(root / "t", arch="llama", vocab_size=SMALL_VOCAB, num_layers=3,
                                   with_tokenizer=False)
    params = SamplingParams(temperature=1.0, max_tokens=3)
    probs = exact_joint(load_model(target), params)
    fields = {"draft": "self:1", "num_draft_tokens": 2, "overlap": True, "adaptive": False,
              "max_running": 256, "max_waiting": NUM_SAMPLES, "kv_budget_tokens": 256 * 32}
    with Cluster.start(config(str(target), **fields)) as cluster:
        samples = [SamplingParams(temperature=1.0, max_tokens=3, seed=50_000 + i) for i in range(NUM_SAMPLES)]
        outs = run_concurrently(cluster, [PROMPT] * NUM_SAMPLES, samples)
    codes = [(o.token_ids[0] * SMALL_VOCAB + o.token_ids[1]) * SMALL_VOCAB + o.token_ids[2] for o in outs]
    counts = np.bincount(codes, minlength=SMALL_VOCAB**3)
    assert chi_square_pvalue(counts, probs) > 1e-3
    assert total_variation(counts, probs) < 1.4 * noise_tv(probs, NUM_SAMPLES)
    accepted = [n for o in outs for n in o.stats["accepted_lengths"]]
    assert 1 < np.mean(accepted) < 3  # drafts were accepted sometimes and rejected sometimes


def test_capture_at_start_covers_every_k_the_policy_may_choose():
    """Fixed k verifies with k + 1 tokens per sequence; adaptive k may run any 1 .. k + 1 (explore
    probes included), so capture_at_start captures them all; target-only decodes only."""
    from cluster.config import ClusterConfig
    from cluster.workers import verify_queries

    assert verify_queries(ClusterConfig(target="t", draft="self:1", num_draft_tokens=4, adaptive=False)) == [1, 5]
    assert verify_queries(ClusterConfig(target="t", draft="self:1", num_draft_tokens=4, adaptive=True)) == [1, 2, 3, 4, 5]
    assert verify_queries(ClusterConfig(target="t", draft="none")) == [1]
