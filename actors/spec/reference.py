"""Single-process reference loop: target-only and speculative generation (data plane).

This is the ground truth the distributed engines are checked against. One batched step reads

    propose (proposer, optional) -> verify (one target forward over [last token, *draft]) ->
    accept (commit the accepted path in the KV cache) -> emit (append tokens, check stops)

Target-only decoding is the same loop with empty proposals, so both paths share every line of
sampling and KV bookkeeping.

Invariants:
* before a step, each sequence's target KV holds every token but the last (``seq_len ==
  len(tokens) - 1``); the step feeds the last token plus the draft as pending entries;
* the accepted path (the last token, then accepted draft nodes) is committed, everything else in
  the step is dropped; the token emitted by the target (bonus or correction) becomes the new last;
* output stops at the first stop token (kept in the output, like Hugging Face ``generate``) or at
  ``max_tokens``; tokens verified past a stop are discarded.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from actors.spec.proposers import ProposeRequest, Proposer, TreeShape
from actors.spec.sampling import make_generator
from actors.spec.sequence import GenerationResult, SequenceState
from actors.spec.types import Proposal, SamplingParams
from actors.spec.verify import verify_batch
from actors.step_batch import SeqStep


@dataclass
class _Seq(SequenceState):
    generator: torch.Generator | None = None


@torch.inference_mode()
def generate(
    target,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams | Sequence[SamplingParams],
    *,
    proposer: Proposer | None = None,
    num_draft_tokens: int = 4,
    tree: TreeShape | None = None,
    kv_budget_bytes: int | None = None,
    block_size: int = 16,
    on_tokens: Callable[[int, list[int]], None] | None = None,
) -> list[GenerationResult]:
    """Generate for every prompt in one batch; speculative when a proposer is given.

    ``on_tokens(prompt_index, new_token_ids)`` is called each time tokens are accepted (streaming).
    """
    params_list = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
    if len(params_list) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(params_list)} sampling parameters")
    shape = tree or TreeShape.chain(num_draft_tokens)
    vocab, max_context = target.config.vocab_size, target.config.max_context
    for i, prompt in enumerate(prompts):
        if not prompt:
            raise ValueError(f"prompt {i} is empty")
        if min(prompt) < 0 or max(prompt) >= vocab:
            raise ValueError(f"prompt {i} has token ids outside the vocabulary [0, {vocab})")
        if len(prompt) >= max_context:
            raise ValueError(f"prompt {i} has {len(prompt)} tokens; the model's context is {max_context}")

    if kv_budget_bytes is None:
        tokens = sum(min(len(p) + sp.max_tokens + shape.num_nodes + 1, max_context + shape.num_nodes + 1) + block_size
                     for p, sp in zip(prompts, params_list))
        kv_budget_bytes = (tokens + block_size) * target.kv_bytes_per_token  # + the runner's scratch block
    cache = target.make_kv_cache(kv_budget_bytes, block_size=block_size)
    from actors.model.graph_runner import GraphRunner

    runner = GraphRunner(target, cache)  # CUDA graphs on a GPU, eager elsewhere
    seqs = [
        _Seq(i, list(p), sp, len(p), generator=make_generator(sp, cache.device))
        for i, (p, sp) in enumerate(zip(prompts, params_list))
    ]
    for seq in seqs:
        cache.add_sequence(seq.req_id)

    # Prefill every prompt in one ragged step; the first token comes from the target alone.
    batch = runner.build([SeqStep(s.req_id, s.tokens, logits="last") for s in seqs])
    logits = runner.forward(batch)
    verdicts = verify_batch([Proposal.empty()] * len(seqs), logits, batch.logits_counts, [s.params for s in seqs],
                            [s.generator for s in seqs])
    for seq, verdict in zip(seqs, verdicts):
        cache.commit(seq.req_id)
        seq.stats.target_forward_passes += 1
        _emit(seq, verdict.token_ids, on_tokens)

    active = [s for s in seqs if s.finish_reason is None]
    while active:
        proposals = _propose(proposer, active, shape, max_context, vocab)
        steps = [
            SeqStep(s.req_id, [s.tokens[-1], *p.token_ids.tolist()], parents=[-1, *(q + 1 for q in p.parents)])
            for s, p in zip(active, proposals)
        ]
        batch = runner.build(steps)
        verdicts = verify_batch(proposals, runner.forward(batch), batch.logits_counts, [s.params for s in active],
                                [s.generator for s in active])
        for seq, proposal, verdict in zip(active, proposals, verdicts):
            cache.commit(seq.req_id, [0, *(a + 1 for a in verdict.accepted)])
            seq.stats.record(max(proposal.depths, default=-1) + 1, verdict.num_accepted)
            _emit(seq, verdict.token_ids, on_tokens)
            if seq.finish_reason is None and len(seq.tokens) >= max_context:
                seq.finish_reason = "length"
        for seq in active:
            if seq.finish_reason is not None:
                cache.free(seq.req_id)
                if proposer is not None:
                    proposer.finish(seq.req_id)
        active = [s for s in active if s.finish_reason is None]

    return [s.result() for s in seqs]


def _emit(seq: _Seq, token_ids: list[int], on_tokens) -> None:
    kept = seq.emit(token_ids)
    if on_tokens is not None:
        on_tokens(seq.req_id, kept)


def _propose(proposer, seqs: list[_Seq], shape: TreeShape, max_context: int, vocab: int) -> list[Proposal]:
    """Ask the proposer for drafts; sequences too close to the context end get none."""
    if proposer is None:
        return [Proposal.empty() for _ in seqs]
    room = [s for s in seqs if len(s.tokens) + shape.num_nodes < max_context]
    proposals = proposer.propose([ProposeRequest(s.req_id, s.tokens, s.params) for s in room], shape) if room else []
    for proposal in proposals:
        if len(proposal) and not 0 <= int(proposal.token_ids.min()) <= int(proposal.token_ids.max()) < vocab:
            raise ValueError(f"proposer returned token ids outside the vocabulary [0, {vocab})")
    drafted = dict(zip((s.req_id for s in room), proposals))
    return [drafted.get(s.req_id, Proposal.empty()) for s in seqs]
