"""Test-session set-up shared by every test module.

Without a GPU, the Triton kernels run under Triton's CPU interpreter. Triton reads
``TRITON_INTERPRET`` when a kernel is defined, that is when ``sharded_novograd`` is
first imported, so the variable is set here, before any test module imports it. This
changes no default: ``fused=None`` still picks the torch kernels for CPU tensors; only
``fused=True`` on CPU tensors becomes runnable instead of raising.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
