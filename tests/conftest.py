"""Test configuration.

Without a CUDA device the Triton kernels run under the Triton interpreter on CPU tensors:
TRITON_INTERPRET must be set before anything imports a kernel module, which is why it is
set here, at conftest import time.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

HAS_CUDA = torch.cuda.is_available()


@pytest.fixture(autouse=True)
def _no_backend_override(monkeypatch):
    """Tests choose backends explicitly; a FASTCON_BACKEND in the caller's shell must not leak in."""
    monkeypatch.delenv("FASTCON_BACKEND", raising=False)
