"""The cluster's configuration: one validated schema for the engine, the CLI and (later) serving.

Plane: control. ``ClusterConfig`` is a pydantic model, validated once at the edge: unknown
fields and bad values raise ``pydantic.ValidationError`` naming the field. Everything that starts
workers or schedules requests reads its settings from here and nowhere else.

Invariants:
* ``draft`` is ``none``, ``self:N`` (the target's first N layers) or a checkpoint path;
  ``num_draft_tokens`` is the most draft tokens per step (the adaptive policy may choose fewer);
* the placement fields map one to one onto ``placement.spec.PlacementRequest`` (``placement_request``);
* ``kv_budget_tokens`` is per worker; admission never lets reserved tokens exceed it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from placement.spec import PlacementRequest


class ClusterConfig(BaseModel):
    """Models, roles and GPU counts, speculation and scheduling settings of one cluster."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # models
    target: str = Field(description="Target checkpoint: a directory (safetensors + config.json) or a .gguf file.")
    draft: str = Field("none", description="Draft: 'none', 'self:N' (target's first N layers) or a checkpoint path.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weight dtype; 'auto' = the checkpoint's (float32 on CPU).")

    # placement
    target_gpus: int = Field(1, ge=1, description="GPUs of the target: its tensor-parallel degree.")
    draft_gpus: int = Field(1, ge=0, description="GPUs of the draft worker (0 only with colocate).")
    colocate: bool = Field(False, description="Put the draft on the GPU of target rank 0.")
    colocated_draft_fraction: float = Field(0.5, gt=0, lt=1, description="Share of that GPU the draft takes.")
    cpus_per_worker: float = Field(1.0, ge=0, description="Ray CPUs reserved per worker actor.")
    num_gpus: int | None = Field(
        None, ge=0, description="GPUs to declare for a local Ray cluster (fake GPUs on a CPU machine).")
    address: str | None = Field(None, description="Ray cluster to join; None starts a local one.")

    # speculation
    num_draft_tokens: int = Field(4, ge=0, le=64, description="Most draft tokens per request per step.")
    adaptive: bool = Field(True, description="Choose the draft length per step for goodput (SmartSpec).")
    overlap: bool = Field(True, description="Draft step t+1 while the target verifies step t (PEARL).")
    pre_verify: bool = Field(
        False, description="With overlap: after a miss, send the first fresh draft token at once (PEARL pre-verify).")
    cost_table: str | None = Field(None, description="JSON of measured step costs to seed the adaptive policy.")
    oracle_continuations: str | None = Field(
        None, description="With draft oracle:ALPHA:DRAFT (benchmarks): JSON of the target's recorded greedy outputs.")

    # scheduling and memory
    kv_budget_tokens: int = Field(4096, ge=16, description="KV cache size per worker, in tokens.")
    block_size: int = Field(16, ge=1, description="KV cache block size in tokens.")
    max_running: int = Field(64, ge=1, description="Most requests decoding at once.")
    max_waiting: int = Field(256, ge=0, description="Most requests queued; beyond it new requests are refused.")
    max_prefill_tokens: int = Field(4096, ge=1, description="Most prompt tokens prefilled in one step.")

    # faults and timeouts
    step_timeout_s: float = Field(60.0, gt=0, description="A worker that does not answer a step in time is failed.")
    start_timeout_s: float = Field(300.0, gt=0, description="Time to start workers and place them.")
    draft_restart_s: float = Field(1.0, gt=0, description="How often to check whether a lost draft is back.")
    max_worker_restarts: int = Field(3, ge=0, description="Ray restarts per worker actor before giving up.")

    @field_validator("draft")
    @classmethod
    def _check_draft(cls, value: str) -> str:
        value = value.strip()
        if value.startswith("self:"):
            n = value.removeprefix("self:")
            if not n.isdigit() or int(n) < 1:
                raise ValueError(f"draft {value!r}: expected self:N with N >= 1")
        elif value == "lookup":
            raise ValueError("draft 'lookup' runs in the single-process engine only (outrider generate)")
        elif value.startswith("oracle:"):
            from actors.spec.proposers import parse_draft_spec

            parse_draft_spec(value)  # raises ValueError naming the problem
        return value

    @model_validator(mode="after")
    def _check_placement(self) -> ClusterConfig:
        self.placement_request()  # raises PlacementError (a ValueError) naming the field
        if self.draft.startswith("oracle:") and not self.oracle_continuations:
            raise ValueError("draft oracle:... needs oracle_continuations (the target's recorded outputs)")
        return self

    @property
    def has_draft(self) -> bool:
        return self.draft != "none" and self.num_draft_tokens > 0

    def placement_request(self) -> PlacementRequest:
        return PlacementRequest(
            target_tp=self.target_gpus,
            draft_gpus=0 if self.colocate else self.draft_gpus,
            num_drafts_per_replica=1 if self.has_draft else 0,
            colocate=self.colocate and self.has_draft,
            colocated_draft_fraction=self.colocated_draft_fraction,
            target_cpus_per_worker=self.cpus_per_worker,
            draft_cpus_per_worker=self.cpus_per_worker,
        )

    def torch_dtype(self):
        import torch

        return None if self.dtype == "auto" else getattr(torch, self.dtype)

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides) -> ClusterConfig:
        data = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping of configuration fields at the top level")
        return cls(**{**data, **{k: v for k, v in overrides.items() if v is not None}})
