"""EpisodeSampler / SinusoidSampler invariants: shapes, dtypes, labels, disjointness,
reproducibility, uniformity (chi-square), augmentation, distributed shares, bad args."""

from __future__ import annotations

import math

import pytest
import torch

from fastmaml.data import EpisodeSampler, SinusoidSampler, group_by_class

C, M = 12, 9  # classes, examples per class of the coded data


def coded(C: int = C, M: int = M) -> torch.Tensor:
    """data[c, m] is a 2x2 image whose pixels are 4·(c·M + m) + (0, 1, 2, 3): every
    example identifies its class, index and (from the pixel order) its rotation."""
    ids = torch.arange(C * M, dtype=torch.float64).view(C, M, 1, 1, 1) * 4
    return (ids + torch.arange(4, dtype=torch.float64).view(1, 1, 1, 2, 2)).contiguous()


def decode(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(class, example) of coded images x [..., 1, 2, 2]."""
    ident = (x.flatten(-3).min(-1).values // 4).long()
    return ident // M, ident % M


@pytest.mark.parametrize("n_way,k,q,T", [(5, 1, 3, 7), (3, 4, 5, 2), (12, 2, 7, 1)])
def test_shapes_labels_disjointness(n_way, k, q, T):
    s = EpisodeSampler(coded(), n_way, k, q, seed=3)
    xs, ys, xq, yq = s.sample(T)
    assert xs.shape == (T, n_way * k, 1, 2, 2) and xq.shape == (T, n_way * q, 1, 2, 2)
    assert ys.shape == (T, n_way * k) and yq.shape == (T, n_way * q)
    assert xs.dtype == torch.float64 and ys.dtype == torch.int64 and yq.dtype == torch.int64
    assert all(t.is_contiguous() for t in (xs, ys, xq, yq))
    for t in range(T):
        assert torch.equal(torch.bincount(ys[t], minlength=n_way), torch.full((n_way,), k))
        assert torch.equal(torch.bincount(yq[t], minlength=n_way), torch.full((n_way,), q))
        cs, es = decode(xs[t])
        cq, eq = decode(xq[t])
        # one class per label, the same in support and query, N distinct classes
        cls_of = {}
        for c, lab in zip(torch.cat([cs, cq]).tolist(), torch.cat([ys[t], yq[t]]).tolist()):
            assert cls_of.setdefault(lab, c) == c
        assert len(set(cls_of.values())) == n_way
        # support and query examples of a class are disjoint, no example twice
        pairs_s = set(zip(cs.tolist(), es.tolist()))
        pairs_q = set(zip(cq.tolist(), eq.tolist()))
        assert len(pairs_s) == n_way * k and len(pairs_q) == n_way * q and not pairs_s & pairs_q


def test_classes_drawn_only_from_the_split():
    full = coded()
    split = torch.tensor([1, 4, 5, 8, 10, 11])
    s = EpisodeSampler(full[split], 4, 2, 2, seed=0)
    xs, _, xq, _ = s.sample(50)
    got = set(decode(xs)[0].unique().tolist()) | set(decode(xq)[0].unique().tolist())
    assert got == set(split.tolist())  # all of the split's classes appear, and no other


def test_integer_data_converted_to_unit_floats():
    data = torch.randint(0, 256, (6, 5, 1, 3, 3), dtype=torch.uint8)
    xs, _, xq, _ = EpisodeSampler(data, 2, 1, 1, dtype=torch.float32).sample(4)
    assert xs.dtype == torch.float32 and float(xs.max()) <= 1.0 and float(xs.min()) >= 0.0
    vals = set((xs.flatten() * 255).round().to(torch.uint8).tolist())
    assert vals <= set(data.flatten().tolist())


def test_seeds_reproducible_and_fixed_episodes():
    a = EpisodeSampler(coded(), 5, 1, 2, seed=7)
    b = EpisodeSampler(coded(), 5, 1, 2, seed=7)
    c = EpisodeSampler(coded(), 5, 1, 2, seed=8)
    for _ in range(3):
        ea, eb, ec = a.sample(6), b.sample(6), c.sample(6)
        assert all(torch.equal(u, v) for u, v in zip(ea, eb))
    assert not torch.equal(ea[0], ec[0])
    g = torch.Generator().manual_seed(7)
    d = EpisodeSampler(coded(), 5, 1, 2, generator=g)
    assert torch.equal(d.sample(6)[0], EpisodeSampler(coded(), 5, 1, 2, seed=7).sample(6)[0])
    f1 = a.fixed_episodes(10, 4, seed=1)
    a.sample(3)  # drawing from the sampler's own generator does not change the fixed set
    f2 = a.fixed_episodes(10, 4, seed=1)
    assert [e[0].shape[0] for e in f1] == [4, 4, 2]
    assert all(torch.equal(u, v) for e1, e2 in zip(f1, f2) for u, v in zip(e1, e2))
    assert not torch.equal(a.fixed_episodes(10, 4, seed=2)[0][0], f1[0][0])


def _chi2_pvalue(counts: torch.Tensor) -> float:
    counts = counts.double()
    expected = counts.sum() / counts.numel()
    stat = float(((counts - expected) ** 2 / expected).sum())
    df = counts.numel() - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2.0, dtype=torch.float64),
                                         torch.tensor(stat / 2.0, dtype=torch.float64)))


def test_uniform_classes_labels_and_examples_chi_square():
    s = EpisodeSampler(coded(), 5, 2, 3, seed=12345)
    cls, ex = s.indices(4000)
    # classes overall, classes per label position, and examples within a class
    assert _chi2_pvalue(torch.bincount(cls.flatten(), minlength=C)) > 1e-3
    for n in range(5):
        assert _chi2_pvalue(torch.bincount(cls[:, n], minlength=C)) > 1e-3
    assert _chi2_pvalue(torch.bincount(ex[:, :, :2].flatten(), minlength=M)) > 1e-3
    # the test can fail: a biased draw (class 0 twice as likely) is rejected
    biased = torch.bincount(cls.flatten(), minlength=C).clone()
    biased[0] *= 2
    assert _chi2_pvalue(biased) < 1e-6


@pytest.mark.parametrize("R", [2, 4])
def test_rotation_augmentation_distinct_classes(R):
    base = coded()
    s = EpisodeSampler(base, 10, 1, 2, rotations=R, seed=5)
    assert s.n_classes == C * R
    cls, ex = s.indices(40)
    xs, ys, xq, yq = s.gather(cls, ex)
    for t in range(cls.shape[0]):
        assert len(set(cls[t].tolist())) == 10  # (class, rotation) pairs distinct in a task
        for n in range(10):
            c, r = int(cls[t, n]) // R, int(cls[t, n]) % R
            img = xs[t, n]  # K = 1: support example of label n
            assert torch.equal(img, torch.rot90(base[c, int(ex[t, n, 0])], r, dims=(-2, -1)))
            assert int(ys[t, n]) == n
    seen_rot = {int(c) % R for c in cls.flatten()}
    assert seen_rot == set(range(R))


def test_distributed_shares_concatenate_to_the_single_process_batch():
    full = EpisodeSampler(coded(), 4, 1, 2, seed=9).sample(7)
    for world in (2, 3):
        parts = [EpisodeSampler(coded(), 4, 1, 2, seed=9, rank=r, world_size=world).sample(7) for r in range(world)]
        assert [p[0].shape[0] for p in parts] == ([4, 3] if world == 2 else [3, 2, 2])
        for i in range(4):
            assert torch.equal(torch.cat([p[i] for p in parts]), full[i])


def test_group_by_class_and_from_labels():
    x = torch.arange(24, dtype=torch.float32).view(24, 1)
    labels = torch.tensor([3, 1, 2] * 8)
    data, classes = group_by_class(x, labels)
    assert classes.tolist() == [1, 2, 3] and data.shape == (3, 8, 1)
    assert data[0, :, 0].tolist() == [float(i) for i in range(1, 24, 3)]
    s = EpisodeSampler.from_labels(x, labels, 3, 2, 2, seed=0)
    xs, ys, _, _ = s.sample(2)
    assert xs.shape == (2, 6, 1)
    with pytest.raises(ValueError, match="same number"):
        group_by_class(x[:-1], labels[:-1])
    d2, _ = group_by_class(x[:-1], labels[:-1], per_class=7)
    assert d2.shape == (3, 7, 1)


@pytest.mark.parametrize("kwargs,name", [
    (dict(n_way=13, k_shot=1, q_query=1), "n_way"),
    (dict(n_way=0, k_shot=1, q_query=1), "n_way"),
    (dict(n_way=2, k_shot=5, q_query=5), "k_shot \\+ q_query"),
    (dict(n_way=2, k_shot=0, q_query=1), "k_shot"),
    (dict(n_way=2, k_shot=1, q_query=0), "q_query"),
    (dict(n_way=2, k_shot=1, q_query=1, rotations=5), "rotations"),
    (dict(n_way=2, k_shot=1, q_query=1, rank=2, world_size=2), "rank"),
])
def test_bad_arguments_raise_value_error_naming_them(kwargs, name):
    with pytest.raises(ValueError, match=name):
        EpisodeSampler(coded(), **kwargs)


def test_empty_split_and_bad_T():
    with pytest.raises(ValueError, match="empty"):
        EpisodeSampler(torch.zeros(0, 5, 3), 1, 1, 1)
    s = EpisodeSampler(coded(), 2, 1, 1)
    with pytest.raises(ValueError, match="T must"):
        s.sample(0)
    with pytest.raises(ValueError, match="world_size"):
        EpisodeSampler(coded(), 2, 1, 1, rank=0, world_size=4).sample(3)  # fewer tasks than ranks


def test_sinusoid_sampler():
    s = SinusoidSampler(10, 15, seed=0, dtype=torch.float64)
    xs, ys, xq, yq = s.sample(500)
    assert xs.shape == (500, 10, 1) and yq.shape == (500, 15, 1) and xs.dtype == torch.float64
    amp, ph = s.last_tasks
    assert 0.1 <= float(amp.min()) and float(amp.max()) <= 5.0 and float(amp.max()) > 4.5
    assert 0.0 <= float(ph.min()) and float(ph.max()) <= math.pi
    assert -5 <= float(torch.cat([xs, xq], 1).min()) and float(torch.cat([xs, xq], 1).max()) <= 5
    torch.testing.assert_close(ys, amp[:, None, None] * torch.sin(xs - ph[:, None, None]), rtol=0, atol=1e-12)
    torch.testing.assert_close(yq, amp[:, None, None] * torch.sin(xq - ph[:, None, None]), rtol=0, atol=1e-12)
    e1 = s.fixed_episodes(5, 2, seed=3)
    e2 = SinusoidSampler(10, 15, seed=99, dtype=torch.float64).fixed_episodes(5, 2, seed=3)
    assert all(torch.equal(u, v) for a, b in zip(e1, e2) for u, v in zip(a, b))
    parts = [SinusoidSampler(2, 2, seed=4, rank=r, world_size=2).sample(5) for r in range(2)]
    full = SinusoidSampler(2, 2, seed=4).sample(5)
    assert torch.equal(torch.cat([parts[0][1], parts[1][1]]), full[1])
    with pytest.raises(ValueError, match="amplitude"):
        SinusoidSampler(1, 1, amplitude=(5.0, 0.1))


@pytest.mark.parametrize("n_way,k,q", [(4, 1, 1), (2, 2, 1), (2, 1, 2)])
def test_sparse_draws_distinct_and_uniform(n_way, k, q):
    """Many classes or examples (the redraw-on-repeat path): still distinct and uniform."""
    Cs, Ms = 400, 60
    s = EpisodeSampler(torch.zeros(Cs, Ms, 1), n_way, k, q, seed=2024)
    cls, ex = s.indices(20000)
    srt = cls.sort(dim=1).values
    assert not bool((srt[:, 1:] == srt[:, :-1]).any())
    srt = ex.sort(dim=2).values
    assert not bool((srt[..., 1:] == srt[..., :-1]).any())
    assert _chi2_pvalue(torch.bincount(cls.flatten(), minlength=Cs)) > 1e-3
    assert _chi2_pvalue(torch.bincount(cls[:, 0], minlength=Cs)) > 1e-3
    assert _chi2_pvalue(torch.bincount(ex.flatten(), minlength=Ms)) > 1e-3
    # ordered pairs of the first two classes are uniform too (no bias towards c0 < c1)
    assert abs(float((cls[:, 0] < cls[:, 1]).double().mean()) - 0.5) < 0.02
