"""``outrider.v1``: the public gRPC API (``generate.proto``).

    from protos.outrider.v1 import generate_pb2, generate_pb2_grpc

The modules are generated from ``generate.proto`` by ``protos.build`` on first import (or by
``python -m protos.build``); they are never committed. When this directory is read-only they are
generated into a cache directory, which joins this package's ``__path__``.
"""

from pathlib import Path as _Path

from protos.build import ensure as _ensure

_generated = _ensure(_Path(__file__).resolve().parent)
if _generated != _Path(__file__).resolve().parent:
    __path__.append(str(_generated))

from . import generate_pb2, generate_pb2_grpc

__all__ = ["generate_pb2", "generate_pb2_grpc"]
