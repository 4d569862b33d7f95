"""Runs one configuration: the float64 reference and the float32 loop's own error (the
agreement tolerance), then every method, in this process (``runner.start_method`` ...)
or each in its own capped child process (``isolation.Isolated``), their timed rounds
interleaved (round-robin over the methods, ``Settings.rounds`` times), then the speedups
between methods whose meta-gradients agree: the median of the per-round ratios. The
rules are in the docstrings of ``runner`` and ``isolation``.
"""

from __future__ import annotations

from collections.abc import Callable

from fastmaml.bench import peers
from fastmaml.bench.configs import Config, build_model
from fastmaml.bench.flops import config_flops
from fastmaml.bench.isolation import Isolated
from fastmaml.bench.runner import (BASELINE_FACTOR, N_PERTURB, RTOL_FLOOR, ConfigResult, Row, Settings,
                                   assign_speedups, compare, finish_method, make_problem, perturb_inputs,
                                   problem_digest, start_method, time_round, tolerance)


def run_config(cfg: Config, methods: list[str], s: Settings, suite: str = "",
               progress: Callable[[str], None] | None = None) -> ConfigResult:
    """Measure ``methods`` on ``cfg``; ``progress(text)`` is called before each unit of work.
    With ``s.method_timeout_s`` set, each method runs in its own capped child process."""
    problem = make_problem(cfg, s)
    ref = None
    reference: dict = {"checked": s.check}
    tol_rel = None
    if s.check:
        if progress:
            progress(f"{cfg.name}: float64 reference")
        ref = peers.reference_meta_grad(problem, 0)
        loop_model = build_model(cfg.family, cfg.seed).to(s.device)  # loop_meta_grad resets its .grad
        base = peers.loop_meta_grad(loop_model, problem.batches[0], cfg)
        base_abs, base_rel = compare(base, ref)
        del base
        perturbed_rel = [compare(peers.loop_meta_grad(loop_model, perturb_inputs(problem.batches[0], i), cfg), ref)[1]
                         for i in range(N_PERTURB)]
        del loop_model
        tol_rel = tolerance(max([base_rel, *perturbed_rel]))
        reference.update(method="per-task loop, unrolled autograd, float64, meta-batch 0",
                         max_abs_grad=max(r.abs().max().item() for r in ref),
                         float32_loop_max_abs_diff=base_abs, float32_loop_rel_diff=base_rel,
                         float32_loop_perturbed_rel_diffs=perturbed_rel, tolerance_rel=tol_rel,
                         rule=(f"rel_diff <= max({RTOL_FLOOR}, {BASELINE_FACTOR} x the float32 loop's largest rel_diff "
                               f"on batch 0 and {N_PERTURB} copies with inputs perturbed by ~1 ulp)"))
    digest = problem_digest(problem) if s.method_timeout_s else ""
    rows = _interleaved(problem, methods, s, ref, tol_rel, digest, progress)
    assign_speedups(rows)
    return ConfigResult(cfg.as_dict(), rows, reference, config_flops(cfg), suite, rounds=s.rounds)


def _interleaved(problem, methods: list[str], s: Settings, ref, tol_rel, digest: str,
                 progress: Callable[[str], None] | None) -> list[Row]:
    """Prepare every method (one after the other), then ``s.rounds`` rounds, round-robin:
    round r of every method before round r+1 of any, in the order given (fastmaml first).
    In-process, or with ``s.method_timeout_s`` each method in its own capped child."""
    name = problem.cfg.name
    if s.method_timeout_s:
        children: list[Isolated] = []
        try:
            for m in methods:
                if progress:
                    progress(f"{name}: {m}")
                children.append(Isolated(problem.cfg, m, s, ref, tol_rel, digest))
                children[-1].prepare()
            for r in range(s.rounds):
                if progress and s.rounds > 1:
                    progress(f"{name}: round {r + 1}/{s.rounds}")
                for child in children:
                    child.round(r)
            return [child.finish() for child in children]
        except BaseException:  # Ctrl-C or an error here: no child outlives the run
            for child in children:
                child.kill()
            raise
    started = []
    for m in methods:
        if progress:
            progress(f"{name}: {m}")
        started.append(start_method(m, problem, s, ref, tol_rel))
    for r in range(s.rounds):
        if progress and s.rounds > 1:
            progress(f"{name}: round {r + 1}/{s.rounds}")
        for i, (row, live) in enumerate(started):
            if live is not None and not time_round(row, live, problem, s):
                started[i] = (row, None)
    return [finish_method(row, live, problem.cfg) for row, live in started]
