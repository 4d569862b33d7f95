"""``python -m fastmaml.bench.family``: iMAML and Reptile on fastmaml's kernels.

Measures, each point in a fresh child process (so peak memory is that of the method
alone, and nothing a point before it allocated remains):

* ``imaml-vs-maml``: time per meta-step and peak memory of ``fastmaml.iMAML`` (CG on the
  HVPs) and ``fastmaml.MAML`` (second order, the adjoint) on the Omniglot and
  miniImageNet configurations (``fastmaml.bench.configs``) against the inner steps K;
* ``imaml-cg``: iMAML against the number of CG steps at a fixed K;
* ``reptile``: ``fastmaml.Reptile`` (batched over tasks, fused ``sgd_step``) against a
  loop-over-tasks Reptile (:func:`fastmaml.reference.reptile.reptile_direction`, what a
  user writes by hand).

Per point: one warm-up call, one call whose peak memory growth is measured
(:func:`fastmaml.bench.measure.peak_growth`: CPU RSS high-water mark above the RSS
before the call; CUDA ``max_memory_allocated``), then ``--reps`` timed calls (median).
A meta-step is the call and its ``backward()`` (iMAML, MAML) or the call that writes
``.grad`` (Reptile). Data are synthetic with the real shapes (``make_batch``).

Examples::

    python -m fastmaml.bench.family --suite imaml-vs-maml --families miniimagenet --steps 5,10,20
    python -m fastmaml.bench.family --suite reptile --reps 3 --json out.json --md out.md
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch

from fastmaml.bench import measure
from fastmaml.bench.configs import PAPER, Config, build_model, make_batch
from fastmaml.bench.runner import ConfigResult, Row, assign_speedups, tolerance

SUITES = ("imaml-vs-maml", "imaml-cg", "reptile")
LAM = 2.0  # iMAML's λ (the paper's Omniglot setting)


def _step_fn(spec: dict):
    """(model, a zero-argument meta-step) for one benchmark point."""
    import fastmaml  # noqa: PLC0415 - the child imports it; the parent needs only the CLI
    from fastmaml.family import Reptile, iMAML  # noqa: PLC0415

    fam, algo, K, T = spec["family"], spec["algo"], spec["K"], spec["T"]
    cfg = Config(fam, T, K, PAPER[fam]["inner_lr"])
    model = build_model(fam, seed=0).to(spec["device"])
    xs, ys, xq, yq = make_batch(cfg, 0, device=spec["device"])
    loss = cfg.fam.loss
    if algo == "imaml":
        m = iMAML(model, inner_lr=cfg.inner_lr, inner_steps=K, lam=LAM, cg_steps=spec["cg"], loss=loss,
                  cg_indefinite="truncate")

        def step():
            model.zero_grad(set_to_none=True)
            m(xs, ys, xq, yq).backward()
    elif algo == "maml":
        m = fastmaml.MAML(model, inner_lr=cfg.inner_lr, inner_steps=K, loss=loss)

        def step():
            model.zero_grad(set_to_none=True)
            m(xs, ys, xq, yq).backward()
    elif algo == "reptile":
        m = Reptile(model, inner_lr=cfg.inner_lr, inner_steps=K, loss=loss)

        def step():
            model.zero_grad(set_to_none=True)
            m(xs, ys)
    elif algo == "reptile-loop":
        from fastmaml.reference.reptile import reptile_direction  # noqa: PLC0415

        params = dict(model.named_parameters())

        def fn(p, x):
            return torch.func.functional_call(model, p, (x,))

        def step():
            d, _ = reptile_direction(fn, params, xs, ys, inner_lr=cfg.inner_lr, inner_steps=K, loss=loss)
            for n, p in params.items():
                p.grad = d[n]
    else:
        raise ValueError(f"algo must be imaml, maml, reptile or reptile-loop, got {algo!r}")
    return (m if algo != "reptile-loop" else None), step, model, (xs, ys), cfg


def reptile_error(model: torch.nn.Module, batch: tuple, cfg: Config) -> tuple[float, float]:
    """max|d − d_ref| and its ratio to max|d_ref| of the Reptile direction in ``model``'s ``.grad``
    against the float64 loop over tasks on the same batch and initial θ."""
    from fastmaml.reference.reptile import reptile_direction  # noqa: PLC0415

    ref_model = build_model(cfg.family, seed=0).double()
    params = dict(ref_model.named_parameters())

    def fn(p, x):
        return torch.func.functional_call(ref_model, p, (x,))

    xs, ys = batch
    xs64 = xs.detach().cpu().double()
    ys64 = ys.detach().cpu().double() if ys.is_floating_point() else ys.detach().cpu()
    d, _ = reptile_direction(fn, params, xs64, ys64, inner_lr=cfg.inner_lr, inner_steps=cfg.K, loss=cfg.fam.loss)
    got = dict(model.named_parameters())
    worst = max((got[n].grad.detach().cpu().double() - d[n]).abs().max().item() for n in d)
    return worst, worst / (max(v.abs().max().item() for v in d.values()) or 1.0)


def run_point(spec: dict) -> dict:
    """Warm-up, peak memory, timed repetitions of one point (in this process)."""
    torch.manual_seed(0)
    if spec.get("threads"):  # the parent's torch threads (python -m fastmaml.bench --threads N)
        torch.set_num_threads(int(spec["threads"]))
    device = torch.device(spec["device"])
    m, step, model, batch, cfg = _step_fn(spec)

    def sync(_: object) -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    t0 = time.perf_counter()
    step()
    first = time.perf_counter() - t0
    peak, how, _ = measure.peak_growth(step, sync, device, "torch")
    times = []
    for _ in range(spec["reps"]):
        dt, _ = measure.time_call(step, sync, device, "torch")
        times.append(dt)
    out = dict(spec, first_s=first, median_s=statistics.median(times) if times else None, times_s=times,
               peak_bytes=peak, peak_how=how, path=getattr(m, "path", ""))
    if spec["algo"] == "imaml":
        out["cg_iterations"] = m.last_cg.get("cg_iterations")
    if spec["algo"].startswith("reptile") and spec.get("check", True):
        out["max_abs_diff"], out["rel_diff"] = reptile_error(model, batch, cfg)  # .grad: the last step's d
    return out


def run_isolated(spec: dict, timeout_s: float) -> dict:
    """``run_point`` in a fresh ``python -m fastmaml.bench.family --point`` child."""
    cmd = [sys.executable, "-m", "fastmaml.bench.family", "--point", json.dumps(spec)]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=dict(os.environ))
    except subprocess.TimeoutExpired:
        return dict(spec, error=f"timed out after {timeout_s:.0f} s")
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
    if res.returncode != 0 or not lines:
        return dict(spec, error=f"exit {res.returncode}: {res.stderr.strip().splitlines()[-1:]}")
    return json.loads(lines[-1])


def plan(suites: list[str], families: list[str], steps: list[int], cg_steps: list[int], cg_at_k: int,
         reps: int, device: str, tasks: int | None = None, reptile_steps: tuple[int, ...] = (5,)) -> list[dict]:
    """The points of ``suites``; ``tasks`` overrides the configurations' meta-batch size."""
    pts: list[dict] = []

    def add(algo: str, fam: str, K: int, cg: int = 0) -> None:
        pts.append(dict(suite=suite, algo=algo, family=fam, T=tasks or PAPER[fam]["T"][0], K=K, cg=cg, reps=reps,
                        device=device))

    for suite in suites:
        if suite == "imaml-vs-maml":
            for fam in families:
                for K in steps:
                    add("imaml", fam, K, cg_steps[0])
                    add("maml", fam, K)
        elif suite == "imaml-cg":
            for fam in families:
                for cg in cg_steps:
                    add("imaml", fam, cg_at_k, cg)
        elif suite == "reptile":
            for fam in dict.fromkeys(["sinusoid", *families]):
                for K in reptile_steps:
                    add("reptile", fam, K)
                    add("reptile-loop", fam, K)
    return pts


def _mib(b: int | None) -> str:
    return "n/a" if b is None else f"{b / 2**20:.0f}"


def table(results: list[dict]) -> str:
    """Markdown table of the results."""
    head = ("| suite | family | T | K | algo | CG steps | median s/step | first s | peak MiB | path |\n"
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n")
    rows = []
    for r in results:
        if "error" in r:
            rows.append(f"| {r['suite']} | {r['family']} | {r['T']} | {r['K']} | {r['algo']} | {r['cg'] or ''} | "
                        f"{r['error']} | | | |")
            continue
        med = "n/a" if r["median_s"] is None else f"{r['median_s']:.3f}"
        cg = f"{r['cg']} (ran {r.get('cg_iterations')})" if r["algo"] == "imaml" else ""
        rows.append(f"| {r['suite']} | {r['family']} | {r['T']} | {r['K']} | {r['algo']} | {cg} | {med} | "
                    f"{r['first_s']:.2f} | {_mib(r['peak_bytes'])} | {r['path']} |")
    return head + "\n".join(rows) + "\n"


def memory_growth_per_step(results: list[dict], family: str = "miniimagenet") -> str:
    """iMAML's peak-memory growth per extra inner step between the smallest and largest
    K >= 5 measured for ``family`` (docs/DESIGN.md §9: memory independent of K)."""
    pts = sorted((r["K"], r["peak_bytes"]) for r in results if r.get("algo") == "imaml" and
                 r.get("suite") == "imaml-vs-maml" and r.get("family") == family and r.get("peak_bytes") is not None
                 and r["K"] >= 5)
    if len(pts) < 2:
        return ""
    (k0, b0), (k1, b1) = pts[0], pts[-1]
    per = (b1 - b0) / (k1 - k0) / 1e6
    return (f"iMAML {family}: peak {b0 / 2**20:.0f} MiB at K={k0}, {b1 / 2**20:.0f} MiB at K={k1}: "
            f"{per:+.2f} MB per extra inner step\n")


def _csv_ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


# ---------------------------------------------------------------------------------
# The ``imaml`` and ``reptile`` suites of ``python -m fastmaml.bench``: the points above,
# each in a fresh process, as the report writer's tables (fastmaml.bench.report).
# ---------------------------------------------------------------------------------

BENCH_SUITES = ("imaml", "reptile")
BENCH_FAMILIES = ("omniglot", "miniimagenet")  # quick mode: the last one only
BENCH_CG = {True: (5, 1), False: (5, 1, 2, 10, 20)}  # quick / full; the first is the K sweep's


def bench_points(name: str, quick: bool, device: str, steps: tuple[int, ...] | None = None,
                 tasks: tuple[int, ...] | None = None, reps: int | None = None) -> list[dict]:
    """The points of suite ``name``, duplicates removed. ``imaml``: iMAML (CG 5) vs MAML
    against K (quick 1, 5; full 1, 5, 10, 20) and iMAML against the CG steps at K = 5
    (quick 1, 5; full 1, 2, 5, 10, 20). ``reptile``: fastmaml.Reptile vs the loop at K = 5
    on the sinusoid and the conv configurations. ``steps`` / ``tasks`` override K and T."""
    if name not in BENCH_SUITES:
        raise ValueError(f"name must be one of {BENCH_SUITES}, got {name!r}")
    fams = list(BENCH_FAMILIES[-1:] if quick else BENCH_FAMILIES)
    ks = list(steps) if steps else ([1, 5] if quick else [1, 5, 10, 20])
    cgs = list(BENCH_CG[quick])
    r = reps if reps is not None else (1 if quick else 3)
    subs = ["imaml-vs-maml", "imaml-cg"] if name == "imaml" else ["reptile"]
    pts = plan(subs, fams, ks, cgs, 5 if 5 in ks else ks[-1], r, device, tasks[0] if tasks else None,
               tuple(steps) if steps else (5,))
    for p in pts:
        p["threads"] = torch.get_num_threads()
        if p["family"] == "sinusoid":
            p["reps"] = max(p["reps"], 20)  # milliseconds per step: 20 reps cost nothing
    return pts


def _key(p: dict) -> tuple:
    return p["algo"], p["family"], p["T"], p["K"], p["cg"]


def _row(method: str, label: str, r: dict) -> Row:
    row = Row(method, label)
    if "error" in r:
        row.status = "timed out" if r["error"].startswith("timed out") else "failed"
        row.reason = r["error"]
        return row
    ts = r["times_s"] or [r["first_s"]]
    q = statistics.quantiles(ts, n=4, method="inclusive") if len(ts) > 1 else [ts[0], ts[0], ts[0]]
    row.first_s, row.times_s, row.median_s = r["first_s"], ts, statistics.median(ts)
    row.q1_s, row.q3_s, row.min_s, row.max_s = q[0], q[2], min(ts), max(ts)
    row.tasks_per_s = r["T"] / row.median_s
    row.peak_bytes, row.memory_kind = r["peak_bytes"], r["peak_how"]
    row.info = {k: r[k] for k in ("path", "K", "cg", "cg_iterations") if r.get(k) not in (None, "")}
    row.max_abs_diff, row.rel_diff = r.get("max_abs_diff"), r.get("rel_diff")
    return row


def _config(title: str, fam: str, T: int, K: object, **extra: object) -> dict:
    c = Config(fam, T, 1, PAPER[fam]["inner_lr"]).as_dict()
    c.update(name=title, K=K, **extra)
    return c


def _tables(name: str, pts: list[dict], done: dict) -> list[ConfigResult]:
    out: list[ConfigResult] = []
    groups: dict[tuple, list[dict]] = {}
    for p in pts:
        groups.setdefault((p["suite"], p["family"], p["T"], p["K"] if p["suite"] != "imaml-vs-maml" else 0),
                          []).append(p)
    no_speedup = "iMAML and MAML compute different meta-gradients: no speedup"
    for (sub, fam, T, K), ps in groups.items():
        if sub == "imaml-vs-maml":
            rows = [_row(f"{p['algo']} K={p['K']}", "fastmaml.iMAML" if p["algo"] == "imaml" else "fastmaml.MAML",
                         done[_key(p)]) for p in ps]
            cfg = _config(f"iMAML (λ={LAM:g}, CG {ps[0]['cg']}) vs MAML (second order) against K: {fam} T={T}", fam,
                          T, sorted({p["K"] for p in ps}), lam=LAM)
        elif sub == "imaml-cg":
            ps = sorted(ps, key=lambda p: p["cg"])
            rows = [_row(f"imaml cg={p['cg']}", "fastmaml.iMAML", done[_key(p)]) for p in ps]
            cfg = _config(f"iMAML (λ={LAM:g}) against CG steps: {fam} T={T} K={K}", fam, T, K, lam=LAM)
        else:
            rows = [_row("fastmaml" if p["algo"] == "reptile" else "loop",
                         "fastmaml.Reptile" if p["algo"] == "reptile" else "Reptile, loop over tasks",
                         done[_key(p)]) for p in ps]
            cfg = _config(f"Reptile: {fam} T={T} K={K}", fam, T, K)
        ref: dict = {"checked": sub == "reptile"}
        if sub == "reptile":
            loop = next((r for r in rows if r.method == "loop" and r.rel_diff is not None), None)
            tol = tolerance(loop.rel_diff) if loop is not None else None
            ref.update(method="Reptile loop over tasks, float64, the same batch and θ",
                       float32_loop_rel_diff=loop.rel_diff if loop else None, tolerance_rel=tol)
            for r in rows:
                if r.rel_diff is not None and tol is not None:
                    r.tol_rel, r.agrees = tol, bool(r.rel_diff <= tol)
                    if not r.agrees:
                        r.status, r.reason = "disagrees", f"direction off by {r.rel_diff:.3g} relative"
            assign_speedups(rows)
        else:
            for r in rows:
                r.speedup_note = no_speedup
        out.append(ConfigResult(cfg, rows, ref, None, name))
    return out


def bench_results(name: str, quick: bool, device: str, *, steps: tuple[int, ...] | None = None,
                  tasks: tuple[int, ...] | None = None, reps: int | None = None, timeout_s: float | None = None,
                  progress: Callable[[str], None] | None = None) -> list[ConfigResult]:
    """Run suite ``name`` (each point in a fresh process, capped at ``timeout_s``,
    default 900 s) and return its tables."""
    pts = bench_points(name, quick, device, steps, tasks, reps)
    done: dict[tuple, dict] = {}
    for p in pts:
        if _key(p) not in done:
            if progress:
                progress(f"{name}: {p['family']} {p['algo']} K={p['K']}" + (f" cg={p['cg']}" if p["cg"] else ""))
            done[_key(p)] = run_isolated(p, timeout_s or 900.0)
    return _tables(name, pts, done)


def n_runs(name: str, quick: bool, device: str, **kw: object) -> int:
    """How many child processes ``bench_results`` starts (for a progress bar)."""
    return len({_key(p) for p in bench_points(name, quick, device, **kw)})  # type: ignore[arg-type]


def summary(results: list[ConfigResult]) -> str:
    """The iMAML memory-growth lines of ``results`` (one per family measured against K)."""
    lines = []
    for res in results:
        if res.suite == "imaml" and isinstance(res.config.get("K"), list):
            pts = [dict(algo="imaml", suite="imaml-vs-maml", family=res.config["family"], K=r.info["K"],
                        peak_bytes=r.peak_bytes) for r in res.rows if r.label == "fastmaml.iMAML" and "K" in r.info]
            lines.append(memory_growth_per_step(pts, res.config["family"]))
    return "".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastmaml.bench.family", description=__doc__.split("\n\n")[0])
    p.add_argument("--suite", default=",".join(SUITES), help=f"comma-separated: {', '.join(SUITES)}")
    p.add_argument("--families", default="omniglot,miniimagenet", help="conv families (omniglot, miniimagenet)")
    p.add_argument("--steps", type=_csv_ints, default=[1, 5, 10, 20], help="inner steps K (imaml-vs-maml)")
    p.add_argument("--cg-steps", type=_csv_ints, default=[5, 10, 20], help="CG steps; the first is used against K")
    p.add_argument("--cg-at-k", type=int, default=5, help="K of the imaml-cg sweep")
    p.add_argument("--reps", type=int, default=3, help="timed repetitions per point")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per point (child process)")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--md", default=None, help="write the Markdown table here")
    p.add_argument("--point", default=None, help=argparse.SUPPRESS)  # child mode: one JSON spec
    a = p.parse_args(argv)
    if a.point is not None:
        print(json.dumps(run_point(json.loads(a.point))))
        return 0
    suites = [s for s in a.suite.split(",") if s]
    bad = [s for s in suites if s not in SUITES]
    if bad:
        p.error(f"unknown suite(s) {bad}; choose from {SUITES}")
    pts = plan(suites, [f for f in a.families.split(",") if f], a.steps, a.cg_steps, a.cg_at_k, a.reps, a.device)
    results = []
    for i, spec in enumerate(pts):
        r = run_isolated(spec, a.timeout)
        results.append(r)
        print(f"[{i + 1}/{len(pts)}] {spec['suite']} {spec['family']} {spec['algo']} K={spec['K']} cg={spec['cg']}: "
              + (r.get("error") or f"{r['median_s']:.3f} s, peak {_mib(r['peak_bytes'])} MiB"), flush=True)
    text = table(results) + "\n" + memory_growth_per_step(results)
    print(text)
    if a.json:
        from fastmaml.bench.report import machine_info  # noqa: PLC0415

        with open(a.json, "w") as f:
            json.dump(dict(machine=machine_info(torch.device(a.device)), command=sys.argv, results=results), f,
                      indent=1, default=str)
    if a.md:
        with open(a.md, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
