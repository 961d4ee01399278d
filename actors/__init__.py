"""Data plane: model runtime, KV cache, speculative verification, and (later) the Ray actors
that execute one step of the engine. Actors make no scheduling decisions."""
