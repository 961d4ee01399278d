"""Control plane: configuration, request lifecycle, scheduling, the CLI. Pure Python; model code
is reached only through the data plane's entry points."""
