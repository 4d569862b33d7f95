"""iMAML and Reptile on the CPU where other processes hold cores (``usable_cores`` below
torch's thread count): their inner loops, query gradients and implicit meta-gradient run on
the usable cores (``fastmaml.maml.tasks.op_threads``), torch's setting restored after, the
numbers those of the unconfined run."""

from __future__ import annotations

import pytest
import torch
from family_cases import conv_bn, grads_of, image_batch, zero_grads

from fastmaml.family import Reptile, iMAML
from fastmaml.family.tasks import GenericTasks
from fastmaml.maml import tasks

pytestmark = pytest.mark.skipif(torch.get_num_threads() < 2, reason="needs 2 intra-op threads to confine to 1")


@pytest.fixture
def seen(monkeypatch):
    """The intra-op thread count at each GenericTasks.grads / losses / hvp_at call."""
    out = []
    for name in ("grads", "losses", "hvp_at"):
        real = getattr(GenericTasks, name)

        def recorded(self, *a, _real=real, _name=name):
            out.append((_name, torch.get_num_threads()))
            return _real(self, *a)

        monkeypatch.setattr(GenericTasks, name, recorded)
    return out


@pytest.mark.parametrize("algo", ["imaml", "reptile"])
def test_family_runs_on_the_usable_cores(monkeypatch, seen, algo):
    model = conv_bn()
    xs, ys, xq, yq = image_batch(T=2, ns=5, nq=4)
    n0 = torch.get_num_threads()
    results = []
    for usable in (n0, 1):
        monkeypatch.setattr(tasks, "_USABLE_CORES", usable)
        seen.clear()
        zero_grads(model)
        if algo == "imaml":
            im = iMAML(model, inner_lr=0.1, inner_steps=2, lam=50.0, cg_steps=5, loss="cross_entropy")
            out = im(xs, ys, xq, yq)
            assert torch.get_num_threads() == n0
            out.backward()
            want = {"grads", "hvp_at"}
        else:
            out = Reptile(model, inner_lr=0.1, inner_steps=2, loss="cross_entropy")(xs, ys)
            want = {"grads", "losses"}
        assert torch.get_num_threads() == n0
        assert want <= {name for name, _ in seen}, seen
        results.append(([g.clone() for g in grads_of(model).values()], {n for _, n in seen}))
    (g_free, threads_free), (g_busy, threads_busy) = results
    assert threads_free == {n0} and threads_busy == {1}
    for a, b in zip(g_free, g_busy):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
