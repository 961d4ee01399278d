"""Outrider's public API protos, one sub-package per version (``protos.outrider.v1``)."""
