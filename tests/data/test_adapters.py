"""learn2learn- and torchmeta-shaped batches to fastmaml's (xs, ys, xq, yq)."""

from __future__ import annotations

import pytest
import torch

from fastmaml.data import from_learn2learn, from_torchmeta


def _l2l_task(seed: int, n_way: int = 3, per: int = 4):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n_way).repeat(per)[torch.randperm(n_way * per, generator=g)]
    x = torch.randn(n_way * per, 2, 5, generator=g) + y.view(-1, 1, 1) * 100  # x encodes its label
    return x, y


def test_from_learn2learn_splits_each_class():
    tasks = [_l2l_task(s) for s in range(4)]
    xs, ys, xq, yq = from_learn2learn(tasks, k_shot=1, n_way=3)
    assert xs.shape == (4, 3, 2, 5) and xq.shape == (4, 9, 2, 5) and ys.dtype == torch.int64
    for t, (x, y) in enumerate(tasks):
        assert torch.equal(ys[t], torch.arange(3)) and torch.equal(yq[t], torch.arange(3).repeat_interleave(3))
        for n in range(3):
            rows = x[y == n]
            assert torch.equal(xs[t, n], rows[0])  # the first example of the class, in the task's order
            assert torch.equal(xq[t, 3 * n:3 * n + 3], rows[1:])
    with pytest.raises(ValueError, match="k_shot"):
        from_learn2learn(tasks, k_shot=4)
    with pytest.raises(ValueError, match="classes"):
        from_learn2learn(tasks, k_shot=1, n_way=5)
    with pytest.raises(ValueError, match="remap"):
        from_learn2learn([(tasks[0][0], tasks[0][1] + 2)], k_shot=1)
    with pytest.raises(TypeError, match="pair"):
        from_learn2learn([tasks[0][0]], k_shot=1)


def test_from_torchmeta():
    b = {"train": (torch.randn(2, 5, 3), torch.randint(0, 5, (2, 5), dtype=torch.int32)),
         "test": (torch.randn(2, 10, 3).transpose(0, 1).contiguous().transpose(0, 1), torch.randint(0, 5, (2, 10)))}
    xs, ys, xq, yq = from_torchmeta(b)
    assert ys.dtype == torch.int64 and xq.is_contiguous() and torch.equal(xq, b["test"][0])
    assert torch.equal(ys, b["train"][1].long())
    reg = {"train": (torch.randn(3, 4, 1), torch.randn(3, 4, 1)), "test": (torch.randn(3, 6, 1), torch.randn(3, 6, 1))}
    assert from_torchmeta(reg)[3].dtype == torch.float32
    with pytest.raises(TypeError, match="'train' and 'test'"):
        from_torchmeta({"train": b["train"]})
    with pytest.raises(ValueError, match="same tasks"):
        from_torchmeta({"train": b["train"], "test": (torch.randn(3, 10, 3), torch.zeros(3, 10))})
