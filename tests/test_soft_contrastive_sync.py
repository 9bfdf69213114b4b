"""No host-device synchronisation on the GPU backends' loss path (issue 13, item 2).

What reads a tensor's value on the host dispatches ``aten::_local_scalar_dense`` (``.item()``,
``float()``, ``bool()``, ``int()``, ``.tolist()`` of a 0-dim tensor); ``nonzero``, ``unique`` and
boolean-mask indexing size their output from the values (a sync on CUDA). One forward + backward
of the fused loss on the GPU backends' code path (backends triton and cuda_simt: CPU tensors
here, the path a GPU takes) must dispatch none of them, for every label kind, a learnable
temperature and the sigmoid form with a learnable bias, a key queue too. Counted twice:
- with a ``TorchDispatchMode`` around the call, the custom operators' Python bodies run under
  it (as tests/test_soft_contrastive_opcount.py does);
- with the profiler, which also sees the ops that C++ code dispatches (the CUDA bindings that
  cuda_simt compiles, the kernels' argument checks): no binding reads scale or bias on the host.
"""

from __future__ import annotations

import collections

import pytest
import torch
from test_soft_contrastive_opcount import _OpCounter

import fastcon

# ops that read values on the host, or size an output by them (a sync on CUDA)
SYNCING = (
    "_local_scalar_dense",
    "item",
    "is_nonzero",
    "equal",
    "nonzero",
    "nonzero_static",
    "masked_select",
    "_unique",
    "_unique2",
    "unique_dim",
    "unique_consecutive",
    "repeat_interleave",
)
N, D, C, K = 24, 16, 5, 7


def _syncing(names) -> dict[str, int]:
    found = collections.Counter()
    for name in names:
        # "aten::item" (profiler) or "aten._local_scalar_dense.default" (dispatch mode)
        base = name.split("::")[-1] if "::" in name else name.split(".")[1] if "." in name else name
        if base in SYNCING:
            found[name] += 1
    return dict(found)


def _inside(event, name: str) -> bool:
    while event is not None:
        if event.name == name:
            return True
        event = event.cpu_parent
    return False


def _case(kind, backend):
    gen = torch.Generator().manual_seed(1)
    z1 = torch.randn(N, D, generator=gen).requires_grad_()
    z2 = torch.randn(N, D, generator=gen).requires_grad_()
    labels, qlabels = (torch.rand(N, C, generator=gen) < 0.4).float(), (torch.rand(K, C, generator=gen) < 0.4).float()
    opts = dict(learnable_temperature=True, backend=backend)
    if kind == "fractions":
        labels, qlabels = torch.rand(N, C, generator=gen), torch.rand(K, C, generator=gen)
    elif kind in ("scene", "scene_ignore", "scene_queue"):
        labels, qlabels = torch.randint(0, 6, (N,), generator=gen), torch.randint(0, 6, (K,), generator=gen)
        if kind == "scene_ignore":
            opts["scene_mode"] = "ignore"
    elif kind == "none":
        labels = qlabels = None
    elif kind == "sigmoid":
        opts.update(loss="sigmoid", learnable_bias=True)
    elif kind == "sigmoid_fixed_bias":
        opts.update(loss="sigmoid", bias=-2.0)
    queue = None
    if kind in ("queue", "scene_queue"):
        queue = torch.randn(K, D, generator=gen)
        opts["symmetric"] = False
    else:
        qlabels = None
    return z1, z2, labels, fastcon.SoftContrastiveLoss(0.1, **opts), queue, qlabels


KINDS = [
    "multi_hot",
    "fractions",
    "scene",
    "scene_ignore",
    "none",
    "sigmoid",
    "sigmoid_fixed_bias",
    "queue",
    "scene_queue",
]


def _step(z1, z2, labels, module, queue, qlabels):
    module(z1, z2, labels, queue=queue, queue_labels=qlabels).backward()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("backend", ["triton", "cuda_simt"])
def test_loss_path_reads_no_value_on_the_host(backend, kind):
    args = _case(kind, backend)
    z1, module = args[0], args[3]
    _step(*args)  # the first call: extension loaded, .grad created
    with _OpCounter() as counter:
        _step(*args)
    counts = counter.counts
    assert counts["fastcon_loss.fused_forward.default"] == 1
    assert counts["fastcon_loss.fused_backward.default"] == 1
    assert sum(counts.values()) > 20  # the custom operators' bodies ran under the mode
    assert z1.grad is not None
    assert module.log_scale.grad is not None
    assert _syncing(counts) == {}, f"{backend} {kind}: host reads {_syncing(counts)}"
    if kind == "sigmoid":
        assert module.bias.grad is not None


@pytest.mark.parametrize("kind", ["multi_hot", "scene", "scene_ignore", "sigmoid", "queue"])
@pytest.mark.parametrize("backend", ["cuda_simt", "triton"])
def test_no_host_read_inside_the_ops(backend, kind):
    """The profiler records the ops C++ dispatches too: the cuda bindings (here in their SIMT
    build) and the kernels' launchers read scale and bias on the device only."""
    args = _case(kind, backend)
    _step(*args)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        _step(*args)
    names = [e.name for e in prof.events()]
    assert any("sc_backward" in n or "sc_loss_backward" in n for n in names) or backend == "triton"  # ops ran
    assert any("fused_backward" in n for n in names)
    # torch._assert_async on a CPU tensor reads it (its CPU kernel; the CUDA one launches a kernel)
    reads = _syncing(e.name for e in prof.events() if not _inside(e, "aten::_assert_async"))
    assert reads == {}, f"{backend} {kind}: host reads {reads}"
    assert _syncing(names), "the CPU _assert_async reads are seen (the profiler sees nested ops)"


def test_counters_see_a_host_read():
    """The two counters are not blind: the reference backend reads a CPU temperature on the host
    for its eager ValueError (reading a CPU value is no synchronisation), and both count it."""
    args = _case("multi_hot", "reference")
    _step(*args)
    with _OpCounter() as counter:
        _step(*args)
    assert _syncing(counter.counts).get("aten._local_scalar_dense.default", 0) >= 1  # float(temperature)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        _step(*args)
    assert _syncing([e.name for e in prof.events()]).get("aten::_local_scalar_dense", 0) >= 1


@pytest.mark.parametrize("backend", ["triton", "cuda_simt"])
def test_bad_values_fail_through_device_asserts(backend):
    """On the GPU path the value checks are torch._assert_async: the same words, raised at once
    on CPU tensors (on CUDA, a device-side assert at the next synchronisation)."""
    z = torch.randn(6, 4)
    cases = [
        ({"temperature": torch.tensor(-0.1)}, None, "temperature must be finite, > 0 and >= "),
        ({"temperature": torch.tensor(float("nan"))}, None, "temperature must be finite, > 0 and >= "),
        ({"temperature": torch.tensor(1e-40)}, None, r"its inverse, the logit scale, must be finite"),
        ({"loss": "sigmoid", "bias": torch.tensor(float("inf"))}, None, "bias must be finite"),
        ({}, -torch.ones(6, 2), r"labels must be >= 0"),
        ({}, torch.full((6, 2), float("nan")), "labels must be finite"),
    ]
    for kw, labels, match in cases:
        with pytest.raises(RuntimeError, match=match):
            fastcon.soft_contrastive_loss(z, z, labels, backend=backend, **kw)
