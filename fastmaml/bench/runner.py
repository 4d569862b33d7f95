"""One method on one problem: checked against the float64 reference, then warmed up,
measured for peak memory and timed; speedups only between methods whose meta-gradients
agree. The data types of a result (``Settings``, ``Row``, ``ConfigResult``) live here;
``harness.run_config`` runs every method of a configuration, ``isolation`` runs one in a
capped child process.

Per configuration:
1. Reference: the per-task loop (plain unrolled autograd) in float64 on meta-batch 0,
   and the same loop in float32, whose error is float32's own rounding for this
   configuration (at lr 0.4 or with ReLU/max-pool kinks it reaches 1e-2 relative).
2. Per method: the first call (on batch 0; compile included for compiled methods) is
   timed as "time to first meta-step" and its meta-gradient is compared with the
   reference. Agreement: max|g − g_ref| / max|g_ref| ≤ max(RTOL_FLOOR, 4 × the float32
   loop's own relative error) — the flash-attention rule, "no worse than a few times
   PyTorch's own error at the same precision". The loop's float32 error is taken as the
   largest of its error on batch 0 and on ``N_PERTURB`` copies of batch 0 whose inputs
   are perturbed by about one float32 ulp (relative noise 2^-23·N(0,1)): one op order's
   rounding can land close to float64 by luck on an ill-conditioned configuration
   (Omniglot K=5 first order, lr 0.4: the loop's error is 2.2e-4 on batch 0 and
   1e-3 to 7e-3 on five perturbed copies), so its unperturbed error alone understates
   float32's resolution there and flags correct methods with another op order. A
   method that disagrees is still timed but gets no speedup (``speedup`` stays ``None``
   and the table says why).
3. A warm-up call that also measures the peak-memory growth (``start_method``), then
   ``rounds`` rounds of timed calls on rotated meta-batches (``i mod n_batches``), each
   until ``reps`` calls or its share ``budget_s / rounds`` of the time budget is used (at
   least ``min_reps``; ``time_round``). ``harness.run_config`` interleaves the rounds of
   a configuration's methods (round-robin: every method's round 1, then every method's
   round 2, ...); the row's median, quartiles, min and max are over all its timed calls,
   its speedup the median of the per-round ratios (``assign_speedups``).
"""

from __future__ import annotations

import hashlib
import math
import statistics
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from fastmaml.bench import measure, peers
from fastmaml.bench.configs import Batch, Config, build_model, make_batch
from fastmaml.bench.flops import config_flops

RTOL_FLOOR = 2e-4  # relative agreement floor in float32
BASELINE_FACTOR = 4.0  # × the float32 loop's own relative error
N_PERTURB = 3  # perturbed copies of batch 0 for the float32 loop's error (see the docstring)


@dataclass
class Settings:
    device: torch.device
    backend: str = "auto"
    warmup: int = 1
    reps: int = 10
    min_reps: int = 3
    budget_s: float = 5.0  # per method: stop repeating after this much timed time
    n_batches: int = 3  # rotated meta-batches
    check: bool = True  # compare with the float64 reference
    memory: bool = True
    method_timeout_s: float | None = None  # None: in-process; else each method in a child, capped
    rounds: int = 1  # interleaved repetitions (--reps): every method timed once per round, round-robin

    def __post_init__(self) -> None:
        for name in ("reps", "min_reps", "rounds"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"Settings.{name} must be a positive int, got {v!r}")


@dataclass
class Row:
    method: str
    label: str
    status: str = "ok"  # ok | disagrees | failed | unavailable | skipped | timed out
    reason: str = ""
    first_s: float | None = None
    median_s: float | None = None
    q1_s: float | None = None
    q3_s: float | None = None
    min_s: float | None = None
    max_s: float | None = None
    times_s: list[float] = field(default_factory=list)
    tasks_per_s: float | None = None
    peak_bytes: int | None = None
    memory_kind: str = ""
    max_abs_diff: float | None = None
    rel_diff: float | None = None
    tol_rel: float | None = None
    agrees: bool | None = None
    speedup: float | None = None  # fastmaml's speed over this method (median / fastmaml median)
    speedup_note: str = ""
    round_medians_s: list[float] = field(default_factory=list)  # each interleaved round's median
    round_speedups: list[float] = field(default_factory=list)  # that method's / fastmaml's, per round
    gflops: float | None = None
    sgemm_fraction: float | None = None  # gflops / the machine's all-core sgemm rate in the same run
    info: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


@dataclass
class ConfigResult:
    config: dict
    rows: list[Row]
    reference: dict
    flops: int | None = None
    suite: str = ""
    rounds: int = 1
    load: bool = False  # measured with the --load competitor running
    sgemm_gflops: float | None = None  # the machine's all-core float32 sgemm rate in the same run

    def as_dict(self) -> dict:
        return {"suite": self.suite, "config": self.config, "flops_per_meta_step": self.flops,
                "rounds": self.rounds, "load": self.load, "sgemm_gflops": self.sgemm_gflops,
                "reference": self.reference, "rows": [asdict(r) for r in self.rows]}


def compare(grads: list[torch.Tensor], ref: list[torch.Tensor]) -> tuple[float, float]:
    """Max absolute difference and its ratio to max|ref| over all parameter tensors."""
    if len(grads) != len(ref):
        raise ValueError(f"the method returned {len(grads)} gradient tensors, the reference has {len(ref)}")
    worst = 0.0
    for g, r in zip(grads, ref):
        if tuple(g.shape) != tuple(r.shape):
            raise ValueError(f"gradient shape {tuple(g.shape)} differs from the reference's {tuple(r.shape)}")
        d = (g.detach().to(device=r.device, dtype=torch.float64) - r).abs().max().item()
        worst = max(worst, d if math.isfinite(d) else math.inf)
    scale = max(r.abs().max().item() for r in ref) or 1.0
    return worst, worst / scale


def perturb_inputs(batch: Batch, seed: int) -> Batch:
    """Batch ``(xs, ys, xq, yq)`` with xs and xq scaled by (1 + 2^-23·N(0,1)) elementwise
    (about one float32 ulp; labels and targets unchanged), from a fixed seed."""
    xs, ys, xq, yq = batch
    g = torch.Generator().manual_seed(10_000 + seed)

    def p(x: torch.Tensor) -> torch.Tensor:
        noise = torch.randn(x.shape, generator=g, dtype=torch.float64).to(device=x.device, dtype=x.dtype)
        return x * (1 + 2.0 ** -23 * noise)

    return p(xs), ys, p(xq), yq


def tolerance(baseline_rel: float) -> float:
    return max(RTOL_FLOOR, BASELINE_FACTOR * baseline_rel)


def assign_speedups(rows: list[Row], fast_key: str = "fastmaml") -> None:
    """speedup of ``fast_key`` over every other timed row — only where both agree and both
    ran to the end. With interleaved rounds the speedup is the MEDIAN OF THE PER-ROUND
    RATIOS (that row's round median / fastmaml's in the same round; ``round_speedups``
    keeps them all): a noisy neighbour slows every method of a round alike, and the
    ratio of one round cancels it where the ratio of two overall medians would not."""
    fast = next((r for r in rows if r.method == fast_key), None)
    for r in rows:
        r.speedup, r.round_speedups = None, []
        if r.median_s is None:
            continue
        if fast is None or fast.median_s is None:
            r.speedup_note = f"{fast_key} not measured"
        elif fast.agrees is not True:
            r.speedup_note = f"{fast_key} meta-gradient " + ("disagrees" if fast.agrees is False else "not checked")
        elif r.agrees is not True:
            r.speedup_note = "meta-gradient " + ("disagrees" if r.agrees is False else "not checked") + ": no speedup"
        elif fast.status != "ok" or r.status != "ok":
            bad = fast if fast.status != "ok" else r
            r.speedup_note = f"{bad.method} {bad.status}: no speedup"
        else:
            pairs = [b / a for a, b in zip(fast.round_medians_s, r.round_medians_s) if a > 0]
            if len(fast.round_medians_s) != len(r.round_medians_s) or not pairs:
                pairs = [r.median_s / fast.median_s]  # rows timed without rounds (the micro ops)
            r.round_speedups = pairs
            r.speedup = statistics.median(pairs)
            r.speedup_note = ""


def _quartiles(xs: list[float]) -> tuple[float, float]:
    if len(xs) < 2:
        return xs[0], xs[0]
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], q[2]


@dataclass
class Live:
    """A prepared method between its rounds: what ``time_round`` needs."""

    prepared: peers.Prepared
    min_calls: int  # timed calls per round at least (1 for a slow method)
    next_batch: int  # the rotated meta-batch of the next timed call


def start_method(method: str, problem: peers.Problem, s: Settings, ref: list[torch.Tensor] | None,
                 tol_rel: float | None, on_stage: Callable[[str, dict], None] | None = None
                 ) -> tuple[Row, Live | None]:
    """Set up, check (first call), warm up and measure the memory of one method: the row so
    far, and the method ready for its rounds (None: unavailable or failed, the row says
    why). ``on_stage(stage, data)`` is told "first" and "warmup" when those are done
    (outside every timed region); the isolated runner forwards them to the parent."""
    row = Row(method, peers.METHODS.get(method, method))
    try:
        prepared = peers.make(method, problem, s.backend)
    except peers.Unavailable as exc:
        row.status, row.reason = "unavailable", str(exc)
        return row, None
    except Exception as exc:  # noqa: BLE001 - a failing peer is a result, reported with its error
        row.status, row.reason = "failed", f"setup: {type(exc).__name__}: {exc}"
        return row, None
    row.notes = list(prepared.notes)
    dev, fw = problem.device, prepared.framework
    n = len(problem.batches)
    live = Live(prepared, s.min_reps, 1 + s.warmup)
    try:
        # 1. first call (compile included) on batch 0, checked against the reference
        row.first_s, out = measure.time_call(lambda: prepared.step(0), prepared.sync, dev, fw)
        if ref is not None:
            row.max_abs_diff, row.rel_diff = compare(prepared.to_torch(out), ref)
            row.tol_rel = tol_rel
            row.agrees = bool(row.rel_diff <= tol_rel)  # type: ignore[operator]
            if not row.agrees:
                row.status = "disagrees"
                row.reason = (f"meta-gradient off by {row.max_abs_diff:.3g} abs, {row.rel_diff:.3g} relative "
                              f"(tolerance {tol_rel:.3g} relative)")
        del out
        if on_stage:
            on_stage("first", dict(first_s=row.first_s, max_abs_diff=row.max_abs_diff, rel_diff=row.rel_diff,
                                   tol_rel=row.tol_rel, agrees=row.agrees))
        # 2. warm-up; the first warm-up call measures the peak-memory growth. A slow
        # method (one warm-up call longer than a round's budget / min_reps: JAX's or a
        # compiled conv net on a CPU, up to minutes per step) gets no further warm-up and
        # at least one timed call per round instead of min_reps; the table shows n for
        # every row. With one round, a very slow one (the warm-up call alone longer than
        # the whole budget) is timed by that warm-up call — already the second call, after
        # the compiling first one — instead of calling it once more.
        budget = s.budget_s / s.rounds
        for w in range(max(1, s.warmup)):
            i = (1 + w) % n
            if w == 0 and s.memory:
                t0 = [0.0]

                def timed_step(i: int = i) -> object:
                    t0[0] = time.perf_counter()
                    return prepared.step(i)

                row.peak_bytes, row.memory_kind, out = measure.peak_growth(timed_step, prepared.sync, dev, fw)
                dt = time.perf_counter() - t0[0]  # the step and its sync, not the memory bookkeeping
            else:
                dt, out = measure.time_call(lambda: prepared.step(i), prepared.sync, dev, fw)
            del out
            slow_above = budget / max(1, s.min_reps)
            if w == 0 and dt > slow_above:
                live.min_calls = 1
                if s.rounds == 1 and dt > s.budget_s:
                    row.times_s.append(dt)
                    row.round_medians_s.append(dt)
                    row.info["slow_method"] = (f"timed by its one warm-up call (the second call; step "
                                               f"> the {s.budget_s:.2g} s budget)")
                    live.min_calls = 0
                else:
                    row.info["slow_method"] = (f"one warm-up call only, at least 1 timed rep per round "
                                               f"(step > {slow_above:.2g} s)")
                break
        if on_stage:
            on_stage("warmup", dict(peak_bytes=row.peak_bytes, memory_kind=row.memory_kind))
    except Exception as exc:  # noqa: BLE001
        _failed(row, exc)
        _info(row, prepared)
        return row, None
    return row, live


def _info(row: Row, prepared: peers.Prepared) -> None:
    try:
        row.info.update(prepared.info())
    except Exception as exc:  # noqa: BLE001
        row.info["info_error"] = str(exc)


def _failed(row: Row, exc: Exception) -> None:
    row.status = "failed"
    msg = str(exc).strip().splitlines()
    row.reason = f"{type(exc).__name__}: {msg[0][:300] if msg else ''}"
    row.info["traceback"] = traceback.format_exc(limit=6)[-3000:]


def time_round(row: Row, live: Live, problem: peers.Problem, s: Settings) -> bool:
    """One round of timed calls on rotated batches: up to ``s.reps`` calls, at least
    ``live.min_calls``, stopping once ``s.budget_s / s.rounds`` seconds are spent. The
    calls go to ``row.times_s``, their median to ``row.round_medians_s``. False: the
    method failed (the row says why) and gets no further round."""
    if live.min_calls == 0:  # timed by its warm-up call (one round only)
        return True
    p, dev, n = live.prepared, problem.device, len(problem.batches)
    spent, rep, times = 0.0, 0, []
    try:
        while rep < s.reps and (rep < live.min_calls or spent < s.budget_s / s.rounds):
            i = live.next_batch % n
            live.next_batch += 1
            dt, out = measure.time_call(lambda: p.step(i), p.sync, dev, p.framework)
            del out
            times.append(dt)
            spent += dt
            rep += 1
    except Exception as exc:  # noqa: BLE001
        _failed(row, exc)
        _info(row, p)
        return False
    finally:
        row.times_s += times
        if times:
            row.round_medians_s.append(statistics.median(times))
    return True


def finish_method(row: Row, live: Live | None, cfg: Config) -> Row:
    """The row's statistics over every timed call, and the method's own info."""
    if live is not None:
        _info(row, live.prepared)
    if row.times_s:
        ts = row.times_s
        row.median_s = statistics.median(ts)
        row.q1_s, row.q3_s = _quartiles(ts)
        row.min_s, row.max_s = min(ts), max(ts)
        row.tasks_per_s = cfg.T / row.median_s
        fl = config_flops(cfg)
        if fl is not None:
            row.gflops = fl / row.median_s / 1e9
    return row


def run_method(method: str, problem: peers.Problem, s: Settings, ref: list[torch.Tensor] | None,
               tol_rel: float | None, on_stage: Callable[[str, dict], None] | None = None) -> Row:
    """One method alone: ``start_method``, ``s.rounds`` rounds of ``time_round``, ``finish_method``."""
    row, live = start_method(method, problem, s, ref, tol_rel, on_stage)
    if live is not None:
        for _ in range(s.rounds):
            if not time_round(row, live, problem, s):
                break
    return finish_method(row, live, problem.cfg)


def make_problem(cfg: Config, s: Settings) -> peers.Problem:
    model = build_model(cfg.family, cfg.seed).to(s.device)
    batches = [make_batch(cfg, i, s.device) for i in range(s.n_batches)]
    return peers.Problem(cfg, model, batches, s.device)


def problem_digest(problem: peers.Problem) -> str:
    """SHA-256 of the initial weights and every batch, byte for byte (dtype and shape included)."""
    h = hashlib.sha256()
    for t in [*problem.model.state_dict().values(), *(x for b in problem.batches for x in b)]:
        t = t.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
