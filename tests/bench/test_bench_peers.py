"""The benchmark's peers compute the MAML meta-gradient: each is checked against the float64
unrolled-autograd reference (itself checked against an independent unrolled computation).
No timings are asserted."""

from __future__ import annotations

import pytest
import torch
from bench_cases import TINY_MLP, _problem, _unrolled_meta_grad, _worst

from fastmaml.bench import configs, peers, peers_jax, runner
from fastmaml.bench.configs import Config


@pytest.mark.parametrize("cfg", TINY_MLP + [Config("wide_mlp", 2, 1, 0.4, False)], ids=lambda c: c.name)
def test_reference_is_unrolled_autograd(cfg):
    prob = _problem(cfg, torch.float64)
    ref = peers.reference_meta_grad(prob, 0)
    truth = _unrolled_meta_grad(prob.model, prob.batches[0], cfg)
    assert _worst(ref, truth) < 1e-12, f"reference off by {_worst(ref, truth):.3g}"
    # second order differs from first order: the check would notice a wrong order
    other = _unrolled_meta_grad(prob.model, prob.batches[0], cfg.with_(first_order=not cfg.first_order))
    assert _worst(ref, other) > 1e-6


@pytest.mark.parametrize("method", ["loop", "higher", "vmap"])
@pytest.mark.parametrize("cfg", TINY_MLP, ids=lambda c: c.name)
def test_torch_peers_match_reference_float64(cfg, method):
    """Run in float64, each torch peer computes the reference meta-gradient to rounding."""
    if method == "higher":
        pytest.importorskip("higher")
    prob = _problem(cfg, torch.float64)
    ref = peers.reference_meta_grad(prob, 0)
    prep = peers.make(method, prob)
    for i in range(2):  # and on a second, rotated batch: no state leaks between steps
        got = prep.to_torch(prep.step(i))
        want = peers.reference_meta_grad(prob, i)
        assert len(got) == len(want)
        for g, w in zip(got, want):
            assert g.shape == w.shape
        err = _worst(got, want)
        assert err < 1e-10, f"{method} off by {err:.3g} on batch {i}"
    assert _worst(ref, peers.reference_meta_grad(prob, 0)) == 0.0


def test_jax_peer_matches_reference():
    pytest.importorskip("jax")
    cfg = Config("sinusoid", 2, 1, 0.01, False)
    prob = _problem(cfg)
    ref = peers.reference_meta_grad(prob, 0)
    prep = peers.make("jax", prob)
    out = prep.step(0)
    prep.sync(out)
    abs_d, rel_d = runner.compare(prep.to_torch(out), ref)
    assert rel_d < 1e-5, f"jax off by {rel_d:.3g} relative"


@pytest.mark.parametrize("family", ["omniglot", "miniimagenet", "wide_mlp"])
def test_jax_network_translation(family):
    """The JAX peer's network is the PyTorch network: same output on the same weights."""
    jax = pytest.importorskip("jax")
    import numpy as np

    torch.manual_seed(0)
    model = configs.build_model(family)
    x = torch.randn(3, *configs.FAMILIES[family].input_shape)
    fwd = jax.jit(peers.jax_forward(peers_jax._jax_layers(model)))
    got = np.asarray(fwd([p.detach().numpy() for p in model.parameters()], x.numpy()))
    want = model(x).detach().numpy()
    assert np.abs(got - want).max() < 1e-4 * max(1.0, np.abs(want).max())


def test_fastmaml_rows_are_never_faked():
    """Without fastmaml.MAML the fastmaml rows say so; with it, they run it."""
    import fastmaml

    prob = _problem(Config("sinusoid", 2, 1, 0.01, False))
    if getattr(fastmaml, "MAML", None) is None:
        with pytest.raises(peers.Unavailable, match="not available"):
            peers.make("fastmaml", prob)
    else:
        prep = peers.make("fastmaml", prob)
        got = prep.to_torch(prep.step(0))
        _, rel = runner.compare(got, peers.reference_meta_grad(prob, 0))
        assert rel < 1e-4
        assert prep.info()["path"]
