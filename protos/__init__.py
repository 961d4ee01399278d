"""Wire contracts (gRPC API, internal messages). Generated code is built, never hand-edited."""
