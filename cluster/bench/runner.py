"""Orchestration of one benchmark run: models x scenarios x concurrency, in one process.

Order per model (so that the most important rows come first when a time limit stops the run):
cost curve -> our target-only at concurrency 1 (the greedy reference of every other row; run
untimed when not selected) -> our speculative configurations -> HF baselines -> higher
concurrencies -> cluster scenarios. Every row is measured ``repetitions`` times after a warm-up;
every row's greedy output is compared with our target-only output at concurrency 1, token for
token. A failing row is recorded with its error and the run goes on; results are written after
every model (and at the end), so a run cut short still leaves its numbers.
"""

from __future__ import annotations

import datetime as dt
import gc
import itertools
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict
from pathlib import Path

import torch

from cluster.bench import floor as floor_mod
from cluster.bench import scenarios as sc
from cluster.bench.config import (
    CLUSTER_SCENARIOS,
    DEMO,
    HF_SCENARIOS,
    SCENARIOS,
    BenchConfig,
    arrival_times,
    greedy_match,
)
from cluster.bench.models import (
    SHAPE_PREFIX,
    shape_name,
    weight_bytes_per_step,
    write_shape_checkpoint,
)
from cluster.bench.workload import encode, find_specbench, load_specbench


def _log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _commit() -> str:
    if os.environ.get("OUTRIDER_COMMIT"):
        return os.environ["OUTRIDER_COMMIT"]
    root = Path(__file__).resolve().parents[2]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=False).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def environment(device: torch.device) -> dict:
    import transformers

    env = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
           "commit": _commit(), "host": platform.node(), "cpu_count": os.cpu_count(),
           "torch_threads": torch.get_num_threads(), "device": str(device)}
    try:
        import ray

        env["ray"] = ray.__version__
    except ImportError:
        env["ray"] = None
    if device.type == "cuda":
        env["device_name"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
        env["gpu_count"] = torch.cuda.device_count()
        try:
            env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True, timeout=20, check=False).stdout.strip().splitlines()[0]
        except (OSError, IndexError, subprocess.SubprocessError):
            env["driver"] = "unknown"
    else:
        name = platform.processor() or platform.machine()
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
        env["device_name"], env["driver"] = name, None
    return env


def parse_model_spec(text: str) -> tuple[str, list[str] | None, list[str] | None]:
    """``SOURCE[@DRAFT,DRAFT...][#SCENARIO,SCENARIO...]`` -> (source, drafts or None, scenarios or None).

    The scenarios after ``#`` narrow the run's scenarios for this model (e.g. the cluster rows on
    one model only)."""
    text, hash_sep, scenarios = text.partition("#")
    source, sep, drafts = text.partition("@")

    def items(part: str) -> list[str]:
        return [x.strip() for x in part.split(",") if x.strip()]

    only = items(scenarios) if hash_sep else None
    if only:
        unknown = [x for x in only if x not in SCENARIOS]
        if unknown:
            raise ValueError(f"model {text}: unknown scenario(s) {', '.join(unknown)}")
    return source.strip(), (items(drafts) if sep else None), only


def default_drafts(num_layers: int, is_shape: bool) -> list[str]:
    if is_shape:  # random weights: real drafts measure cost; the oracle emulates acceptance
        n = max(1, num_layers // 4)
        return ["lookup", f"self:{n}", f"oracle:0.8:self:{n}"]
    return ["lookup", f"self:{max(1, round(num_layers * 0.8))}"]


ORACLE_PREFIX = "oracle:"


def oracle_alpha(draft: str) -> float | None:
    """The emulated acceptance rate of an ``oracle:ALPHA:DRAFT`` spec (None for real drafts)."""
    from actors.spec.proposers import parse_draft_spec

    kind, value = parse_draft_spec(draft) if draft.startswith(ORACLE_PREFIX) else ("", None)
    return value[0] if kind == "oracle" else None


def model_draft(drafts: list[str]) -> str | None:
    """The draft model a Hugging Face assisted row uses: the first model draft (self:N or a
    checkpoint), else the model inside the first oracle spec."""
    for d in drafts:
        if d not in ("none", "lookup") and not d.startswith(ORACLE_PREFIX):
            return d
    for d in drafts:
        if d.startswith(ORACLE_PREFIX):
            return d.removeprefix(ORACLE_PREFIX).partition(":")[2]
    return None


def cluster_draft(drafts: list[str], is_shape: bool) -> str | None:
    """The cluster rows' draft: on a shape (random weights) the first oracle draft (emulated
    acceptance; a real draft accepts nothing there), else the first model draft."""
    oracles = [d for d in drafts if d.startswith(ORACLE_PREFIX)]
    models = [d for d in drafts if d not in ("none", "lookup") and not d.startswith(ORACLE_PREFIX)]
    order = oracles + models if is_shape else models + oracles
    return order[0] if order else None


def _median_spread(values: list[float]) -> dict:
    values = [v for v in values if v is not None]
    if not values:
        return {"median": None, "min": None, "max": None}
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


class BenchRun:
    def __init__(self, config: BenchConfig) -> None:
        config.validate()
        self.config = config
        self.start = time.monotonic()
        self.device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = getattr(torch, config.dtype) if config.dtype else (
            torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        date = dt.date.today().isoformat()
        root = Path(__file__).resolve().parents[2]
        self.out_dir = Path(config.out_dir) if config.out_dir else root / "benchmarks" / "results" / f"{date}-{config.name}"
        self._tmp = None
        self.shape_dir = Path(config.shape_dir) if config.shape_dir else None
        self.results: dict = {"benchmark": "outrider-bench", "date": date, "name": config.name,
                              "out_dir": str(self.out_dir),
                              "config": asdict(config), "dtype": str(self.dtype).removeprefix("torch."),
                              "env": environment(self.device), "floor": None, "models": [], "notes": [],
                              "errors": [], "skipped": []}
        self._owns_ray = False
        self._only: list[str] | None = None  # the current model's own scenario list
        self._cost_tables: set[str] = set()  # cost table file names written in this run
        for spec in config.models:
            parse_model_spec(spec)  # raises ValueError on an unknown scenario

    # ------------------------------------------------------------------ helpers
    def time_left(self) -> float:
        if self.config.time_limit_s is None:
            return float("inf")
        return self.config.time_limit_s - (time.monotonic() - self.start)

    def _skip(self, what: str, why: str) -> None:
        _log(f"skip {what}: {why}")
        self.results["skipped"].append({"what": what, "why": why})

    def _wanted(self, scenario: str) -> bool:
        return scenario in self.config.scenarios and (self._only is None or scenario in self._only)

    def _shape_path(self, name: str) -> Path:
        if self.shape_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="outrider-shapes-")
            self.shape_dir = Path(self._tmp.name)
        name = shape_name(name)
        path = self.shape_dir / f"{name}-{str(self.dtype).removeprefix('torch.')}"
        if not (path / "outrider-shape.json").exists():
            _log(f"writing shape {name} (random weights) to {path}")
        return write_shape_checkpoint(name, path, dtype=self.dtype, device=self.device, seed=self.config.seed,
                                      tokenizer_dir=self.config.tokenizer)

    def resolve(self, source: str) -> tuple[Path, str, bool]:
        """(checkpoint path, label, is_shape)."""
        if source == DEMO:
            from cluster.demo_model import ensure_demo_model

            return Path(ensure_demo_model(progress=True)), "SmolLM2-135M-Instruct", False
        if source.startswith(SHAPE_PREFIX):
            return self._shape_path(source), f"{shape_name(source)} (shape, random weights)", True
        path = Path(source)
        if not path.exists():
            raise ValueError(f"model {source}: no such checkpoint")
        return path, path.name, False

    def resolve_draft(self, spec: str) -> str:
        """A draft spec with ``shape:NAME`` parts replaced by the shape's checkpoint path."""
        if spec.startswith(ORACLE_PREFIX):
            alpha, _, inner = spec.removeprefix(ORACLE_PREFIX).partition(":")
            return f"{ORACLE_PREFIX}{alpha}:{self.resolve_draft(inner)}"
        if spec.startswith(SHAPE_PREFIX):
            return str(self._shape_path(spec))
        return spec

    def build_proposer(self, spec: str, target, path: Path):
        from actors.spec.proposers import build_proposer

        budget = 4 * (self.config.max_prompt_tokens + self.config.max_tokens + 64) * max(self.config.concurrency)
        return build_proposer(spec, target, target_path=path, dtype=self.dtype, device=self.device,
                              kv_budget_tokens=budget,
                              oracle_continuations=self.continuations if spec.startswith(ORACLE_PREFIX) else None)

    # ------------------------------------------------------------------ run
    def run(self) -> dict:
        cfg = self.config
        _log(f"device {self.device} ({self.results['env'].get('device_name')}), dtype {self.results['dtype']}, "
             f"scenarios {', '.join(cfg.scenarios)}; writing to {self.out_dir}")
        self.results["floor"] = floor_mod.measure(self.device)
        fl = self.results["floor"]
        _log(f"floor: copy {fl['copy']['bytes_per_s'] / 1e9:.1f} GB/s, matmul "
             f"{fl['matmul']['flop_per_s'] / 1e12:.2f} TFLOP/s ({fl['matmul']['dtype']})")
        prompts_file = find_specbench(cfg.prompts_file)
        self.prompts = load_specbench(prompts_file, per_category=cfg.per_category, categories=cfg.categories)
        self.results["workload"] = {"file": str(prompts_file), "prompts": len(self.prompts),
                                    "categories": sorted({p.category for p in self.prompts})}
        try:
            for spec in cfg.models:
                if self.time_left() <= 0:
                    self._skip(f"model {spec}", "time limit reached")
                    continue
                try:
                    self.run_model(spec)
                except Exception as exc:  # noqa: BLE001 - one model failing must not lose the others
                    self._error(f"model {spec}", exc)
                finally:
                    self._free()
                self.write()
        finally:
            if self._owns_ray:
                import ray

                ray.shutdown()
            self.results["elapsed_s"] = time.monotonic() - self.start
            self.write()
            if self._tmp is not None:
                self._tmp.cleanup()
        return self.results

    def write(self) -> None:
        from cluster.bench.report import goodput_summary, write_results

        for model in self.results["models"]:
            if model.get("arrival_rows"):
                model["goodput"] = goodput_summary(model)

        write_results(self.results, self.out_dir, plots=self.config.plots)

    def _error(self, what: str, exc: BaseException) -> None:
        _log(f"ERROR in {what}: {type(exc).__name__}: {exc}")
        self.results["errors"].append({"what": what, "error": f"{type(exc).__name__}: {exc}",
                                       "traceback": traceback.format_exc()[-4000:]})

    def _free(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # ------------------------------------------------------------------ one model
    def run_model(self, spec: str) -> None:
        from actors.model.loader import load_model
        from actors.model.tokenizer import TokenizerLoadError, load_tokenizer

        cfg = self.config
        source, drafts, self._only = parse_model_spec(spec)
        path, label, is_shape = self.resolve(source)
        _log(f"model {label}: {path}")
        target = load_model(path, dtype=self.dtype, device=self.device)
        if cfg.fused_kernels:
            target.use_compiled(True)  # self:N drafts (truncated) share it
        tokenizer, tokenizer_from = None, None
        for candidate in (path, cfg.tokenizer):
            if candidate is None:
                continue
            try:
                tokenizer, tokenizer_from = load_tokenizer(candidate), str(candidate)
                break
            except (TokenizerLoadError, OSError, ValueError):
                continue
        encoded = encode(self.prompts, tokenizer, vocab_size=target.config.vocab_size,
                         max_prompt_tokens=cfg.max_prompt_tokens, seed=cfg.seed)
        prompts = [e.token_ids for e in encoded]
        if is_shape:
            stops: tuple[int, ...] = ()  # random weights: no end of sequence, every request runs max_tokens
        else:
            stop = set(target.config.eos_token_ids)
            if tokenizer is not None and tokenizer.eos_token_id is not None:
                stop.add(int(tokenizer.eos_token_id))
            stops = tuple(sorted(stop))
        params = sc.SamplingParams(max_tokens=cfg.max_tokens, stop_token_ids=stops)
        drafts = drafts if drafts is not None else (cfg.drafts or default_drafts(target.config.num_layers, is_shape))
        drafts = [self.resolve_draft(d) for d in drafts]
        mean_prompt = statistics.mean(len(p) for p in prompts)
        model_rec = {
            "label": label, "source": source, "path": str(path), "is_shape": is_shape,
            "short_name": shape_name(source) if is_shape else label,
            "tokenizer": tokenizer_from,  # None: synthetic prompt ids (about len(text) / 4 random tokens)
            "num_layers": target.config.num_layers, "vocab_size": target.config.vocab_size,
            "weight_bytes_per_step": weight_bytes_per_step(target), "kv_bytes_per_token": target.kv_bytes_per_token,
            "prompts": [{"question_id": e.question_id, "category": e.category, "tokens": len(e.token_ids)}
                        for e in encoded],
            "mean_prompt_tokens": mean_prompt, "stop_token_ids": list(stops), "drafts": drafts,
            "rows": [], "arrival_rows": [], "cost_curve": None, "draft_cost_curve": None,
        }
        self.results["models"].append(model_rec)
        bw = self.results["floor"]["copy"]["bytes_per_s"]
        mean_context = mean_prompt + cfg.max_tokens / 2
        model_rec["floor"] = {
            "context_tokens": mean_context,
            "step_s_batch1": floor_mod.decode_floor_s(model_rec["weight_bytes_per_step"], target.kv_bytes_per_token,
                                                      mean_context, bw),
        }
        model_rec["floor"]["tok_s_batch1"] = 1 / model_rec["floor"]["step_s_batch1"]

        # -- cost curve (target, and the first model draft at T = 1)
        if self._wanted("cost-curve"):
            self._cost_curves(model_rec, target, path, drafts)

        # -- the greedy reference: our target-only, concurrency 1
        _log(f"{label}: ours-target-only c=1 (reference)")
        reqs1 = sc.Requests.for_concurrency(prompts, 1)
        timed = self._wanted("ours-target-only")
        ref_meas = sc.run_ours(target, reqs1, 1, params, repetitions=cfg.repetitions if timed else 1,
                               warmup=cfg.warmup, device=self.device)
        self.reference = ref_meas["outputs"]
        # what the oracle drafter replays (actors.spec.oracle): the target's own greedy outputs
        self.continuations = [{"prompt": list(p), "output": list(o)} for p, o in zip(prompts, self.reference)]
        model_rec["reference_outputs"] = self.reference
        if timed:
            self._add_row(model_rec, "ours-target-only", "none", 0, None, 1, ref_meas, reqs1, encoded)

        # -- our speculative configurations, concurrency 1
        proposers = {}
        if self._wanted("ours-spec"):
            for d in drafts:
                if not self._time_ok(f"{label} ours-spec {d}"):
                    break
                try:
                    proposers[d] = self.build_proposer(d, target, path)
                    self._run_ours_row(model_rec, target, proposers[d], d, 1, prompts, params, encoded)
                except Exception as exc:  # noqa: BLE001
                    self._error(f"{label} ours-spec {d}", exc)

        # -- Hugging Face baselines, batch 1
        hf_wanted = [s for s in HF_SCENARIOS if self._wanted(s)]
        if hf_wanted == ["hf-compiled"] and self._hf_compiled_skip_reason():  # nothing to load the model for
            self._skip(f"{label} hf-compiled", self._hf_compiled_skip_reason())
        elif hf_wanted:
            try:
                self._hf_rows(model_rec, path, prompts, params, drafts, encoded)
            except Exception as exc:  # noqa: BLE001
                self._error(f"{label} hf", exc)
            self._free()

        # -- higher concurrency, ours
        for c in [c for c in cfg.concurrency if c != 1]:
            if self._wanted("ours-target-only") and self._time_ok(f"{label} ours-target-only c={c}"):
                try:
                    reqs = sc.Requests.for_concurrency(prompts, c)
                    _log(f"{label}: ours-target-only c={c}")
                    meas = sc.run_ours(target, reqs, c, params, repetitions=cfg.repetitions, warmup=cfg.warmup,
                                       device=self.device)
                    self._add_row(model_rec, "ours-target-only", "none", 0, None, c, meas, reqs, encoded)
                except Exception as exc:  # noqa: BLE001
                    self._error(f"{label} ours-target-only c={c}", exc)
            for d, proposer in proposers.items():
                if self._time_ok(f"{label} ours-spec {d} c={c}"):
                    try:
                        self._run_ours_row(model_rec, target, proposer, d, c, prompts, params, encoded)
                    except Exception as exc:  # noqa: BLE001
                        self._error(f"{label} ours-spec {d} c={c}", exc)
        del proposers, target
        self._free()

        # -- cluster scenarios
        wanted = [s for s in CLUSTER_SCENARIOS if self._wanted(s)]
        if wanted:
            self._cluster_rows(model_rec, path, wanted, prompts, params, drafts, encoded)

    def _time_ok(self, what: str) -> bool:
        if self.time_left() > 0:
            return True
        self._skip(what, "time limit reached")
        return False

    def _run_ours_row(self, model_rec, target, proposer, draft: str, c: int, prompts, params, encoded) -> None:
        cfg = self.config
        reqs = sc.Requests.for_concurrency(prompts, c)
        _log(f"{model_rec['label']}: ours-spec {draft} k={cfg.num_draft_tokens} c={c}")
        meas = sc.run_ours(target, reqs, c, params, proposer=proposer, num_draft_tokens=cfg.num_draft_tokens,
                           repetitions=cfg.repetitions, warmup=cfg.warmup, device=self.device)
        self._add_row(model_rec, "ours-spec", draft, cfg.num_draft_tokens, None, c, meas, reqs, encoded)

    # ------------------------------------------------------------------ rows
    def _add_row(self, model_rec, scenario, draft, k, adaptive, c, meas, reqs, encoded, extra=None) -> dict:
        reps = meas["reps"]
        row = {"scenario": scenario, "draft": draft, "k": k, "adaptive": adaptive, "concurrency": c,
               "requests": len(reqs), "emulated_alpha": oracle_alpha(draft), "reps": reps, **(extra or {})}
        row["greedy"] = greedy_match(self.reference, meas["outputs"], reqs.prompt_index)
        row["tok_s"] = _median_spread([r["tok_s"] for r in reps])
        row["wall_s"] = _median_spread([r["wall_s"] for r in reps])
        row["gpus"] = 2 if scenario.startswith("cluster-separate") else 1  # every GPU the configuration holds
        row["tok_s_per_gpu"] = row["tok_s"]["median"] / row["gpus"] if row["tok_s"]["median"] else None
        row["mean_accepted_length"] = _median_spread([r.get("mean_accepted_length") for r in reps])
        row["acceptance_by_position"] = reps[0].get("acceptance_by_position") if reps else None
        row["control_plane_share"] = _median_spread([r.get("control_plane_share") for r in reps])
        for key in ("ttft_p50_s", "ttft_p99_s", "tpot_p50_s", "tpot_p99_s", "wall_per_step_s", "forward_per_step_s"):
            if reps and key in reps[0]:
                row[key] = _median_spread([r.get(key) for r in reps])
        fl = model_rec["floor"]
        bw = self.results["floor"]["copy"]["bytes_per_s"]
        floor_step = floor_mod.decode_floor_s(model_rec["weight_bytes_per_step"], model_rec["kv_bytes_per_token"],
                                              fl["context_tokens"], bw, batch=c)
        row["floor_tok_s"] = c / floor_step
        row["fraction_of_floor"] = row["tok_s"]["median"] / row["floor_tok_s"] if row["tok_s"]["median"] else None
        # per category, concurrency 1 only (each request timed alone)
        if c == 1 and reps and all(r.get("seconds") is not None for r in reps[0]["per_request"]):
            cats: dict[str, dict] = {}
            for rep_i, rep in enumerate(reps):
                per_cat: dict[str, list] = {}
                for r in rep["per_request"]:
                    cat = encoded[r["prompt"]].category
                    per_cat.setdefault(cat, []).append(r)
                for cat, rs in per_cat.items():
                    entry = cats.setdefault(cat, {"tok_s_reps": [], "requests": len(rs)})
                    secs = sum(r["seconds"] for r in rs)
                    entry["tok_s_reps"].append(sum(r["tokens"] for r in rs) / secs if secs else 0.0)
                    if rep_i == 0 and rs and "verify_steps" in rs[0]:
                        steps = sum(r["verify_steps"] for r in rs)
                        entry["mean_accepted_length"] = (sum(r["accepted_length_sum"] for r in rs) / steps
                                                         if steps else None)
            for entry in cats.values():
                entry["tok_s"] = statistics.median(entry["tok_s_reps"])
            row["by_category"] = cats
        model_rec["rows"].append(row)
        g = row["greedy"]
        _log(f"  -> {row['tok_s']['median']:.1f} tok/s (min {row['tok_s']['min']:.1f}, max {row['tok_s']['max']:.1f})"
             + (f", tau {row['mean_accepted_length']['median']:.2f}" if row["mean_accepted_length"]["median"] else "")
             + f", greedy mismatches {g['mismatched_requests']}/{g['requests']} requests")
        return row

    def _add_arrival_row(self, model_rec, scenario, draft, k, adaptive, rate, meas, reqs, schedule, *,
                         max_running: int, step_transport: str | None = None, run_ahead: bool = True) -> dict:
        cfg = self.config
        reps = meas["reps"]
        row = {"scenario": scenario, "draft": draft, "k": k, "adaptive": adaptive, "rate_rps": rate,
               "step_transport": step_transport, "run_ahead": run_ahead,
               "arrival": "poisson" if cfg.arrival_cv == 1.0 else f"gamma cv={cfg.arrival_cv:g}",
               "arrival_cv": cfg.arrival_cv, "seed": cfg.seed, "requests": len(reqs), "schedule_s": schedule,
               # the sample's own rate: a few dozen seeded gaps stray from the nominal one
               "offered_rps": len(schedule) / schedule[-1] if schedule and schedule[-1] > 0 else None,
               "max_running": max_running, "emulated_alpha": oracle_alpha(draft),
               "slo": {"ttft_s": cfg.slo_ttft_s, "tpot_s": cfg.slo_tpot_s, "attainment": cfg.slo_attainment},
               "gpus": 2 if scenario.startswith("cluster-separate") else 1, "reps": reps}
        row["greedy"] = greedy_match(self.reference, meas["outputs"], reqs.prompt_index)
        for key in ("tok_s", "throughput_rps", "goodput_rps", "slo_attainment", "duration_s", "failed",
                    "ttft_p50_s", "ttft_p90_s", "ttft_p99_s", "tpot_p50_s", "tpot_p90_s", "tpot_p99_s",
                    "mean_accepted_length", "send_lateness_p99_s"):
            row[key] = _median_spread([r.get(key) for r in reps])
        att = row["slo_attainment"]["median"]
        row["meets_slo"] = att is not None and att >= cfg.slo_attainment
        model_rec["arrival_rows"].append(row)
        _log(f"  -> {row['tok_s']['median']:.1f} tok/s, SLO met by {'–' if att is None else f'{att:.0%}'} of requests, goodput "
             f"{row['goodput_rps']['median']:.2f} req/s, TTFT p99 {row['ttft_p99_s']['median'] or 0:.3f} s, "
             f"TPOT p99 {row['tpot_p99_s']['median'] or 0:.4f} s, greedy mismatches "
             f"{row['greedy']['mismatched_requests']}/{row['greedy']['requests']}")
        return row

    def _cost_curves(self, model_rec, target, path, drafts) -> None:
        cfg = self.config
        if not self._time_ok(f"{model_rec['label']} cost curve"):
            return
        _log(f"{model_rec['label']}: cost curve B={cfg.cost_batches} T={cfg.cost_tokens} context {cfg.cost_context}")
        try:
            rows = sc.cost_curve(target, batches=cfg.cost_batches, tokens=cfg.cost_tokens, context=cfg.cost_context,
                                 repetitions=max(3, cfg.repetitions), device=self.device, seed=cfg.seed)
            bw = self.results["floor"]["copy"]["bytes_per_s"]
            mm = self.results["floor"]["matmul"]["flop_per_s"]
            params = sum(p.numel() for p in target.parameters())
            for r in rows:
                mem = floor_mod.decode_floor_s(model_rec["weight_bytes_per_step"], target.kv_bytes_per_token,
                                               r["context"] + r["tokens_per_seq"], bw, batch=r["batch"])
                compute = 2 * params * r["batch"] * r["tokens_per_seq"] / mm
                r["floor_s"] = max(mem, compute)
                r["fraction_of_floor"] = r["floor_s"] / r["median_s"]
            model_rec["cost_curve"] = rows
            one = next(r for r in rows if r["batch"] == 1 and r["tokens_per_seq"] == 1) if 1 in cfg.cost_batches \
                and 1 in cfg.cost_tokens else None
            if one:
                _log(f"  -> batch-1 decode step {one['median_s'] * 1e3:.2f} ms, floor {one['floor_s'] * 1e3:.2f} ms "
                     f"({one['fraction_of_floor']:.0%} of floor)")
            draft = model_draft(drafts)
            if draft is not None:
                from actors.model.loader import load_model
                from actors.spec.proposers import parse_draft_spec

                kind, value = parse_draft_spec(draft)
                dmodel = target.truncated(value) if kind == "self" else load_model(value, dtype=self.dtype,
                                                                                    device=self.device)
                drows = sc.cost_curve(dmodel, batches=cfg.cost_batches, tokens=[1], context=cfg.cost_context,
                                      repetitions=max(3, cfg.repetitions), device=self.device, seed=cfg.seed)
                for r in drows:
                    t = next((x for x in rows if x["batch"] == r["batch"] and x["tokens_per_seq"] == 1), None)
                    r["draft"] = draft
                    r["ratio_to_target_step"] = r["median_s"] / t["median_s"] if t else None
                model_rec["draft_cost_curve"] = drows
                del dmodel
        except Exception as exc:  # noqa: BLE001
            self._error(f"{model_rec['label']} cost curve", exc)
        if model_rec.get("cost_curve"):
            self._write_cost_table(model_rec)

    def _write_cost_table(self, model_rec) -> None:
        """``cost_table-<model>.json`` in the results folder, in ``StepCostModel.from_table``'s format:
        pass it as ``cost_table`` (cluster config file / OUTRIDER_COST_TABLE) to seed the adaptive policy."""
        from cluster.bench.report import cost_table

        table = cost_table(model_rec)
        base = "cost_table-" + re.sub(r"[^A-Za-z0-9._-]+", "-", model_rec["short_name"]).strip("-")
        name, n = f"{base}.json", 2
        while name in self._cost_tables:  # the same model twice in one run: keep both
            name, n = f"{base}-{n}.json", n + 1
        self._cost_tables.add(name)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / name
        path.write_text(json.dumps(table, indent=1) + "\n")
        model_rec["cost_table_file"] = str(path)
        _log(f"  -> cost table {path} ({len(table['verify'])} verify points, {len(table.get('draft', []))} draft)")

    def _hf_rows(self, model_rec, path, prompts, params, drafts, encoded) -> None:
        cfg = self.config
        label, k = model_rec["label"], cfg.num_draft_tokens
        reqs = sc.Requests.for_concurrency(prompts, 1)
        _log(f"{label}: loading the Hugging Face model")
        hf = sc.load_hf(path, self.dtype, self.device)
        try:
            if self._wanted("hf-target-only") and self._time_ok(f"{label} hf-target-only"):
                _log(f"{label}: hf-target-only")
                meas = sc.run_hf(hf, reqs, params, repetitions=cfg.repetitions, warmup=cfg.warmup, device=self.device)
                self._add_row(model_rec, "hf-target-only", "none", 0, None, 1, meas, reqs, encoded)
            if self._wanted("hf-lookup") and self._time_ok(f"{label} hf-lookup"):
                _log(f"{label}: hf-lookup (prompt_lookup_num_tokens={k})")
                meas = sc.run_hf(hf, reqs, params, lookup_tokens=k, num_draft_tokens=k, repetitions=cfg.repetitions,
                                 warmup=cfg.warmup, device=self.device)
                self._add_row(model_rec, "hf-lookup", "lookup", k, None, 1, meas, reqs, encoded)
            draft = model_draft(drafts)
            if self._wanted("hf-assisted"):
                if draft is None:
                    self._skip(f"{label} hf-assisted", "no model draft among the drafts")
                elif self._time_ok(f"{label} hf-assisted"):
                    from actors.spec.proposers import parse_draft_spec

                    kind, value = parse_draft_spec(draft)
                    _log(f"{label}: hf-assisted (assistant_model = {draft}, {k} tokens)")
                    assistant = (sc.load_hf(path, self.dtype, self.device, num_hidden_layers=value) if kind == "self"
                                 else sc.load_hf(value, self.dtype, self.device))
                    try:
                        meas = sc.run_hf(hf, reqs, params, assistant=assistant, num_draft_tokens=k,
                                         repetitions=cfg.repetitions, warmup=cfg.warmup, device=self.device)
                        self._add_row(model_rec, "hf-assisted", draft, k, None, 1, meas, reqs, encoded)
                    finally:
                        del assistant
            if self._wanted("hf-compiled") and self._time_ok(f"{label} hf-compiled"):
                self._hf_compiled_row(model_rec, hf, reqs, params, encoded)
        finally:
            del hf

    def _hf_compiled_row(self, model_rec, hf, reqs, params, encoded) -> None:
        """Static cache + ``torch.compile(mode="reduce-overhead")``: CUDA by default; a compile that
        fails with ``fullgraph=True`` is retried once without it; a second failure is a skip with
        its reason (the run goes on)."""
        cfg, label = self.config, model_rec["label"]
        what = f"{label} hf-compiled"
        why = self._hf_compiled_skip_reason()
        if why:
            self._skip(what, why)
            return
        failures = []
        for fullgraph in (True, False):
            _log(f"{label}: hf-compiled (static cache, torch.compile reduce-overhead, fullgraph={fullgraph}); "
                 "the warm-up pass compiles")
            try:
                meas = sc.run_hf_compiled(hf, reqs, params, repetitions=cfg.repetitions, device=self.device,
                                          fullgraph=fullgraph, all_devices=self.device.type != "cuda")
            except Exception as exc:  # noqa: BLE001 - a compile failure must not end the run
                _log(f"  hf-compiled fullgraph={fullgraph} failed: {type(exc).__name__}: {exc}")
                failures.append(f"fullgraph={fullgraph}: {type(exc).__name__}: {str(exc)[:300]}")
                self._reset_compile(hf)
                continue
            comp = meas["compile"]
            _log(f"  compile {comp['compile_s']:.1f} s (first call {comp['first_call_s']:.1f} s, "
                 f"warm-up pass {comp['warmup_s']:.1f} s){'' if comp['compiled'] else '; NOT compiled'}")
            self._add_row(model_rec, "hf-compiled", "none", 0, None, 1, meas, reqs, encoded,
                          extra={"compile": comp, "compile_failures": failures})
            if not comp["compiled"]:
                self.results["notes"].append(f"{label} hf-compiled: transformers did not compile the decode step "
                                             "(static cache, eager)")
            self._reset_compile(hf)
            return
        self._skip(what, "torch.compile failed: " + "; ".join(failures))

    def _hf_compiled_skip_reason(self) -> str | None:
        if self.config.hf_compile == "off":
            return "hf_compile = off"
        if self.device.type != "cuda" and self.config.hf_compile == "auto":
            return (f"the torch.compile baseline runs on CUDA only by default (device {self.device.type}: "
                    "transformers compiles generate's decode step on accelerators only, and inductor on CPU takes "
                    "minutes); --hf-compile on forces it")
        return None

    @staticmethod
    def _reset_compile(model) -> None:
        for attr in ("_compiled_call", "_last_compile_config"):
            if hasattr(model, attr):
                delattr(model, attr)
        try:
            torch._dynamo.reset()
        except Exception as exc:  # noqa: BLE001
            _log(f"torch._dynamo.reset failed: {type(exc).__name__}: {exc}")

    def _ensure_ray(self) -> None:
        import ray

        if ray.is_initialized():
            return
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        num_gpus = self.config.num_gpus
        if num_gpus is None and self.device.type == "cuda":
            num_gpus = torch.cuda.device_count()
        _log(f"starting a local Ray ({num_gpus if num_gpus is not None else 'detected'} GPUs)")
        ray.init(address="local", num_gpus=num_gpus, include_dashboard=False, log_to_driver=False)
        self._owns_ray = True

    def _cluster_rows(self, model_rec, path, wanted, prompts, params, drafts, encoded) -> None:
        import ray

        from cluster.cluster import Cluster
        from cluster.config import ClusterConfig

        cfg = self.config
        label, k = model_rec["label"], cfg.num_draft_tokens
        self._ensure_ray()
        gpus = int(ray.cluster_resources().get("GPU", 0))
        draft = cfg.cluster_draft or cluster_draft(drafts, model_rec["is_shape"])
        if draft is not None:
            draft = self.resolve_draft(draft)
        oracle_file = None
        if draft is not None and draft.startswith(ORACLE_PREFIX):
            with tempfile.NamedTemporaryFile("w", suffix=".json", prefix="outrider-oracle-", delete=False) as f:
                json.dump(self.continuations, f)
            oracle_file = Path(f.name)
        cmax = max(cfg.concurrency)
        longest = max(len(p) for p in prompts)
        kv_tokens = cmax * (longest + cfg.max_tokens + 4 * k + 64) + 256
        adaptive_modes = {"off": [False], "on": [True], "both": [False, True]}[cfg.adaptive]
        transports = {"socket": ["socket"], "ray": ["ray"], "both": ["ray", "socket"]}[cfg.step_transport]
        links = {"auto": ["auto"], "gloo": ["gloo"], "both": ["auto", "gloo"]}[cfg.draft_link]
        run_aheads = {"on": [True], "off": [False], "both": [False, True]}[cfg.run_ahead]
        cost_table = cfg.cluster_cost_table
        if cost_table == "measured":
            cost_table = model_rec.get("cost_table_file")
            if cost_table is None:
                self.results["notes"].append(f"{label}: no cost curve measured (cost-curve scenario), so the cluster "
                                             "rows start from the adaptive policy's prior")
        model_rec["cluster_cost_table"] = cost_table
        layouts = {
            "cluster-target-only": {"draft": "none"},
            "cluster-colocated-turns": {"colocate": True, "draft_gpus": 0, "overlap": False},
            "cluster-colocated-overlap": {"colocate": True, "draft_gpus": 0, "overlap": True},
            "cluster-separate-turns": {"draft_gpus": 1, "overlap": False},
            "cluster-separate-overlap": {"draft_gpus": 1, "overlap": True},
        }
        for scenario in wanted:
            layout = dict(layouts[scenario])
            uses_draft = layout.get("draft") != "none"
            if uses_draft and draft is None:
                self._skip(f"{label} {scenario}", "no model draft (self:N, checkpoint or shape) among the drafts")
                continue
            if scenario.startswith("cluster-separate") and gpus < 2:
                self._skip(f"{label} {scenario}", f"needs >= 2 GPUs, the Ray cluster has {gpus}")
                continue
            row_links = links if scenario.startswith("cluster-separate") else ["auto"]
            for transport, adaptive, link, ahead in itertools.product(
                    transports, adaptive_modes if uses_draft else [None], row_links, run_aheads):
                what = (f"{label} {scenario}" + ("" if adaptive is None else f" adaptive={'on' if adaptive else 'off'}")
                        + (f" step_transport={transport}" if len(transports) > 1 else "")
                        + (f" draft_link={link}" if len(row_links) > 1 else "")
                        + (f" run_ahead={'on' if ahead else 'off'}" if len(run_aheads) > 1 else ""))
                if not self._time_ok(what):
                    continue
                fields = {"target": str(path), "draft": draft if uses_draft else "none", "num_draft_tokens": k,
                          "adaptive": bool(adaptive), "dtype": str(self.dtype).removeprefix("torch."),
                          "kv_budget_tokens": kv_tokens, "max_running": cmax, "max_waiting": max(256, 4 * cmax),
                          "cpus_per_worker": cfg.cpus_per_worker, "num_gpus": cfg.num_gpus,
                          "step_timeout_s": 120.0, "start_timeout_s": 300.0, "step_transport": transport,
                          "fused_kernels": cfg.fused_kernels, "draft_link": link, "run_ahead": ahead,
                          "capture_at_start": cfg.capture_at_start, **layout}
                if uses_draft and oracle_file is not None:
                    fields["oracle_continuations"] = str(oracle_file)
                if uses_draft and cost_table is not None:
                    fields["cost_table"] = cost_table
                fields["draft"] = draft if uses_draft else "none"
                try:
                    _log(f"{what}: starting the cluster")
                    t0 = time.perf_counter()
                    with Cluster.start(ClusterConfig(**fields)) as cluster:
                        start_s = time.perf_counter() - t0
                        placement = cluster.workers.plan.describe()
                        devices = {"target": cluster.workers.info.target_device,
                                   "draft": cluster.workers.info.draft_device}
                        for c in cfg.concurrency:
                            if not self._time_ok(f"{what} c={c}"):
                                break
                            reqs = sc.Requests.for_concurrency(prompts, c)
                            _log(f"{what} c={c}")
                            meas = sc.run_cluster(cluster, reqs, c, params, repetitions=cfg.repetitions,
                                                  warmup=cfg.warmup, max_positions=max(k, 1),
                                                  retrack_oracle=uses_draft and oracle_file is not None)
                            self._add_row(model_rec, scenario, fields["draft"], k if uses_draft else 0, adaptive, c,
                                          meas, reqs, encoded,
                                          extra={"cluster_start_s": start_s, "placement": placement,
                                                 "workers": devices, "step_transport": transport,
                                                 "run_ahead": ahead, "captured_at_start": cluster.workers.captured,
                                                 "draft_link": cluster.workers.link_backend,
                                                 "draft_link_rtt_ms": None if cluster.workers.link_rtt_s is None
                                                 else 1e3 * cluster.workers.link_rtt_s})
                        # open loop: Poisson (or bursty) arrivals per rate, on the same (warm) cluster
                        for rate in cfg.arrival_rates:
                            if not self._time_ok(f"{what} arrivals {rate:g}/s"):
                                break
                            reqs = sc.Requests.cycle(prompts, cfg.arrival_requests)
                            schedule = arrival_times(rate, len(reqs), seed=cfg.seed, cv=cfg.arrival_cv)
                            _log(f"{what} arrivals {rate:g}/s ({len(reqs)} requests, cv {cfg.arrival_cv:g}, "
                                 f"offered over {schedule[-1]:.1f} s)")
                            meas = sc.run_arrivals(cluster, reqs, schedule, params, slo_ttft_s=cfg.slo_ttft_s,
                                                   slo_tpot_s=cfg.slo_tpot_s, repetitions=cfg.repetitions,
                                                   max_positions=max(k, 1),
                                                   retrack_oracle=uses_draft and oracle_file is not None)
                            self._add_arrival_row(model_rec, scenario, fields["draft"], k if uses_draft else 0,
                                                  adaptive, rate, meas, reqs, schedule, max_running=cmax,
                                                  step_transport=transport, run_ahead=ahead)
                except Exception as exc:  # noqa: BLE001
                    self._error(what, exc)
        if oracle_file is not None:
            oracle_file.unlink(missing_ok=True)


def run_bench(config: BenchConfig) -> dict:
    """Run the benchmark; returns the results dict (also written to ``<out_dir>/results.json``)."""
    return BenchRun(config).run()
