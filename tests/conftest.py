"""Test configuration.

Without a CUDA device the Triton kernels run under the Triton interpreter on CPU tensors:
TRITON_INTERPRET must be set before anything imports a kernel module, which is why it is
set here, at conftest import time.

torch.compile's on-disk caches (FX graphs, AOT autograd) name fastcon's custom ops but do not
key on their schemas: after a change of an op's signature, a warm cache replays a graph made
for the old one. So the tests compile into a cache folder named after a hash of fastcon's
sources (set here, inherited by the example scripts the tests start).
"""

import hashlib
import os
import pathlib
import tempfile

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _sources_hash() -> str:
    root = pathlib.Path(__file__).resolve().parent.parent
    digest = hashlib.sha256()
    for path in sorted([*root.glob("fastcon/**/*.py"), *root.glob("csrc/**/*.*")]):
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


os.environ.setdefault(
    "TORCHINDUCTOR_CACHE_DIR", os.path.join(tempfile.gettempdir(), f"torchinductor_fastcon_{_sources_hash()}")
)

HAS_CUDA = torch.cuda.is_available()


@pytest.fixture(autouse=True)
def _no_backend_override(monkeypatch):
    """Tests choose backends explicitly; a FASTCON_BACKEND in the caller's shell must not leak in."""
    monkeypatch.delenv("FASTCON_BACKEND", raising=False)
