"""The MAML layer's replay of a fused-MLP call: the per-call Python work of the fused MLP
route cut to what can change between two meta-steps of a training loop.

The first call of :class:`fastmaml.MAML` on the MLP route runs every check of
:func:`fastmaml.maml.mlp_path.run_with_plan` and of ``ops.maml_mlp``
(:func:`fastmaml.ops._maml_mlp.function.prepare`) and keeps the op's configuration (the
*plan*) with the :func:`signature` of its inputs. A later call whose signature is equal
launches the kernel with the plan (:func:`fastmaml.ops._maml_mlp.function.relaunch`)
after only the checks that depend on the values: NaN/Inf in the data, the parameters and
the rates (one call into the extension), the class labels' range (cross-entropy) and the
fixed rate (finite, > 0). Any difference, or any value check that fails, takes the full
path, which then raises or warns exactly as without a replay.

The signature holds everything the plan was derived from: the route's cache key
(:func:`fastmaml.maml.module.route_key`: the modules, requires_grad of the parameters
and rates, the data's shapes, grad mode, loss, knobs, K, the adapted names, the MSL
weights), every parameter's shape, dtype, device and contiguity, the data's dtypes,
devices, contiguity and requires_grad, the kind of rate (a float or a 0-d tensor, its
dtype, device, requires_grad) and the ``FASTMAML_BACKEND`` environment variable. Only
CPU tensors replay (the finiteness check is the extension's CPU loop); per-tensor and
per-step rates, CUDA and a call traced by Dynamo always take the full path.
"""

from __future__ import annotations

import os

import torch

from fastmaml import _checks
from fastmaml.maml import mlp_path
from fastmaml.ops import mlp as mlp_ops
from fastmaml.ops._maml_mlp import function as _fn
from fastmaml.ops._maml_mlp.config import Cfg


def _tensor_sig(t: torch.Tensor) -> tuple:
    return t.shape, t.dtype, t.device, t.is_contiguous(), t.requires_grad


def signature(key: tuple | None, ws: list, bs: list, lrs: object, data: tuple) -> tuple | None:
    """What a plan depends on beyond the values (see the module docstring); None: this
    call does not replay (and keeps no plan)."""
    if key is None or torch.compiler.is_compiling():
        return None
    if isinstance(lrs, float):
        lr_sig: tuple = (float,)
    elif isinstance(lrs, torch.Tensor) and lrs.dim() == 0:
        lr_sig = _tensor_sig(lrs)
    else:
        return None
    if any(t.device.type != "cpu" or not t.is_contiguous() for t in data):
        return None  # (the full path compacts strided data)
    return (key, lr_sig, tuple(_tensor_sig(t) for t in ws), tuple(_tensor_sig(t) for t in bs),
            tuple(_tensor_sig(t) for t in data), os.environ.get("FASTMAML_BACKEND"))


def keep(sig: tuple | None, cfg: Cfg | None) -> tuple | None:
    """The plan to keep after a full call: (signature, the op's configuration without the
    call's data, so that the plan holds no batch alive); None when the call may not
    replay: no signature, traced, or not the fused kernel on the CPU backend."""
    if sig is None or cfg is None or not cfg.fused or cfg.backend != "cpu":
        return None
    return sig, cfg.replaced(xs=None, ys=None, xq=None, yq=None, out=None)


def values_ok(cfg: Cfg, ws: list, bs: list, lrs: object, data: tuple) -> bool:
    """The value checks of the full path, answered yes or no (no: the full path runs
    and reports): every float tensor finite, labels in range, a fixed rate finite > 0."""
    ts = [t for t in data if t.is_floating_point()]
    ts += ws
    ts += bs
    if isinstance(lrs, torch.Tensor):
        ts.append(lrs)
    if any(t.dtype != cfg.dtype for t in ts) or mlp_path.first_nonfinite(ts) != -1:
        return False
    if cfg.loss == "cross_entropy" and any(mlp_ops.labels_outside(y, cfg.dims[-1]) for y in (data[1], data[3])):
        return False
    if isinstance(lrs, float):
        try:
            _checks.inner_lr("lrs (a fixed inner learning rate)", lrs)  # its warning for a huge rate, as in full
        except (TypeError, ValueError):
            return False
    return True


def replay(plan: tuple | None, sig: tuple | None, ws: list, bs: list, lrs: object, data: tuple,
           first_order: bool) -> torch.Tensor | None:
    """The meta-loss by the kept plan, or None when it does not apply (different
    signature, a value check that fails)."""
    if plan is None or sig is None or plan[0] != sig:
        return None
    cfg = plan[1]
    if not values_ok(cfg, ws, bs, lrs, data):
        return None
    lr_value = lrs if isinstance(lrs, float) else 0.0
    lr_ts = [lrs] if isinstance(lrs, torch.Tensor) else []
    return _fn.relaunch(cfg, ws, bs, lr_ts, *data, lr_value, bool(first_order))


__all__ = ["signature", "keep", "values_ok", "replay"]
