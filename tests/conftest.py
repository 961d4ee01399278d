"""Test-wide settings. The models in tests are tiny: one intra-op thread is fastest for them, and
several threads per process oversubscribe a 2-core CI machine by orders of magnitude."""

import torch

torch.set_num_threads(1)
