#!/usr/bin/env bash
# Copies a carried chunk folder (.real-b) of the demo GGUF to /tmp/real on the device machine, where
# a later call on the same warm machine joins it with the rest (benchmarks/gpu_real_pair_run.sh).
set -u
mkdir -p /tmp/real && cp "${1:-.real-b}"/part-* /tmp/real/ && ls -l /tmp/real
