"""FLOP count of one MAML meta-step: the matrix-multiply and convolution work the
algorithm needs, the same figure for every method (the GFLOP/s column of the tables).

Counting rule: a multiply-add is 2 FLOPs; only GEMMs and convolutions are counted (for
``nn.Linear`` and ``nn.Conv2d``); biases, activations, BatchNorm, pooling, losses and the
O(P) parameter updates are left out (below 2 % of the total for every configuration here).

Let ``A(N)`` be the multiply-adds of one forward pass of the network on N points (for a
linear layer ``d_in·d_out`` per point, for a convolution ``H_out·W_out·C_out·C_in/groups·
kh·kw`` per image) and ``A₁(N)`` those of the first layer, the one that reads the data
(its input needs no gradient, so no method computes one). Per layer of cost ``a``
(``z = h W``):

- forward ``2a``; backward ``2a`` for ∂W and ``2a`` for ∂h (not in the first layer), so
  one loss and gradient costs ``G(N) = 6A − 2A₁``;
- a Hessian-vector product (the R-operator, reusing the gradient pass's activations):
  R-forward ``R{z} = R{h}W + hV`` (4a, 2a in the first layer), R-backward ``R{∂h} = R{δ}Wᵀ
  + δVᵀ`` (4a, none in the first layer) and ``R{∂W} = R{h}ᵀδ + hᵀR{δ}`` (4a, 2a in the
  first layer): ``H(N) = 12A − 8A₁`` — about two gradients. Reverse-over-reverse autograd
  (the per-task loop's double backward) does the same GEMMs.

One meta-step of T tasks, K inner steps, Ns support and Nq query points per task::

    flops = T · [ K·G(Ns) + G(Nq) + (second order) K·H(Ns) ]

(K support gradients, the query loss and gradient at θ_K, and for second order one HVP
per inner step in the adjoint ``v ← v − α H(θ_k) v``). For an MLP with weights
``P = Σ d_{l−1}·d_l`` and first layer ``P₁ = d_0·d_1``: ``A(N) = N·P``, ``A₁(N) = N·P₁``.
Sinusoid 1-40-40-1 (P = 1680, P₁ = 40), T=25, K=5, Ns = Nq = 10, second order:
25·(5·10·(18·1680 − 10·40) + 10·(6·1680 − 2·40)) = 39.8 MFLOP. The count agrees exactly
with ``torch.utils.flop_counter.FlopCounterMode`` on the per-task loop
(tests/bench/test_bench_flops.py).
"""

from __future__ import annotations

import torch
from torch import nn

from fastmaml.bench.configs import FAMILIES, Config, build_model

_MACS: dict[str, tuple[int, int]] = {}  # family -> (A, A₁) per point, computed once


def forward_macs(model: nn.Module, input_shape: tuple[int, ...]) -> tuple[int, int]:
    """(A, A₁): multiply-adds of one forward pass on ONE point of ``input_shape``, all
    layers and the first ``Linear``/``Conv2d`` alone (shapes read by hooks on a zero
    input, so any stack of these layers is counted from its real output sizes)."""
    macs: list[int] = []

    def hook(mod: nn.Module, args: tuple, out: torch.Tensor) -> None:
        if isinstance(mod, nn.Linear):
            macs.append(out.shape[-1] * mod.in_features * (out.numel() // out.shape[-1]))
        else:  # nn.Conv2d: every output element is C_in/groups·kh·kw multiply-adds
            kh, kw = mod.kernel_size
            macs.append(out.numel() * (mod.in_channels // mod.groups) * kh * kw)

    layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    if not layers:
        raise ValueError(f"model has no nn.Linear or nn.Conv2d layer to count, got {type(model).__name__}")
    handles = [m.register_forward_hook(hook) for m in layers]
    try:
        with torch.no_grad():
            model(torch.zeros(1, *input_shape, dtype=layers[0].weight.dtype))
    finally:
        for h in handles:
            h.remove()
    return sum(macs), macs[0]


def grad_flops(a: int, a1: int) -> int:
    """G: one loss and gradient, given the forward's multiply-adds ``a`` and the first layer's ``a1``."""
    return 6 * a - 2 * a1


def hvp_flops(a: int, a1: int) -> int:
    """H: one Hessian-vector product by the R-operator (or reverse-over-reverse)."""
    return 12 * a - 8 * a1


def meta_step_flops(a: int, a1: int, T: int, K: int, n_support: int, n_query: int, first_order: bool) -> int:
    """FLOPs of one meta-step from the per-point multiply-adds ``a`` (all layers) and ``a1``
    (first layer); see the module docstring."""
    for name, v in (("T", T), ("n_support", n_support), ("n_query", n_query)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if isinstance(K, bool) or not isinstance(K, int) or K < 0:
        raise ValueError(f"K must be an int >= 0, got {K!r}")
    s, q = n_support, n_query
    per_task = K * grad_flops(s * a, s * a1) + grad_flops(q * a, q * a1)
    if not first_order:
        per_task += K * hvp_flops(s * a, s * a1)
    return T * per_task


def mlp_meta_step_flops(widths: tuple[int, ...], T: int, K: int, n_support: int, n_query: int,
                        first_order: bool) -> int:
    """:func:`meta_step_flops` of the MLP ``widths`` (d_0, ..., d_L): A = P, A₁ = d_0·d_1 per point."""
    if len(widths) < 2:
        raise ValueError(f"widths must list at least an input and an output width, got {widths!r}")
    P = sum(widths[i] * widths[i + 1] for i in range(len(widths) - 1))
    return meta_step_flops(P, widths[0] * widths[1], T, K, n_support, n_query, first_order)


def config_flops(cfg: Config) -> int | None:
    """FLOPs of one meta-step of a benchmark configuration (None: a family not counted)."""
    f = FAMILIES.get(cfg.family)
    if f is None:
        return None
    if f.mlp_widths is not None:
        return mlp_meta_step_flops(f.mlp_widths, cfg.T, cfg.K, f.n_support, f.n_query, cfg.first_order)
    if cfg.family not in _MACS:
        with torch.random.fork_rng(devices=[]):  # build_model seeds the global generator
            _MACS[cfg.family] = forward_macs(build_model(cfg.family, 0), f.input_shape)
    a, a1 = _MACS[cfg.family]
    return meta_step_flops(a, a1, cfg.T, cfg.K, f.n_support, f.n_query, cfg.first_order)
