"""Tensor-parallel target (tp_size=2, gloo on 127.0.0.1) vs the unsharded model, logits position by position.

One spawn of two rank processes runs every case (process start-up dominates the cost): each rank
loads its shard with ``load_model(..., tp_rank, tp_size=2, tp_group)``, runs the same scripted
steps through ``StepBatch`` and its own ``PagedKVCache`` — a ragged prefill of two prompts, two
decode steps, a tree-shaped verify step (beside a decode of the other sequence), a commit of one
tree path and a decode after it — and saves the logits. The parent runs the same script on the
unsharded model and compares.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.multiprocessing as mp

from actors.model.loader import load_config, load_model
from actors.model.tensor_parallel import TensorParallel, check_tp_divisible
from actors.step_batch import SeqStep, StepBatch
from tests.tiny_models import write_tiny_checkpoint, write_tiny_gguf

TP = 2
ATOL = 1e-4
BUDGET = 1 << 20
TRUNCATE = 2  # layers of the self-speculative draft

# case -> (arch, write_tiny_checkpoint overrides); every case has heads 4, KV heads 2, MLP 128.
CASES = {
    "llama": ("llama", {}),
    "qwen2": ("qwen2", {}),  # q/k/v biases (column-parallel, split with their rows)
    "llama_biases": ("llama", {"attention_bias": True, "mlp_bias": True}),  # o/down biases: added once
    "llama_tied": ("llama", {"tie_word_embeddings": True}),
}


def _ids(seed: int, n: int) -> list[int]:
    return torch.randint(3, 300, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def run_script(model) -> list[torch.Tensor]:
    """The scripted steps; returns every step's logits [rows, V] (tokens fixed, not sampled)."""
    cache = model.make_kv_cache(BUDGET, block_size=4)  # small blocks: sequences span many blocks
    out: list[torch.Tensor] = []

    def step(steps: list[SeqStep]) -> None:
        batch = StepBatch.build(cache, steps)
        out.append(model(batch, cache))

    cache.add_sequence("a")
    cache.add_sequence("b")
    step([SeqStep("a", _ids(1, 7)), SeqStep("b", _ids(2, 12))])  # ragged prefill, all rows
    cache.commit("a")
    cache.commit("b")
    for k in range(2):  # two decode steps
        step([SeqStep("a", _ids(10 + k, 1)), SeqStep("b", _ids(20 + k, 1))])
        cache.commit("a")
        cache.commit("b")
    # verify: a tree after "a"'s last committed token, a decode of "b" in the same step
    tree, parents = [41, 42, 43, 44, 45, 46], [-1, 0, 0, 1, 2, 1]
    step([SeqStep("a", tree, parents=parents), SeqStep("b", _ids(30, 1))])
    cache.commit("a", [0, 2, 4])  # not a prefix: entries are copied down
    cache.commit("b")
    step([SeqStep("a", [47]), SeqStep("b", _ids(31, 1), logits="last")])
    return out


def _rank_main(rank: int, port: int, paths: dict[str, str], out_dir: str) -> None:
    torch.set_num_threads(1)
    from actors.transport import make_process_group

    group = make_process_group("127.0.0.1", port, rank, TP, "gloo", torch.device("cpu"), timeout_s=60.0)
    results = {"broadcast": _broadcast_check(rank, group)}
    for case, path in paths.items():
        model = load_model(path, tp_rank=rank, tp_size=TP, tp_group=group)
        results[case] = run_script(model)
        results[case + ":truncated"] = run_script(model.truncated(TRUNCATE))
        cache = model.make_kv_cache(BUDGET)
        results[case + ":shapes"] = {
            "w_qkv": tuple(model.layers[0].w_qkv.shape),
            "w_gate_up": tuple(model.layers[0].w_gate_up.shape),
            "w_o": tuple(model.layers[0].w_o.shape),
            "w_down": tuple(model.layers[0].w_down.shape),
            "kv_heads": cache.storage.shape[3],
            "kv_bytes_per_token": model.kv_bytes_per_token,
        }
    torch.save(results, f"{out_dir}/rank{rank}.pt")


def _broadcast_check(rank: int, group) -> list[int]:
    """``TensorParallel.broadcast_``: every rank ends with rank 0's tensor (e.g. the accepted path)."""
    tp = TensorParallel(rank=rank, size=TP, group=group, num_heads=1, num_kv_heads=1, intermediate_size=1, head_dim=1)
    return tp.broadcast_(torch.tensor([rank, 7 + rank, 100])).tolist()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    paths = {}
    for case, (arch, overrides) in CASES.items():
        paths[case] = str(write_tiny_checkpoint(tmp_path_factory.mktemp(case), arch, with_tokenizer=False, **overrides))
    paths["llama_gguf"] = str(write_tiny_gguf(paths["llama"], tmp_path_factory.mktemp("gguf") / "tiny.gguf"))
    return paths


@pytest.fixture(scope="module")
def rank_results(checkpoints, tmp_path_factory):
    from actors.transport import free_port

    out_dir = tmp_path_factory.mktemp("tp_out")
    mp.spawn(_rank_main, args=(free_port(), checkpoints, str(out_dir)), nprocs=TP, join=True)
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(TP)]


def _assert_close(ours: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    assert ours.shape == ref.shape, f"{what}: shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    diff = (ours - ref).abs().max().item()
    assert diff <= ATOL, f"{what}: max abs diff {diff} > {ATOL}"


@pytest.mark.parametrize("case", [*CASES, "llama_gguf"])
def test_sharded_logits_match_unsharded(case, checkpoints, rank_results):
    full = load_model(checkpoints[case])
    assert not full.tp.enabled and full.tp.group is None
    for suffix, model in (("", full), (":truncated", full.truncated(TRUNCATE))):
        ref = run_script(model)
        for rank, results in enumerate(rank_results):
            got = results[case + suffix]
            assert len(got) == len(ref) == 5
            for i, (ours, theirs) in enumerate(zip(got, ref)):
                _assert_close(ours, theirs, f"{case}{suffix} rank {rank} step {i}")
        for i, (r0, r1) in enumerate(zip(rank_results[0][case + suffix], rank_results[1][case + suffix])):
            assert torch.equal(r0, r1), f"{case}{suffix} step {i}: logits differ between ranks"


@pytest.mark.parametrize("case", ["llama", "qwen2"])
def test_shard_shapes_and_kv_cache(case, checkpoints, rank_results):
    full = load_model(checkpoints[case])
    cfg = full.config
    d, h, inter = cfg.head_dim, cfg.hidden_size, cfg.intermediate_size
    for results in rank_results:
        shapes = results[case + ":shapes"]
        assert shapes["w_qkv"] == ((cfg.num_heads + 2 * cfg.num_kv_heads) // TP * d, h)
        assert shapes["w_o"] == (h, cfg.num_heads // TP * d)
        assert shapes["w_gate_up"] == (2 * inter // TP, h)
        assert shapes["w_down"] == (h, inter // TP)
        assert shapes["kv_heads"] == cfg.num_kv_heads // TP
        assert shapes["kv_bytes_per_token"] * TP == full.kv_bytes_per_token


def test_broadcast_from_rank0(rank_results):
    assert [r["broadcast"] for r in rank_results] == [[0, 7, 100]] * TP


def test_not_divisible_raises(checkpoints):
    path = checkpoints["llama"]  # heads 4, KV heads 2, MLP 128
    with pytest.raises(ValueError, match="num_attention_heads=4 is not divisible by tp_size=3"):
        load_model(path, tp_rank=0, tp_size=3)
    cfg = load_config(path)
    with pytest.raises(ValueError, match="num_key_value_heads=2 is not divisible by tp_size=4"):
        check_tp_divisible(dataclasses.replace(cfg, num_heads=8), 4)
    with pytest.raises(ValueError, match="intermediate_size=130 is not divisible by tp_size=4"):
        check_tp_divisible(dataclasses.replace(cfg, num_heads=8, num_kv_heads=4, intermediate_size=130), 4)
    with pytest.raises(ValueError, match="needs a process group"):
        load_model(path, tp_rank=0, tp_size=2)
    with pytest.raises(ValueError, match="tp_rank=2 is not in"):
        TensorParallel.for_config(cfg, rank=2, size=2, group=object())
