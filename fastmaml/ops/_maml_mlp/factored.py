"""``maml_mlp``'s factored path: the inner steps as low-rank corrections to the shared weights.

One SGD step on task t changes layer l's weight by a product of two thin factors,
``W ← W − α·δᵀh`` (δ: ``[Ns, out]``, the loss gradient at the layer's output; h: ``[Ns, in]``,
its input), so after k steps ``W_{t,k} = W_0 + D_tᵀH_t`` with ``H_t = [h_0; …; h_{k−1}]`` and
``D_t = [−α_0δ_0; …]`` of ``r = k·Ns`` rows. The path never forms a task's weights: a set of
inputs z goes through ``z·W_{t,k}ᵀ = z·W_0ᵀ + (z·H_tᵀ)·D_t`` and a gradient g back through
``g·W_{t,k} = g·W_0 + (g·D_tᵀ)·H_t``, so the product with W_0 is ONE matrix product over all
tasks' rows (``[T·N, in] × [in, out]``) and the per-task part costs ``r·(in + out)`` per row
instead of ``in·out``. The first layer's input is the support set itself at every step, so its
factor stays ``xs`` and D sums over the steps: rank Ns. Biases are kept per task.

The inner gradients are written out by hand (the layers' backward), as differentiable torch
ops, and the meta-loss (1/T)·Σ_t Σ_k w_k·Lq(θ_{t,k}) is differentiated by autograd: through
the hand-written backward that is the second-order meta-gradient (the Hessian-vector products
of docs/DESIGN.md §1 in factored form), with the factors detached (first order) the inner
gradients are constants. A learned rate — one 0-d tensor or the ``[K, 2L]`` per-step,
per-tensor table — gets its gradient the same way; per-element rates (Meta-SGD) do not keep
the update low-rank and take the other paths (:func:`fastmaml.ops.maml_mlp_fit.prefers_factored`).

The numbers are the reference's up to float rounding (the products are associated
differently: ``z·(W_0 + DᵀH)ᵀ`` as ``z·W_0ᵀ + (z·Hᵀ)·D``); the op's tests compare every case
with :func:`fastmaml.reference.maml_mlp`.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from fastmaml.ops._maml_mlp.config import Cfg
from fastmaml.reference.mlp import task_losses  # the per-task mean losses, plain torch


class _Layers:
    """The T tasks' current weights of every layer in factored form."""

    def __init__(self, ws, bs, xs: torch.Tensor, T: int):
        self.ws = ws
        self.L = len(ws)
        self.xs = xs
        self.b = [b.unsqueeze(0).expand(T, -1) for b in bs]  # [T, out] per task
        self.h: list[torch.Tensor | None] = [None] * self.L  # H_t: [T, r, in] (layer 0: xs itself)
        self.d: list[torch.Tensor | None] = [None] * self.L  # D_t: [T, r, out]
        self.xs_w0 = self._shared(xs, 0)  # xs·W_0ᵀ of the first layer: the same at every step

    def _shared(self, z: torch.Tensor, l: int) -> torch.Tensor:
        T, N, _ = z.shape
        return (z.reshape(T * N, -1) @ self.ws[l].t()).view(T, N, -1)

    def forward_layer(self, z: torch.Tensor, l: int, shared: torch.Tensor | None = None) -> torch.Tensor:
        """z·W_{t}ᵀ + b_t for every task (``shared``: z·W_0ᵀ when already known)."""
        out = self._shared(z, l) if shared is None else shared
        if self.d[l] is not None:
            h = self.xs if l == 0 else self.h[l]
            out = torch.baddbmm(out, torch.bmm(z, h.transpose(1, 2)), self.d[l])
        return out + self.b[l].unsqueeze(1)

    def input_grad(self, g: torch.Tensor, l: int) -> torch.Tensor:
        """g·W_t for every task (the gradient at layer l's input)."""
        T, N, _ = g.shape
        out = (g.reshape(T * N, -1) @ self.ws[l]).view(T, N, -1)
        if self.d[l] is not None:
            out = torch.baddbmm(out, torch.bmm(g, self.d[l].transpose(1, 2)), self.h[l])
        return out

    def update(self, l: int, h: torch.Tensor, g: torch.Tensor, lr_w, lr_b) -> None:
        """W_t ← W_t − lr_w·gᵀh, b_t ← b_t − lr_b·Σ_n g (h, g: [T, Ns, ·])."""
        d = -lr_w * g
        self.b[l] = self.b[l] - lr_b * g.sum(1)
        if l == 0:  # the input is xs at every step: D sums
            self.d[0] = d if self.d[0] is None else self.d[0] + d
        elif self.d[l] is None:
            self.h[l], self.d[l] = h, d
        else:
            self.h[l], self.d[l] = torch.cat([self.h[l], h], 1), torch.cat([self.d[l], d], 1)


def _act(z: torch.Tensor, act: str) -> torch.Tensor:
    return torch.relu(z) if act == "relu" else torch.tanh(z)


def _act_grad(g: torch.Tensor, h: torch.Tensor, act: str) -> torch.Tensor:
    """g·σ'(z) from the activation's output h = σ(z)."""
    return g * (h > 0).to(g.dtype) if act == "relu" else g * (1 - h * h)


def _forward(net: _Layers, x: torch.Tensor, act: str, first: torch.Tensor | None = None):
    """(the layers' inputs h_0..h_{L−1}, the prediction)."""
    hs = [x]
    z = x
    for l in range(net.L):
        z = net.forward_layer(z, l, first if l == 0 else None)
        if l < net.L - 1:
            z = _act(z, act)
            hs.append(z)
    return hs, z


def _loss_grad(pred: torch.Tensor, y: torch.Tensor, loss: str) -> torch.Tensor:
    """∂L_t/∂pred of each task's mean loss."""
    if loss == "mse":
        return (2.0 / (pred.shape[1] * pred.shape[2])) * (pred - y)
    onehot = F.one_hot(y, pred.shape[2]).to(pred.dtype)
    return (torch.softmax(pred, dim=2) - onehot) / pred.shape[1]


def _rates(cfg: Cfg, lrs, k: int, i: int):
    """The rate of step k for flat tensor i (W_1, b_1, ...)."""
    if cfg.lr_kind == "float":
        return cfg.lr_value
    if cfg.lr_kind == "scalar":
        return lrs[0]
    return lrs[0][k, i]


def meta_loss(cfg: Cfg, ws, bs, lrs) -> torch.Tensor:
    """The meta-loss as a differentiable function of ``ws``, ``bs`` and ``lrs``."""
    net = _Layers(ws, bs, cfg.xs, cfg.T)
    act, L = cfg.act, net.L
    meta = cfg.xs.new_zeros(())
    # first order: the inner gradients are constants, computed without a graph (a learned
    # rate still enters the graph through the update)
    inner_mode = torch.no_grad if cfg.first_order or not torch.is_grad_enabled() else contextlib.nullcontext
    for k in range(cfg.K):
        with inner_mode():
            hs, pred = _forward(net, cfg.xs, act, first=net.xs_w0)
            g = _loss_grad(pred, cfg.ys, cfg.loss)
            steps = []
            for l in range(L - 1, -1, -1):
                steps.append((l, hs[l], g))
                if l > 0:
                    g = _act_grad(net.input_grad(g, l), hs[l], act)
        for l, h, g in steps:
            net.update(l, h, g, _rates(cfg, lrs, k, 2 * l), _rates(cfg, lrs, k, 2 * l + 1))
        w = cfg.msl_list[k]
        if w != 0.0:
            _, pq = _forward(net, cfg.xq, act)
            meta = meta + w * task_losses(pq, cfg.yq, cfg.loss).mean()
    return meta


def run_factored(cfg: Cfg, ws, bs, lrs, lr_learned: bool | None = None):
    """(meta-loss, meta-gradient in flat order W_1, b_1, ..., lr gradient) like the fused
    and layer-wise paths. ``lr_learned``: whether the rate gets a gradient (default: an lr
    tensor requires grad; inside the custom op ``fastmaml::maml_mlp`` none does, so it
    passes the flag)."""
    if not cfg.need_grad:
        with torch.no_grad():
            return meta_loss(cfg, ws, bs, lrs), None, None
    if lr_learned is None:
        lr_learned = any(t.requires_grad for t in lrs)
    lr_learned = lr_learned and bool(lrs)
    with torch.enable_grad():
        leaves = [p.detach().requires_grad_() for pair in zip(ws, bs) for p in pair]
        lr_leaves = [t.detach().requires_grad_() if lr_learned else t.detach() for t in lrs]
        meta = meta_loss(cfg, leaves[0::2], leaves[1::2], lr_leaves)
        grads = torch.autograd.grad(meta, leaves + (lr_leaves if lr_learned else []), allow_unused=True)
    grads = [torch.zeros_like(p) if g is None else g.contiguous() for g, p in zip(grads, leaves + lr_leaves)]
    P = len(leaves)
    dlr = None
    if lr_learned:
        dlr = grads[P].reshape(-1)  # scalar: [1]; table: [K·2L] (unpack_dlr's layouts)
    return meta.detach(), grads[:P], dlr
