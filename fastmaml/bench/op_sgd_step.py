"""Micro-suite ``sgd_step``: ``fastmaml.ops.sgd_step``, the fused inner update θ' = θ − α·g.

Parameter sets (docs/DESIGN.md §5): the sinusoid MLP 1-40-40-1 at T = 25 and the Omniglot
4-conv-64 network at T = 32; θ shared by the tasks, g per task, a scalar (Python
float) lr, no autograd. Compared, in the same run:

- ``fastmaml[<backend>]``: one fused call for all tensors, into new output tensors;
- ``fastmaml[<backend>] out=``: the same call writing into output tensors allocated
  once before timing and reused by every call (``sgd_step(..., out=bufs)``);
- ``reference loop``: :func:`fastmaml.reference.sgd_step`, one ``p - a * g`` per tensor;
- ``torch._foreach``: ``torch._foreach_add(θ expanded, g, alpha=-lr)``;
- ``torch copy``: ``out.copy_(src)`` moving the same number of bytes (half read, half
  written), the memory-bandwidth yardstick.

Bytes per update: read θ (N), read g (T·N), write θ' (T·N) elements. Reported: median
time per call, spread (10th–90th percentile), effective bandwidth (bytes / median).
The methods are interleaved in rounds so that a noisy neighbour hits them all alike.

    python -m fastmaml.bench --suite sgd_step [--backend cpu] [--reps 300] [--out PATH]

Writes a table to the terminal and JSON (machine, versions, commit, figures) to
``--out`` (default ``bench_out/sgd_step_<backend>.json``).
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

from fastmaml import reference as ref
from fastmaml.bench import measure, report
from fastmaml.ops import sgd_step

SINUSOID = [(40, 1), (40,), (40, 40), (40,), (1, 40), (1,)]
OMNIGLOT = (
    [(64, 1, 3, 3), (64,), (64,), (64,)]  # conv1 weight, bias, BN γ, β
    + [(64, 64, 3, 3), (64,), (64,), (64,)] * 3  # conv2..4
    + [(5, 256), (5,)]  # linear head
)
SETS = {"sinusoid": (SINUSOID, 25, 0.01), "omniglot": (OMNIGLOT, 32, 0.4)}
COPY = "torch copy (same bytes)"


def summarize(times: list[float], nbytes: int) -> dict:
    q = statistics.quantiles(times, n=10) if len(times) > 1 else [times[0]]
    med = statistics.median(times)
    return {"median_s": med, "p10_s": q[0], "p90_s": q[-1], "bytes": nbytes,
            "bandwidth_GBps": nbytes / med / 1e9, "reps": len(times)}


def bench_set(name: str, backend: str, dtype: torch.dtype, device: torch.device, reps: int, warmup: int,
              sets: dict | None = None) -> dict:
    shapes, T, lr = (sets or SETS)[name]
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=gen, dtype=dtype).to(device) for s in shapes]
    grads = [torch.randn((T, *s), generator=gen, dtype=dtype).to(device) for s in shapes]
    es = params[0].element_size()
    n_elem = sum(p.numel() for p in params)
    nbytes = (n_elem + 2 * T * n_elem) * es  # read θ and g, write θ'
    expanded = [p.expand_as(g) for p, g in zip(params, grads)]
    src = torch.randn(nbytes // (2 * es), dtype=dtype, device=device)
    dst = torch.empty_like(src)

    # agreement first: every method computes the same update
    want = ref.sgd_step(params, grads, lr)
    with torch.no_grad():
        got = sgd_step(params, grads, lr, backend=backend)
    fe = torch._foreach_add(expanded, grads, alpha=-lr)
    bufs = [torch.empty_like(g) for g in grads]  # the out= method's outputs, reused every call
    with torch.no_grad():
        got_out = sgd_step(params, grads, lr, backend=backend, out=bufs)
    err = max(max((a - b).abs().max().item() for a, b in zip(outs, want)) for outs in (got, got_out, fe))

    fused, fused_out = f"fastmaml[{backend}]", f"fastmaml[{backend}] out="
    methods = {
        fused: lambda: sgd_step(params, grads, lr, backend=backend),
        fused_out: lambda: sgd_step(params, grads, lr, backend=backend, out=bufs),
        "reference loop": lambda: ref.sgd_step(params, grads, lr),
        "torch._foreach": lambda: torch._foreach_add(expanded, grads, alpha=-lr),
        COPY: lambda: dst.copy_(src),
    }
    rounds = 5
    per = max(1, reps // rounds)
    collected: dict[str, list[float]] = {k: [] for k in methods}
    with torch.no_grad():
        for _ in range(rounds):
            for k, fn in methods.items():
                collected[k] += measure.repeat(fn, per, warmup, device)
    rows = {k: summarize(collected[k], nbytes) for k in methods}
    fast, fast_out, copy = (rows[k]["median_s"] for k in (fused, fused_out, COPY))
    return {
        "set": name, "tasks": T, "tensors": len(shapes), "elements_per_task": n_elem,
        "dtype": str(dtype).replace("torch.", ""), "lr": lr, "max_abs_diff_vs_reference": err, "methods": rows,
        "fused_over_copy_time": fast / copy,
        "reference_over_fused_time": rows["reference loop"]["median_s"] / fast,
        "foreach_over_fused_time": rows["torch._foreach"]["median_s"] / fast,
        "out_fused_over_copy_time": fast_out / copy,
        "reference_over_out_fused_time": rows["reference loop"]["median_s"] / fast_out,
    }


def targets(results: list[dict]) -> tuple[dict, list[str]]:
    """Each target judged twice: the allocating call (new outputs every call) and out=
    (outputs preallocated once and reused), since they differ by the allocation cost."""
    out: dict = {}
    lines = []
    by = {r["set"]: r for r in results}
    met = lambda ok: "met" if ok else "NOT met"  # noqa: E731
    if "omniglot" in by:
        new, o = by["omniglot"]["fused_over_copy_time"], by["omniglot"]["out_fused_over_copy_time"]
        out["omniglot_fused_within_1.5x_of_copy"] = {"new_outputs": new <= 1.5, "out=": o <= 1.5}
        lines.append(f"omniglot_fused_within_1.5x_of_copy: new outputs {new:.2f}x ({met(new <= 1.5)}), "
                     f"out= {o:.2f}x ({met(o <= 1.5)})")
    if "sinusoid" in by:
        new, o = by["sinusoid"]["reference_over_fused_time"], by["sinusoid"]["reference_over_out_fused_time"]
        out["sinusoid_fused_3x_faster_than_reference"] = {"new_outputs": new >= 3.0, "out=": o >= 3.0}
        lines.append(f"sinusoid_fused_3x_faster_than_reference: new outputs {new:.2f}x ({met(new >= 3.0)}), "
                     f"out= {o:.2f}x ({met(o >= 3.0)})")
    return out, lines


def print_table(results: list[dict], device: torch.device, dtype: str) -> None:
    print(f"sgd_step on {device} ({dtype}); torch {torch.__version__}")
    header = f"{'set':<9} {'method':<25} {'median':>10} {'p10..p90':>21} {'GB/s':>8}"
    print(header)
    print("-" * len(header))
    for r in results:
        for k, m in r["methods"].items():
            print(f"{r['set']:<9} {k:<25} {m['median_s'] * 1e6:>8.1f}us "
                  f"{m['p10_s'] * 1e6:>9.1f}..{m['p90_s'] * 1e6:<9.1f} {m['bandwidth_GBps']:>8.2f}")
        print(f"{r['set']:<9} fused/copy time {r['fused_over_copy_time']:.2f}x; reference/fused "
              f"{r['reference_over_fused_time']:.2f}x; foreach/fused {r['foreach_over_fused_time']:.2f}x; "
              f"max |diff| vs reference {r['max_abs_diff_vs_reference']:.2e}")
        print(f"{r['set']:<9} with out= (preallocated outputs): fused/copy time "
              f"{r['out_fused_over_copy_time']:.2f}x; reference/fused {r['reference_over_out_fused_time']:.2f}x")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fastmaml.bench --suite sgd_step",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--backend", default="cpu", help="fastmaml backend to measure (cpu, cuda, triton)")
    ap.add_argument("--device", default=None, help="tensor device (default: cuda for cuda/triton, else cpu)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--sets", default="sinusoid,omniglot")
    ap.add_argument("--reps", type=int, default=300)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--threads", type=int, default=0, help="CPU threads for torch and fastmaml (0: leave as is)")
    ap.add_argument("--out", default=None, help="JSON file (default: bench_out/sgd_step_<backend>.json)")
    args = ap.parse_args(argv)
    from fastmaml import _ext

    if args.threads > 0:
        torch.set_num_threads(args.threads)
        _ext.ext().set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if args.backend in ("cuda", "triton") else "cpu"))
    names = [s.strip() for s in args.sets.split(",") if s.strip()]
    bad = [s for s in names if s not in SETS]
    if bad:
        raise SystemExit(f"--sets: unknown {bad}; choose from {', '.join(SETS)}")
    results = [bench_set(s, args.backend, getattr(torch, args.dtype), device, args.reps, args.warmup)
               for s in names]
    print_table(results, device, args.dtype)
    tg, lines = targets(results)
    print("targets:")
    for line in lines:
        print("  " + line)
    meta = report.machine_info(device)
    meta["fastmaml_threads"] = _ext.ext().openmp_max_threads() if _ext._C is not None else None
    out = Path(args.out or f"bench_out/sgd_step_{args.backend}.json")
    report.write_payload(out, {"benchmark": "sgd_step", "backend": args.backend, "device": str(device),
                               "meta": meta, "results": results, "targets": tg})
    print(f"wrote {out}")
    return 0
