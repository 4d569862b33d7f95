"""Capture safety of the CUDA ops, checked on the CPU through the emulated build: each
``torch.ops.fastmaml.*`` op run with ``backend="cuda"`` (its Python launcher and the
C++ launcher behind it) makes no host synchronisation (cudaStreamSynchronize,
cudaDeviceSynchronize, synchronous cudaMemcpy, device-to-host copies: the emulation's
runtime-call counters), allocates nothing in C++ (cudaMalloc) and, in torch, only its
outputs and the named workspace, and reads no value back with ``.item()``
(``aten::_local_scalar_dense``, seen by a dispatch mode). The data checks inside the ops
(labels, finiteness) read values on the host in eager calls and become device-side
asserts while a CUDA graph is captured (simulated here). These are the conditions for
``torch.compile(mode="reduce-overhead")`` to capture the ops into a CUDA graph; the
capture itself is test_gpu_semantics.py's CUDA test."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastmaml  # noqa: F401 - registers torch.ops.fastmaml
from fastmaml import _ext, codes
from fastmaml.ops import mlp_library
from fastmaml.ops._maml_mlp.library import maml_mlp_op
from fastmaml.ops._sgd_step.library import sgd_step_backward_op, sgd_step_op

ALLOCATING = {"empty", "empty_like", "new_empty", "empty_strided", "new_empty_strided", "zeros", "zeros_like",
              "new_zeros", "ones", "ones_like", "full", "full_like", "clone"}
SYNCS = ("memcpy_sync", "memcpy_device_to_host", "stream_syncs", "device_syncs", "mallocs", "frees")


class _Ops(TorchDispatchMode):
    """The aten ops a call runs (by their packet name)."""

    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def impl(op):
    """The Python implementation behind a custom op (a dispatch mode sees an op call as
    one node; the aten ops of its implementation are what the launch runs)."""
    fn = op._init_fn
    assert callable(fn) and fn.__module__.startswith("fastmaml.ops"), fn
    return fn


def _launch(call):
    """Runs ``call``; returns (its runtime-call counts, the aten ops it ran, its launches
    per kernel)."""
    C = _ext.ext()
    before = {k: v["launches"] for k, v in C.cuda_emulation_stats().items()}  # not reset: the coverage list reads them
    C.cuda_emulation_api_reset()
    with _Ops() as ops:
        call()
    api = C.cuda_emulation_api_stats()
    launches = {k: v["launches"] - before.get(k, 0) for k, v in C.cuda_emulation_stats().items()}
    return api, ops.names, {k: n for k, n in launches.items() if n}


def _assert_capture_safe(api, names, launches, kernels, n_alloc):
    assert {k: api[k] for k in SYNCS} == dict.fromkeys(SYNCS, 0), api
    assert "_local_scalar_dense" not in names, names  # no .item() / bool() / int() of a tensor
    allocs = [n for n in names if n in ALLOCATING]
    assert len(allocs) == n_alloc, allocs
    for k in kernels:
        assert launches.get(k, 0) >= 1, (k, launches)


def _sgd_inputs(kind):
    g = torch.Generator().manual_seed(0)
    ps = [torch.randn(4, 5, generator=g), torch.randn(3, 5, generator=g)]
    gs = [torch.randn(3, 4, 5, generator=g), torch.randn(3, 5, generator=g)]
    lrs = {codes.SGD_LR_FLOAT: [], codes.SGD_LR_SCALAR: [torch.tensor(0.1)],
           codes.SGD_LR_PER_TENSOR: [torch.rand(2, generator=g)],
           codes.SGD_LR_PER_ELEMENT: [torch.rand(4, 5, generator=g), torch.rand(5, generator=g)]}[kind]
    return ps, gs, lrs


@pytest.mark.parametrize("kind", [codes.SGD_LR_FLOAT, codes.SGD_LR_SCALAR, codes.SGD_LR_PER_TENSOR,
                                  codes.SGD_LR_PER_ELEMENT])
def test_sgd_step_ops_capture_safe(kind):
    ps, gs, lrs = _sgd_inputs(kind)
    val = 0.1 if kind == codes.SGD_LR_FLOAT else 0.0
    fwd = lambda: impl(sgd_step_op)(ps, gs, lrs, kind, val, "cuda")  # noqa: E731
    _assert_capture_safe(*_launch(fwd), kernels=["multi_tensor_kernel"], n_alloc=len(gs))
    v = [torch.randn_like(x) for x in gs]
    bwd = lambda: impl(sgd_step_backward_op)(v, gs, lrs, [1, 0], kind, val, True, "cuda")  # noqa: E731
    api, names, launches = _launch(bwd)
    # one lr for many elements (scalar, per tensor): dα is reduced through a stream-ordered
    # workspace of per-block partial sums (cudaMallocAsync/cudaFreeAsync on the op's stream,
    # which a CUDA graph captures as allocation nodes); no other runtime call
    ws = int(kind in (codes.SGD_LR_SCALAR, codes.SGD_LR_PER_TENSOR))
    assert {k: api[k] for k in SYNCS} == {**dict.fromkeys(SYNCS, 0), "mallocs": ws, "frees": ws}, api
    assert "_local_scalar_dense" not in names, names
    assert launches.get("multi_tensor_kernel", 0) >= 1, launches
    assert launches.get("sum_segments_kernel", 0) == ws, launches


def test_launchers_allocate_only_stream_ordered():
    """The op launchers' only device allocations are stream-ordered (cudaMallocAsync /
    cudaFreeAsync: capturable); the synchronous cudaMalloc/cudaMemcpy of csrc/ are the
    availability probe's (csrc/common/cuda_device.cu, never inside an op)."""
    import re
    from pathlib import Path

    csrc = Path(__file__).resolve().parents[2] / "csrc"
    for path in [*csrc.rglob("*.cu"), *csrc.rglob("*.cuh")]:
        if path.name in ("cuda_device.cu", "cuda_emulation_selftest.cu"):
            continue
        text = path.read_text()
        bad = re.findall(r"\b(cudaMalloc|cudaFree|cudaMemcpy|cudaStreamSynchronize|cudaDeviceSynchronize)\s*\(", text)
        assert bad == [], (path.name, bad)


def _mlp(loss, T=2, N=5, dims=(3, 6, 4)):
    g = torch.Generator().manual_seed(1)
    ws = [0.5 * torch.randn(T, dims[i + 1], dims[i], generator=g) for i in range(len(dims) - 1)]
    bs = [0.1 * torch.randn(T, dims[i + 1], generator=g) for i in range(len(dims) - 1)]
    x = torch.randn(T, N, dims[0], generator=g)
    y = torch.randn(T, N, dims[-1], generator=g) if loss == "mse" else torch.randint(0, dims[-1], (T, N), generator=g)
    return ws, bs, x, y


def test_mlp_ops_capture_safe():
    ws, bs, x, y = _mlp("mse")
    lg = lambda: impl(mlp_library.mlp_loss_and_grad_op)(ws, bs, x, y, "relu", "mse", "cuda")  # noqa: E731
    _assert_capture_safe(*_launch(lg), kernels=["loss_and_grad_kernel"], n_alloc=1 + 2 * len(ws))
    hvp = lambda: impl(mlp_library.mlp_hvp_op)(ws, bs, x, y, ws, bs, "relu", "mse", "cuda")  # noqa: E731
    _assert_capture_safe(*_launch(hvp), kernels=["hvp_kernel"], n_alloc=2 * len(ws))


def test_maml_mlp_op_capture_safe():
    """The fused meta-step: outputs (loss, 2L gradients) and one workspace (the per-task
    partial sums reduced in a fixed order by reduce_tasks_kernel), the MSL weights given on
    the host (as the public function does for the default weights)."""
    g = torch.Generator().manual_seed(2)
    dims, T, K = (1, 8, 8, 1), 3, 2
    ws = [torch.randn(dims[i + 1], dims[i], generator=g) for i in range(3)]
    bs = [torch.randn(dims[i + 1], generator=g) for i in range(3)]
    xs, ys, xq, yq = (torch.randn(T, 4, 1, generator=g) for _ in range(4))
    msl = torch.tensor([0.0, 1.0])
    args = (ws, bs, xs, ys, xq, yq, [], msl, K, False, "relu", "mse", "float", 0.01, True, False, "cuda", False,
            [0.0, 1.0])
    call = lambda: impl(maml_mlp_op)(*args)  # noqa: E731
    _assert_capture_safe(*_launch(call), kernels=["maml_kernel", "reduce_tasks_kernel"],
                         n_alloc=1 + 2 * len(ws) + 1)


def test_data_checks_become_device_asserts_while_capturing(monkeypatch):
    """With a capture in progress (simulated: ``capturing`` reports True), the label and
    finiteness checks queue ``aten::_assert_async`` and read nothing back; outside a
    capture they read the values and raise ValueError naming the argument."""
    ws, bs, x, y = _mlp("cross_entropy")
    xn = x.clone()
    xn[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="y holds labels outside"):
        mlp_library.check_labels("y", y + 4, 4)
    with pytest.raises(ValueError, match="xs contains NaN or Inf"):
        mlp_library.check_finite("xs", xn)
    monkeypatch.setattr(mlp_library, "capturing", lambda t: True)

    def checks():
        mlp_library.check_labels("y", y, 4)
        mlp_library.check_finite("xs", x)

    api, names, _ = _launch(checks)
    assert "_local_scalar_dense" not in names and names.count("_assert_async") == 2, names
    assert {k: api[k] for k in SYNCS} == dict.fromkeys(SYNCS, 0), api
    lg = lambda: impl(mlp_library.mlp_loss_and_grad_op)(ws, bs, x, y, "relu", "cross_entropy", "cuda")  # noqa: E731
    _assert_capture_safe(*_launch(lg), kernels=["loss_and_grad_kernel"], n_alloc=1 + 2 * len(ws))
