"""Generate the Python gRPC code of ``protos/**.proto`` (build step, also run on first import).

Plane: wire contracts. The ``*_pb2.py``, ``*_pb2.pyi`` and ``*_pb2_grpc.py`` modules are build
outputs, ignored by git: ``python -m protos.build`` writes them next to their ``.proto``, and
importing a generated package (``protos.outrider.v1``) calls ``ensure`` first, so a fresh clone
(``pip install -e .``), a Ray worker or a CI job never imports stale or missing code.

``ensure(package_dir)``
  * up to date when the directory's stamp names the sha256 of every ``.proto`` there and the
    grpcio-tools / protobuf versions installed now: nothing runs (one file read and a hash);
  * otherwise, under an exclusive file lock (concurrent processes, e.g. Ray workers starting
    together, wait for one writer), it re-checks, runs ``grpc_tools.protoc`` into a temporary
    directory, rewrites the ``*_pb2_grpc`` imports to be package-relative, moves every module into
    place (``os.replace``, atomic per file) and writes the stamp last; a reader that sees a good
    stamp therefore sees complete modules;
  * when the package directory is not writable (a read-only install) it generates into
    ``$OUTRIDER_CACHE/protos/...`` (default ``~/.cache/outrider``) and returns that directory,
    which the package appends to its ``__path__``;
  * without grpcio-tools, existing generated modules are used as they are (with a warning when
    the stamp does not match); with none, ``ImportError`` says what to install.

Invariant: the ``.proto`` files are the only source; generated modules are never edited by hand.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import threading
from pathlib import Path

log = logging.getLogger("outrider.protos")

ROOT = Path(__file__).resolve().parent  # the include root: imports are "outrider/v1/x.proto"
STAMP = ".generated.json"
LOCK = ".generate.lock"
_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")
_thread_lock = threading.Lock()
_checked: dict[Path, Path] = {}


def _tool_versions() -> dict[str, str] | None:
    try:
        from importlib.metadata import PackageNotFoundError, version
    except ImportError:  # pragma: no cover
        return None
    try:
        import grpc_tools  # noqa: F401
    except ImportError:
        return None
    try:
        return {"grpcio-tools": version("grpcio-tools"), "protobuf": version("protobuf")}
    except PackageNotFoundError:
        return {"grpcio-tools": "unknown", "protobuf": "unknown"}


def _protos(package_dir: Path) -> list[Path]:
    return sorted(package_dir.glob("*.proto"))


def _fingerprint(package_dir: Path, tools: dict[str, str] | None) -> dict:
    return {
        "protos": {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in _protos(package_dir)},
        "tools": tools,
    }


def _outputs(proto: Path) -> list[str]:
    return [proto.stem + suffix for suffix in _SUFFIXES]


def _read_stamp(out_dir: Path) -> dict | None:
    try:
        return json.loads((out_dir / STAMP).read_text())
    except (OSError, ValueError):
        return None


def _complete(out_dir: Path, package_dir: Path) -> bool:
    return all((out_dir / name).exists() for p in _protos(package_dir) for name in _outputs(p))


def _up_to_date(out_dir: Path, package_dir: Path, want: dict) -> bool:
    return _read_stamp(out_dir) == want and _complete(out_dir, package_dir)


def _writable(directory: Path) -> bool:
    return os.access(directory, os.W_OK | os.X_OK)


def _cache_dir(package_dir: Path, root: Path) -> Path:
    base = Path(os.environ.get("OUTRIDER_CACHE") or Path.home() / ".cache" / "outrider")
    rel = package_dir.relative_to(root)
    key = hashlib.sha256(str(package_dir).encode()).hexdigest()[:12]
    return base / "protos" / key / rel


def ensure(package_dir: str | Path, root: str | Path = ROOT) -> Path:
    """Make the generated modules of ``package_dir``'s ``.proto`` files current; returns the
    directory that holds them (``package_dir`` itself unless it is read-only). ``root`` is the
    include root the ``.proto`` imports are relative to (``protos/``)."""
    package_dir, root = Path(package_dir).resolve(), Path(root).resolve()
    if package_dir in _checked:
        return _checked[package_dir]
    with _thread_lock:
        if package_dir in _checked:
            return _checked[package_dir]
        out_dir = package_dir if _writable(package_dir) else _cache_dir(package_dir, root)
        tools = _tool_versions()
        if tools is None:
            if _complete(out_dir, package_dir):
                stamp = _read_stamp(out_dir) or {}
                if stamp.get("protos") != _fingerprint(package_dir, None)["protos"]:
                    log.warning("grpcio-tools is not installed: using generated code in %s that may "
                                "not match its .proto files", out_dir)
                _checked[package_dir] = out_dir
                return out_dir
            raise ImportError(f"the gRPC code of {package_dir} has not been generated and grpcio-tools "
                              "is not installed: pip install grpcio-tools, then python -m protos.build")
        want = _fingerprint(package_dir, tools)
        if not _up_to_date(out_dir, package_dir, want):
            out_dir.mkdir(parents=True, exist_ok=True)
            _generate_locked(package_dir, out_dir, want, root)
        _checked[package_dir] = out_dir
        return out_dir


def _generate_locked(package_dir: Path, out_dir: Path, want: dict, root: Path) -> None:
    import fcntl

    with open(out_dir / LOCK, "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if _up_to_date(out_dir, package_dir, want):  # another process generated meanwhile
                return
            _generate(package_dir, out_dir, want, root)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _generate(package_dir: Path, out_dir: Path, want: dict, root: Path) -> None:
    import grpc_tools
    from grpc_tools import protoc

    protos = _protos(package_dir)
    rel = package_dir.relative_to(root)
    well_known = Path(grpc_tools.__file__).resolve().parent / "_proto"
    tmp = Path(tempfile.mkdtemp(prefix=".gen-", dir=out_dir))
    try:
        args = ["grpc_tools.protoc", f"-I{root}", f"-I{well_known}", f"--python_out={tmp}",
                f"--pyi_out={tmp}", f"--grpc_python_out={tmp}", *[str(p.relative_to(root)) for p in protos]]
        code = protoc.main(args)
        if code != 0:
            raise RuntimeError(f"grpc_tools.protoc failed (exit {code}) on {', '.join(map(str, protos))}; "
                               "its messages are above")
        module_prefix = ".".join(rel.parts)  # e.g. "outrider.v1"
        for proto in protos:
            for name in _outputs(proto):
                path = tmp / rel / name
                if name.endswith("_pb2_grpc.py"):
                    # protoc writes absolute imports ("from outrider.v1 import x_pb2"); the modules
                    # live inside the `protos` package, so make them relative to their own package
                    text = path.read_text()
                    text = re.sub(rf"^from {re.escape(module_prefix)} import (\w+_pb2)",
                                  r"from . import \1", text, flags=re.MULTILINE)
                    path.write_text(text)
                os.replace(path, out_dir / name)
        stamp = out_dir / (STAMP + ".tmp")
        stamp.write_text(json.dumps(want, indent=1, sort_keys=True) + "\n")
        os.replace(stamp, out_dir / STAMP)
        log.info("generated gRPC code for %s into %s", ", ".join(p.name for p in protos), out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def packages() -> list[Path]:
    """Every directory under ``protos/`` that holds ``.proto`` files."""
    return sorted({p.parent for p in ROOT.rglob("*.proto")})


def main(argv: list[str] | None = None) -> int:
    """``python -m protos.build [--force]``: generate the code of every ``.proto`` now."""
    argv = sys.argv[1:] if argv is None else argv
    if any(a not in ("--force",) for a in argv):
        print("usage: python -m protos.build [--force]", file=sys.stderr)
        return 2
    for package_dir in packages():
        if "--force" in argv:
            (package_dir / STAMP).unlink(missing_ok=True)
        out = ensure(package_dir)
        print(f"{package_dir.relative_to(ROOT.parent)}: generated code in {out}")
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    sys.exit(main())
