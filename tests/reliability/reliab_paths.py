"""The MAML paths the reliability tests run every case on, as (id, build) pairs.

Each ``build()`` returns ``(maml, data, expected_path)``: a ``fastmaml.MAML`` in
float64 on the path named by ``expected_path`` (checked by ``run_path``), a meta-batch
for it, and the path name ``maml.path`` must report. ``reference_twin(maml)`` is the
same model (a deep copy, same weights) on ``backend="reference"``."""

from __future__ import annotations

import copy

import torch
from torch import nn

import fastmaml

F64 = torch.float64


def mlp_relu() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(1, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 1)).to(F64)


def mlp_wide() -> nn.Module:
    # past the fused kernel's 32 MiB per-task workspace in float64: the layer-wise MLP route
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(1, 1100), nn.ReLU(), nn.Linear(1100, 1100), nn.ReLU(), nn.Linear(1100, 1)).to(F64)


def mlp_gelu() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(1, 8), nn.GELU(), nn.Linear(8, 1)).to(F64)


def conv_bn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.BatchNorm2d(2, track_running_stats=False), nn.ReLU(),
                         nn.Flatten(), nn.Linear(2 * 16, 1)).to(F64)


def vec_data(T: int = 3, N: int = 5, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(T, N, 1, generator=g, dtype=F64) for _ in range(4)]


def img_data(T: int = 2, N: int = 3, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    xs, xq = (torch.randn(T, N, 1, 4, 4, generator=g, dtype=F64) for _ in range(2))
    ys, yq = (torch.randn(T, N, 1, generator=g, dtype=F64) for _ in range(2))
    return [xs, ys, xq, yq]


# id -> (model factory, data factory, MAML kwargs, attributes set on the MAML, expected path)
PATHS = {
    "fused_mlp": (mlp_relu, vec_data, {}, {}, "fused_mlp"),
    "mlp_layerwise": (mlp_wide, lambda: vec_data(2, 4), {}, {}, "mlp_layerwise"),
    "generic_vmap": (mlp_gelu, vec_data, {}, {}, "generic"),
    "generic_loop": (mlp_gelu, vec_data, {}, {"task_map": "loop"}, "generic"),
    "generic_one_task_at_a_time": (mlp_gelu, vec_data, {}, {"task_map": "loop", "task_threads": 1}, "generic"),
    "generic_conv_bn": (conv_bn, img_data, {}, {}, "generic"),
    "reference": (mlp_gelu, vec_data, {"backend": "reference"}, {}, "reference"),
}
FAST_PATHS = [p for p in PATHS if p != "reference"]


def build(path: str, **kw) -> tuple[fastmaml.MAML, list[torch.Tensor], str]:
    model_f, data_f, mkw, attrs, expected = PATHS[path]
    args = dict(inner_lr=0.1, inner_steps=2)
    args.update(mkw)
    args.update(kw)
    m = fastmaml.MAML(model_f(), **args)
    for k, v in attrs.items():
        setattr(m, k, v)
    return m, data_f(), expected


def reference_twin(m: fastmaml.MAML) -> fastmaml.MAML:
    twin = copy.deepcopy(m)
    twin.backend = "reference"
    return twin


def check_path(m: fastmaml.MAML, expected: str) -> None:
    assert m.path == expected, f"expected path {expected!r}, got {m.path!r} ({m.path_reason})"


def grads(module: nn.Module) -> list[torch.Tensor | None]:
    return [None if p.grad is None else p.grad.clone() for p in module.parameters()]


def assert_grads_equal(name: str, got: list, want: list, tol: float = 1e-9) -> None:
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        assert w is not None, f"{name}[{i}]: the reference gives no gradient"
        assert g is not None, f"{name}[{i}]: no gradient (.grad is None) where the reference gives one"
        err = float((g - w).abs().max() / (1 + w.abs().max()))
        assert err <= tol, f"{name}[{i}]: relative error {err:.3e} > {tol:.1e}"

