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
3. A warm-up call that also measures the peak-memory growth, then timed repetitions on
   rotated meta-batches (``i mod n_batches``) until ``reps`` or the time budget is
   used (at least ``min_reps``): median, quartiles, min and max.
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
from fastmaml.bench.configs import Batch, Config, build_model, config_flops, make_batch

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
    gflops: float | None = None
    info: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


@dataclass
class ConfigResult:
    config: dict
    rows: list[Row]
    reference: dict
    flops: int | None = None
    suite: str = ""

    def as_dict(self) -> dict:
        return {"suite": self.suite, "config": self.config, "flops_per_meta_step": self.flops,
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
    """speedup of ``fast_key`` over every other timed row — only where both agree."""
    fast = next((r for r in rows if r.method == fast_key), None)
    for r in rows:
        r.speedup = None
        if r.median_s is None:
            continue
        if fast is None or fast.median_s is None:
            r.speedup_note = f"{fast_key} not measured"
        elif fast.agrees is not True:
            r.speedup_note = f"{fast_key} meta-gradient " + ("disagrees" if fast.agrees is False else "not checked")
        elif r.agrees is not True:
            r.speedup_note = "meta-gradient " + ("disagrees" if r.agrees is False else "not checked") + ": no speedup"
        else:
            r.speedup = r.median_s / fast.median_s
            r.speedup_note = ""


def _quartiles(xs: list[float]) -> tuple[float, float]:
    if len(xs) < 2:
        return xs[0], xs[0]
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], q[2]


def run_method(method: str, problem: peers.Problem, s: Settings, ref: list[torch.Tensor] | None,
               tol_rel: float | None, on_stage: Callable[[str, dict], None] | None = None) -> Row:
    """Check, warm up, measure the memory of and time one method on ``problem``.
    ``on_stage(stage, data)`` is told "first" and "warmup" when those are done (outside
    every timed region); the isolated runner forwards them to the parent."""
    cfg = problem.cfg
    row = Row(method, peers.METHODS.get(method, method))
    try:
        prepared = peers.make(method, problem, s.backend)
    except peers.Unavailable as exc:
        row.status, row.reason = "unavailable", str(exc)
        return row
    except Exception as exc:  # noqa: BLE001 - a failing peer is a result, reported with its error
        row.status, row.reason = "failed", f"setup: {type(exc).__name__}: {exc}"
        return row
    row.notes = list(prepared.notes)
    dev, fw = problem.device, prepared.framework
    n = len(problem.batches)
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
        # method (one warm-up call longer than budget / min_reps: JAX's or a compiled
        # conv net on a CPU, up to minutes per step) gets no further warm-up and at least
        # one timed repetition instead of min_reps; the table shows n for every row. A
        # very slow one (the warm-up call alone longer than the whole budget) is timed by
        # that warm-up call — already the second call, after the compiling first one —
        # instead of calling it once more.
        min_reps = s.min_reps
        very_slow = False
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
            slow_above = s.budget_s / max(1, s.min_reps)
            if w == 0 and dt > slow_above:
                min_reps = 1
                very_slow = dt > s.budget_s
                if very_slow:
                    row.times_s.append(dt)
                    row.info["slow_method"] = (f"timed by its one warm-up call (the second call; step "
                                               f"> the {s.budget_s:.2g} s budget)")
                else:
                    row.info["slow_method"] = (f"one warm-up call only, at least 1 timed rep "
                                               f"(step > {slow_above:.2g} s)")
                break
        if on_stage:
            on_stage("warmup", dict(peak_bytes=row.peak_bytes, memory_kind=row.memory_kind))
        # 3. timed repetitions on rotated batches
        spent = 0.0
        rep = 0
        while not very_slow and rep < s.reps and (rep < min_reps or spent < s.budget_s):
            i = (1 + s.warmup + rep) % n
            dt, out = measure.time_call(lambda: prepared.step(i), prepared.sync, dev, fw)
            del out
            row.times_s.append(dt)
            spent += dt
            rep += 1
    except Exception as exc:  # noqa: BLE001
        row.status = "failed"
        msg = str(exc).strip().splitlines()
        row.reason = f"{type(exc).__name__}: {msg[0][:300] if msg else ''}"
        row.info["traceback"] = traceback.format_exc(limit=6)[-3000:]
    try:
        row.info.update(prepared.info())
    except Exception as exc:  # noqa: BLE001
        row.info["info_error"] = str(exc)
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
