"""The layers' element-wise chains fused by torch.compile (actors.model.fused) compute what the
eager model computes: logits of prefill and decode steps, and greedy generation, on CPU (inductor's
C++ backend); the CUDA graph capture of the fused kernels is tested in test_graph_runner.py."""

import pytest
import torch

from actors.model import fused
from actors.model.loader import load_model
from actors.spec.reference import generate
from actors.spec.types import SamplingParams
from actors.step_batch import SeqStep, StepBatch
from tests.tiny_models import write_tiny_checkpoint


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = write_tiny_checkpoint(tmp_path_factory.mktemp("fused"), arch="llama", num_layers=2, with_tokenizer=False)
    return load_model(path, dtype=torch.float32)


def test_fused_layers_match_eager_logits_and_greedy_output(model):
    prompts, params = [[5, 17, 3, 99, 42], [1, 2, 3]], SamplingParams(max_tokens=6)
    want_tokens = [r.token_ids for r in generate(model, prompts, params)]
    cache = model.make_kv_cache(1 << 20)
    for r, prompt in enumerate(prompts):
        cache.add_sequence(r)
    steps = [SeqStep(r, p, logits="last") for r, p in enumerate(prompts)]

    def logits():
        batch = StepBatch.build(cache, steps)
        out = model.forward(batch, cache)
        for r in range(len(prompts)):
            cache.commit(r, [])
        return out

    eager = logits()
    model.use_compiled(True)
    try:
        assert model.kernels is fused.compiled() and model.truncated(1).kernels is model.kernels
        torch.testing.assert_close(logits(), eager, rtol=1e-5, atol=1e-5)
        assert [r.token_ids for r in generate(model, prompts, params)] == want_tokens
    finally:
        model.use_compiled(False)
    assert model.kernels is fused.EAGER
