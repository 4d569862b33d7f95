"""Shared test fixtures for the MAML tests: tiny models as pure functions, meta-batches,
learning rates of every granularity, and a comparison that reports the worst element."""

from __future__ import annotations

import torch
from torch import nn

F64 = torch.float64


def assert_close(name: str, a: torch.Tensor, b: torch.Tensor, tol: float) -> None:
    """|a − b| ≤ tol·(1 + |b|) elementwise; the message names the worst element."""
    assert a.shape == b.shape, f"{name}: shape {tuple(a.shape)} vs {tuple(b.shape)}"
    err = (a - b).abs() / (1 + b.abs())
    worst = int(err.argmax()) if err.numel() else 0
    if err.numel() and float(err.max()) > tol:
        raise AssertionError(
            f"{name}: {int((err > tol).sum())}/{err.numel()} elements off; worst at flat index {worst}: "
            f"{float(a.flatten()[worst])!r} vs {float(b.flatten()[worst])!r} (rel err {float(err.max()):.3e} > {tol:.1e})"
        )


def assert_close_to_max(name: str, got: torch.Tensor, want: torch.Tensor, rtol: float, atol: float) -> None:
    """|got − want| ≤ rtol·max|want| + atol everywhere (a tolerance relative to the largest
    magnitude, for gradients and HVPs whose small entries carry only absolute error); the
    message names the worst element and how many are off."""
    got, want = got.double(), want.double()
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    err = (got - want).abs()
    scale = want.abs().max().item() + 1e-30 if want.numel() else 1e-30
    worst = int(err.reshape(-1).argmax()) if err.numel() else 0
    bad = err.max().item() if err.numel() else 0.0
    assert bad <= rtol * scale + atol, (
        f"{name}: max abs error {bad:.3e} (scale {scale:.3e}) at flat index {worst}: "
        f"got {got.reshape(-1)[worst].item():.12g}, want {want.reshape(-1)[worst].item():.12g}; "
        f"{int((err > rtol * scale + atol).sum())} of {err.numel()} elements off")


def mlp_params(sizes=(3, 7, 5, 2), dtype=F64, seed=0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    p = {}
    for i in range(len(sizes) - 1):
        p[f"w{i}"] = (torch.randn(sizes[i + 1], sizes[i], generator=g) / sizes[i] ** 0.5).to(dtype)
        p[f"b{i}"] = (0.1 * torch.randn(sizes[i + 1], generator=g)).to(dtype)
    return p


def mlp_fn(params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    n = len(params) // 2
    h = x
    for i in range(n):
        h = h @ params[f"w{i}"].T + params[f"b{i}"]
        if i < n - 1:
            h = torch.tanh(h)
    return h


def meta_batch(T, ns, nq, din, dout, dtype=F64, seed=1, classes=None):
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(T, ns, din, generator=g).to(dtype)
    xq = torch.randn(T, nq, din, generator=g).to(dtype)
    if classes is None:
        ys = torch.randn(T, ns, dout, generator=g).to(dtype)
        yq = torch.randn(T, nq, dout, generator=g).to(dtype)
    else:
        ys = torch.randint(0, classes, (T, ns), generator=g)
        yq = torch.randint(0, classes, (T, nq), generator=g)
    return xs, ys, xq, yq


def make_lrs(kind: str, shapes, K: int, dtype=F64, seed=2, base=0.1):
    """Learning rates of each granularity, learned (requires_grad) except 'fixed'."""
    g = torch.Generator().manual_seed(seed)
    n = len(shapes)

    def r(*s):
        return (base * (0.5 + torch.rand(*s, generator=g))).to(dtype).requires_grad_(True)

    if kind == "fixed":
        return base
    if kind == "scalar":
        return torch.tensor(base, dtype=dtype, requires_grad=True)
    if kind == "per_tensor":
        return r(n)
    if kind == "per_step_layer":
        return r(K, n)
    if kind == "per_element":
        return [r(*s) for s in shapes]
    if kind == "per_step_element":
        return [r(K, *s) for s in shapes]
    raise ValueError(kind)


LR_KINDS = ("fixed", "scalar", "per_tensor", "per_step_layer", "per_element", "per_step_element")


def lr_tensors(lrs) -> list[torch.Tensor]:
    if isinstance(lrs, torch.Tensor):
        return [lrs]
    if isinstance(lrs, list):
        return lrs
    return []


def conv_bn_net(pool: bool, ch: int = 3, cin: int = 1, classes: int = 3, hw: int = 8) -> nn.Module:
    """4 × [conv3×3, BN (batch statistics), ReLU, stride 2 or maxpool 2] + linear, tiny."""
    layers: list[nn.Module] = []
    c = cin
    s = hw
    for _ in range(4):
        if pool:
            layers += [nn.Conv2d(c, ch, 3, padding=1), nn.BatchNorm2d(ch, track_running_stats=False), nn.ReLU(),
                       nn.MaxPool2d(2, ceil_mode=True)]
        else:
            layers += [nn.Conv2d(c, ch, 3, stride=2, padding=1), nn.BatchNorm2d(ch, track_running_stats=False),
                       nn.ReLU()]
        s = (s + 1) // 2
        c = ch
    layers += [nn.Flatten(), nn.Linear(ch * s * s, classes)]
    return nn.Sequential(*layers)


def module_fn(model: nn.Module):
    def fn(params, x):
        return torch.func.functional_call(model, params, (x,))

    return fn


def module_params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def one_thread():
    """Module-scoped fixture body: run with one intra-op thread, then restore. These
    tests use tiny tensors; on a shared, oversubscribed 2-core machine OpenMP's spinning
    made them 50× slower with 2 threads."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def conv_case(seed=3, T=4, K=3):
    """A small 4-conv BatchNorm network (float64) and a cross-entropy meta-batch of 8x8 images."""
    torch.manual_seed(seed)
    model = conv_bn_net(True).double()
    g = torch.Generator().manual_seed(seed + 1)
    data = (torch.randn(T, 3, 1, 8, 8, generator=g, dtype=F64), torch.randint(0, 3, (T, 3), generator=g),
            torch.randn(T, 4, 1, 8, 8, generator=g, dtype=F64), torch.randint(0, 3, (T, 4), generator=g))
    return model, data
