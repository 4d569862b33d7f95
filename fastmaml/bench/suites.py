"""The suites: which configurations and methods each runs, in quick and full mode.

Quick mode (the default of ``python -m fastmaml.bench``) is sized to finish in a few
minutes on a 2-core CPU: the sinusoid configuration (both orders, every peer), the wide
MLP and Omniglot K=1 (second order; without the compiled peers, whose cold compiles take
20 s to minutes each, and on a CPU Omniglot without JAX, whose conv step is 10-50x slower
than PyTorch's there), the micro ops, time against T for the
sinusoid (T = 1, 10, 100, 1000; without the compiled peer, which compiles afresh for
every T), and memory against K for miniImageNet (K = 1, 5, 10; fastmaml and the loop).
``--full`` runs every configuration of docs/DESIGN.md §5 (sinusoid T = 25 and 1000, K = 1
and 5; wide MLP K = 1 and 5; Omniglot K = 1 and 5; miniImageNet K = 5; both orders)
with every peer, more repetitions, and the longer sweeps (T up to 1000 with the
compiled peer; K up to 20 with the vmap peer as well).

The family suites ``imaml`` (iMAML vs second-order MAML against K, iMAML against the CG
steps) and ``reptile`` (fastmaml.Reptile vs a loop over tasks) run each point in a fresh
process (:mod:`fastmaml.bench.family`). They are not in the default quick suite: even
quick (miniImageNet only, K = 1, 5, CG 1, 5; one rep) they take a couple of minutes on a
2-core CPU. Ask for them with ``--suite imaml,reptile``; ``--full`` runs their whole
sweeps (Omniglot and miniImageNet, K = 1, 5, 10, 20, CG 1, 2, 5, 10, 20).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from fastmaml.bench.configs import PAPER, Config
from fastmaml.bench.family import BENCH_SUITES as FAMILY_SUITES
from fastmaml.bench.runner import Settings
from fastmaml.bench.peers import PEERS

SUITES = ("micro", "sinusoid", "wide-mlp", "omniglot", "miniimagenet", "scaling-T", "memory-K", *FAMILY_SUITES)
QUICK_DEFAULT = ("micro", "sinusoid", "wide-mlp", "omniglot", "scaling-T", "memory-K")


@dataclass
class Unit:
    suite: str
    cfg: Config
    methods: list[str]
    settings: Settings
    skipped: dict[str, str]  # method → why it is not run in this mode


@dataclass
class Options:
    quick: bool
    device_type: str
    orders: tuple[bool, ...] | None  # first_order flags chosen by --order, None: the suite's default
    steps: tuple[int, ...] | None
    tasks: tuple[int, ...] | None
    methods: tuple[str, ...] | None  # --peers (fastmaml rows are always included unless excluded)


def default_methods(family: str, device_type: str) -> list[str]:
    ms = ["fastmaml"]
    if family in ("sinusoid", "wide_mlp"):
        ms.append("fastmaml-generic")
    ms += [p for p in PEERS if p != "compile-ro" or device_type == "cuda"]
    return ms


def _select(family: str, o: Options) -> list[str]:
    ms = default_methods(family, o.device_type)
    if o.methods is not None:
        ms = [m for m in ms if m in o.methods] + [m for m in o.methods if m not in ms]
    return ms


def plan(suites: tuple[str, ...], o: Options, base: Settings) -> list[Unit]:
    units: list[Unit] = []
    q = o.quick

    def orders(default: tuple[bool, ...]) -> tuple[bool, ...]:
        return o.orders if o.orders is not None else default

    def add(suite: str, family: str, Ts, Ks, fos, settings: Settings, skip: dict[str, str] | None = None,
            methods: list[str] | None = None):
        lr = PAPER[family]["inner_lr"]
        Ts = o.tasks if o.tasks is not None and suite != "scaling-T" else Ts
        Ks = o.steps if o.steps is not None and suite != "memory-K" else Ks
        for T in Ts:
            for K in Ks:
                for fo in fos:
                    ms = methods if methods is not None else _select(family, o)
                    sk = {m: why for m, why in (skip or {}).items() if m in ms}
                    units.append(Unit(suite, Config(family, T, K, lr, fo), [m for m in ms if m not in sk],
                                      settings, sk))

    conv_settings = replace(base, min_reps=3 if q else base.min_reps, budget_s=base.budget_s)
    # Quick mode compiles only for the sinusoid (a cold torch.compile of a double backward
    # takes ~20 s for the sinusoid MLP on a 2-core CPU and minutes for the conv nets).
    no_compile = {"compile": "quick mode: compiled only for the sinusoid (cold compiles take 20 s to "
                             "minutes each); run --full",
                  "compile-ro": "quick mode: compiled only for the sinusoid; run --full"}
    quick_conv_skip = dict(no_compile)
    if base.device.type == "cpu":
        quick_conv_skip["jax"] = "quick mode: XLA's CPU conv step is 10-50x slower than PyTorch's; run --full"
    for s in suites:
        if s == "sinusoid":
            # full mode adds K=1 (the fused-MLP issue's sweep) to the paper's K=5
            add(s, "sinusoid", (25,) if q else (25, 1000), (5,) if q else (1, 5), orders((False, True)), base)
        elif s == "wide-mlp":
            add(s, "wide_mlp", (32,), (5,) if q else (1, 5), orders((False,) if q else (False, True)), base,
                no_compile if q else None)
        elif s == "omniglot":
            add(s, "omniglot", (32,), (1,) if q else (1, 5), orders((False,) if q else (False, True)),
                conv_settings, quick_conv_skip if q else None)
        elif s == "miniimagenet":
            add(s, "miniimagenet", (2,), (5,), orders((False,) if q else (False, True)), conv_settings,
                quick_conv_skip if q else None)
        elif s == "scaling-T":
            Ts = o.tasks or ((1, 10, 100, 1000) if q else (1, 5, 25, 100, 250, 1000))
            skip = {"higher": "left out of the T sweep (slower than the loop at every T; see the sinusoid table)",
                    "fastmaml-generic": "left out of the T sweep"}
            if q:
                skip["compile"] = ("quick mode: a cold compile per T (~20 s each on a 2-core CPU); the sinusoid "
                                   "table has it at T=25; run --full for the sweep")
                skip["compile-ro"] = "quick mode: see compile"
            add(s, "sinusoid", Ts, (5,), orders((False,)), replace(base, budget_s=min(base.budget_s, 2.0)), skip)
        elif s == "memory-K":
            Ks = o.steps or ((1, 5, 10) if q else (1, 5, 10, 20))
            ms = ["fastmaml", "loop"] + ([] if q else ["vmap"])
            if o.methods is not None:
                ms = [m for m in o.methods]
            # One warm-up call measures the memory; one timed call in one round; no float64
            # check (the miniimagenet table checks the same configuration at K=5).
            add(s, "miniimagenet", (2,), Ks, orders((False,)),
                replace(base, warmup=1, reps=1, min_reps=1, check=False, rounds=1), None, ms)
        elif s != "micro" and s not in FAMILY_SUITES:  # those run by fastmaml.bench.family
            raise ValueError(f"suite must be one of {SUITES} or 'all', got {s!r}")
    return units
