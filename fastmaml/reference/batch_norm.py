"""Reference twin of :func:`fastmaml.ops.batch_norm`: batch-statistics BatchNorm in
PyTorch ops, and its three levels in closed form (the torch-ops twins of the C++
kernels in ``csrc/batch_norm/``).

Math, per channel, over its M = N·S values (x viewed as [N, C, S]); r = 1/sqrt(σ² + ε)
with the biased batch variance σ², x̂ = (x − μ) r:

* forward:  y = γ x̂ + β
* backward (gy):  dβ = Σ gy,  dγ = Σ gy x̂,  dx = γ r (gy − Σgy/M − x̂ Σ(gy x̂)/M)
* double backward (cotangents a for dx, bγ for dγ, bβ for dβ); with A = Σa,
  Ax = Σ a x̂, Sg = Σ gy, Sgx = Σ gy x̂, Sag = Σ a gy:

      g_gy = γ r (a − A/M − x̂ Ax/M) + bγ x̂ + bβ
      g_γ  = r (Sag − Sg A/M − Ax Sgx/M)
      g_x  = −(r/M) γ g_γ x̂ − (γ r² Sgx/M)(a − A/M − x̂ Ax/M)
             + r (bγ − γ r Ax/M)(gy − Sg/M − x̂ Sgx/M)

  (from ∂x̂_j/∂x_i = r(δ_ij − 1/M − x̂_i x̂_j/M) and ∂r/∂x_i = −r² x̂_i/M).

:func:`batch_norm_forward`, :func:`batch_norm_backward`, :func:`batch_norm_double_backward` take contiguous
``[N, C, S]`` views; :func:`batch_norm` is the twin of the op (same arguments, no
checks beyond PyTorch's own): the forward formula, differentiated by autograd.
"""

from __future__ import annotations

import torch


def _bc(v: torch.Tensor) -> torch.Tensor:
    return v.view(1, -1, 1)


def batch_norm_forward(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, eps: float) -> tuple:
    mean = x.mean(dim=(0, 2))
    var = (x - _bc(mean)).square().mean(dim=(0, 2))
    rstd = (var + eps).rsqrt()
    y = (x - _bc(mean)) * _bc(rstd * w) + _bc(b)
    return y, mean, rstd


def batch_norm_backward(gy: torch.Tensor, x: torch.Tensor, w: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor) -> tuple:
    m = x.shape[0] * x.shape[2]
    xh = (x - _bc(mean)) * _bc(rstd)
    sg = gy.sum(dim=(0, 2))
    sgx = (gy * xh).sum(dim=(0, 2))
    dx = _bc(w * rstd) * (gy - _bc(sg / m) - xh * _bc(sgx / m))
    return dx, sgx, sg


def batch_norm_double_backward(a: torch.Tensor | None, bw: torch.Tensor | None, bb: torch.Tensor | None, gy: torch.Tensor,
                   x: torch.Tensor, w: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor) -> tuple:
    m = x.shape[0] * x.shape[2]
    xh = (x - _bc(mean)) * _bc(rstd)
    sg = gy.sum(dim=(0, 2))
    sgx = (gy * xh).sum(dim=(0, 2))
    zero = torch.zeros_like(w)
    bw = zero if bw is None else bw
    bb = zero if bb is None else bb
    if a is None:
        g_gy = xh * _bc(bw) + _bc(bb)
        g_w = zero
        g_x = _bc(rstd * bw) * (gy - _bc(sg / m) - xh * _bc(sgx / m))
        return g_gy, g_x, g_w
    A = a.sum(dim=(0, 2))
    ax = (a * xh).sum(dim=(0, 2))
    sag = (a * gy).sum(dim=(0, 2))
    pa = a - _bc(A / m) - xh * _bc(ax / m)  # the BN backward shape of a
    g_gy = _bc(w * rstd) * pa + xh * _bc(bw) + _bc(bb)
    g_w = rstd * (sag - sg * A / m - ax * sgx / m)
    pg = gy - _bc(sg / m) - xh * _bc(sgx / m)
    g_x = (xh * _bc(-(rstd / m) * w * g_w) - pa * _bc(w * rstd * rstd * sgx / m)
           + pg * _bc(rstd * (bw - w * rstd * ax / m)))
    return g_gy, g_x, g_w


def batch_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """``F.batch_norm(x, None, None, weight, bias, training=True, eps=eps)`` written
    out: y = γ (x − μ) / sqrt(σ² + ε) + β per channel of ``x [N, C, *]``, the statistics
    over the batch and the spatial positions; differentiable to any order by autograd."""
    x3 = x.reshape(x.shape[0], x.shape[1], -1)
    return batch_norm_forward(x3, weight, bias, float(eps))[0].reshape(x.shape)
