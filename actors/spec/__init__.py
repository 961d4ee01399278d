"""Speculative decoding: proposals, sampling, lossless verification, proposers, reference loop."""
