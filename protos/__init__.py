"""Wire contracts (gRPC API, internal messages). Generated code is built, never hand-edited.

``protos/outrider/v1/generate.proto`` is the public gRPC API. Its Python modules are build
outputs (ignored by git): importing ``protos.outrider.v1`` generates them when they are missing or
out of date with the ``.proto`` (see ``protos.build``); ``python -m protos.build`` does it explicitly.
"""


def load():
    """The generated ``outrider.v1`` package (``.generate_pb2``, ``.generate_pb2_grpc``)."""
    from protos.outrider import v1

    return v1
