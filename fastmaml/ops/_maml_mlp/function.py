"""``maml_mlp``: the whole MAML meta-step of an MLP as one differentiable op.

Semantics are those of :func:`fastmaml.reference.maml_mlp` (docs/DESIGN.md §1): shared
initial parameters ``weights[l]: [out_l, in_l]``, ``biases[l]: [out_l]``; support and
query sets ``xs [T, Ns, in]``, ``xq [T, Nq, in]``, ``ys``/``yq`` ``[T, N, out]`` (mse) or
``[T, N]`` int64 labels (cross_entropy); K = ``steps`` inner SGD steps per task; the
meta-loss M = (1/T) Σ_t Σ_k w_k Lq(θ_{t,k}) with ``msl_weights`` w (default: the last
step only). ``lr`` is

- a float (fixed) or a 0-d tensor (one rate; learned when it requires grad),
- a ``[K, 2L]`` tensor (MAML++ per step and per tensor, order W_1, b_1, ...),
- a list of 2L tensors, each ``[*shape]`` (Meta-SGD, per element) or ``[K, *shape]``
  (per step and element).

Gradients flow to weights, biases and tensor learning rates (not to xs/xq/ys/yq or to
msl_weights, which must not require grad). The op is **once-differentiable**: its
backward is the adjoint recursion with explicit Hessian-vector products, not a graph,
so ``backward``/``autograd.grad`` with ``create_graph=True`` through it raises a
RuntimeError.

Three implementations, the reference's numbers (the fused and layer-wise paths compute the
same products in the same order; the factored path associates them differently):

- **fused** (``cpu``, ``cuda``): ONE kernel call per meta-step. When a gradient is
  needed (grad mode on and an input requires grad) the call runs, per task, the K
  inner steps, the query losses and right away the adjoint recursion (K HVPs, second or
  first order), while the task's parameter copies θ_1..θ_K, gradients and activations
  are still in the core's L1/L2 (CPU) or the CTA's shared memory (CUDA); it returns the
  meta-loss and the meta-gradient (summed over tasks in a fixed order: bitwise
  reproducible). ``backward`` then only scales the stored meta-gradient by the incoming
  gradient. Without a gradient the call runs the forward only. On CPU the tasks are
  spread over the OpenMP threads; a call whose threads stalled (wall time above the
  work they did: an oversubscribed machine, where a 2-thread region can wait whole
  scheduler time slices) makes the following calls run on one thread for a while
  (csrc/mlp/mlp_cpu.cpp, ``Oversubscription``); the numbers do not depend on it.
  Limits: at most 8 layers; the per-task workspace
  ``K·PT + (n_g + n_msl)·P + 2PT + 2P + 3K·Ns·Σd + max(3Nq·Σd, 3Ns·Σd + Ns·max d)``
  elements (P parameters, PT = P + Σ|W_l| with the transposed weight copies, Σd the sum
  of the layer widths d_1..d_L, n_g = K when the lr is learned else 1, n_msl the number
  of nonzero MSL weights; see :func:`fastmaml.ops.maml_mlp_fit.fused_workspace_bytes`; the sinusoid MLP at K = 5,
  10 + 10 points, float32: 182 KB) must be at most
  ``maml_mlp_fit.FUSED_CPU_MAX_WORKSPACE_BYTES`` (32 MiB; see :mod:`fastmaml.ops.maml_mlp_fit`)
  on CPU, and at most the device's opt-in shared memory per block (e.g. 227 KiB on
  H100) on CUDA. :func:`fastmaml.ops.maml_mlp_fit.supports` and :func:`~fastmaml.ops.maml_mlp_fit.fits_fused`
  say whether a model fits.
- **layer-wise** (``reference`` and ``triton`` backends, and past the fused limits): a
  Python loop over the K steps (never over tasks) composed of
  :func:`fastmaml.ops.mlp_loss_and_grad`, :func:`fastmaml.ops.sgd_step` and, for the
  adjoint (run in the forward as well, when a gradient is needed),
  :func:`fastmaml.ops.mlp_hvp` (:mod:`fastmaml.ops._maml_mlp.layerwise`).
- **factored** (``cpu`` backend, eager calls, where
  :func:`fastmaml.ops.maml_mlp_fit.prefers_factored` holds: a large MLP, few support points,
  one rate or a per-step table): each task's weights kept as the shared ones plus a low-rank
  correction, one matrix product per layer over all tasks' rows, the meta-gradient by autograd
  through the written-out inner gradients (:mod:`fastmaml.ops._maml_mlp.factored`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from fastmaml import _checks, backends
from fastmaml.ops import maml_mlp_fit
from fastmaml.ops import mlp as mlp_ops
from fastmaml.ops._maml_mlp.config import Cfg, check_lr, default_msl, unpack_dlr
from fastmaml.ops._maml_mlp.factored import run_factored
from fastmaml.ops._maml_mlp.fused import run_fused
from fastmaml.ops._maml_mlp.layerwise import run_layerwise
from fastmaml.ops._maml_mlp.library import maml_mlp_op

# ---- the autograd layer ---------------------------------------------------------------------------
class _MamlMlp(torch.autograd.Function):
    """Inputs: cfg, then the L weights, the L biases and the lr tensors; output: the
    meta-loss. The forward computes the meta-gradient too (the fused adjoint) and hands
    it to setup_context through ``cfg``; backward only scales it."""

    @staticmethod
    def forward(cfg: Cfg, *tensors):
        L = cfg.L
        ws, bs, lrs = tensors[:L], tensors[L:2 * L], tensors[2 * L:]
        if cfg.factored:
            loss, grads, dlr = run_factored(cfg, ws, bs, lrs)
        elif cfg.fused:
            loss, grads, dlr = run_fused(cfg, ws, bs, lrs)
        else:
            loss, grads, dlr = run_layerwise(cfg, ws, bs, lrs)
        cfg.out = (grads, dlr)
        return loss

    @staticmethod
    def setup_context(ctx, inputs, output):
        cfg = inputs[0]
        ctx.grads, ctx.dlr = cfg.out  # meta-gradient in flat order W_1, b_1, ...; lr gradient
        cfg.out = None
        ctx.cfg = cfg
        ctx.flat_shapes = cfg.shapes
        ctx.lr_shapes = [t.shape for t in inputs[1 + 2 * cfg.L:]] if cfg.n_lr_tensors else []
        ctx.used = False
        # autograd's contract: a second backward without retain_graph raises, and so does
        # an input modified in place since the forward (version counters)
        ctx.save_for_backward(*inputs[1:])

    @staticmethod
    def backward(ctx, gloss):
        if torch.is_grad_enabled():
            # create_graph=True: the meta-gradient has no graph (it is the adjoint's result),
            # so a second derivative would silently be missing; refuse clearly instead.
            raise RuntimeError(
                "maml_mlp is once-differentiable: its backward is the fused adjoint recursion, not a graph, "
                "so double backward (create_graph=True through maml_mlp) is not supported")
        cfg = ctx.cfg
        ctx.saved_tensors  # noqa: B018 - raises after a freed graph or an in-place edit of an input
        grads = ctx.grads
        if grads is None:
            raise RuntimeError("maml_mlp: the forward ran without a gradient (no input required grad)")
        # The common case, d(loss) = 1 on the first backward: hand out the stored tensors
        # themselves (autograd may adopt them as .grad, so never twice).
        if ctx.used or gloss.device.type != "cpu" or gloss.item() != 1.0:
            grads = torch._foreach_mul(grads, gloss)
        ctx.used = True
        out = [None, *grads[0::2], *grads[1::2]]
        if ctx.lr_shapes:
            if ctx.dlr is None:
                out += [None] * len(ctx.lr_shapes)
            else:
                out += unpack_dlr(cfg, ctx.dlr, ctx.lr_shapes, ctx.flat_shapes, gloss)
        return tuple(out)


def maml_mlp(
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor],
    xs: torch.Tensor,
    ys: torch.Tensor,
    xq: torch.Tensor,
    yq: torch.Tensor,
    lr,
    *,
    steps: int,
    first_order: bool = False,
    activation: str = "relu",
    loss: str = "mse",
    msl_weights: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """The scalar MAML meta-loss of an MLP; see the module docstring for shapes, lr
    granularities, the two implementations and their limits."""
    out = prepare(weights, biases, xs, ys, xq, yq, lr, steps=steps, first_order=first_order, activation=activation,
                  loss=loss, msl_weights=msl_weights, backend=backend)
    return out if isinstance(out, torch.Tensor) else launch(*out)


def prepare(weights, biases, xs, ys, xq, yq, lr, *, steps, first_order=False, activation="relu", loss="mse",
            msl_weights=None, backend=None) -> torch.Tensor | tuple:
    """``maml_mlp``'s checks and configuration: ``(cfg, weights, biases, lr tensors)`` for
    :func:`launch`, or (traced by Dynamo) the meta-loss itself."""
    mlp_ops.check_activation_loss(activation, loss)
    K = _checks.positive_int("steps", steps)
    ws, bs, dims, dtype, device = mlp_ops.check_layers(weights, biases, per_task=False)
    eager = not torch.compiler.is_compiling()  # compiled: the data-dependent checks run inside the op
    xs, ys, T, Ns = mlp_ops.check_data("xs", xs, "ys", ys, T=None, dims=dims, loss=loss, dtype=dtype, device=device,
                                       check_labels=eager)
    xq, yq, _, Nq = mlp_ops.check_data("xq", xq, "yq", yq, T=T, dims=dims, loss=loss, dtype=dtype, device=device,
                                       check_labels=eager)
    for name, t in (("xs", xs), ("xq", xq), ("ys", ys), ("yq", yq)):
        if t.requires_grad:
            raise ValueError(f"{name} requires grad: maml_mlp differentiates with respect to weights, biases and lr only")
    L = len(ws)
    shapes = [p.shape for pair in zip(ws, bs) for p in pair]
    lr_kind, lr_value, lrs = check_lr(lr, K, shapes, dtype, device)
    if msl_weights is None:
        msl = default_msl(K, dtype, device) if eager else None  # compiled: the op builds it
        msl_list = [0.0] * (K - 1) + [1.0]
    else:
        msl_weights = _checks.tensor("msl_weights", msl_weights)
        if msl_weights.requires_grad:
            raise ValueError("msl_weights must not require grad (maml_mlp gives no gradient for them)")
        _checks.shape("msl_weights", msl_weights, (K,))
        _checks.same_device("msl_weights", msl_weights, device)
        if not msl_weights.is_floating_point():
            raise TypeError(f"msl_weights must be a float tensor, got {msl_weights.dtype}")
        msl = msl_weights.detach().to(dtype).contiguous()
        msl_list = [] if not eager else [float(w) for w in msl.tolist()]
    be = _resolve_cached(backend, device)
    need_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (*ws, *bs, *lrs))
    lr_learned = need_grad and any(t.requires_grad for t in lrs)
    if not eager and be != "reference":
        # One opaque node for Dynamo/AOTAutograd (fastmaml::maml_mlp); the op decides
        # fused vs layer-wise itself and checks the data's finiteness in the graph. The
        # reference backend (autograd inside) is traced as plain torch code instead.
        out, _, _ = maml_mlp_op(list(ws), list(bs), xs, ys, xq, yq, list(lrs), msl, K, bool(first_order),
                                activation, loss, lr_kind, float(lr_value), need_grad, lr_learned, be, True,
                                msl_list if msl_weights is None else None)  # host values: capture-safe
        return out
    if msl is None:  # traced on the reference backend: plain torch code
        msl = default_msl(K, dtype, device)
    n_msl = sum(1 for w in msl_list if w != 0.0)
    factored = maml_mlp_fit.prefers_factored(dims, K, Ns, lr_kind, be, device)[0]
    fused = not factored and be in ("cpu", "cuda") and maml_mlp_fit.fits_cached(dims, K, Ns, Nq, dtype, device,
                                                                                lr_learned, n_msl, be)
    cfg = Cfg(dims, L, T, K, Ns, Nq, activation, loss, dtype, device, xs, ys, xq, yq, msl, msl_list, lr_kind,
               lr_value, len(lrs), bool(first_order), need_grad, be, fused, n_msl, shapes, factored)
    return cfg, ws, bs, lrs


def launch(cfg: Cfg, ws, bs, lrs) -> torch.Tensor:
    """The meta-loss of a configuration from :func:`prepare` (or :func:`relaunch`)."""
    if torch._C._are_functorch_transforms_active():
        return _MamlMlp.apply(cfg, *ws, *bs, *lrs)
    # The C++ apply directly: Function.apply's Python wrapper re-binds the arguments with
    # inspect.signature on every call (tens of µs), for nothing here.
    return _APPLY(cfg, *ws, *bs, *lrs)


def relaunch(cfg0: Cfg, ws, bs, lrs, xs, ys, xq, yq, lr_value: float, first_order: bool) -> torch.Tensor:
    """:func:`launch` of ``cfg0`` (from :func:`prepare`) on new data, a new fixed rate and
    order: the caller guarantees that every other input ``prepare`` read is as it was
    (shapes, dtypes, devices, contiguity, requires_grad, grad mode, backend; see
    :mod:`fastmaml.maml.mlp_replay`) and that the data, parameters and rates are finite."""
    cfg = cfg0.replaced(xs=xs, ys=ys, xq=xq, yq=yq, lr_value=lr_value, first_order=first_order, out=None)
    return launch(cfg, ws, bs, lrs)


_APPLY = super(torch.autograd.Function, _MamlMlp).apply
_RESOLVE_CACHE: dict = {}


def _resolve_cached(backend, device: torch.device) -> str:
    """``backends.resolve`` for this op, remembered per (request, device, and the
    FASTMAML_BACKEND environment variable when no backend is named). Triton on CPU (which
    depends on TRITON_INTERPRET) is not remembered; a request it refuses raises every time."""
    if torch.compiler.is_compiling():  # no cache fill while traced (it would cost a recompile)
        return backends.resolve(backend, device, "maml_mlp")
    key = (backend, device, os.environ.get("FASTMAML_BACKEND") if backend is None else None)
    be = _RESOLVE_CACHE.get(key)
    if be is None:
        be = backends.resolve(backend, device, "maml_mlp")
        if be != "triton" or device.type != "cpu":
            if len(_RESOLVE_CACHE) > 64:
                _RESOLVE_CACHE.clear()
            _RESOLVE_CACHE[key] = be
    return be


__all__ = ["maml_mlp", "prepare", "launch", "relaunch"]
