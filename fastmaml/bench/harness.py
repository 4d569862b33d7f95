"""Runs one configuration: the float64 reference and the float32 loop's own error (the
agreement tolerance), then every method, in this process (``runner.run_method``) or each
in its own capped child process (``isolation.run_isolated``), then the speedups between
methods whose meta-gradients agree. The rules are in the docstrings of ``runner`` and
``isolation``.
"""

from __future__ import annotations

from collections.abc import Callable

from fastmaml.bench import peers
from fastmaml.bench.configs import Config, build_model, config_flops
from fastmaml.bench.isolation import run_isolated
from fastmaml.bench.runner import (BASELINE_FACTOR, N_PERTURB, RTOL_FLOOR, ConfigResult, Settings, assign_speedups,
                                   compare, make_problem, perturb_inputs, problem_digest, run_method, tolerance)


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
    rows = []
    digest = problem_digest(problem) if s.method_timeout_s else ""
    for m in methods:
        if progress:
            progress(f"{cfg.name}: {m}")
        if s.method_timeout_s:
            rows.append(run_isolated(cfg, m, s, ref, tol_rel, digest))
        else:
            rows.append(run_method(m, problem, s, ref, tol_rel))
    assign_speedups(rows)
    return ConfigResult(cfg.as_dict(), rows, reference, config_flops(cfg), suite)
