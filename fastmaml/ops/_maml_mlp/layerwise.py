"""``maml_mlp``'s layer-wise path: a Python loop over the K steps (never over tasks)
composed of :func:`fastmaml.ops.mlp_loss_and_grad`, :func:`fastmaml.ops.sgd_step` and,
for the adjoint, :func:`fastmaml.ops.mlp_hvp` (``reference`` and ``triton`` backends,
and past the fused limits)."""

from __future__ import annotations

import torch

from fastmaml.ops import mlp as mlp_ops
from fastmaml.ops._maml_mlp.config import Cfg
from fastmaml.ops._sgd_step.function import sgd_step

def _lr_row(cfg: Cfg, lrs, k: int, shapes):
    """The lr of step k in ops.sgd_step's form."""
    if cfg.lr_kind == "float":
        return cfg.lr_value
    if cfg.lr_kind == "scalar":
        return lrs[0].detach()
    if cfg.lr_kind == "table":
        return lrs[0].detach()[k]
    return [(a if a.shape == shp else a[k]).detach() for a, shp in zip(lrs, shapes)]


def run_layerwise(cfg: Cfg, ws, bs, lrs):
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
    # adjoint (docs/DESIGN.md §1), per task, batched over tasks
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


def _dlr_init(cfg: Cfg, lrs, shapes):
    if not lrs or cfg.lr_kind == "float":
        return None
    P = sum(s.numel() for s in shapes)
    if cfg.lr_kind == "scalar":
        return torch.zeros(1, dtype=cfg.dtype, device=cfg.device)
    if cfg.lr_kind == "table":
        return torch.zeros(cfg.K * 2 * cfg.L, dtype=cfg.dtype, device=cfg.device)
    per_step = any(a.shape != shp for a, shp in zip(lrs, shapes))
    return torch.zeros((cfg.K, P) if per_step else (P,), dtype=cfg.dtype, device=cfg.device)


def _dlr_add(cfg: Cfg, dl: torch.Tensor, k: int, g, v, shapes) -> None:
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
