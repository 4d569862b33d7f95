"""``maml_mlp``'s call configuration (:class:`Cfg`), its learning-rate check and the
packing of the lr into the fused kernel's layout (``codes.MLP_LR_*``) and back."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fastmaml import _checks, codes

@dataclass
class Cfg:
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
    factored: bool = False  # the factored path (fastmaml.ops._maml_mlp.factored) instead of fused/layer-wise
    out: tuple | None = None  # (meta-gradient, lr gradient) from forward to setup_context

    def replaced(self, **fields) -> "Cfg":
        """A copy with ``fields`` set (a shallow copy of the rest; cheaper than
        ``dataclasses.replace``, which re-runs ``__init__``)."""
        c = Cfg.__new__(Cfg)
        c.__dict__.update(self.__dict__)
        c.__dict__.update(fields)
        return c


_MSL_CACHE: dict = {}


def default_msl(K: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if torch.compiler.is_compiling():  # no cache fill while traced (it would cost a recompile)
        return torch.nn.functional.one_hot(torch.tensor(K - 1, device=device), K).to(dtype)
    key = (K, dtype, device)
    t = _MSL_CACHE.get(key)
    if t is None:
        t = torch.zeros(K, dtype=dtype, device=device)
        t[-1] = 1.0
        _MSL_CACHE[key] = t
    return t


def check_lr(lr, K: int, shapes: list[torch.Size], dtype, device) -> tuple[str, float, list[torch.Tensor]]:
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


def pack_lr(cfg: Cfg, lrs: Sequence[torch.Tensor], shapes) -> tuple[int, torch.Tensor | None, bool]:
    """(lr_mode, packed lr tensor or None, per_step) for the fused kernel."""
    if cfg.lr_kind == "float":
        return codes.MLP_LR_SCALAR, None, False
    if cfg.lr_kind == "scalar":
        return codes.MLP_LR_SCALAR, lrs[0].detach().reshape(1).contiguous(), False
    if cfg.lr_kind == "table":
        return codes.MLP_LR_TABLE, lrs[0].detach().contiguous(), False
    per_step = any(a.shape != shp for a, shp in zip(lrs, shapes))
    if per_step:
        K = cfg.K
        flat = torch.cat([(a if a.shape != shp else a.unsqueeze(0).expand(K, *shp)).detach().reshape(K, -1)
                          for a, shp in zip(lrs, shapes)], dim=1)
        return codes.MLP_LR_STEP_ELEMENT, flat.contiguous(), True
    return codes.MLP_LR_ELEMENT, torch.cat([a.detach().reshape(-1) for a in lrs]).contiguous(), False


def unpack_dlr(cfg: Cfg, dlr: torch.Tensor, lr_shapes, shapes, g: torch.Tensor):
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
