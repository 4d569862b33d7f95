"""Case 7: non-contiguous inputs (the everyday ``x[:, :10]`` / ``x[:, 10:]``
support/query split) are accepted on every path, with results bitwise equal to those
for contiguous copies (the fused MLP path refused them: ``xs must be contiguous``)."""

from __future__ import annotations

import pytest
import torch

from reliab_paths import PATHS, build


def _strided(data: list[torch.Tensor]) -> list[torch.Tensor]:
    # the same values as views into larger tensors: a split along the points, and a
    # transposed storage for the labels
    out = []
    for t in data:
        big = torch.cat([t, t], dim=1)
        v = big[:, : t.shape[1]]
        if t.dim() == 3:
            v = t.transpose(0, 2).contiguous().transpose(0, 2) if t.shape[2] > 1 else big[:, t.shape[1]:]
        out.append(v)
    assert any(not v.is_contiguous() for v in out)
    for v, t in zip(out, data):
        assert torch.equal(v, t)
    return out


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("path", [p for p in PATHS])
def test_strided_inputs_give_bitwise_the_contiguous_results(path, first_order):
    m, data, _ = build(path, first_order=first_order)
    strided = _strided(data)
    loss_c = m(*[t.contiguous() for t in data])
    loss_c.backward()
    g_c = [p.grad.clone() for p in m.model.parameters()]
    m.zero_grad()
    loss_s = m(*strided)
    loss_s.backward()
    assert torch.equal(loss_s, loss_c)
    for a, p in zip(g_c, m.model.parameters()):
        assert torch.equal(p.grad, a)
    fast_c = m.adapt(data[0].contiguous(), data[1].contiguous())
    fast_s = m.adapt(strided[0], strided[1])
    for n in fast_c:
        assert torch.equal(fast_s[n], fast_c[n])
