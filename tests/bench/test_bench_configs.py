"""Benchmark configurations (FLOP counts, batch shapes) and the peak-memory measurement."""

from __future__ import annotations

import pytest
import torch

from fastmaml.bench import configs, flops, measure
from fastmaml.bench.configs import Config


def test_flop_count():
    # sinusoid, P = 1·40 + 40·40 + 40·1 = 1680 weights, P₁ = 40 (the first layer: no input gradient);
    # per task K·(6P − 2P₁)·Ns + (6P − 2P₁)·Nq, plus K·(12P − 8P₁)·Ns for second order
    g, h = 6 * 1680 - 2 * 40, 12 * 1680 - 8 * 40
    assert flops.mlp_meta_step_flops((1, 40, 40, 1), 25, 5, 10, 10, False) == 25 * (5 * 10 * (g + h) + 10 * g)
    assert flops.mlp_meta_step_flops((1, 40, 40, 1), 25, 5, 10, 10, True) == 25 * (5 * 10 * g + 10 * g)
    assert flops.config_flops(Config("sinusoid", 25, 5, 0.01)) == 39_800_000  # the "40 MFLOP"
    # Omniglot: 4 stride-2 convs 28→14→7→4→2 and a 256→5 head, multiply-adds per image
    a1 = 14 * 14 * 64 * 1 * 9
    a = a1 + (7 * 7 + 4 * 4 + 2 * 2) * 64 * 64 * 9 + 256 * 5
    per_task = 1 * (6 * a - 2 * a1) * 5 + (6 * a - 2 * a1) * 75 + 1 * (12 * a - 8 * a1) * 5
    assert flops.config_flops(Config("omniglot", 2, 1, 0.4)) == 2 * per_task


def test_batches_have_the_real_shapes():
    b = configs.make_batch(Config("miniimagenet", 2, 5, 0.01), 0)
    assert [tuple(t.shape) for t in b] == [(2, 25, 3, 84, 84), (2, 25), (2, 75, 3, 84, 84), (2, 75)]
    assert b[1].dtype == torch.int64 and set(b[1][0].tolist()) == set(range(5))
    b = configs.make_batch(Config("sinusoid", 4, 5, 0.01), 0)
    assert [tuple(t.shape) for t in b] == [(4, 10, 1)] * 4
    b2 = configs.make_batch(Config("sinusoid", 4, 5, 0.01), 1)
    assert not torch.equal(b[0], b2[0]), "rotated batches must differ"


def test_cpu_peak_memory_sees_an_allocation():
    ok, why = measure.cpu_peak_supported()
    if not ok:
        pytest.skip(why)
    n = 64 * 2**20 // 4
    peak, kind, _ = measure.peak_growth(lambda: torch.ones(n).sum(), lambda o: None, torch.device("cpu"), "torch")
    assert kind == "RSS high-water growth"
    assert 60 * 2**20 <= peak < 512 * 2**20
