"""The one registry of the op-vs-twin agreement tests: per op, the public op, its twin in
:mod:`fastmaml.reference`, the backends it is checked on, its cases, and the check that
runs one (backend, case) pair and asserts the agreement (tests/ops/test_registry.py runs
every entry × backend × case).

A check takes ``(entry, backend, case, monkeypatch)``; cases are tuples of plain values
whose ids name them.
"""

from __future__ import annotations

import itertools
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

from fastmaml import _ext, ops
from fastmaml import reference as ref

from tests.helpers import CUDA
from tests.ops.batch_norm_cases import SHAPES, _first_and_second, _inputs, _native
from tests.ops.maml_mlp_cases import PATHS, use_path
from tests.ops.maml_mlp_cases import check as check_maml_mlp
from tests.ops.mlp_cases import DIMS, close, make_mlp
from tests.ops.sgd_step_cases import CPU_BACKENDS, LR_KINDS, THETA_MODES, check_backend

F64, F32 = torch.float64, torch.float32


@dataclass(frozen=True)
class OpEntry:
    name: str
    op: Callable
    twin: Callable
    backends: list  # names or pytest.param(name, marks=...)
    cases: list  # tuples
    check: Callable  # (entry, backend, case, monkeypatch) -> None; raises AssertionError on disagreement
    case_id: Callable = str


# ---- sgd_step: against the twin and an independent per-task float64 computation -------
def _check_sgd_step(entry, backend, case, monkeypatch):
    dtype, lr_kind, theta_mode, T = case
    seed = zlib.crc32(f"{backend}/{dtype}/{lr_kind}/{theta_mode}/{T}".encode()) % 10_000  # stable across runs
    check_backend(backend, dtype, T, lr_kind, theta_mode, seed)


# ---- mlp_loss_and_grad and mlp_hvp (one entry: the same problem, both ops) ------------
def _check_mlp(entry, backend, case, monkeypatch):
    dtype, activation, loss, dims = case
    device = "cuda" if backend == "cuda" else "cpu"
    ws, bs, x, y = make_mlp(dims, 3, 11, loss, dtype, device=device)
    g = torch.Generator().manual_seed(1)
    vw = [torch.randn(w.shape, generator=g, dtype=dtype).to(device) for w in ws]
    vb = [torch.randn(b.shape, generator=g, dtype=dtype).to(device) for b in bs]
    before = [t.clone() for t in (*ws, *bs, x, y, *vw, *vb)]
    kw = {"activation": activation, "loss": loss}
    lt, gw, gb = entry.op(ws, bs, x, y, backend=backend, **kw)
    rl, rw, rb = entry.twin(ws, bs, x, y, **kw)
    close("loss", lt, rl, dtype)
    for l in range(len(ws)):
        close(f"grad_w[{l}]", gw[l], rw[l], dtype)
        close(f"grad_b[{l}]", gb[l], rb[l], dtype)
    hw, hb = ops.mlp_hvp(ws, bs, x, y, vw, vb, backend=backend, **kw)
    rhw, rhb = ref.mlp_hvp(ws, bs, x, y, vw, vb, **kw)
    for l in range(len(ws)):
        close(f"hv_w[{l}]", hw[l], rhw[l], dtype)
        close(f"hv_b[{l}]", hb[l], rhb[l], dtype)
    for a, b in zip(before, (*ws, *bs, x, y, *vw, *vb)):
        assert torch.equal(a, b), "an input was modified in place"


# ---- maml_mlp: fused and layer-wise paths ("backends") against the twin, float64 -------
def _check_maml_mlp(entry, path, case, monkeypatch):
    lr_kind, first_order, (activation, loss) = case
    check_maml_mlp([3, 9, 7, 4], 3, 5, 6, 3, lr_kind=lr_kind, first_order=first_order, activation=activation,
                   loss=loss, msl=lr_kind in ("table", "fixed_table", "step_elem"), backend=use_path(path, monkeypatch))


# ---- batch_norm: every level to second order, against F.batch_norm and the twin -------
def _check_batch_norm(entry, backend, case, monkeypatch):
    (shape,) = case
    if backend == "cpu" and _ext._C is None:
        pytest.skip(_ext.IMPORT_ERROR)
    x, w, b = _inputs(shape, mean=3.0)  # a mean far from 0: no cancellation in the statistics
    got = _first_and_second(lambda x, w, b: entry.op(x, w, b, 1e-5, backend=backend), x, w, b)
    want = _first_and_second(_native, x, w, b)
    twin = _first_and_second(lambda x, w, b: entry.twin(x, w, b, 1e-5), x, w, b)
    for i, (a, e, t) in enumerate(zip(got, want, twin)):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10, msg=f"level output {i}")
        torch.testing.assert_close(a, t, rtol=1e-10, atol=1e-10, msg=f"level output {i} vs the twin")


def _name(v) -> str:
    if isinstance(v, torch.dtype):
        return str(v).replace("torch.", "")
    if isinstance(v, (list, tuple)):
        return "-".join(map(_name, v))
    return str(v)


REGISTRY = [
    OpEntry("sgd_step", ops.sgd_step, ref.sgd_step, CPU_BACKENDS,
            list(itertools.product([F64, F32], LR_KINDS, THETA_MODES, [1, 3])), _check_sgd_step),
    OpEntry("mlp_loss_and_grad+mlp_hvp", ops.mlp_loss_and_grad, ref.mlp_loss_and_grad, ["cpu", CUDA],
            list(itertools.product([F64, F32], ["relu", "tanh"], ["mse", "cross_entropy"], DIMS)), _check_mlp),
    OpEntry("maml_mlp", ops.maml_mlp, ref.maml_mlp, PATHS,
            list(itertools.product(["float", "scalar", "fixed_scalar", "table", "fixed_table", "elem", "step_elem",
                                    "mixed_elem"], [False, True],
                                   [("relu", "mse"), ("tanh", "cross_entropy"), ("tanh", "mse"),
                                    ("relu", "cross_entropy")])), _check_maml_mlp),
    OpEntry("batch_norm", ops.batch_norm, ref.batch_norm, ["cpu", "reference"], [(s,) for s in SHAPES],
            _check_batch_norm),
]


def params() -> list:
    """Every (entry, backend, case) as a pytest parameter, carrying the backend's marks."""
    out = []
    for e in REGISTRY:
        for b in e.backends:
            name, marks = (b.values[0], b.marks) if hasattr(b, "values") else (b, ())
            for c in e.cases:
                out.append(pytest.param(e, name, c, marks=marks, id=f"{e.name}-{name}-{_name(c)}"))
    return out
