"""Per-request generation state shared by every generation loop (data plane, pure Python).

``SequenceState`` holds a request's tokens, its sampling parameters, its speculation counters and
why it finished; the reference loop and the distributed engine both emit through it, so stop
handling and statistics are defined once.

Invariants: ``tokens`` is the prompt followed by the output; output stops at the first stop token
(kept, like Hugging Face ``generate``) or at ``max_tokens``; tokens past a stop are discarded.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from actors.spec.types import SamplingParams


@dataclass
class SpecStats:
    """Speculation counters of one request."""

    target_forward_passes: int = 0
    accepted_lengths: list[int] = field(default_factory=list)  # tokens committed per verify step
    proposed_by_position: list[int] = field(default_factory=list)  # times position j was *tested*
    accepted_by_position: list[int] = field(default_factory=list)

    def record(self, draft_depth: int, num_accepted: int) -> None:
        """One verification step of a proposal ``draft_depth`` deep that accepted ``num_accepted``.

        Position j counts as tested only when every earlier position was accepted (positions after
        the first rejection were never checked), so ``acceptance_by_position`` is the conditional
        acceptance rate — the same definition as the engine's estimator and metrics."""
        self.target_forward_passes += 1
        self.accepted_lengths.append(num_accepted + 1)
        tested = min(draft_depth, num_accepted + 1)
        for counts, upto in ((self.proposed_by_position, tested), (self.accepted_by_position, num_accepted)):
            counts.extend([0] * (upto - len(counts)))
            for j in range(upto):
                counts[j] += 1

    def as_dict(self) -> dict:
        steps = len(self.accepted_lengths)
        accepted = self.accepted_by_position + [0] * (len(self.proposed_by_position) - len(self.accepted_by_position))
        return {
            "target_forward_passes": self.target_forward_passes,
            "mean_accepted_length": sum(self.accepted_lengths) / steps if steps else 0.0,
            "accepted_lengths": list(self.accepted_lengths),
            "acceptance_by_position": [a / p for a, p in zip(accepted, self.proposed_by_position)],
        }


@dataclass
class GenerationResult:
    token_ids: list[int]  # generated tokens only
    finish_reason: str  # "stop" or "length"
    stats: dict


@dataclass
class SequenceState:
    req_id: int
    tokens: list[int]
    params: SamplingParams
    num_prompt: int
    stats: SpecStats = field(default_factory=SpecStats)
    finish_reason: str | None = None

    @property
    def output(self) -> list[int]:
        return self.tokens[self.num_prompt :]

    def emit(self, token_ids: Sequence[int]) -> list[int]:
        """Append verified tokens, stopping at a stop token or at max_tokens; return those kept."""
        before = len(self.tokens)
        for token in token_ids:
            self.tokens.append(int(token))
            if token in self.params.stop_token_ids:
                self.finish_reason = "stop"
                break
            if len(self.output) >= self.params.max_tokens:
                self.finish_reason = "length"
                break
        return self.tokens[before:]

    def result(self) -> GenerationResult:
        return GenerationResult(self.output, self.finish_reason, self.stats.as_dict())
