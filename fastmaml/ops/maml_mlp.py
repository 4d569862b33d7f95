"""``maml_mlp``: the whole MAML meta-step of an MLP as one differentiable op.

Semantics are those of :func:`fastmaml.reference.maml_mlp` (DESIGN.md §1): shared
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

Two implementations, same numbers:

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
  (csrc/mlp_cpu.cpp, ``Oversubscription``); the numbers do not depend on it.
  Limits: at most 8 layers; the per-task workspace
  ``K·PT + (n_g + n_msl)·P + 2PT + 2P + 3K·Ns·Σd + max(3Nq·Σd, 3Ns·Σd + Ns·max d)``
  elements (P parameters, PT = P + Σ|W_l| with the transposed weight copies, Σd the sum
  of the layer widths d_1..d_L, n_g = K when the lr is learned else 1, n_msl the number
  of nonzero MSL weights; see :func:`fused_workspace_bytes`; the sinusoid MLP at K = 5,
  10 + 10 points, float32: 182 KB) must be at most
  ``FUSED_CPU_MAX_WORKSPACE_BYTES`` (4 MiB, a few times the 1 MiB L2 of the target CPU)
  on CPU, and at most the device's opt-in shared memory per block (e.g. 227 KiB on
  H100) on CUDA. :func:`supports` and :func:`fits_fused` say whether a model fits.
- **layer-wise** (``reference`` and ``triton`` backends, and past the fused limits): a
  Python loop over the K steps (never over tasks) composed of
  :func:`fastmaml.ops.mlp_loss_and_grad`, :func:`fastmaml.ops.sgd_step` and, for the
  adjoint (run in the forward as well, when a gradient is needed),
  :func:`fastmaml.ops.mlp_hvp`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fastmaml import _checks, backends
from fastmaml._ext import ext
from fastmaml.ops import mlp as mlp_ops
from fastmaml.ops.mlp import _ACT_CODE, _DTYPE_CODE, _LOSS_CODE, MAX_LAYERS

FUSED_CPU_MAX_WORKSPACE_BYTES = 4 << 20

LR_SCALAR, LR_TABLE, LR_ELEM, LR_STEP_ELEM = 0, 1, 2, 3


# ---- limits ---------------------------------------------------------------------------------
def fused_workspace_bytes(dims: Sequence[int], steps: int, n_support: int, n_query: int, dtype=torch.float32, *,
                          lr_learned: bool = False, n_msl: int = 1) -> int:
    """Bytes of the per-task workspace of the fused kernel (CPU: per thread; CUDA: shared
    memory per CTA). ``lr_learned``: the K support gradients are kept for dα; ``n_msl``:
    the number of steps with a nonzero multi-step-loss weight (1 for plain MAML)."""
    L = len(dims) - 1
    P = sum(dims[l + 1] * dims[l] + dims[l + 1] for l in range(L))
    sd = sum(dims[1:])
    PT = P + sum(dims[l + 1] * dims[l] for l in range(L))  # with transposed weight copies
    n_g = steps if lr_learned else 1
    # = csrc/mlp.h maml_workspace_size
    elems = (steps * PT + (n_g + n_msl) * P + steps * 3 * n_support * sd
             + max(3 * n_query * sd, 3 * n_support * sd + n_support * max(dims)) + 2 * PT + 2 * P)
    return elems * torch.empty((), dtype=dtype).element_size()


def _cuda_smem_limit(device: torch.device) -> int:
    idx = device.index if device.index is not None else torch.cuda.current_device()
    # the launcher adds a 16-element margin to the workspace: keep 256 bytes spare
    return int(ext().maml_mlp_cuda_smem_limit(idx)) - 256


def fused_limits(device: torch.device | str = "cpu") -> dict:
    """The fused path's limits on ``device``: ``max_layers`` and ``max_workspace_bytes``
    (per task)."""
    device = torch.device(device)
    if device.type == "cuda":
        return {"max_layers": MAX_LAYERS, "max_workspace_bytes": _cuda_smem_limit(device)}
    return {"max_layers": MAX_LAYERS, "max_workspace_bytes": FUSED_CPU_MAX_WORKSPACE_BYTES}


def fits_fused(dims: Sequence[int], steps: int, n_support: int, n_query: int, *, dtype=torch.float32,
               device: torch.device | str = "cpu", lr_learned: bool = False, n_msl: int = 1) -> tuple[bool, str]:
    """Whether an MLP of widths ``dims`` fits the fused kernel; (ok, reason)."""
    L = len(dims) - 1
    lim = fused_limits(device)
    if L < 1 or L > lim["max_layers"]:
        return False, f"{L} layers (the fused kernel takes 1..{lim['max_layers']})"
    need = fused_workspace_bytes(dims, steps, n_support, n_query, dtype, lr_learned=lr_learned, n_msl=n_msl)
    if need > lim["max_workspace_bytes"]:
        return False, (f"per-task workspace of {need} bytes exceeds the fused limit of "
                       f"{lim['max_workspace_bytes']} bytes on {torch.device(device).type}")
    return True, f"fits: per-task workspace {need} of {lim['max_workspace_bytes']} bytes"


def mlp_structure(model: torch.nn.Module) -> tuple[list[int], str] | str:
    """``([d_0, ..., d_L], activation)`` of an ``nn.Sequential`` of ``nn.Linear`` (with
    bias) alternating with one kind of activation (``nn.ReLU`` or ``nn.Tanh``) and ending
    in ``nn.Linear``, or a string saying why ``model`` is not such an MLP."""
    if not isinstance(model, (torch.nn.Sequential, torch.nn.Linear)):
        return f"model is a {type(model).__name__}, not an nn.Sequential of nn.Linear and ReLU/Tanh"
    mods = list(model.children()) if isinstance(model, torch.nn.Sequential) else [model]
    dims: list[int] = []
    acts = set()
    for i, m in enumerate(mods):
        if i % 2 == 0:
            if not isinstance(m, torch.nn.Linear):
                return f"layer {i} is {type(m).__name__}, expected nn.Linear"
            if m.bias is None:
                return f"layer {i}: nn.Linear without bias is not supported by the fused path"
            if not dims:
                dims.append(m.in_features)
            elif m.in_features != dims[-1]:
                return f"layer {i} takes {m.in_features} inputs, previous layer gives {dims[-1]}"
            dims.append(m.out_features)
        elif isinstance(m, torch.nn.ReLU):
            acts.add("relu")
        elif isinstance(m, torch.nn.Tanh):
            acts.add("tanh")
        else:
            return f"layer {i} is {type(m).__name__}, expected nn.ReLU or nn.Tanh"
    if not mods or not isinstance(mods[-1], torch.nn.Linear):
        return "the model must end with nn.Linear"
    if len(acts) > 1:
        return "mixed activations (ReLU and Tanh) are not supported by the fused path"
    return dims, (acts.pop() if acts else "relu")


def supports(model_or_dims, activation: str | None = None, loss: str = "mse", *, steps: int = 5,
             n_support: int = 10, n_query: int = 10, dtype=torch.float32, device: torch.device | str = "cpu",
             lr_learned: bool = False, n_msl: int = 1) -> tuple[bool, str]:
    """Whether the fused MLP path applies; returns (ok, reason).

    ``model_or_dims``: an MLP module (see :func:`mlp_structure`) or the list of widths
    ``[d_0, ..., d_L]`` (then ``activation`` names the activation).
    """
    dims: list[int]
    if isinstance(model_or_dims, torch.nn.Module):
        parsed = mlp_structure(model_or_dims)
        if isinstance(parsed, str):
            return False, parsed
        dims, model_act = parsed
        if activation is not None and activation != model_act:
            return False, f"activation {activation!r} does not match the model's {model_act!r}"
        activation = model_act
    else:
        dims = [int(d) for d in model_or_dims]
        activation = activation or "relu"
    if activation not in _ACT_CODE:
        return False, f"activation {activation!r} is not one of {tuple(_ACT_CODE)}"
    if loss not in _LOSS_CODE:
        return False, f"loss {loss!r} is not one of {tuple(_LOSS_CODE)}"
    return fits_fused(dims, steps, n_support, n_query, dtype=dtype, device=device, lr_learned=lr_learned,
                      n_msl=n_msl)


# ---- input handling ---------------------------------------------------------------------------
@dataclass
class _Cfg:
    dims: list[int]
    L: int
    T: int
    K: int
    Ns: int
    Nq: int
    act: str
    loss: str
    dtype: torch.dtype
    device: torch.device
    xs: torch.Tensor
    ys: torch.Tensor
    xq: torch.Tensor
    yq: torch.Tensor
    msl: torch.Tensor  # [K] weights, dtype/device of the data
    msl_list: list[float]
    lr_kind: str  # "float" | "scalar" | "table" | "elem"
    lr_value: float
    n_lr_tensors: int
    first_order: bool
    need_grad: bool
    backend: str
    fused: bool
    n_msl: int
    shapes: list  # parameter shapes in flat order W_1, b_1, ...
    out: tuple | None = None  # (meta-gradient, lr gradient) from forward to setup_context


_MSL_CACHE: dict = {}


def _default_msl(K: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    key = (K, dtype, device)
    t = _MSL_CACHE.get(key)
    if t is None:
        t = torch.zeros(K, dtype=dtype, device=device)
        t[-1] = 1.0
        _MSL_CACHE[key] = t
    return t


def _check_lr(lr, K: int, shapes: list[torch.Size], dtype, device) -> tuple[str, float, list[torch.Tensor]]:
    n = len(shapes)
    if isinstance(lr, bool):
        raise TypeError("lr must be a float, a tensor or a list of tensors, got bool")
    if isinstance(lr, (int, float)):
        return "float", float(lr), []
    if isinstance(lr, torch.Tensor):
        _checks.float_dtype("lr", lr, dtype)
        _checks.same_device("lr", lr, device)
        if lr.dim() == 0:
            return "scalar", 0.0, [lr]
        if tuple(lr.shape) != (K, n):
            raise ValueError(f"lr must be a 0-d tensor or a [steps, 2L] = [{K}, {n}] table, got shape {tuple(lr.shape)}")
        return "table", 0.0, [lr]
    if isinstance(lr, Sequence) and not isinstance(lr, str):
        if len(lr) != n:
            raise ValueError(f"lr as a list must hold 2L = {n} tensors (W_1, b_1, ...), got {len(lr)}")
        out = []
        for i, (a, shp) in enumerate(zip(lr, shapes)):
            a = _checks.tensor(f"lr[{i}]", a)
            _checks.float_dtype(f"lr[{i}]", a, dtype)
            _checks.same_device(f"lr[{i}]", a, device)
            if tuple(a.shape) != tuple(shp) and tuple(a.shape) != (K, *shp):
                raise ValueError(f"lr[{i}] must have shape {tuple(shp)} or {(K, *shp)}, got {tuple(a.shape)}")
            out.append(a)
        return "elem", 0.0, out
    raise TypeError(f"lr must be a float, a tensor or a list of tensors, got {type(lr).__name__}")


def _pack_lr(cfg: _Cfg, lrs: Sequence[torch.Tensor], shapes) -> tuple[int, torch.Tensor | None, bool]:
    """(lr_mode, packed lr tensor or None, per_step) for the fused kernel."""
    if cfg.lr_kind == "float":
        return LR_SCALAR, None, False
    if cfg.lr_kind == "scalar":
        return LR_SCALAR, lrs[0].detach().reshape(1).contiguous(), False
    if cfg.lr_kind == "table":
        return LR_TABLE, lrs[0].detach().contiguous(), False
    per_step = any(a.shape != shp for a, shp in zip(lrs, shapes))
    if per_step:
        K = cfg.K
        flat = torch.cat([(a if a.shape != shp else a.unsqueeze(0).expand(K, *shp)).detach().reshape(K, -1)
                          for a, shp in zip(lrs, shapes)], dim=1)
        return LR_STEP_ELEM, flat.contiguous(), True
    return LR_ELEM, torch.cat([a.detach().reshape(-1) for a in lrs]).contiguous(), False


def _unpack_dlr(cfg: _Cfg, dlr: torch.Tensor, lr_shapes, shapes, g: torch.Tensor):
    if cfg.lr_kind == "scalar":
        return [(dlr[0] * g).reshape(())]
    if cfg.lr_kind == "table":
        return [(dlr * g).view(cfg.K, 2 * cfg.L)]
    out = []
    per_step = dlr.dim() == 2
    off = 0
    for ashape, shp in zip(lr_shapes, shapes):
        n = shp.numel()
        if per_step:
            blk = dlr[:, off:off + n].reshape(cfg.K, *shp)
            out.append(blk * g if ashape != shp else blk.sum(0) * g)
        else:
            out.append(dlr[off:off + n].view(shp) * g)
        off += n
    return out


# ---- fused path -------------------------------------------------------------------------------
def _run_fused(cfg: _Cfg, ws, bs, lrs):
    lr_mode, lr_t, _ = _pack_lr(cfg, lrs, cfg.shapes)
    lr_learned = cfg.need_grad and len(lrs) > 0
    n_lr = lr_t.numel() if (lr_learned and lr_t is not None) else 0
    dtype, device = cfg.dtype, cfg.device
    loss = torch.empty((), dtype=dtype, device=device)
    # the meta-gradient is written straight into tensors of the parameters' shapes
    grads = [torch.empty_like(p) for pair in zip(ws, bs) for p in pair] if cfg.need_grad else None
    dlr = torch.empty(n_lr, dtype=dtype, device=device) if n_lr else None
    args = [_DTYPE_CODE[dtype], cfg.dims, _ACT_CODE[cfg.act], _LOSS_CODE[cfg.loss], cfg.T, cfg.K, cfg.Ns, cfg.Nq,
            [w.data_ptr() for w in ws], [b.data_ptr() for b in bs], cfg.xs.data_ptr(), cfg.ys.data_ptr(),
            cfg.xq.data_ptr(), cfg.yq.data_ptr(), lr_mode, 0 if lr_t is None else lr_t.data_ptr(), cfg.lr_value,
            cfg.msl.data_ptr(), cfg.first_order, cfg.need_grad, n_lr, *([cfg.n_msl] if cfg.backend == "cuda" else []),
            loss.data_ptr(),
            [g.data_ptr() for g in grads] if grads is not None else [], dlr.data_ptr() if dlr is not None else 0]
    if cfg.backend == "cpu":
        ext().maml_mlp_cpu(*args)
    else:
        P = sum(s.numel() for s in cfg.shapes)
        partials = torch.empty(cfg.T * (1 + (P + n_lr if cfg.need_grad else 0)), dtype=dtype, device=device)
        with torch.cuda.device(device):
            ext().maml_mlp_cuda(*args, partials.data_ptr(), torch.cuda.current_stream(device).cuda_stream)
    if lr_mode == LR_STEP_ELEM and n_lr:
        dlr = dlr.view(cfg.K, -1)
    return loss, grads, dlr


# ---- layer-wise path ----------------------------------------------------------------------------
def _lr_row(cfg: _Cfg, lrs, k: int, shapes):
    """The lr of step k in ops.sgd_step's form."""
    if cfg.lr_kind == "float":
        return cfg.lr_value
    if cfg.lr_kind == "scalar":
        return lrs[0].detach()
    if cfg.lr_kind == "table":
        return lrs[0].detach()[k]
    return [(a if a.shape == shp else a[k]).detach() for a, shp in zip(lrs, shapes)]


def _run_layerwise(cfg: _Cfg, ws, bs, lrs):
    from fastmaml.ops.sgd_step import sgd_step  # noqa: PLC0415

    be = cfg.backend
    L, K, T = cfg.L, cfg.K, cfg.T
    shapes = [p.shape for pair in zip(ws, bs) for p in pair]
    kw = {"activation": cfg.act, "loss": cfg.loss, "backend": be}
    th = [p.detach().unsqueeze(0).expand(T, *p.shape).contiguous() for pair in zip(ws, bs) for p in pair]
    thetas, grads, gqs = [], [], {}
    meta = torch.zeros((), dtype=cfg.dtype, device=cfg.device)
    for k in range(K):
        thetas.append(th)
        _, gw, gb = mlp_ops.mlp_loss_and_grad(th[0::2], th[1::2], cfg.xs, cfg.ys, **kw)
        g = [t for pair in zip(gw, gb) for t in pair]
        grads.append(g)
        th = [t.contiguous() for t in sgd_step(th, g, _lr_row(cfg, lrs, k, shapes))]
        w = cfg.msl_list[k]
        if w != 0.0:
            lq, qw, qb = mlp_ops.mlp_loss_and_grad(th[0::2], th[1::2], cfg.xq, cfg.yq, **kw)
            meta = meta + w * lq.mean()
            gqs[k] = [t for pair in zip(qw, qb) for t in pair]
    if not cfg.need_grad:
        return meta, None, None
    # adjoint (DESIGN.md §1), per task, batched over tasks
    v = [torch.zeros_like(t) for t in th]
    dl = _dlr_init(cfg, lrs, shapes)
    for k in range(K - 1, -1, -1):
        if k in gqs:
            w = cfg.msl_list[k] / T
            v = [vi + w * gi for vi, gi in zip(v, gqs[k])]
        g = grads[k]
        if dl is not None:
            _dlr_add(cfg, dl, k, g, v, shapes)
        if not cfg.first_order:
            lr_k = _lr_row(cfg, lrs, k, shapes)
            u = [(_lr_of(lr_k, i) * vi).contiguous() for i, vi in enumerate(v)]
            hw, hb = mlp_ops.mlp_hvp(thetas[k][0::2], thetas[k][1::2], cfg.xs, cfg.ys, u[0::2], u[1::2], **kw)
            hv = [t for pair in zip(hw, hb) for t in pair]
            v = [vi - hi for vi, hi in zip(v, hv)]
    return meta, [vi.sum(0) for vi in v], dl


def _lr_of(lr_k, i: int):
    if isinstance(lr_k, (int, float)):
        return lr_k
    if isinstance(lr_k, torch.Tensor):
        return lr_k if lr_k.dim() == 0 else lr_k[i]
    return lr_k[i]


def _dlr_init(cfg: _Cfg, lrs, shapes):
    if not lrs or cfg.lr_kind == "float":
        return None
    P = sum(s.numel() for s in shapes)
    if cfg.lr_kind == "scalar":
        return torch.zeros(1, dtype=cfg.dtype, device=cfg.device)
    if cfg.lr_kind == "table":
        return torch.zeros(cfg.K * 2 * cfg.L, dtype=cfg.dtype, device=cfg.device)
    per_step = any(a.shape != shp for a, shp in zip(lrs, shapes))
    return torch.zeros((cfg.K, P) if per_step else (P,), dtype=cfg.dtype, device=cfg.device)


def _dlr_add(cfg: _Cfg, dl: torch.Tensor, k: int, g, v, shapes) -> None:
    """dM/dα_k += −Σ_t g_{t,k} ⊙ v_{t,k+1}, reduced to the lr's granularity."""
    prods = [-(gi * vi).sum(0) for gi, vi in zip(g, v)]
    if cfg.lr_kind == "scalar":
        dl[0] += sum(p.sum() for p in prods)
    elif cfg.lr_kind == "table":
        for i, p in enumerate(prods):
            dl[k * 2 * cfg.L + i] += p.sum()
    else:
        flat = torch.cat([p.reshape(-1) for p in prods])
        if dl.dim() == 2:
            dl[k] += flat
        else:
            dl += flat


# ---- the autograd layer ---------------------------------------------------------------------------
class _MamlMlp(torch.autograd.Function):
    """Inputs: cfg, then the L weights, the L biases and the lr tensors; output: the
    meta-loss. The forward computes the meta-gradient too (the fused adjoint) and hands
    it to setup_context through ``cfg``; backward only scales it."""

    @staticmethod
    def forward(cfg: _Cfg, *tensors):
        L = cfg.L
        ws, bs, lrs = tensors[:L], tensors[L:2 * L], tensors[2 * L:]
        if cfg.fused:
            loss, grads, dlr = _run_fused(cfg, ws, bs, lrs)
        else:
            loss, grads, dlr = _run_layerwise(cfg, ws, bs, lrs)
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
        ctx.saved_tensors  # noqa: B018 - raises after a freed graph or an in-place edit of an input
        cfg = ctx.cfg
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
                out += _unpack_dlr(cfg, ctx.dlr, ctx.lr_shapes, ctx.flat_shapes, gloss)
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
    mlp_ops.check_activation_loss(activation, loss)
    K = _checks.positive_int("steps", steps)
    ws, bs, dims, dtype, device = mlp_ops.check_layers(weights, biases, per_task=False)
    xs, ys, T, Ns = mlp_ops.check_data("xs", xs, "ys", ys, T=None, dims=dims, loss=loss, dtype=dtype, device=device)
    xq, yq, _, Nq = mlp_ops.check_data("xq", xq, "yq", yq, T=T, dims=dims, loss=loss, dtype=dtype, device=device)
    for name, t in (("xs", xs), ("xq", xq), ("ys", ys), ("yq", yq)):
        if t.requires_grad:
            raise ValueError(f"{name} requires grad: maml_mlp differentiates with respect to weights, biases and lr only")
    L = len(ws)
    shapes = [p.shape for pair in zip(ws, bs) for p in pair]
    lr_kind, lr_value, lrs = _check_lr(lr, K, shapes, dtype, device)
    if msl_weights is None:
        msl = _default_msl(K, dtype, device)
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
        msl_list = [float(w) for w in msl.tolist()]
    be = _resolve_cached(backend, device)
    need_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (*ws, *bs, *lrs))
    lr_learned = need_grad and any(t.requires_grad for t in lrs)
    n_msl = sum(1 for w in msl_list if w != 0.0)
    fused = be in ("cpu", "cuda") and _fits_cached(dims, K, Ns, Nq, dtype, device, lr_learned, n_msl)
    cfg = _Cfg(dims, L, T, K, Ns, Nq, activation, loss, dtype, device, xs, ys, xq, yq, msl, msl_list, lr_kind,
               lr_value, len(lrs), bool(first_order), need_grad, be, fused, n_msl, shapes)
    if torch._C._are_functorch_transforms_active():
        return _MamlMlp.apply(cfg, *ws, *bs, *lrs)
    else:
        # The C++ apply directly: Function.apply's Python wrapper re-binds the arguments
        # with inspect.signature on every call (tens of µs), for nothing here.
        return _APPLY(cfg, *ws, *bs, *lrs)


_APPLY = super(torch.autograd.Function, _MamlMlp).apply
_FITS_CACHE: dict = {}
_RESOLVE_CACHE: dict = {}


def _resolve_cached(backend, device: torch.device) -> str:
    """``backends.resolve`` for this op, remembered per (request, device, and the
    FASTMAML_BACKEND environment variable when no backend is named). Triton on CPU (which
    depends on TRITON_INTERPRET) is not remembered; a request it refuses raises every time."""
    key = (backend, device, os.environ.get("FASTMAML_BACKEND") if backend is None else None)
    be = _RESOLVE_CACHE.get(key)
    if be is None:
        be = backends.resolve(backend, device, "maml_mlp")
        if be != "triton" or device.type != "cpu":
            if len(_RESOLVE_CACHE) > 64:
                _RESOLVE_CACHE.clear()
            _RESOLVE_CACHE[key] = be
    return be


def _fits_cached(dims, K, Ns, Nq, dtype, device, lr_learned, n_msl) -> bool:
    limit = FUSED_CPU_MAX_WORKSPACE_BYTES if device.type == "cpu" else None
    key = (tuple(dims), K, Ns, Nq, dtype, device, limit, lr_learned, n_msl)
    ok = _FITS_CACHE.get(key)
    if ok is None:
        ok = fits_fused(dims, K, Ns, Nq, dtype=dtype, device=device, lr_learned=lr_learned, n_msl=n_msl)[0]
        _FITS_CACHE[key] = ok
    return ok


__all__ = ["maml_mlp", "mlp_structure", "supports", "fits_fused", "fused_limits", "fused_workspace_bytes",
           "FUSED_CPU_MAX_WORKSPACE_BYTES"]

# ``fastmaml.ops.maml_mlp`` is the function once the package is imported (the function
# shadows this module's name in fastmaml.ops), so the dispatch helpers ride along on it:
# ``fastmaml.ops.maml_mlp.supports(...)`` works either way.
maml_mlp.supports = supports  # type: ignore[attr-defined]
maml_mlp.mlp_structure = mlp_structure  # type: ignore[attr-defined]
maml_mlp.fits_fused = fits_fused  # type: ignore[attr-defined]
maml_mlp.fused_limits = fused_limits  # type: ignore[attr-defined]
maml_mlp.fused_workspace_bytes = fused_workspace_bytes  # type: ignore[attr-defined]
