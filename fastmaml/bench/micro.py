"""Micro level: the ops under the meta-step.

- ``sgd_step``: the multi-tensor, multi-task inner update θ' = θ − α g for every
  parameter tensor of a network, per task (``[T, *shape]``): ``fastmaml.ops.sgd_step``
  against a per-tensor Python loop and ``torch._foreach_add`` (one call for the list).
- ``mlp_loss_and_grad``: per-task MLP loss and gradient, ``fastmaml.ops.mlp_loss_and_grad``
  against torch.func ``vmap(grad_and_value(task_loss))``.
- ``mlp_hvp``: per-task Hessian-vector product, ``fastmaml.ops.mlp_hvp`` against torch.func
  ``vmap(jvp(grad(task_loss)))`` (forward-over-reverse).

Each is checked against a float64 computation before it is timed; the speedup column is
the fastmaml op's speed over each row.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable

import torch
import torch.nn.functional as F

from fastmaml.bench import measure
from fastmaml.bench.configs import FAMILIES, build_model, make_batch, Config
from fastmaml.bench.runner import ConfigResult, Row, Settings, _quartiles, assign_speedups, compare

RTOL = 1e-4  # relative agreement of a float32 op with its float64 value


class _Skip(Exception):
    pass


def _fastmaml_op(name: str) -> Callable:
    import fastmaml.ops as ops

    fn = getattr(ops, name, None)
    if fn is None:
        raise _Skip(f"fastmaml.ops.{name} is not available in this checkout (not merged yet)")
    return fn


def _time_rows(cases: list[tuple[str, str, Callable[[int], list[torch.Tensor]]]], ref: list[torch.Tensor],
               s: Settings, n_inputs: int, work: int, fast_key: str) -> list[Row]:
    rows = []
    for key, label, fn in cases:
        row = Row(key, label)
        try:
            row.first_s, out = measure.time_call(lambda: fn(0), lambda o: None, s.device, "torch")
            row.max_abs_diff, row.rel_diff = compare(out, ref)
            row.tol_rel = RTOL
            row.agrees = row.rel_diff <= RTOL
            if not row.agrees:
                row.status = "disagrees"
                row.reason = f"off by {row.rel_diff:.3g} relative (tolerance {RTOL})"
            del out
            # each result is dropped before the next call, so no method pays for holding
            # two sets of outputs at once (for large outputs that makes the allocator hand
            # fresh, page-faulting memory to every call)
            for w in range(s.warmup):
                _, out = measure.time_call(lambda: fn((w + 1) % n_inputs), lambda o: None, s.device, "torch")
                del out
            spent, rep = 0.0, 0
            reps = max(s.reps, 20)
            while rep < reps and (rep < s.min_reps or spent < min(s.budget_s, 2.0)):
                dt, out = measure.time_call(lambda: fn(rep % n_inputs), lambda o: None, s.device, "torch")
                del out
                row.times_s.append(dt)
                spent += dt
                rep += 1
        except _Skip as exc:
            row.status, row.reason = "unavailable", str(exc)
        except Exception as exc:  # noqa: BLE001 - reported, not raised
            row.status, row.reason = "failed", f"{type(exc).__name__}: {str(exc)[:300]}"
        if row.times_s:
            row.median_s = statistics.median(row.times_s)
            row.q1_s, row.q3_s = _quartiles(row.times_s)
            row.min_s, row.max_s = min(row.times_s), max(row.times_s)
            row.tasks_per_s = work / row.median_s
        rows.append(row)
    assign_speedups(rows, fast_key)
    return rows


def bench_sgd_step(s: Settings, family: str = "omniglot", T: int = 32) -> ConfigResult:
    """θ' = θ − α g for every tensor of ``family``'s network, per task ([T, *shape])."""
    dev = s.device
    shapes = [tuple(p.shape) for p in build_model(family).parameters()]
    lr = 0.4
    gen = torch.Generator().manual_seed(0)
    inputs = []
    for _ in range(s.n_batches):
        ps = [torch.randn(T, *sh, generator=gen).to(dev) for sh in shapes]
        gs = [torch.randn(T, *sh, generator=gen).to(dev) for sh in shapes]
        inputs.append((ps, gs))
    ref = [p.double() - lr * g.double() for p, g in zip(*inputs[0])]

    def fm(i: int) -> list[torch.Tensor]:
        op = _fastmaml_op("sgd_step")
        return op(inputs[i][0], inputs[i][1], lr, backend=s.backend if s.backend != "auto" else None)

    bufs = [torch.empty_like(g) for g in inputs[0][1]]

    def fm_out(i: int) -> list[torch.Tensor]:
        op = _fastmaml_op("sgd_step")
        return op(inputs[i][0], inputs[i][1], lr, backend=s.backend if s.backend != "auto" else None, out=bufs)

    def loop(i: int) -> list[torch.Tensor]:
        return [p - lr * g for p, g in zip(*inputs[i])]

    def foreach(i: int) -> list[torch.Tensor]:
        return list(torch._foreach_add(inputs[i][0], inputs[i][1], alpha=-lr))

    cases = [("fastmaml.ops.sgd_step", "fastmaml.ops.sgd_step (one launch for all tensors)", fm),
             ("fastmaml.ops.sgd_step out=", "fastmaml.ops.sgd_step(..., out=bufs) (outputs allocated once, reused)",
              fm_out),
             ("loop", "per-tensor loop p - lr*g", loop),
             ("foreach", "torch._foreach_add (multi-tensor)", foreach)]
    numel = sum(T * int(torch.Size(sh).numel()) for sh in shapes)
    rows = _time_rows(cases, ref, s, s.n_batches, T, "fastmaml.ops.sgd_step")
    cfg = {"name": f"sgd_step: {family} net, {len(shapes)} tensors, T={T} ({numel} elements), scalar lr",
           "family": family, "T": T, "tensors": len(shapes), "elements": numel}
    return ConfigResult(cfg, rows, {"checked": True, "method": "float64 p - lr*g", "tolerance_rel": RTOL},
                        None, "micro")


def _mlp_inputs(family: str, T: int, dev: torch.device, dtype=torch.float32, n: int = 3):
    f = FAMILIES[family]
    model = build_model(family)
    lin = [m for m in model if isinstance(m, torch.nn.Linear)]
    out = []
    for i in range(n):
        xs, ys, _, _ = make_batch(Config(family, T, 1, 0.0), i, dev, dtype)
        W = [m.weight.detach().to(dev, dtype).unsqueeze(0).repeat(T, 1, 1) for m in lin]
        b = [m.bias.detach().to(dev, dtype).unsqueeze(0).repeat(T, 1) for m in lin]
        gen = torch.Generator().manual_seed(100 + i)
        vW = [torch.randn(w.shape, generator=gen).to(dev, dtype) for w in W]
        vb = [torch.randn(x.shape, generator=gen).to(dev, dtype) for x in b]
        out.append((W, b, xs, ys, vW, vb))
    return out


def _single_task_loss(loss: str):
    # MSE written out: torch.func.jvp of grad through F.mse_loss raises "ZeroTensors are
    # immutable" in torch 2.13 (its backward writes into a zero tangent in place).
    lf = (lambda pred, y: ((pred - y) ** 2).mean()) if loss == "mse" else F.cross_entropy

    def task_loss(params, x, y):
        W, b = params
        h = x
        for l, (w, bb) in enumerate(zip(W, b)):
            h = h @ w.T + bb
            if l < len(W) - 1:
                h = torch.relu(h)
        return lf(h, y)

    return task_loss


def bench_mlp_ops(s: Settings, family: str, T: int) -> list[ConfigResult]:
    """mlp_loss_and_grad and mlp_hvp on ``family``'s MLP, T tasks of its support set."""
    dev = s.device
    f = FAMILIES[family]
    inputs = _mlp_inputs(family, T, dev, n=s.n_batches)
    task_loss = _single_task_loss(f.loss)
    kw = dict(activation="relu", loss=f.loss)
    if s.backend != "auto":
        kw["backend"] = s.backend

    # float64 references: torch.func on float64 copies of batch 0
    W64, b64, x64, y64, vW64, vb64 = [[t.double() for t in a] if isinstance(a, list)
                                      else (a.double() if a.is_floating_point() else a) for a in inputs[0]]
    lg = torch.func.vmap(torch.func.grad_and_value(task_loss))
    (gW, gb), l64 = lg((W64, b64), x64, y64)
    ref_lg = [l64] + list(gW) + list(gb)

    def hvp_fn(params, v, x, y):
        return torch.func.jvp(lambda p: torch.func.grad(task_loss)(p, x, y), (params,), (v,))[1]

    hv = torch.func.vmap(hvp_fn)
    hW, hb = hv((W64, b64), (vW64, vb64), x64, y64)
    ref_hvp = list(hW) + list(hb)

    def fm_lg(i):
        W, b, x, y, _, _ = inputs[i]
        loss, gw, gbb = _fastmaml_op("mlp_loss_and_grad")(W, b, x, y, **kw)
        return [loss] + list(gw) + list(gbb)

    def tf_lg(i):
        W, b, x, y, _, _ = inputs[i]
        (gw, gbb), loss = lg((W, b), x, y)
        return [loss] + list(gw) + list(gbb)

    def fm_hvp(i):
        W, b, x, y, vW, vb = inputs[i]
        hw, hbb = _fastmaml_op("mlp_hvp")(W, b, x, y, vW, vb, **kw)
        return list(hw) + list(hbb)

    def tf_hvp(i):
        W, b, x, y, vW, vb = inputs[i]
        hw, hbb = hv((W, b), (vW, vb), x, y)
        return list(hw) + list(hbb)

    results = []
    widths = "-".join(map(str, f.mlp_widths or ()))
    for op, fm, tf, ref, label in (("mlp_loss_and_grad", fm_lg, tf_lg, ref_lg, "vmap(grad_and_value)"),
                                   ("mlp_hvp", fm_hvp, tf_hvp, ref_hvp, "vmap(jvp(grad)) forward-over-reverse")):
        cases = [(f"fastmaml.ops.{op}", f"fastmaml.ops.{op}", fm), ("torch.func", f"torch.func {label}", tf)]
        rows = _time_rows(cases, ref, s, s.n_batches, T, f"fastmaml.ops.{op}")
        cfg = {"name": f"{op}: MLP {widths}, T={T}, N={f.n_support}, {f.loss}", "family": family, "T": T,
               "N": f.n_support}
        results.append(ConfigResult(cfg, rows, {"checked": True, "method": "torch.func in float64",
                                                "tolerance_rel": RTOL}, None, "micro"))
    return results


def run_micro(s: Settings, quick: bool) -> list[ConfigResult]:
    out = [bench_sgd_step(s)]
    out += bench_mlp_ops(s, "sinusoid", 25)
    if not quick:
        out += bench_mlp_ops(s, "sinusoid", 1000)
        out += bench_mlp_ops(s, "wide_mlp", 32)
    return out
