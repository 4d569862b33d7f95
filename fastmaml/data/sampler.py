"""Vectorised few-shot episode samplers: N-way K-shot classification and the MAML
paper's sinusoid regression.

A meta-batch of T tasks is drawn with a handful of tensor ops on the data's device,
without a Python loop over tasks or classes (learn2learn's ``TaskDataset`` and
torchmeta's ``BatchMetaDataLoader`` build one episode at a time in Python):

    classes  c[t, :N]      = a uniformly random ordered N-subset of 0..C'−1
    examples e[t, n, :K+Q] = a uniformly random ordered (K+Q)-subset of 0..M−1
    x[t, n, j]             = data[c[t, n] // R, e[t, n, j]] rotated by 90°·(c[t, n] % R)

with C' = C·R candidate classes when rotation augmentation adds R − 1 rotated copies
of every class (R = 1 without it). The subsets are the top-N of i.i.d. uniforms, or,
when N ≪ C', N random integers with the rows that repeat one redrawn (see
``_distinct``); either way class c[t, n] gets label n, a random relabelling 0..N−1
per task. Support and query come from disjoint example
indices of the same classes.

Rank-aware sampling (``rank``/``world_size``): every process draws the random numbers
of the whole meta-batch from the same seed and gathers only its own contiguous share of
the tasks (``fastmaml.distributed.task_range``), so P processes see exactly the tasks
one process would; the random numbers are cheap next to the gathers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from fastmaml.distributed import task_range

Episode = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def _positive(name: str, value: object, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def _generator(generator: torch.Generator | None, seed: int, device: torch.device) -> torch.Generator:
    if generator is None:
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)
        return generator
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if generator.device.type != device.type:
        raise ValueError(f"generator must be on the data's device {device}, got one on {generator.device}")
    return generator


def _ranks(rank: object, world_size: object) -> tuple[int, int]:
    world = _positive("world_size", world_size)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world:
        raise ValueError(f"rank must be an int in [0, world_size={world}), got {rank!r}")
    return rank, world


def group_by_class(x: torch.Tensor, labels: torch.Tensor, *, per_class: int | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense ``[n_classes, n_per_class, *shape]`` tensor from examples x [n, *shape] and
    integer labels [n], and the sorted class values [n_classes]. Every class must have
    the same number of examples, or ``per_class`` (the first ``per_class`` of each, in
    their original order) must be given and at most the smallest count."""
    if not isinstance(x, torch.Tensor) or not isinstance(labels, torch.Tensor):
        raise TypeError(f"x and labels must be tensors, got {type(x).__name__} and {type(labels).__name__}")
    if labels.dim() != 1 or labels.shape[0] != x.shape[0] or labels.is_floating_point():
        raise ValueError(f"labels must be an integer tensor [n={x.shape[0]}], got {labels.dtype} "
                         f"shape {tuple(labels.shape)}")
    if x.shape[0] == 0:
        raise ValueError("x must hold at least one example, got an empty tensor")
    classes, counts = torch.unique(labels, return_counts=True)
    lo, hi = int(counts.min()), int(counts.max())
    if per_class is None:
        if lo != hi:
            raise ValueError(f"every class must have the same number of examples (got {lo} to {hi}); "
                             "pass per_class=<n> to keep the first n of each")
        per_class = lo
    elif _positive("per_class", per_class) > lo:
        raise ValueError(f"per_class must be <= the smallest class's count {lo}, got {per_class}")
    order = torch.sort(labels.to(x.device), stable=True).indices  # by class, original order within
    starts = torch.cumsum(counts, 0) - counts
    idx = starts.to(x.device)[:, None] + torch.arange(per_class, device=x.device)[None, :]
    return x[order[idx]], classes


def _distinct(g: torch.Generator, device: torch.device, lead: tuple[int, ...], pool: int, n: int) -> torch.Tensor:
    """[*lead, n] indices in [0, pool), distinct along the last dim, each row a uniformly
    random ordered n-subset. Dense draws (n·(n−1)/2 ≥ pool/4) take the n largest of
    ``pool`` uniforms; sparse ones draw n integers and redraw the rows with a repeat
    (rejection keeps the rows exactly uniform; few rows repeat, so the redraw loop,
    over rounds and not over rows, ends after a round or two). Pairs (n = 2, e.g. a
    1-shot support and a query example) need no redraw: b is drawn from the pool − 1
    values other than a."""
    if n * (n - 1) >= pool // 2:
        return torch.rand(*lead, pool, device=device, generator=g).topk(n, dim=-1).indices
    if n == 2:  # b uniform over the pool without a: draw from pool − 1 values, skip a
        a = torch.randint(0, pool, lead, device=device, generator=g)
        b = torch.randint(0, pool - 1, lead, device=device, generator=g)
        return torch.stack([a, b + (b >= a)], dim=-1)
    idx = torch.randint(0, pool, (*lead, n), device=device, generator=g)
    if n == 1:
        return idx
    flat = idx.view(-1, n)
    while True:
        srt = flat.sort(dim=1).values
        bad = (srt[:, 1:] == srt[:, :-1]).any(dim=1).nonzero().squeeze(1)
        if bad.numel() == 0:
            return idx
        flat[bad] = torch.randint(0, pool, (bad.numel(), n), device=device, generator=g)


def _fixed_episodes(sampler: EpisodeSampler | SinusoidSampler, n_episodes: int, batch: int, seed: int,
                    device: torch.device) -> list[Episode]:
    """``n_episodes`` episodes in meta-batches of ``batch`` from a generator of their own
    seeded by ``seed``, every rank getting all of them."""
    n_episodes, batch = _positive("n_episodes", n_episodes), _positive("batch", batch)
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    rank, world = sampler.rank, sampler.world_size
    sampler.rank, sampler.world_size = 0, 1
    try:
        return [sampler.sample(min(batch, n_episodes - i), g) for i in range(0, n_episodes, batch)]
    finally:
        sampler.rank, sampler.world_size = rank, world


class EpisodeSampler:
    """Draws meta-batches of N-way K-shot episodes from a dense class-indexed tensor.

    Args:
        data: [n_classes, n_per_class, *shape], on the device the episodes are wanted
            (one split: every class in it is a candidate).
        n_way: N classes per task; k_shot: K support examples per class; q_query: Q
            query examples per class (disjoint from the support ones).
        generator: a ``torch.Generator`` on data's device (default: one seeded by seed).
        seed: the default generator's seed.
        rotations: R ≥ 1; R > 1 adds the rotations by 90°·r, r = 1..R−1 (R ≤ 4) of every
            class as extra classes (Omniglot, as in the MAML paper). Needs 2-D images
            with equal height and width as the last two dims.
        rank, world_size: distributed mode; ``sample(T)`` returns this rank's share of
            the T tasks (see the module docstring).
        dtype: the dtype of xs/xq (default data's; integer data is divided by 255 when
            converted to a float dtype, so cached uint8 images come out in [0, 1]).

    ``sample(T)`` returns ``(xs [T', N·K, *shape], ys [T', N·K], xq [T', N·Q, *shape],
    yq [T', N·Q])``, contiguous, int64 labels laid out as 0..N−1 each repeated K (Q)
    times, T' = T or the rank's share.
    """

    def __init__(self, data: torch.Tensor, n_way: int, k_shot: int, q_query: int, *,
                 generator: torch.Generator | None = None, seed: int = 0, rotations: int = 1,
                 rank: int = 0, world_size: int = 1, dtype: torch.dtype | None = None) -> None:
        if not isinstance(data, torch.Tensor):
            raise TypeError(f"data must be a tensor [n_classes, n_per_class, *shape], got {type(data).__name__}")
        if data.dim() < 2 or data.shape[0] == 0 or data.shape[1] == 0:
            raise ValueError(f"data must be a non-empty [n_classes, n_per_class, *shape] tensor (an empty split?), "
                             f"got shape {tuple(data.shape)}")
        self.rotations = _positive("rotations", rotations)
        if self.rotations > 4:
            raise ValueError(f"rotations must be in 1..4 (90°·r, r < rotations), got {rotations}")
        if self.rotations > 1 and (data.dim() < 4 or data.shape[-1] != data.shape[-2]):
            raise ValueError(f"rotations > 1 needs square images [..., H, W] with H == W, got data shape "
                             f"{tuple(data.shape)}")
        self.data = data
        self.n_classes = data.shape[0] * self.rotations
        self.n_per_class = data.shape[1]
        self.n_way = _positive("n_way", n_way)
        if self.n_way > self.n_classes:
            raise ValueError(f"n_way must be <= the number of classes {self.n_classes}, got {n_way}")
        self.k_shot = _positive("k_shot", k_shot)
        self.q_query = _positive("q_query", q_query)
        if self.k_shot + self.q_query > self.n_per_class:
            raise ValueError(f"k_shot + q_query must be <= the examples per class {self.n_per_class}, "
                             f"got {k_shot} + {q_query}")
        self.rank, self.world_size = _ranks(rank, world_size)
        if dtype is not None and not isinstance(dtype, torch.dtype):
            raise TypeError(f"dtype must be a torch.dtype, got {type(dtype).__name__}")
        self.dtype = data.dtype if dtype is None else dtype
        self.generator = _generator(generator, seed, data.device)
        self._flat = data.reshape(data.shape[0] * data.shape[1], *data.shape[2:])
        self._labels: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # T -> (ys, yq), cloned out
        self._order: dict[int, torch.Tensor] = {}  # T -> the support-then-query row order

    @classmethod
    def from_labels(cls, x: torch.Tensor, labels: torch.Tensor, n_way: int, k_shot: int, q_query: int, *,
                    per_class: int | None = None, **kwargs: object) -> EpisodeSampler:
        """Sampler over examples x [n, *shape] with integer labels [n], grouped once by
        :func:`group_by_class` (keyword arguments as for the constructor)."""
        data, _ = group_by_class(x, labels, per_class=per_class)
        return cls(data, n_way, k_shot, q_query, **kwargs)  # type: ignore[arg-type]

    # --- drawing ---------------------------------------------------------------------
    def indices(self, T: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(classes [T', N] in 0..n_classes−1, example indices [T', N, K+Q]) of the next
        T tasks (this rank's share in distributed mode); advances the generator."""
        T = _positive("T", T)
        g = self.generator if generator is None else generator
        dev = self.data.device
        cls = _distinct(g, dev, (T,), self.n_classes, self.n_way)
        ex = _distinct(g, dev, (T, self.n_way), self.n_per_class, self.k_shot + self.q_query)
        lo, hi = task_range(T, self.rank, self.world_size)
        return cls[lo:hi], ex[lo:hi]

    def sample(self, T: int, generator: torch.Generator | None = None) -> Episode:
        """The next meta-batch (xs, ys, xq, yq) of T tasks (see the class docstring)."""
        cls, ex = self.indices(T, generator)
        return self.gather(cls, ex)

    def gather(self, cls: torch.Tensor, ex: torch.Tensor) -> Episode:
        """Episodes of given (classes [T, N], example indices [T, N, K+Q]).

        The rows of every support set, then of every query set, are gathered by one
        ``index_select`` straight into their final layout in the data's dtype, so xs
        and xq are the two contiguous halves of one buffer; rotated there, and
        converted to the output dtype when it differs: the copy-bound minimum."""
        T, N, K, Q, R = cls.shape[0], self.n_way, self.k_shot, self.q_query, self.rotations
        base = cls // R if R > 1 else cls
        flat = base[:, :, None] * self.n_per_class + ex  # [T, N, K+Q] rows of data
        order = self._order.get(T)
        if order is None:  # positions in flat of every support row, then every query row
            pos = torch.arange(T * N * (K + Q), device=flat.device).view(T, N, K + Q)
            order = self._order[T] = torch.cat([pos[:, :, :K].reshape(-1), pos[:, :, K:].reshape(-1)])
        x = self._flat.index_select(0, flat.view(-1).index_select(0, order))
        if R > 1:
            rot = (cls % R)[:, :, None]
            self._rotate(x, torch.cat([rot.expand(T, N, K).reshape(-1), rot.expand(T, N, Q).reshape(-1)]))
        x = self._convert(x)
        shape = self.data.shape[2:]
        labels = self._labels.get(T)
        if labels is None:
            lab = torch.arange(N, device=self.data.device)
            labels = self._labels[T] = (lab.repeat_interleave(K).expand(T, N * K).contiguous(),
                                        lab.repeat_interleave(Q).expand(T, N * Q).contiguous())
        return (x[:T * N * K].view(T, N * K, *shape), labels[0].clone(),
                x[T * N * K:].view(T, N * Q, *shape), labels[1].clone())

    def _rotate(self, x: torch.Tensor, rot: torch.Tensor) -> None:
        """Rotate x[i] [..., H, W] in place by 90°·rot[i]: a loop over the R − 1 angles,
        not over tasks."""
        for r in range(1, self.rotations):
            sel = (rot == r).nonzero().squeeze(1)
            if sel.numel():
                x.index_copy_(0, sel, torch.rot90(x.index_select(0, sel), r, dims=(-2, -1)))

    def _convert(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == self.dtype:
            return x
        if self.dtype.is_floating_point and not x.dtype.is_floating_point:
            # convert, then divide in place: the same values as torch.div(x, 255.0) and
            # about twice as fast on CPU (the promoting division is not vectorised)
            return x.to(self.dtype).div_(255.0)
        return x.to(self.dtype)

    def fixed_episodes(self, n_episodes: int, batch: int, *, seed: int = 0) -> list[Episode]:
        """A fixed evaluation set: ``n_episodes`` episodes in meta-batches of ``batch``
        (the last one smaller), drawn from a generator of their own seeded by ``seed``,
        so the same arguments give bit-identical episodes whatever the sampler's own
        generator has drawn. Distributed mode is ignored here (every rank gets all)."""
        return _fixed_episodes(self, n_episodes, batch, seed, self.data.device)


class SinusoidSampler:
    """The sinusoid regression tasks of Finn et al. (2017), §5.1: y = A·sin(x − φ) with
    A ~ U[amplitude], φ ~ U[phase], x ~ U[x_range] for support and query alike.

    ``sample(T)`` returns ``(xs [T', K, 1], ys [T', K, 1], xq [T', Q, 1], yq [T', Q, 1])``
    float tensors (T' as for :class:`EpisodeSampler`); ``last_tasks`` holds the
    (amplitude, phase) [T'] of the last draw.
    """

    def __init__(self, k_shot: int, q_query: int, *, amplitude: Sequence[float] = (0.1, 5.0),
                 phase: Sequence[float] = (0.0, math.pi), x_range: Sequence[float] = (-5.0, 5.0),
                 generator: torch.Generator | None = None, seed: int = 0, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, rank: int = 0, world_size: int = 1) -> None:
        self.k_shot = _positive("k_shot", k_shot)
        self.q_query = _positive("q_query", q_query)
        for name, rng in (("amplitude", amplitude), ("phase", phase), ("x_range", x_range)):
            if len(rng) != 2 or not float(rng[0]) <= float(rng[1]):
                raise ValueError(f"{name} must be a (low, high) pair with low <= high, got {rng!r}")
        self.amplitude, self.phase, self.x_range = tuple(amplitude), tuple(phase), tuple(x_range)
        self.device, self.dtype = torch.device(device), dtype
        self.rank, self.world_size = _ranks(rank, world_size)
        self.generator = _generator(generator, seed, self.device)
        self.last_tasks: tuple[torch.Tensor, torch.Tensor] | None = None

    def _uniform(self, shape: tuple[int, ...], rng: tuple, g: torch.Generator) -> torch.Tensor:
        u = torch.rand(shape, device=self.device, generator=g, dtype=torch.float64)
        return (rng[0] + (rng[1] - rng[0]) * u).to(self.dtype)

    def sample(self, T: int, generator: torch.Generator | None = None) -> Episode:
        T = _positive("T", T)
        g = self.generator if generator is None else generator
        amp = self._uniform((T,), self.amplitude, g)
        ph = self._uniform((T,), self.phase, g)
        x = self._uniform((T, self.k_shot + self.q_query, 1), self.x_range, g)
        lo, hi = task_range(T, self.rank, self.world_size)
        amp, ph, x = amp[lo:hi], ph[lo:hi], x[lo:hi]
        y = amp[:, None, None] * torch.sin(x - ph[:, None, None])
        self.last_tasks = (amp, ph)
        K = self.k_shot
        return (x[:, :K].contiguous(), y[:, :K].contiguous(), x[:, K:].contiguous(), y[:, K:].contiguous())

    def fixed_episodes(self, n_episodes: int, batch: int, *, seed: int = 0) -> list[Episode]:
        """A fixed evaluation set (see :meth:`EpisodeSampler.fixed_episodes`)."""
        return _fixed_episodes(self, n_episodes, batch, seed, self.device)
