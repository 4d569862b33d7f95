"""``python -m fastmaml.bench``: fastmaml against the MAML implementations people use.

With no arguments: the quick suite on the best device here (CUDA if available, else
CPU), a few minutes on a 2-core CPU. Prints one table per configuration and writes
``bench_out/bench_<time>_<device>.{json,md,png}``.

Examples::

    python -m fastmaml.bench                                   # quick suite
    python -m fastmaml.bench --full --results-md benchmarks/RESULTS.md
    python -m fastmaml.bench --suite sinusoid --order second --peers loop,vmap,jax
    python -m fastmaml.bench --suite scaling-T --tasks 1,10,100 --device cpu
    python -m fastmaml.bench --suite omniglot --peers fastmaml,jax --method-timeout 300

The op micro-suites take their own options (``--suite NAME --help``) and run alone:

    python -m fastmaml.bench --suite sgd_step --backend cpu     # fastmaml.bench.op_sgd_step
    python -m fastmaml.bench --suite batch_norm --reps 20       # fastmaml.bench.op_batch_norm
    python -m fastmaml.bench --suite mlp_triton                 # fastmaml.bench.op_mlp_triton (GPU)

``--reps N`` repeats each configuration's measurements N times interleaved (round-robin:
fastmaml, peer A, peer B, fastmaml, ...; default 3 with ``--full``, 1 in quick mode); a
speedup is then the median of the N per-round ratios, shown with their range. ``--load``
runs a CPU-bound competitor process (``fastmaml.bench.load``) during the measurements. The
header gives the machine's float32 sgemm rate measured in the same run (1 thread and every
usable core, at the start and the end); the GFLOP/s column gives each row's fraction of it.

``--method-timeout SECONDS`` runs each method in its own child process and kills it
(with its compile workers) when it has no result after that many seconds; its row then
says "timed out" and how far it got. Default: 600 s with ``--full`` (a cold JAX jit or
torch.compile of a conv meta-step can take many minutes on a small CPU), off in quick
mode (every method in this process); ``0`` turns it off. The micro ops always run here.
"""

from __future__ import annotations

import argparse
import re
import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from fastmaml.bench import family, harness, heap, load, measure, micro, op_batch_norm, op_mlp_triton, op_sgd_step, report, suites
from fastmaml.bench.runner import ConfigResult, Row, Settings
from fastmaml.bench.peers import METHODS

# The op micro-suites: each is its own program with its own options.
OP_SUITES = {"sgd_step": op_sgd_step.main, "batch_norm": op_batch_norm.main, "mlp_triton": op_mlp_triton.main}


def _ints(text: str) -> tuple[int, ...]:
    try:
        vals = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not vals or any(v < 1 for v in vals):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return vals


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m fastmaml.bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", default=None,
                   help=f"comma-separated suites: {', '.join(suites.SUITES)}, or all; or one op micro-suite "
                        f"with its own options: {', '.join(OP_SUITES)} "
                        f"(default: {','.join(suites.QUICK_DEFAULT)} in quick mode, all with --full)")
    p.add_argument("--device", default=None, help="cpu or cuda[:i] (default: cuda if available, else cpu)")
    p.add_argument("--backend", default="auto", help="fastmaml backend: auto, reference, cpu, cuda, triton")
    p.add_argument("--peers", default=None,
                   help=f"comma-separated methods to run (default: all): {', '.join(METHODS)}")
    p.add_argument("--order", choices=("second", "first", "both"), default=None,
                   help="MAML order (default: per suite; both for the sinusoid)")
    p.add_argument("--steps", type=_ints, default=None, help="inner steps K, comma-separated (overrides)")
    p.add_argument("--tasks", type=_ints, default=None, help="meta-batch sizes T, comma-separated (overrides)")
    p.add_argument("--reps", type=int, default=None,
                   help="interleaved repetitions (rounds): each configuration's methods are timed round-robin "
                        "this many times, and each speedup is the median of the per-round ratios "
                        "(default: 3 with --full, 1 in quick mode)")
    p.add_argument("--calls", type=int, default=None, help="timed calls per method and round (max; a time "
                                                           "budget stops slow methods earlier)")
    p.add_argument("--load", action="store_true",
                   help="run a CPU-bound competitor process (one thread of torch.mm in a loop) during the "
                        "measurements; the tables and JSON say so")
    p.add_argument("--load-settle", type=float, default=60.0, metavar="SECONDS",
                   help="with --load: wait up to this long after starting the competitor until the 1-minute "
                        "load average shows it (default 60)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up calls per method after the first")
    p.add_argument("--out", default="bench_out", help="output folder (default: bench_out/)")
    p.add_argument("--results-md", default=None,
                   help="also write the tables, machine and command into this Markdown file "
                        "(e.g. benchmarks/RESULTS.md), replacing the section of this device kind")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", dest="quick", action="store_true", default=True, help="quick suite (default)")
    mode.add_argument("--full", dest="quick", action="store_false", help="every configuration and peer")
    p.add_argument("--method-timeout", type=float, default=None, metavar="SECONDS",
                   help="run each method in its own process, killed after SECONDS without a result "
                        "(default: 600 with --full, off in quick mode; 0: off, in-process)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's default, one per core)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--malloc", choices=heap.CHOICES, default="tuned",
                   help="glibc malloc settings of the method processes: tuned (default; the same for every "
                        "method, see fastmaml.bench.heap) or inherit (this environment's)")
    return p.parse_args(argv)


def method_timeout(args: argparse.Namespace) -> float | None:
    """The per-method cap in seconds, or None (in-process): 600 in full mode, off in quick mode."""
    if args.method_timeout is None:
        return None if args.quick else 600.0
    if args.method_timeout < 0:
        raise SystemExit(f"--method-timeout must be >= 0 (0: no cap), got {args.method_timeout:g}")
    return args.method_timeout or None


def _device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch.cuda.is_available() is False on this machine")
    if dev.type not in ("cpu", "cuda"):
        raise SystemExit(f"--device must be cpu or cuda, got {name!r}")
    return dev


class _Progress:
    def __init__(self, total: int, enabled: bool):
        self.bar = None
        self.started = False
        if enabled:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, unit="step", dynamic_ncols=True, file=sys.stderr)
            except ImportError:
                self.bar = None
        self.enabled = enabled

    def __call__(self, text: str) -> None:
        if self.bar is not None:
            if self.started:
                self.bar.update(1)
            self.started = True
            self.bar.set_postfix_str(text[:70])
        elif self.enabled:
            print(f"... {text}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            if self.started:
                self.bar.update(1)
            self.bar.close()


def update_results_md(path: Path, section_key: str, text: str) -> None:
    """Replace (or append) the section between this device kind's markers."""
    begin, end = f"<!-- fastmaml-bench:{section_key} -->", f"<!-- /fastmaml-bench:{section_key} -->"
    block = f"{begin}\n{text.rstrip()}\n{end}\n"
    if path.exists():
        old = path.read_text()
        # the "no figures yet" note goes once a section is written
        old = re.sub(r"<!-- fastmaml-bench:placeholder -->.*?<!-- /fastmaml-bench:placeholder -->\n?", "", old,
                     flags=re.S)
        pat = re.compile(re.escape(begin) + r".*?" + re.escape(end) + r"\n?", re.S)
        new = pat.sub(lambda _m: block, old) if pat.search(old) else old.rstrip() + "\n\n" + block
    else:
        new = ("# fastmaml benchmark results\n\n"
               "Generated by `python -m fastmaml.bench ... --results-md benchmarks/RESULTS.md`: one section per "
               "device kind, each naming the machine, the versions, the commit and the command. Times are "
               "medians per meta-step after warm-up; \"first step\" includes compilation; peak memory is the "
               "growth during one meta-step (CPU: resident-set high-water mark; GPU: "
               "torch.cuda.max_memory_allocated); the speedup is fastmaml's, and is shown only where both "
               "meta-gradients agree with the float64 reference.\n\n" + block)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(new)


def run(argv: list[str] | None = None) -> tuple[list[ConfigResult], dict, dict[str, Path]]:
    args = parse_args(argv)
    t_start = time.perf_counter()
    device = _device(args.device)
    if args.threads is not None:
        torch.set_num_threads(max(1, args.threads))
    q = args.quick
    if args.suite is None:
        names = suites.QUICK_DEFAULT if q else suites.SUITES
    elif args.suite == "all":
        names = suites.SUITES
    else:
        names = tuple(s.strip() for s in args.suite.split(",") if s.strip())
        bad = [s for s in names if s not in suites.SUITES]
        if bad:
            raise SystemExit(f"--suite: unknown {bad}; choose from {', '.join(suites.SUITES)} or all")
    methods = None
    if args.peers:
        methods = tuple(m.strip() for m in args.peers.split(",") if m.strip())
        bad = [m for m in methods if m not in METHODS]
        if bad:
            raise SystemExit(f"--peers: unknown {bad}; choose from {', '.join(METHODS)}")
    orders = {None: None, "second": (False,), "first": (True,), "both": (False, True)}[args.order]
    base = Settings(device=device, backend=args.backend,
                    warmup=1 if q else 3, reps=10 if q else 30, min_reps=3 if q else 5,
                    budget_s=3.0 if q else 20.0, method_timeout_s=method_timeout(args))
    if args.calls is not None:
        base = replace(base, reps=max(1, args.calls), min_reps=min(base.min_reps, max(1, args.calls)))
    if args.reps is not None and args.reps < 1:
        raise SystemExit(f"--reps must be >= 1, got {args.reps}")
    base = replace(base, rounds=args.reps if args.reps is not None else (1 if q else 3))
    if args.warmup is not None:
        base = replace(base, warmup=max(1, args.warmup))
    opts = suites.Options(quick=q, device_type=device.type, orders=orders, steps=args.steps, tasks=args.tasks,
                          methods=methods)
    units = suites.plan(tuple(n for n in names if n != "micro"), opts, base)
    n_micro = (3 if q else 7) * ("micro" in names)
    fam_kw = dict(steps=args.steps, tasks=args.tasks, reps=args.reps and max(1, args.reps))
    fam_names = [n for n in names if n in suites.FAMILY_SUITES]
    total = n_micro + sum(len(u.methods) + (1 if u.settings.check else 0) for u in units)
    total += sum(u.settings.rounds for u in units if u.settings.rounds > 1)
    total += sum(family.n_runs(n, q, str(device), **fam_kw) for n in fam_names)
    progress = _Progress(total, not args.no_progress)
    user_malloc = heap.user_settings()
    malloc_line, malloc_added = heap.apply(args.malloc, base.method_timeout_s is not None)
    results: list[ConfigResult] = []
    rates = {"at the start": measure.machine_rate()}
    competitor = load.Competitor(settle_s=max(0.0, args.load_settle)) if args.load else None
    load_info: dict = {"on": False}
    try:
        if competitor is not None:
            competitor.start()
            rates["under --load"] = dict(measure.machine_rate(), under_load=True)
        if "micro" in names:
            progress("micro ops")
            results += micro.run_micro(base, q)
            for _ in range(n_micro - 1):
                progress("micro ops")
        for u in units:
            res = harness.run_config(u.cfg, u.methods, u.settings, u.suite, progress)
            for m, why in u.skipped.items():
                res.rows.append(Row(m, METHODS.get(m, m), status="skipped", reason=why))
            results.append(res)
        for n in fam_names:  # each point in a fresh process, capped by --method-timeout (default 900 s)
            results += family.bench_results(n, q, str(device), timeout_s=base.method_timeout_s, progress=progress,
                                            **fam_kw)
    finally:
        progress.close()
        heap.restore(malloc_added)
        if competitor is not None:
            load_info = competitor.stop()
    for res in results:
        res.load = competitor is not None
    rates["at the end"] = measure.machine_rate()
    meta = report.machine_info(device)
    meta.update(matmul=rates, load=load_info, rounds=base.rounds, malloc_env=user_malloc, malloc=malloc_line)
    report.apply_machine_rate(results, meta)
    meta["command"] = "python -m fastmaml.bench" + ("" if not argv else " " + shlex.join(argv))
    meta["mode"] = "quick" if q else "full"
    meta["suites"] = list(names)
    meta["method_timeout_s"] = base.method_timeout_s
    meta["wall_s"] = time.perf_counter() - t_start
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"bench_{time.strftime('%Y%m%d-%H%M%S')}_{device.type}"
    paths = {"json": out / f"{stem}.json", "md": out / f"{stem}.md", "png": out / f"{stem}.png"}
    report.write_json(results, meta, paths["json"])
    md = report.markdown_doc(results, meta, meta["command"])
    fam_summary = family.summary(results)
    md += ("\n" + fam_summary) if fam_summary else ""
    paths["md"].write_text(md)
    why = report.plot(results, paths["png"])
    if why is not None:
        paths.pop("png")
        meta["plot"] = why
    if args.results_md:
        key = "gpu" if device.type == "cuda" else "cpu"
        update_results_md(Path(args.results_md), key, md)
        paths["results_md"] = Path(args.results_md)
    print("\n".join(report.header(meta)) + "\n")
    for res in results:
        print(report.text_table(res))
        print()
    print(report.legend())
    print(fam_summary, end="")
    print(f"wall time {meta['wall_s']:.0f} s; wrote " + ", ".join(str(p) for p in paths.values())
          + (f" (no plot: {why})" if why else ""))
    return results, meta, paths


def op_suite(argv: list[str]) -> tuple[str | None, list[str]]:
    """(the op micro-suite ``--suite`` names, argv without it) or (None, argv)."""
    for i, a in enumerate(argv):
        if a == "--suite" and i + 1 < len(argv) and argv[i + 1] in OP_SUITES:
            return argv[i + 1], argv[:i] + argv[i + 2:]
        if a.startswith("--suite=") and a.split("=", 1)[1] in OP_SUITES:
            return a.split("=", 1)[1], argv[:i] + argv[i + 1:]
    return None, argv


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    name, rest = op_suite(argv)
    if name is not None:
        return OP_SUITES[name](rest)
    run(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
