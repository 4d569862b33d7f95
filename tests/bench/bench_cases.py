"""Shared cases of the benchmark tests: tiny problems, an independent unrolled meta-gradient."""

from __future__ import annotations

import torch

from fastmaml.bench import configs, peers
from fastmaml.bench.configs import Config


def _problem(cfg: Config, dtype=torch.float32, n_batches: int = 2) -> peers.Problem:
    model = configs.build_model(cfg.family, cfg.seed).to(dtype)
    batches = [configs.make_batch(cfg, i, "cpu", dtype) for i in range(n_batches)]
    return peers.Problem(cfg, model, batches, torch.device("cpu"))


def _unrolled_meta_grad(model: torch.nn.Module, batch, cfg: Config) -> list[torch.Tensor]:
    """Independent ground truth: all tasks at once, parameters expanded per task, the K
    steps unrolled with create_graph=True, one backward of the mean query loss."""
    loss_fn = torch.nn.functional.mse_loss if cfg.fam.loss == "mse" else torch.nn.functional.cross_entropy
    names = [n for n, _ in model.named_parameters()]
    theta = [p.detach().clone().requires_grad_(True) for p in model.parameters()]
    xs, ys, xq, yq = batch
    total = 0.0
    for t in range(xs.shape[0]):
        fast = theta
        for _ in range(cfg.K):
            ls = loss_fn(torch.func.functional_call(model, dict(zip(names, fast)), (xs[t],)), ys[t])
            g = torch.autograd.grad(ls, fast, create_graph=not cfg.first_order)
            if cfg.first_order:
                g = [x.detach() for x in g]
            fast = [w - cfg.inner_lr * x for w, x in zip(fast, g)]
        total = total + loss_fn(torch.func.functional_call(model, dict(zip(names, fast)), (xq[t],)), yq[t])
    return list(torch.autograd.grad(total / xs.shape[0], theta))


def _worst(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((x.double() - y.double()).abs().max().item() for x, y in zip(a, b))


TINY_MLP = [Config("sinusoid", 3, 2, 0.01, fo) for fo in (False, True)]
