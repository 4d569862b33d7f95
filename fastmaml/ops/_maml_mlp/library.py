"""``torch.ops.fastmaml.maml_mlp``: the meta-step as a ``torch.library`` custom op.

Eager calls of :func:`fastmaml.ops.maml_mlp` keep their lean ``autograd.Function``
(:mod:`fastmaml.ops._maml_mlp.function`); under ``torch.compile`` (and wherever an
opaque, schema-described op is wanted) the same kernels run behind this op, so Dynamo
puts ONE node in the graph instead of breaking at the pybind call, and AOTAutograd
compiles the backward through :func:`_backward` (docs/DESIGN.md §7).

Schema: the data and parameters are tensors, every knob a primitive (the backend a
string — ``cpu``, ``cuda`` or ``triton``; the reference backend differentiates with autograd
inside, which an op's implementation cannot, so it is traced as plain torch code — device only picks the default, so ``backend="cuda"`` on CPU tensors in an
emulated build and the Triton interpreter keep working). Outputs: the meta-loss (0-d),
the meta-gradient (2L tensors in flat order W_1, b_1, ..., empty when ``need_grad`` is
False) and the lr gradient (one flat tensor, empty list when no lr tensor is given or no
gradient is needed). Nothing is mutated, no output aliases an input.

The finiteness policy (docs/DESIGN.md §5) stays on: with ``check_finite`` the op itself
scans xs, ys, xq and yq and raises ValueError naming the first non-finite one, so a
compiled graph keeps the check without a data-dependent branch in Python.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastmaml import _ext, codes
from fastmaml.ops import maml_mlp_fit, mlp_library
from fastmaml.ops._maml_mlp.config import Cfg, default_msl
from fastmaml.ops._maml_mlp.fused import run_fused
from fastmaml.ops._maml_mlp.layerwise import run_layerwise


def check_finite_tensors(names: list[str], tensors: list[Tensor]) -> None:
    """ValueError naming the first float tensor holding NaN/Inf. Contiguous CPU tensors of
    one dtype: ONE call into the extension for all of them (a few µs, as the eager
    path's check; four torch reductions cost ~0.1 ms, a tenth of a compiled sinusoid
    step), the exact check only on the tensor it reports; otherwise one reduction each
    (a device-side assert while a CUDA graph is captured)."""
    floats = [(n, t) for n, t in zip(names, tensors) if t.is_floating_point() and t.numel()]
    C = _ext._C
    if (floats and C is not None and hasattr(C, "first_nonfinite_cpu") and floats[0][1].dtype in codes.DTYPE
            and all(t.device.type == "cpu" and t.dtype == floats[0][1].dtype and t.is_contiguous()
                    for _, t in floats)):
        i = C.first_nonfinite_cpu(codes.DTYPE[floats[0][1].dtype], [t.data_ptr() for _, t in floats],
                                  [t.numel() for _, t in floats])
        if i < 0:
            return
        floats = [floats[i]]
    for name, t in floats:
        mlp_library.check_finite(name, t)


def _dlr_numel(lr_kind: str, K: int, shapes: list, lrs: list[Tensor]) -> int:
    if lr_kind == "scalar":
        return 1
    if lr_kind == "table":
        return K * len(shapes)
    P = sum(s.numel() for s in shapes)
    per_step = any(a.shape != shp for a, shp in zip(lrs, shapes))
    return K * P if per_step else P


def _has_dlr(lr_kind: str, lrs: list[Tensor], need_grad: bool) -> bool:
    return need_grad and bool(lrs) and lr_kind != "float"


@torch.library.custom_op("fastmaml::maml_mlp", mutates_args=())
def maml_mlp_op(weights: list[Tensor], biases: list[Tensor], xs: Tensor, ys: Tensor, xq: Tensor, yq: Tensor,
                lrs: list[Tensor], msl: Tensor | None, steps: int, first_order: bool, activation: str, loss: str,
                lr_kind: str, lr_value: float, need_grad: bool, lr_learned: bool, backend: str,
                check_finite: bool, msl_host: list[float] | None) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """The meta-loss, meta-gradient and lr gradient of ``fastmaml.ops.maml_mlp`` for
    checked arguments (the public function checks them before calling the op).
    ``msl_host``: msl's values when the caller knows them on the host (the default
    last-step weights), so the op reads nothing back from the device (capture-safe);
    None: read from ``msl``. ``msl`` None: the default last-step weights, built (once,
    cached) here, so a compiled graph holds no generated kernel for them (each such
    kernel is a C++ compile of seconds at the first call)."""
    if backend == "reference":
        raise ValueError("fastmaml::maml_mlp runs the kernels (backend 'cpu', 'cuda' or 'triton'), got backend "
                         "'reference': call fastmaml.reference.maml_mlp (plain torch code) instead")
    if check_finite:
        check_finite_tensors(["xs", "ys", "xq", "yq"], [xs, ys, xq, yq])
    if loss == "cross_entropy":
        for name, y in (("ys", ys), ("yq", yq)):
            mlp_library.check_labels(name, y, int(weights[-1].shape[0]))
    ws = [w.contiguous() for w in weights]
    bs = [b.contiguous() for b in biases]
    xs, ys, xq, yq = xs.contiguous(), ys.contiguous(), xq.contiguous(), yq.contiguous()
    L = len(ws)
    dims = [ws[0].shape[1], *[w.shape[0] for w in ws]]
    T, Ns, Nq = xs.shape[0], xs.shape[1], xq.shape[1]
    dtype, device = ws[0].dtype, ws[0].device
    msl = default_msl(steps, dtype, device) if msl is None else msl.contiguous()
    msl_list = [float(w) for w in (msl.tolist() if msl_host is None else msl_host)]
    n_msl = sum(1 for w in msl_list if w != 0.0)
    shapes = [p.shape for pair in zip(ws, bs) for p in pair]
    # Never the factored path here: it differentiates with autograd, which does not record
    # inside a custom op's implementation (the dispatcher runs it below the autograd keys).
    fused = backend in ("cpu", "cuda") and maml_mlp_fit.fits_cached(dims, steps, Ns, Nq, dtype, device, lr_learned,
                                                                    n_msl, backend)
    cfg = Cfg(dims, L, T, steps, Ns, Nq, activation, loss, dtype, device, xs, ys, xq, yq, msl, msl_list, lr_kind,
              lr_value, len(lrs), bool(first_order), bool(need_grad), backend, fused, n_msl, shapes)
    out, grads, dlr = run_fused(cfg, ws, bs, lrs, lr_learned) if fused else run_layerwise(cfg, ws, bs, lrs)
    grads_out = [g.contiguous() for g in grads] if need_grad and grads is not None else []
    dlr_out: list[Tensor] = []
    if _has_dlr(lr_kind, lrs, need_grad):
        dlr_out = [dlr.reshape(-1).clone() if dlr is not None else
                   torch.zeros(_dlr_numel(lr_kind, steps, shapes, lrs), dtype=dtype, device=device)]
    return out.clone() if out._base is not None else out, grads_out, dlr_out


@maml_mlp_op.register_fake
def _fake(weights, biases, xs, ys, xq, yq, lrs, msl, steps, first_order, activation, loss, lr_kind, lr_value,
          need_grad, lr_learned, backend, check_finite, msl_host):
    w0 = weights[0]
    out = w0.new_empty(())
    grads = [torch.empty_like(p) for pair in zip(weights, biases) for p in pair] if need_grad else []
    shapes = [p.shape for pair in zip(weights, biases) for p in pair]
    dlr = ([w0.new_empty(_dlr_numel(lr_kind, steps, shapes, lrs))] if _has_dlr(lr_kind, lrs, need_grad) else [])
    return out, grads, dlr


def _setup_context(ctx, inputs, output):
    weights, biases, lrs, steps, lr_kind = inputs[0], inputs[1], inputs[6], inputs[8], inputs[12]
    _, grads, dlr = output
    ctx.K, ctx.lr_kind = steps, lr_kind
    ctx.lr_per_step = [a.dim() > 0 and a.shape != p.shape for a, p in
                       zip(lrs, [p for pair in zip(weights, biases) for p in pair])] if lr_kind == "elem" else []
    ctx.n_lr, ctx.n_grads = len(lrs), len(grads)
    ctx.save_for_backward(*grads, *dlr)


def _backward(ctx, gloss, _ggrads, _gdlr):
    """d(loss) scales the stored meta-gradient (the op is once-differentiable: the
    meta-gradient is the adjoint recursion's result, not a graph). The scaling runs in
    ONE opaque op, :func:`maml_mlp_backward_op`: left to the compiler, the handful of
    small multiplies became a generated kernel with its own OpenMP parallel region, which
    right after the fused kernel's region cost tens of ms per step on a loaded 2-core CPU
    (the eager backward hands the stored tensors out as they are)."""
    saved = ctx.saved_tensors
    if not ctx.n_grads:
        raise RuntimeError("fastmaml::maml_mlp: the forward ran without a gradient (need_grad=False)")
    grads, dlr = list(saved[: ctx.n_grads]), list(saved[ctx.n_grads:])
    g, dlrs = maml_mlp_backward_op(grads, dlr, gloss, ctx.lr_kind, ctx.K, ctx.lr_per_step)
    dlrs = dlrs if dlrs else [None] * ctx.n_lr
    return (g[0::2], g[1::2], None, None, None, None, dlrs, *[None] * 12)


def _dlr_split(g: Tensor, dlr: Tensor, lr_kind: str, K: int, lr_per_step: list[bool], shapes: list) -> list[Tensor]:
    """The flat lr gradient ``dlr`` times ``g``, in the lr tensors' shapes (see
    ``config.unpack_dlr``; a shared rate of a per-step packing sums over the steps)."""
    if lr_kind == "scalar":
        return [(dlr[0] * g).reshape(())]
    if lr_kind == "table":
        return [(dlr * g).view(K, len(shapes))]
    per_step = dlr.numel() != sum(s.numel() for s in shapes)
    flat = dlr.view(K, -1) if per_step else dlr
    out, off = [], 0
    for step_lr, shp in zip(lr_per_step, shapes):
        n = shp.numel()
        if per_step:
            blk = flat[:, off:off + n].reshape(K, *shp)
            out.append(blk * g if step_lr else blk.sum(0) * g)
        else:
            out.append(flat[off:off + n].reshape(shp) * g)
        off += n
    return out


@torch.library.custom_op("fastmaml::maml_mlp_backward", mutates_args=())
def maml_mlp_backward_op(grads: list[Tensor], dlr: list[Tensor], gloss: Tensor, lr_kind: str, steps: int,
                         lr_per_step: list[bool]) -> tuple[list[Tensor], list[Tensor]]:
    """``fastmaml::maml_mlp``'s backward: the stored meta-gradient ``grads`` (flat order
    W_1, b_1, ...) times the 0-d ``gloss``, and the stored flat lr gradient ``dlr`` (empty
    list: none) times ``gloss`` in the lr tensors' shapes (``lr_per_step``: per ``elem``
    rate, whether it has a leading step axis). New tensors (no output aliases an input)."""
    g = torch._foreach_mul(grads, gloss) if grads else []
    shapes = [t.shape for t in grads]
    return g, (_dlr_split(gloss, dlr[0], lr_kind, steps, lr_per_step, shapes) if dlr else [])


@maml_mlp_backward_op.register_fake
def _fake_backward(grads, dlr, gloss, lr_kind, steps, lr_per_step):
    g = [torch.empty_like(t) for t in grads]
    if not dlr:
        return g, []
    if lr_kind == "scalar":
        return g, [gloss.new_empty(())]
    if lr_kind == "table":
        return g, [gloss.new_empty((steps, len(grads)))]
    return g, [gloss.new_empty((steps, *t.shape) if s else t.shape) for s, t in zip(lr_per_step, grads)]


def _backward_of_backward(ctx, *_):
    raise RuntimeError("maml_mlp is once-differentiable: its backward is the fused adjoint recursion, not a graph, "
                       "so double backward (create_graph=True through maml_mlp) is not supported")


maml_mlp_backward_op.register_autograd(_backward_of_backward)
maml_mlp_op.register_autograd(_backward, setup_context=_setup_context)


__all__ = ["maml_mlp_op", "maml_mlp_backward_op", "check_finite_tensors"]
