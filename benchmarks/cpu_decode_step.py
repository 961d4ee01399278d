"""CPU batch-1 decode step: Outrider's target-only step vs transformers' forward (benchmark).

Both sides run in this one process, on the same weights (the demo model unless --model is given),
the same prompt, the same dtype and the same torch thread count:

* ours: ``StepBatch.build`` for one new token + ``LlamaModel.forward`` with the prompt's KV already
  in the paged cache, then ``cache.commit(req, [])`` drops the new entry so every repeat sees the
  same context (all three are inside the timed region: that is what a real step costs);
* transformers: ``AutoModelForCausalLM`` called on the same token with the ``past_key_values`` of
  the same prefill; the cache is cropped back (outside the timed region) after each repeat.

Repeats alternate ours / theirs so that drift on a shared machine hits both alike. Reported: the
median and min-max of each, the ratio of medians (theirs / ours, > 1 means ours is faster), and
whether both pick the same next token. The CPU copy bandwidth is measured in the same run and each
step is also given as a fraction of its floor (weight bytes + KV bytes read over that bandwidth).

Writes ``result.json`` and ``README.md`` under ``benchmarks/results/<date>-cpu-decode-step/``.

    python benchmarks/cpu_decode_step.py [--model DIR] [--prompt-tokens 96] [--repeats 50]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from actors.model.loader import load_model  # noqa: E402
from actors.step_batch import SeqStep, StepBatch  # noqa: E402

PASSAGE = (
    "The history of computing is a story of abstraction. Early machines were programmed by "
    "rewiring panels and flipping switches; later, stored programs let the same hardware run any "
    "sequence of instructions. Assemblers gave names to opcodes, compilers turned formulas into "
    "machine code, and operating systems hid the details of disks, memory and devices behind "
    "files and processes. Each layer let people think about the problem instead of the machine, "
    "and each layer cost a little speed, which the next generation of hardware paid back. Today "
    "a language model answering a question runs on billions of transistors, yet the person asking "
    "sees only a sentence appearing one word at a time."
)


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def copy_bandwidth(num_bytes: int = 256 << 20, repeats: int = 10) -> float:
    """CPU copy bandwidth in bytes/s (bytes read + written), median of ``repeats``."""
    src = torch.ones(num_bytes // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = [_timed(lambda: dst.copy_(src)) for _ in range(repeats)]
    return 2 * num_bytes / statistics.median(times)


def _stats(times: list[float]) -> dict:
    ms = [t * 1e3 for t in times]
    return {"median_ms": statistics.median(ms), "min_ms": min(ms), "max_ms": max(ms), "raw_ms": ms}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


@torch.inference_mode()
def run(model_dir: Path, prompt_tokens: int, warmup: int, repeats: int) -> dict:
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    ids = tokenizer.encode(PASSAGE * 4)[:prompt_tokens]
    if len(ids) < prompt_tokens:
        raise SystemExit(f"the passage gives only {len(ids)} tokens")

    ours = load_model(model_dir, dtype=torch.float32, device="cpu")
    theirs = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()

    # Prefill both with the prompt; the decode input is the target's own next token.
    cache = ours.make_kv_cache((prompt_tokens + 64) * ours.kv_bytes_per_token)
    cache.add_sequence(0)
    prefill = StepBatch.build(cache, [SeqStep(0, ids, logits="last")])
    next_token = int(ours.forward(prefill, cache)[0].argmax())
    cache.commit(0)
    hf_prefill = theirs(input_ids=torch.tensor([ids]), use_cache=True)
    past = hf_prefill.past_key_values
    hf_next = int(hf_prefill.logits[0, -1].argmax())
    hf_input = torch.tensor([[next_token]])

    def our_step():
        batch = StepBatch.build(cache, [SeqStep(0, [next_token], logits="last")])
        our_step.logits = ours.forward(batch, cache)[0]
        cache.commit(0, [])

    def their_step():
        their_step.logits = theirs(input_ids=hf_input, past_key_values=past, use_cache=True).logits[0, -1]

    our_times, their_times = [], []
    for i in range(warmup + repeats):
        t_ours = _timed(our_step)
        t_theirs = _timed(their_step)
        past.crop(prompt_tokens - past.get_seq_length())  # negative: drop that many (all versions)
        if cache.seq_len(0) != prompt_tokens or past.get_seq_length() != prompt_tokens:
            raise RuntimeError("a cache did not roll back to the prompt")
        if i >= warmup:
            our_times.append(t_ours)
            their_times.append(t_theirs)

    ours_logits, theirs_logits = our_step.logits.float(), their_step.logits.float()
    bandwidth = copy_bandwidth()
    # A step reads every weight once, except the embedding, of which it reads one row.
    weight_bytes = sum(p.numel() * p.element_size() for name, p in ours.named_parameters(remove_duplicate=False)
                       if not name.startswith("embed_tokens"))
    kv_bytes = prompt_tokens * ours.kv_bytes_per_token
    floor_s = (weight_bytes + kv_bytes) / bandwidth
    ours_stats, theirs_stats = _stats(our_times), _stats(their_times)
    return {
        "benchmark": "cpu-decode-step",
        "date": dt.date.today().isoformat(),
        "model": str(model_dir),
        "dtype": "float32",
        "batch_size": 1,
        "prompt_tokens": prompt_tokens,
        "warmup": warmup,
        "repeats": repeats,
        "threads": torch.get_num_threads(),
        "cpu": _cpu_model(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "commit": _commit(),
        "ours": ours_stats,
        "transformers_forward": theirs_stats,
        "ratio_theirs_over_ours": theirs_stats["median_ms"] / ours_stats["median_ms"],
        "prefill_argmax_equal": next_token == hf_next,
        "decode_argmax_ours": int(ours_logits.argmax()),
        "decode_argmax_transformers": int(theirs_logits.argmax()),
        "decode_argmax_equal": int(ours_logits.argmax()) == int(theirs_logits.argmax()),
        "decode_logits_max_abs_diff": float((ours_logits - theirs_logits).abs().max()),
        "copy_bandwidth_gb_s": bandwidth / 1e9,
        "bytes_per_step": weight_bytes + kv_bytes,
        "floor_ms": floor_s * 1e3,
        "ours_fraction_of_floor": floor_s * 1e3 / ours_stats["median_ms"],
        "transformers_fraction_of_floor": floor_s * 1e3 / theirs_stats["median_ms"],
    }


def markdown(r: dict) -> str:
    o, t = r["ours"], r["transformers_forward"]
    return "\n".join([
        f"# CPU decode step, batch 1 — {r['date']}",
        "",
        f"Model `{Path(r['model']).name}` ({r['dtype']}), prompt {r['prompt_tokens']} tokens already in "
        f"the KV cache, one new token per step. {r['cpu']}, {r['threads']} torch threads, torch "
        f"{r['torch']}, transformers {r['transformers']}, commit `{r['commit']}`. "
        f"{r['warmup']} warm-up steps, then {r['repeats']} alternating repeats of each.",
        "",
        "| step | median ms | min–max ms | fraction of floor |",
        "| --- | ---: | ---: | ---: |",
        f"| Outrider `LlamaModel.forward` (incl. `StepBatch.build`, rollback) | {o['median_ms']:.2f} | "
        f"{o['min_ms']:.2f}–{o['max_ms']:.2f} | {r['ours_fraction_of_floor']:.2f} |",
        f"| transformers `AutoModelForCausalLM` forward with `past_key_values` | {t['median_ms']:.2f} | "
        f"{t['min_ms']:.2f}–{t['max_ms']:.2f} | {r['transformers_fraction_of_floor']:.2f} |",
        "",
        f"Ratio of medians (transformers / Outrider): **{r['ratio_theirs_over_ours']:.2f}×** "
        f"({'Outrider faster' if r['ratio_theirs_over_ours'] >= 1 else 'Outrider slower'}).",
        "",
        f"Next-token argmax equal: prefill {r['prefill_argmax_equal']}, decode {r['decode_argmax_equal']} "
        f"(max |Δlogit| {r['decode_logits_max_abs_diff']:.2e}).",
        "",
        f"Floor: {r['bytes_per_step'] / 1e6:.0f} MB read per step (weights + KV) over "
        f"{r['copy_bandwidth_gb_s']:.1f} GB/s CPU copy bandwidth (read + write, measured in this run) "
        f"= {r['floor_ms']:.1f} ms.",
        "",
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="HF checkpoint directory (default: the demo model)")
    parser.add_argument("--prompt-tokens", type=int, default=96)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default: dated)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model is None:
        from cluster.demo_model import ensure_demo_model

        args.model = ensure_demo_model()
    result = run(args.model, args.prompt_tokens, args.warmup, args.repeats)
    out = args.out or ROOT / "benchmarks" / "results" / f"{result['date']}-cpu-decode-step"
    out.mkdir(parents=True, exist_ok=True)
    (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    table = markdown(result)
    (out / "README.md").write_text(table)
    print(table)
    print(f"written to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
