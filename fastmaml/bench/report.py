"""Outputs: the terminal tables, the JSON file, the Markdown tables and the plot."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import subprocess
from pathlib import Path

import torch

from fastmaml.bench.load import KIND
from fastmaml.bench.runner import ConfigResult, Row

# ---------------------------------------------------------------------------------
# Machine and versions
# ---------------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(mod: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(mod)
    except metadata.PackageNotFoundError:
        pass
    try:
        m = __import__(mod)
        return str(getattr(m, "__version__", "?"))
    except Exception:  # noqa: BLE001 - not installed, or broken
        return None


def _git_commit() -> dict:
    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip() != ""
        return {"commit": commit or None, "dirty": dirty}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def machine_info(device: torch.device) -> dict:
    """Machine, versions and commit: the ``meta`` of every JSON file a benchmark writes."""
    import fastmaml

    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return {
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "gpu": gpu,
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "cuda": torch.version.cuda, "triton": _version("triton"), "jax": _version("jax"),
                     "jaxlib": _version("jaxlib"),
                     "higher": _version("higher"), "numpy": _version("numpy"), "fastmaml": fastmaml.__version__},
        "git": _git_commit(),
        # glibc's malloc tuning, read at process start (the method processes inherit it)
        "malloc_env": {k: v for k, v in sorted(os.environ.items()) if k.startswith("MALLOC_")},
    }


def sgemm_peak(meta: dict) -> float | None:
    """The all-core sgemm rate the fractions are taken of: the higher of the idle
    measurements at the start and the end of the run (the conservative choice)."""
    rates = [m["gflops_all"] for m in (meta.get("matmul") or {}).values() if m and not m.get("under_load")]
    return max(rates) if rates else None


def apply_machine_rate(results: list[ConfigResult], meta: dict) -> None:
    """Set every configuration's sgemm rate and every row's fraction of it."""
    peak = sgemm_peak(meta)
    for res in results:
        res.sgemm_gflops = peak
        for r in res.rows:
            r.sgemm_fraction = None if peak is None or r.gflops is None else r.gflops / peak


def header(meta: dict) -> list[str]:
    """The lines above the tables: the machine's sgemm rate, the load, the rounds."""
    lines = []
    for when, m in (meta.get("matmul") or {}).items():
        if m:
            lines.append(f"float32 sgemm {m['n']}x{m['n']} (torch.mm, median of {m['reps']}), {when}: "
                         f"{m['gflops_1thread']:.1f} GFLOP/s on 1 thread, {m['gflops_all']:.1f} GFLOP/s on "
                         f"{m['threads_all']} threads (all usable cores)")
    load = meta.get("load") or {}
    if load.get("on"):
        busy = load.get("busy_fraction")
        lines.append(f"load: ON, a competitor process ({load['kind']}) ran during every measurement"
                     + (f" (busy {100 * busy:.0f} % of its {load['wall_s']:.0f} s)" if busy is not None else ""))
    else:
        lines.append("load: off (no competitor process)")
    if meta.get("malloc"):
        lines.append(meta["malloc"])
    rounds = meta.get("rounds", 1)
    lines.append(f"each method timed in {rounds} interleaved round(s), round-robin over the methods of a "
                 "configuration; speedup = the MEDIAN OF THE PER-ROUND RATIOS (min–max in brackets)"
                 if rounds > 1 else "each method timed in 1 round (--reps 1): speedup = ratio of the medians")
    return lines


# ---------------------------------------------------------------------------------
# Formatting
# ---------------------------------------------------------------------------------


def fmt_time(s: float | None) -> str:
    if s is None:
        return "—"
    if s < 1e-3:
        return f"{s * 1e6:.1f} µs"
    if s < 1.0:
        return f"{s * 1e3:.2f} ms"
    return f"{s:.2f} s"


def fmt_bytes(b: int | None) -> str:
    if b is None:
        return "n/a"
    if b < 2**20:
        return f"{b / 2**10:.0f} KiB"
    if b < 2**30:
        return f"{b / 2**20:.1f} MiB"
    return f"{b / 2**30:.2f} GiB"


def _spread(r: Row) -> str:
    if r.median_s is None:
        return ""
    return f"IQR {fmt_time(r.q1_s)}–{fmt_time(r.q3_s)}, n={len(r.times_s)}"


def _diff(r: Row) -> str:
    if r.max_abs_diff is None:
        return "not checked" if r.median_s is not None else "—"
    mark = "" if r.agrees else " ✗"
    return f"{r.max_abs_diff:.1e} ({r.rel_diff:.1e} rel){mark}"


def _speedup(r: Row) -> str:
    if r.speedup is None:
        return "—"
    if len(r.round_speedups) > 1:  # the median of the per-round ratios, and their range
        return f"{r.speedup:.2f}× ({min(r.round_speedups):.2f}–{max(r.round_speedups):.2f})"
    return f"{r.speedup:.2f}×"


def _rate(r: Row) -> str:
    if r.gflops is None:
        return "—"
    return f"{r.gflops:.2f}" + ("" if r.sgemm_fraction is None else f" ({100 * r.sgemm_fraction:.0f} %)")


def _note(r: Row) -> str:
    parts = []
    if r.status != "ok":
        parts.append(f"{r.status.upper()}: {r.reason}")
    if r.info.get("path"):
        parts.append(f"path={r.info['path']}")
    for k in ("unique_graphs", "graph_breaks", "recompiles"):
        if r.info.get(k):
            parts.append(f"{k}={r.info[k]}")
    if r.speedup is None and r.speedup_note and r.status == "ok":
        parts.append(r.speedup_note)
    return "; ".join(parts)


COLUMNS = ["method", "median/step", "spread", "first step", "tasks/s", "peak mem", "speedup",
           "max |Δ| vs f64 ref", "GFLOP/s (% sgemm)", "notes"]


def row_cells(r: Row) -> list[str]:
    return [r.method, fmt_time(r.median_s), _spread(r), fmt_time(r.first_s),
            "—" if r.tasks_per_s is None else f"{r.tasks_per_s:,.0f}",
            fmt_bytes(r.peak_bytes) if r.median_s is not None else "—", _speedup(r), _diff(r),
            _rate(r), _note(r)]


def _title(res: ConfigResult) -> str:
    c = res.config
    t = c.get("name", "?")
    if c.get("model"):
        t += f" — {c['model']}, inner lr {c['inner_lr']}"
    if res.load:
        t += f" [--load: {KIND} running]"
    return t


def _footer(res: ConfigResult) -> str:
    ref = res.reference
    parts = []
    if res.flops:
        parts.append(f"{res.flops / 1e6:.1f} MFLOP per meta-step (GEMM and conv count, see fastmaml.bench.flops)")
    if ref.get("float32_loop_rel_diff") is not None:
        pert = ref.get("float32_loop_perturbed_rel_diffs")
        pert_txt = (f" ({', '.join(f'{v:.1e}' for v in pert)} on batch 0 with its inputs perturbed by ~1 ulp)"
                    if pert else "")
        parts.append(f"float32 loop vs float64 reference: {ref['float32_loop_rel_diff']:.1e} relative{pert_txt}; "
                     f"agreement tolerance {ref['tolerance_rel']:.1e} relative")
    elif ref.get("tolerance_rel") is not None:
        parts.append(f"agreement tolerance {ref['tolerance_rel']:.1e} relative")
    if res.rounds > 1:
        parts.append(f"speedup = the MEDIAN OF THE PER-ROUND RATIOS of {res.rounds} interleaved rounds (that "
                     "method's median / fastmaml's median in the same round), min–max in brackets; median/step "
                     "and spread over all timed calls (only where both meta-gradients agree)")
    else:
        parts.append("speedup = that method's median / fastmaml's median (only where both meta-gradients agree)")
    if res.sgemm_gflops:
        parts.append(f"% sgemm = GFLOP/s / this run's {res.sgemm_gflops:.1f} GFLOP/s all-core float32 sgemm rate")
    return "; ".join(parts)


def text_table(res: ConfigResult) -> str:
    cells = [COLUMNS] + [row_cells(r) for r in res.rows]
    widths = [max(len(c[i]) for c in cells[:]) for i in range(len(COLUMNS) - 1)]
    lines = [f"== {_title(res)}"]
    for c in cells:
        lines.append("  ".join(x.ljust(w) for x, w in zip(c[:-1], widths)) + "  " + c[-1])
    lines.append(f"   ({_footer(res)})")
    return "\n".join(lines)


def markdown_table(res: ConfigResult) -> str:
    esc = lambda s: s.replace("|", "\\|")  # noqa: E731
    lines = [f"#### {_title(res)}", "", "| " + " | ".join(COLUMNS) + " |",
             "|" + "|".join(["---"] * len(COLUMNS)) + "|"]
    for r in res.rows:
        lines.append("| " + " | ".join(esc(x) for x in row_cells(r)) + " |")
    lines += ["", f"_{_footer(res)}_", ""]
    return "\n".join(lines)


def markdown_doc(results: list[ConfigResult], meta: dict, command: str) -> str:
    m = meta
    v = m["versions"]
    g = m["git"]
    head = [
        f"### {m['gpu'] or m['cpu']} ({m['device']})",
        "",
        f"- command: `{command}`"
        + "".join(f" with {k}={v}" for k, v in (m.get("malloc_env") or {}).items()),
        f"- date: {m['date']}; commit {g.get('commit') or '?'}{' (uncommitted changes)' if g.get('dirty') else ''}",
        f"- machine: {m['cpu']}, {m['cpu_count']} CPUs, {m['torch_threads']} torch threads"
        + (f", GPU {m['gpu']}" if m["gpu"] else "") + f"; {m['platform']}",
        f"- versions: python {v['python']}, torch {v['torch']}, triton {v['triton']}, jax {v['jax']}, "
        f"higher {v['higher']}, fastmaml {v['fastmaml']}",
        f"- wall time of the run: {m.get('wall_s', 0):.0f} s",
        f"- each method in its own process, capped at {m['method_timeout_s']:g} s"
        if m.get("method_timeout_s") else "- every method in one process (no per-method cap)",
        *(f"- {line}" for line in header(m)),
        "",
    ]
    body = [markdown_table(r) for r in results]
    return "\n".join(head + [legend(markdown=True), ""] + body)


def legend(markdown: bool = False) -> str:
    """What each method row is."""
    from fastmaml.bench.peers import METHODS

    bn = ("; with BatchNorm its second-order meta-gradient is wrong (torch.func's batching rule for "
          "batch_norm's backward, pytorch/functorch#534; exactly 0 expected, 1.8e-2 measured in float64 for a "
          "conv bias before BN): a second-order conv row says DISAGREES where that error exceeds the "
          "configuration's float32 resolution (the tolerance), and can pass where float32 rounding alone "
          "moves the answer as much (Omniglot K=5)")
    notes = {"loop": "; learn2learn itself does not build on Python 3.11, so it is not installed",
             "vmap": bn, "compile": " (cold compile: inductor caches disabled)" + bn,
             "jax": " (same network and weights in jax.numpy/jax.lax)"}
    items = [f"{k}: {v}{notes.get(k, '')}" for k, v in METHODS.items()]
    statuses = ("DISAGREES: timed, no speedup; FAILED: raised an error or its process died; UNAVAILABLE: not "
                "installed; TIMED OUT: no result within --method-timeout (its process was killed; the note says "
                "how far it got); only rows whose meta-gradient agrees get a speedup")
    if markdown:
        return ("Methods:\n\n" + "\n".join(f"- `{i.split(':', 1)[0]}`:{i.split(':', 1)[1]}" for i in items)
                + f"\n\nStatuses: {statuses}.")
    return "methods:\n" + "\n".join(f"  {i}" for i in items) + f"\nstatuses: {statuses}"


def write_payload(path: Path, payload: dict) -> None:
    """Write one benchmark's JSON file (``payload`` holds its ``meta`` from machine_info)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1, default=str))


def write_json(results: list[ConfigResult], meta: dict, path: Path) -> None:
    write_payload(path, {"meta": meta, "results": [r.as_dict() for r in results]})


# ---------------------------------------------------------------------------------
# Plot
# ---------------------------------------------------------------------------------


def plot(results: list[ConfigResult], path: Path) -> str | None:
    """Speedup of fastmaml (or time per meta-step) against T, and peak memory against K.
    Returns None on success, or why no plot was drawn."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as exc:  # noqa: BLE001
        return f"matplotlib is not available ({exc})"
    scaling = [r for r in results if r.suite == "scaling-T"]
    memory = [r for r in results if r.suite == "memory-K"]
    if not scaling and not memory:
        # fall back: time per method of every end-to-end configuration
        scaling = [r for r in results if r.suite not in ("micro",)]
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))

    def series(res_list, x_key, y_fn):
        out: dict[str, list[tuple[float, float]]] = {}
        for res in res_list:
            x = res.config.get(x_key)
            for r in res.rows:
                y = y_fn(r)
                if x is not None and y is not None:
                    out.setdefault(r.method, []).append((x, y))
        return out

    ax = axes[0]
    sp = series(scaling, "T", lambda r: r.speedup if r.method != "fastmaml" else None)
    if sp:
        for m, pts in sp.items():
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=f"vs {m}")
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_yscale("log")
        ax.set_ylabel("speedup of fastmaml (×)")
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no speedup to plot\n(fastmaml not measured, or no agreement)", ha="center",
                va="center", transform=ax.transAxes)
    ax.set_xscale("log")
    ax.set_xlabel("meta-batch size T")
    ax.set_title("speedup vs T (" + (scaling[0].config.get("family", "") if scaling else "") + ")")

    ax = axes[1]
    ts = series(scaling, "T", lambda r: r.median_s)
    for m, pts in ts.items():
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] * 1e3 for p in pts], "o-", label=m)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("meta-batch size T")
    ax.set_ylabel("median time per meta-step (ms)")
    ax.set_title("time vs T")
    if ts:
        ax.legend(fontsize=8)

    ax = axes[2]
    mem = series(memory, "K", lambda r: r.peak_bytes / 2**20 if r.peak_bytes is not None else None)
    for m, pts in mem.items():
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=m)
    ax.set_xlabel("inner steps K")
    ax.set_ylabel("peak memory growth of one meta-step (MiB)")
    ax.set_title("memory vs K (" + (memory[0].config.get("family", "") if memory else "not run") + ")")
    if mem:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None
