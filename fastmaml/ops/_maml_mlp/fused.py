"""``maml_mlp``'s fused launcher: ONE kernel call per meta-step (``csrc/mlp/``)."""

from __future__ import annotations

import torch

from fastmaml import codes
from fastmaml._ext import cuda_launch, ext
from fastmaml.ops._maml_mlp.config import Cfg, pack_lr

def run_fused(cfg: Cfg, ws, bs, lrs, lr_learned: bool | None = None):
    lr_mode, lr_t, _ = pack_lr(cfg, lrs, cfg.shapes)
    # the K support gradients are kept (and dα computed) only for an lr that requires grad:
    # the same condition as the fit check (maml_mlp_fit.fused_workspace_bytes' lr_learned).
    # Inside the custom op fastmaml::maml_mlp no input requires grad: it passes the flag.
    if lr_learned is None:
        lr_learned = any(t.requires_grad for t in lrs)
    lr_learned = cfg.need_grad and lr_learned
    n_lr = lr_t.numel() if (lr_learned and lr_t is not None) else 0
    dtype, device = cfg.dtype, cfg.device
    loss = torch.empty((), dtype=dtype, device=device)
    # the meta-gradient is written straight into tensors of the parameters' shapes
    grads = [torch.empty_like(p) for pair in zip(ws, bs) for p in pair] if cfg.need_grad else None
    dlr = torch.empty(n_lr, dtype=dtype, device=device) if n_lr else None
    args = [codes.DTYPE[dtype], cfg.dims, codes.ACTIVATION[cfg.act], codes.LOSS[cfg.loss], cfg.T, cfg.K, cfg.Ns, cfg.Nq,
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
        with cuda_launch(device) as (_, stream):
            ext().maml_mlp_cuda(*args, partials.data_ptr(), stream)
    if lr_mode == codes.MLP_LR_STEP_ELEMENT and n_lr:
        dlr = dlr.view(cfg.K, -1)
    return loss, grads, dlr
