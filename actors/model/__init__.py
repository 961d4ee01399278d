"""Pure-PyTorch Llama-family runtime, executable by pieces."""
