"""Reference twins of the MLP ops: per-task batched MLP loss, gradient, Hessian-vector
product, and the whole MAML meta-step of an MLP, all by plain autograd.

Conventions shared by every MLP op (reference and fused):

- An MLP with L layers is ``weights = [W_1, ..., W_L]`` and ``biases = [b_1, ..., b_L]``;
  layer l computes ``z_l = h_{l-1} W_lᵀ + b_l`` and ``h_l = σ(z_l)`` for l < L; the last
  layer is linear (its output ``z_L`` is the prediction). σ is ReLU or tanh.
- Per-task ops take ``W_l: [T, out_l, in_l]``, ``b_l: [T, out_l]``, ``x: [T, N, in_1]``.
- ``loss="mse"``: ``y: [T, N, out_L]`` float, the per-task loss is the mean over points
  and output features. ``loss="cross_entropy"``: ``y: [T, N]`` int64 class labels, the
  per-task loss is the mean over points.
- Parameter order wherever a flat list is needed (learning-rate tables):
  ``[W_1, b_1, W_2, b_2, ..., W_L, b_L]``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

ACTIVATIONS = ("relu", "tanh")
LOSSES = ("mse", "cross_entropy")


def _act(z: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "relu":
        return torch.relu(z)
    if activation == "tanh":
        return torch.tanh(z)
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def mlp_forward(
    weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor], x: torch.Tensor, *, activation: str = "relu"
) -> torch.Tensor:
    """Per-task MLP output ``[T, N, out_L]`` (weights ``[T, out, in]``, x ``[T, N, in]``)."""
    h = x
    L = len(weights)
    for l, (W, b) in enumerate(zip(weights, biases)):
        z = torch.baddbmm(b.unsqueeze(1), h, W.transpose(1, 2))  # z = h Wᵀ + b, per task
        h = _act(z, activation) if l < L - 1 else z
    return h


def task_losses(pred: torch.Tensor, y: torch.Tensor, loss: str) -> torch.Tensor:
    """Per-task loss ``[T]`` of predictions ``[T, N, out]``."""
    if loss == "mse":
        return ((pred - y) ** 2).mean(dim=(1, 2))
    if loss == "cross_entropy":
        T, N, C = pred.shape
        return F.cross_entropy(pred.reshape(T * N, C), y.reshape(T * N), reduction="none").view(T, N).mean(1)
    raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")


def mlp_loss(weights, biases, x, y, *, activation: str = "relu", loss: str = "mse") -> torch.Tensor:
    """Per-task loss ``[T]``."""
    return task_losses(mlp_forward(weights, biases, x, activation=activation), y, loss)


def mlp_loss_and_grad(
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    activation: str = "relu",
    loss: str = "mse",
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """Per-task loss ``[T]`` and its gradient with respect to each task's own weights
    (``[T, out, in]``) and biases (``[T, out]``)."""
    with torch.enable_grad():
        ws = [W.detach().requires_grad_(True) for W in weights]
        bs = [b.detach().requires_grad_(True) for b in biases]
        lt = mlp_loss(ws, bs, x, y, activation=activation, loss=loss)
        # Task t's loss depends only on task t's slice, so ∇ of Σ_t L_t is the per-task gradient.
        # contiguous like every backend's outputs (autograd may hand back transposed views)
        grads = [g.contiguous() for g in torch.autograd.grad(lt.sum(), ws + bs)]
    L = len(ws)
    return lt.detach(), list(grads[:L]), list(grads[L:])


def mlp_hvp(
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    v_weights: Sequence[torch.Tensor],
    v_biases: Sequence[torch.Tensor],
    *,
    activation: str = "relu",
    loss: str = "mse",
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per-task Hessian-vector product H_t v_t of the per-task loss (double backward).
    ``v_weights``/``v_biases`` have the shapes of ``weights``/``biases``."""
    with torch.enable_grad():
        ws = [W.detach().requires_grad_(True) for W in weights]
        bs = [b.detach().requires_grad_(True) for b in biases]
        lt = mlp_loss(ws, bs, x, y, activation=activation, loss=loss)
        grads = torch.autograd.grad(lt.sum(), ws + bs, create_graph=True)
        dot = sum((g * v).sum() for g, v in zip(grads, list(v_weights) + list(v_biases)))
        hv = torch.autograd.grad(dot, ws + bs, allow_unused=True)
    hv = [torch.zeros_like(p) if h is None else h.contiguous() for h, p in zip(hv, ws + bs)]
    L = len(ws)
    return hv[:L], hv[L:]


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
) -> torch.Tensor:
    """Reference MAML meta-loss of an MLP, unrolled with autograd (docs/DESIGN.md §1).

    weights[l]: ``[out_l, in_l]`` and biases[l]: ``[out_l]``, shared by the T tasks;
    xs ``[T, Ns, in]``, xq ``[T, Nq, in]``, ys/yq as in :func:`task_losses`.
    lr: float or 0-d tensor (one rate); ``[K, 2L]`` tensor (per step and tensor, order
    W_1, b_1, ...); or a list of 2L tensors, per element, each ``[*shape]`` or
    ``[K, *shape]`` (per step too). msl_weights: ``[K]`` query-loss weights after each
    step (default: only the last step, weight 1).
    Returns the scalar meta-loss M = (1/T) Σ_t Σ_k w_k Lq(θ_{t,k}); differentiable in
    weights, biases, lr (second order unless ``first_order``: then the inner gradients
    are treated as constants).
    """
    T = xs.shape[0]
    grad_on = torch.is_grad_enabled()
    if msl_weights is None:
        w = [0.0] * (steps - 1) + [1.0]
    else:
        w = [msl_weights[k] for k in range(steps)]
    meta = xs.new_zeros(())
    with torch.enable_grad():
        # The inner gradients need θ in the graph even under no_grad or when θ itself is
        # not trained (only the lr, say): use a detached leaf then.
        params = [
            (p if (p.requires_grad and grad_on) else p.detach().requires_grad_()).unsqueeze(0).expand(T, *p.shape)
            for pair in zip(weights, biases)
            for p in pair
        ]
        for k in range(steps):
            ls = mlp_loss(params[0::2], params[1::2], xs, ys, activation=activation, loss=loss).sum()
            g = torch.autograd.grad(ls, params, create_graph=not first_order)
            if first_order:
                g = [gi.detach() for gi in g]
            new = []
            for i, (p, gi) in enumerate(zip(params, g)):
                new.append(p - step_lr(lr, k, i, p.shape[1:]) * gi)
            params = new
            if isinstance(w[k], torch.Tensor) or w[k] != 0.0:
                lq = mlp_loss(params[0::2], params[1::2], xq, yq, activation=activation, loss=loss)
                meta = meta + w[k] * lq.mean()
    return meta if grad_on else meta.detach()


def step_lr(lr, k: int, i: int, shape: torch.Size):
    """The inner learning rate of step ``k`` for flat parameter ``i`` (order W_1, b_1, ...)
    whose shape is ``shape``, for every granularity of docs/DESIGN.md §1."""
    if isinstance(lr, (int, float)):
        return lr
    if isinstance(lr, torch.Tensor):
        return lr if lr.dim() == 0 else lr[k, i]  # scalar, or the [K, n_tensors] table
    a = lr[i]  # per element: [*shape], or per step and element: [K, *shape]
    return a if tuple(a.shape) == tuple(shape) else a[k]


__all__ = ["mlp_forward", "task_losses", "mlp_loss", "mlp_loss_and_grad", "mlp_hvp", "maml_mlp", "step_lr"]
