"""The FLOP count of a meta-step (fastmaml.bench.flops) against a hand count of a tiny MLP
and against torch.utils.flop_counter.FlopCounterMode on the per-task loop (unrolled
autograd, the reference algorithm) and on fastmaml's reference backend."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from fastmaml.bench import configs, flops, peers
from fastmaml.bench.configs import Config


def test_hand_count_of_a_tiny_mlp():
    # MLP 3-4-2, N points: forward 2N(12 + 8); backward ∂W 2N·20, ∂h 2N·8 (not the first layer's)
    N = 7
    assert flops.grad_flops(N * 20, N * 12) == 2 * N * 20 + 2 * N * 20 + 2 * N * 8
    # HVP: R-forward 2N·12 + 4N·8, R-backward ∂h 4N·8, R{∂W} 2N·12 + 4N·8
    assert flops.hvp_flops(N * 20, N * 12) == (2 * N * 12 + 4 * N * 8) + 4 * N * 8 + (2 * N * 12 + 4 * N * 8)
    # T=2 tasks, K=3 steps, 5 support and 6 query points
    g5, g6, h5 = 6 * 5 * 20 - 2 * 5 * 12, 6 * 6 * 20 - 2 * 6 * 12, 12 * 5 * 20 - 8 * 5 * 12
    assert flops.mlp_meta_step_flops((3, 4, 2), 2, 3, 5, 6, True) == 2 * (3 * g5 + g6)
    assert flops.mlp_meta_step_flops((3, 4, 2), 2, 3, 5, 6, False) == 2 * (3 * g5 + g6 + 3 * h5)
    assert flops.forward_macs(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)), (3,)) == (20, 12)
    conv = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Conv2d(3, 4, 3, stride=2, padding=1, groups=1))
    assert flops.forward_macs(conv, (2, 6, 6)) == (36 * 3 * 2 * 9 + 9 * 4 * 3 * 9, 36 * 3 * 2 * 9)


def test_bad_arguments_name_the_argument():
    with pytest.raises(ValueError, match=r"T must be a positive int, got 0"):
        flops.meta_step_flops(10, 2, 0, 1, 1, 1, False)
    with pytest.raises(ValueError, match=r"K must be an int >= 0, got -1"):
        flops.meta_step_flops(10, 2, 1, -1, 1, 1, False)
    with pytest.raises(ValueError, match=r"widths must list at least"):
        flops.mlp_meta_step_flops((3,), 1, 1, 1, 1, False)
    with pytest.raises(ValueError, match=r"model has no nn.Linear or nn.Conv2d"):
        flops.forward_macs(nn.Sequential(nn.ReLU()), (3,))
    assert flops.config_flops(Config("sinusoid", 1, 1, 0.01).with_(family="no-such-family")) is None


# MLPs: exact. Conv nets: exact first order; second order PyTorch's strided-conv double
# backward does ~1.2-1.4 % more convolution work than the R-operator's minimum (measured:
# Omniglot T=1 K=1, FlopCounterMode 1.0116x the count).
CASES = [(Config("sinusoid", 2, 2, 0.01, False), 0.0), (Config("sinusoid", 2, 2, 0.01, True), 0.0),
         (Config("wide_mlp", 1, 2, 0.4, False), 0.0), (Config("wide_mlp", 1, 1, 0.4, True), 0.0),
         (Config("omniglot", 1, 1, 0.4, True), 0.0), (Config("omniglot", 1, 1, 0.4, False), 0.02)]


@pytest.mark.parametrize("cfg,rtol", CASES, ids=lambda c: c.name if isinstance(c, Config) else str(c))
def test_count_matches_flop_counter_on_the_per_task_loop(cfg, rtol):
    model = configs.build_model(cfg.family)
    batch = configs.make_batch(cfg, 0)
    with FlopCounterMode(display=False) as fc:
        peers.loop_meta_grad(model, batch, cfg)
    want = flops.config_flops(cfg)
    got = fc.get_total_flops()
    assert want <= got <= want * (1 + rtol), (cfg.name, got, want, got / want)


def test_count_matches_flop_counter_on_the_reference_backend():
    """fastmaml.MAML with backend='reference' (the pure-PyTorch twin of the fused MLP op:
    explicit forward, backward and R-operator passes) does the counted GEMMs and at most a
    few more (its stored-activation bookkeeping), never fewer."""
    import fastmaml

    for fo in (False, True):
        cfg = Config("sinusoid", 3, 2, 0.01, fo)
        model = configs.build_model(cfg.family)
        maml = fastmaml.MAML(model, inner_lr=cfg.inner_lr, inner_steps=cfg.K, first_order=fo, loss="mse",
                             backend="reference")
        batch = configs.make_batch(cfg, 0)
        with FlopCounterMode(display=False) as fc:
            maml(*batch).backward()
        want, got = flops.config_flops(cfg), fc.get_total_flops()
        assert want <= got <= 1.1 * want, (cfg.name, maml.path, got, want, got / want)


def test_config_flops_leaves_the_global_generator_alone():
    torch.manual_seed(123)
    a = torch.rand(3)
    torch.manual_seed(123)
    flops._MACS.pop("miniimagenet", None)
    flops.config_flops(Config("miniimagenet", 2, 5, 0.01))
    assert torch.equal(torch.rand(3), a)
