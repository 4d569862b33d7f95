"""Dispatch of the MAML layer to the fused MLP op (``fastmaml.ops.maml_mlp``).

``fastmaml.MAML`` and ``fastmaml.maml_loss`` take this route by themselves when the
model is an ``nn.Sequential`` of ``nn.Linear`` (with bias) and one kind of activation
(``nn.ReLU`` or ``nn.Tanh``) ending in ``nn.Linear``, every trainable parameter is
adapted in the inner loop (no ANIL subset), the loss is ``"mse"`` or
``"cross_entropy"`` by name, and the data are ``[T, N, in]``. Within the route,
``maml_mlp`` runs its one-call fused kernel when a task's workspace fits the limits
(``fastmaml.ops.maml_mlp_fit.fits_fused``) and its layer-wise path (a loop over steps, never over
tasks) past them. Anything else takes the generic path (:mod:`fastmaml.maml.adjoint`).
Both give the reference's numbers; :func:`mlp_route` says which applies and why (the
one router, :func:`fastmaml.maml.dispatch.route`, asks it first).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from fastmaml import _checks, _ext
from fastmaml import codes
from fastmaml.codes import DTYPE as _DTYPE_CODE
from fastmaml.ops._maml_mlp import function as _maml_mlp_fn
from fastmaml.ops._maml_mlp.config import Cfg
from fastmaml.ops import maml_mlp_fit

FUSED = "fused_mlp"
LAYERWISE = "mlp_layerwise"


@dataclass(frozen=True)
class MlpModel:
    """The structure of a supported MLP: parameter names per layer and the activation."""

    weight_names: tuple[str, ...]
    bias_names: tuple[str, ...]
    dims: tuple[int, ...]
    activation: str


def mlp_structure(model: object) -> tuple[MlpModel | None, str]:
    """(structure, '') for a supported MLP — an ``nn.Sequential`` of ``nn.Linear`` (with
    bias) alternating with one kind of activation (``nn.ReLU`` or ``nn.Tanh``) and ending
    in ``nn.Linear`` — else (None, why not)."""
    if not isinstance(model, nn.Sequential):
        return None, f"the model is a {type(model).__name__}, not an nn.Sequential of nn.Linear and ReLU/Tanh"
    named = list(model.named_children())
    dims: list[int] = []
    acts = set()
    for i, (_, m) in enumerate(named):
        if i % 2 == 0:
            if not isinstance(m, nn.Linear):
                return None, f"layer {i} is {type(m).__name__}, expected nn.Linear"
            if m.bias is None:
                return None, f"layer {i}: nn.Linear without bias is not supported by the fused path"
            if not dims:
                dims.append(m.in_features)
            elif m.in_features != dims[-1]:
                return None, f"layer {i} takes {m.in_features} inputs, previous layer gives {dims[-1]}"
            dims.append(m.out_features)
        elif isinstance(m, nn.ReLU):
            acts.add("relu")
        elif isinstance(m, nn.Tanh):
            acts.add("tanh")
        else:
            return None, f"layer {i} is {type(m).__name__}, expected nn.ReLU or nn.Tanh"
    if not named or not isinstance(named[-1][1], nn.Linear):
        return None, "the model must end with nn.Linear"
    if len(acts) > 1:
        return None, "mixed activations (ReLU and Tanh) are not supported by the fused path"
    names = [name for name, m in named if isinstance(m, nn.Linear)]
    return MlpModel(tuple(f"{n}.weight" for n in names), tuple(f"{n}.bias" for n in names), tuple(dims),
                    acts.pop() if acts else "relu"), ""


def supports(model_or_dims, activation: str | None = None, loss: str = "mse", *, steps: int = 5,
             n_support: int = 10, n_query: int = 10, dtype=torch.float32, device: torch.device | str = "cpu",
             lr_learned: bool = False, n_msl: int = 1) -> tuple[bool, str]:
    """Whether the fused MLP path applies; returns (ok, reason).

    ``model_or_dims``: an MLP module (see :func:`mlp_structure`) or the list of widths
    ``[d_0, ..., d_L]`` (then ``activation`` names the activation).
    """
    dims: list[int]
    if isinstance(model_or_dims, torch.nn.Module):
        st, why = mlp_structure(model_or_dims)
        if st is None:
            return False, why
        dims, model_act = list(st.dims), st.activation
        if activation is not None and activation != model_act:
            return False, f"activation {activation!r} does not match the model's {model_act!r}"
        activation = model_act
    else:
        dims = [int(d) for d in model_or_dims]
        activation = activation or "relu"
    if activation not in codes.ACTIVATION:
        return False, f"activation {activation!r} is not one of {tuple(codes.ACTIVATION)}"
    if loss not in codes.LOSS:
        return False, f"loss {loss!r} is not one of {tuple(codes.LOSS)}"
    return maml_mlp_fit.fits_fused(dims, steps, n_support, n_query, dtype=dtype, device=device, lr_learned=lr_learned,
                      n_msl=n_msl)


def linear_tensors(model: nn.Sequential) -> tuple[tuple, list, list]:
    """(children, weights, biases) of a Sequential's ``nn.Linear`` layers, read straight
    from the parameter dicts (``Module.__getattr__`` is a Python call per lookup; a
    parametrized weight is not in the dict: attribute access)."""
    mods = tuple(model._modules.values())
    ws: list = []
    bs: list = []
    for m in mods:
        if isinstance(m, nn.Linear):
            d = m._parameters
            w = d.get("weight")
            ws.append(w if w is not None else m.weight)
            bs.append(d["bias"] if "bias" in d else m.bias)
    return mods, ws, bs


def mlp_route(
    model: object,
    params: Mapping[str, torch.Tensor],
    adapted: Sequence[str],
    loss: object,
    lr_learned: bool,
    n_msl: int,
    steps: int,
    data: tuple | None,
    backend: str = "auto",
) -> tuple[str | None, str, MlpModel | None]:
    """Which MLP route applies: (FUSED | LAYERWISE | None, reason, structure).
    ``data`` = (xs, ys, xq); None (before the first call): the route for data that fit.
    ``backend="cuda"`` on CPU tensors (the emulated CUDA build) uses the CUDA fit limits."""
    st, why = mlp_structure(model)
    if st is None:
        return None, why, None
    names = set(st.weight_names) | set(st.bias_names)
    if set(params) != names:
        frozen = sorted(names - set(params))
        return None, f"parameters {frozen} are frozen (requires_grad=False); the fused MLP op adapts every tensor", None
    if set(adapted) != names:
        return None, "only a subset of the parameters is adapted (ANIL); the fused MLP op adapts every tensor", None
    if not isinstance(loss, str) or loss not in ("mse", "cross_entropy"):
        return None, "a custom loss callable; the fused MLP op takes 'mse' or 'cross_entropy'", None
    p0 = params[st.weight_names[0]]
    dims = "-".join(map(str, st.dims))
    if data is None:
        if p0.dtype not in _checks.FLOAT_DTYPES:
            return None, f"dtype {p0.dtype} of the parameters (the generic path reports it)", st
        ok, why = maml_mlp_fit.fits_fused(list(st.dims), steps, 1, 1, dtype=p0.dtype, device=p0.device,
                                          lr_learned=lr_learned, n_msl=n_msl, backend=backend)
        if ok:  # with a point or two per task: the data's sizes are checked at the call
            return FUSED, f"fused MLP kernel ({dims}, {st.activation}) for [T, N, in] data within its limits", st
        return LAYERWISE, f"MLP {dims} past the fused limits ({why}): layer-wise MLP ops, loop over steps", st
    xs, ys, xq = data
    if not (isinstance(xs, torch.Tensor) and isinstance(xq, torch.Tensor) and isinstance(ys, torch.Tensor)):
        return None, "inputs are not tensors", None
    want_y = 3 if loss == "mse" else 2
    if xs.dim() != 3 or xq.dim() != 3 or ys.dim() != want_y:
        return None, (f"data are not [T, N, in] with {'[T, N, out]' if loss == 'mse' else '[T, N] labels'} targets "
                      f"(xs {tuple(xs.shape)}, ys {tuple(ys.shape)})"), st
    if any(t.device != p0.device for t in (xs, ys, xq)):
        return None, f"data on another device than the parameters ({p0.device}; the generic path reports it)", st
    if p0.dtype not in _checks.FLOAT_DTYPES or xs.dtype != p0.dtype:
        return None, f"dtype {xs.dtype} of xs vs {p0.dtype} of the parameters (the generic path reports it)", st
    ok, why = maml_mlp_fit.fits_fused(list(st.dims), steps, xs.shape[1], xq.shape[1], dtype=p0.dtype,
                                      device=p0.device, lr_learned=lr_learned, n_msl=n_msl, backend=backend)
    fac, why_fac = maml_mlp_fit.prefers_factored(st.dims, steps, xs.shape[1], "scalar",
                                                 "cpu" if backend == "auto" else backend, p0.device)
    if fac:  # the op's choice for one rate or a per-step table (per-element rates: as below)
        return (FUSED if ok else LAYERWISE), (
            f"MLP op ({dims}, {st.activation}), one call per meta-step: {why_fac} "
            f"(per-element rates: {'the fused kernel' if ok else 'layer-wise ops'})"), st
    if ok:
        return FUSED, f"fused MLP kernel ({dims}, {st.activation}): one call per meta-step; {why}", st
    return LAYERWISE, f"MLP {dims} past the fused limits ({why}): layer-wise MLP ops, loop over steps", st


def mlp_lr(lrs: object, names: Sequence[str], steps: int) -> object:
    """The learning rates in the form ``ops.maml_mlp`` takes (flat order W_1, b_1, ...).
    ``names`` is that order; ``lrs`` is in the MAML layer's forms."""
    if isinstance(lrs, torch.Tensor) and lrs.dim() == 1:
        return lrs.unsqueeze(0).expand(steps, lrs.shape[0])  # one rate per tensor, all steps
    if isinstance(lrs, Mapping):
        return [lrs[n] for n in names]
    return lrs


def first_nonfinite(ts: Sequence[torch.Tensor]) -> int | None:
    """The index of the first float tensor of ``ts`` holding NaN/Inf, -1 if none, by one
    call into the extension; None when that call does not apply (no extension, not all
    contiguous CPU tensors of one float dtype)."""
    C = _ext._C
    dtype = ts[0].dtype if ts else None
    if (C is None or dtype not in _DTYPE_CODE or not hasattr(C, "first_nonfinite_cpu")
            or not all(t.device.type == "cpu" and t.dtype == dtype and t.is_contiguous() for t in ts)):
        return None
    return C.first_nonfinite_cpu(_DTYPE_CODE[dtype], [t.data_ptr() for t in ts], [t.numel() for t in ts])


def finite_inputs(**tensors: torch.Tensor) -> None:
    """NaN/Inf in a float input raises ValueError naming it. Contiguous CPU tensors of
    one float dtype: one call into the extension for all of them (a few µs); otherwise
    one reduction per tensor (a sum is non-finite when any element is). The exact check
    only on failure."""
    floats = [(name, t) for name, t in tensors.items() if t.is_floating_point()]
    if not floats:
        return
    i = first_nonfinite([t for _, t in floats])
    if i is not None:
        if i < 0:
            return
        floats = [floats[i]]
    for name, t in floats:
        if not math.isfinite(float(t.detach().sum())):
            _checks.finite(name, t)  # raises for NaN/Inf
            raise ValueError(f"{name} holds values so large that their sum overflows ({t.dtype}); rescale the data")


def run(st: MlpModel, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor], lrs: object,
        xs: torch.Tensor, ys: torch.Tensor, xq: torch.Tensor, yq: torch.Tensor, **kw) -> torch.Tensor:
    """The meta-loss by ``ops.maml_mlp``; see :func:`run_with_plan` (the same, keyword
    arguments ``steps``, ``first_order``, ``loss``, ``msl_weights``, ``backend``)."""
    return run_with_plan(st, weights, biases, lrs, xs, ys, xq, yq, **kw)[0]


def run_with_plan(
    st: MlpModel,
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor],
    lrs: object,
    xs: torch.Tensor,
    ys: torch.Tensor,
    xq: torch.Tensor,
    yq: torch.Tensor,
    *,
    steps: int,
    first_order: bool,
    loss: str,
    msl_weights: torch.Tensor | None,
    backend: str,
) -> tuple[torch.Tensor, Cfg | None]:
    """(meta-loss, plan) by ``ops.maml_mlp`` (fused kernel or its layer-wise path); the
    plan is the op's configuration (for :func:`fastmaml.ops._maml_mlp.function.relaunch`;
    None when traced by Dynamo). ``weights``/``biases`` in layer order
    (``st.weight_names``/``st.bias_names``).

    The MAML layer's contract, the same as on the other paths: data on the parameters'
    device; strided data compacted first (the kernels read contiguous memory; a copy
    gives bitwise the same numbers); NaN/Inf in the data, the parameters or the rates
    refused up front (the kernels would propagate them); a fixed rate > 0. Compiled, the
    data's finiteness is checked inside the graph by ``fastmaml::maml_mlp``."""
    for name, t in (("xs", xs), ("ys", ys), ("xq", xq), ("yq", yq)):
        _checks.same_device(name, t, weights[0].device)
    xs, ys, xq, yq = (t if t.is_contiguous() else t.contiguous() for t in (xs, ys, xq, yq))
    if isinstance(lrs, (int, float)):
        _checks.inner_lr("lrs (a fixed inner learning rate)", lrs)
    lr_ts = [lrs] if isinstance(lrs, torch.Tensor) else list(lrs.values()) if isinstance(lrs, Mapping) else (
        list(lrs) if isinstance(lrs, (list, tuple)) else [])
    if not torch.compiler.is_compiling():
        named = zip((*st.weight_names, *st.bias_names), (*weights, *biases))
        finite_inputs(xs=xs, ys=ys, xq=xq, yq=yq, **{f"params[{n!r}]": p for n, p in named},
                      **{f"lrs[{i}]": t for i, t in enumerate(lr_ts) if isinstance(t, torch.Tensor)})
    if isinstance(lrs, (torch.Tensor, Mapping)):
        lrs = mlp_lr(lrs, [n for pair in zip(st.weight_names, st.bias_names) for n in pair], steps)
    out = _maml_mlp_fn.prepare(list(weights), list(biases), xs, ys, xq, yq, lrs, steps=steps,
                               first_order=first_order, activation=st.activation, loss=loss,
                               msl_weights=msl_weights, backend=None if backend == "auto" else backend)
    if isinstance(out, torch.Tensor):
        return out, None
    return _maml_mlp_fn.launch(*out), out[0]


def msl_tensor(msl_weights: Sequence[float] | None, like: torch.Tensor) -> torch.Tensor | None:
    """MSL weights as the ``[K]`` tensor ``ops.maml_mlp`` takes (None: plain MAML)."""
    return None if msl_weights is None else torch.tensor(list(msl_weights), dtype=like.dtype, device=like.device)
