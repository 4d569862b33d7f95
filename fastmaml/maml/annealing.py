"""MAML++ derivative-order annealing: first order for the first E outer steps, then
second order (Antoniou et al. 2019, "DA"), and the state a ``MAML`` module carries
across outer steps (:class:`MetaState`: the schedule and the per-step BatchNorm layers).

An *outer step* is one call of ``MAML.forward`` in training mode (``maml.train()``, the
default) with grad mode enabled: a call that builds a meta-loss to train on. Evaluation
calls (``maml.eval()`` or under ``torch.no_grad()``/``inference_mode``) neither count nor
advance the schedule; they use the order of the current step. The count starts at 0
and is ``MAML.outer_steps`` (an int attribute: set it when resuming a run from a
checkpoint to continue its schedule).

``first_order_until``: an int E ≥ 0 (outer steps 0..E−1 are first order, E onwards second
order) or a callable ``schedule(outer_step: int) -> bool`` returning True where the step
is first order.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch

from fastmaml.maml.dispatch import Route
from fastmaml.nn import StepSchedule

Schedule = Callable[[int], bool]


class OrderSchedule:
    """Which derivative order each outer step uses, and the outer-step count."""

    def __init__(self, first_order: bool, first_order_until: int | Schedule | None) -> None:
        self.outer_steps = 0
        self.set_until(first_order, first_order_until)

    def set_until(self, first_order: bool, first_order_until: int | Schedule | None) -> None:
        """Check and set the schedule (``first_order_until`` as in the module docstring)."""
        if not isinstance(first_order, bool):
            raise TypeError(f"first_order must be a bool, got {type(first_order).__name__}")
        if first_order_until is not None:
            if first_order:
                raise ValueError("first_order_until anneals from first to second order; it needs first_order=False, "
                                 "got first_order=True")
            if isinstance(first_order_until, bool) or not (
                    isinstance(first_order_until, int) or callable(first_order_until)):
                raise TypeError("first_order_until must be None, an int >= 0 or a callable schedule(outer_step) -> "
                                f"bool, got {type(first_order_until).__name__}")
            if isinstance(first_order_until, int) and first_order_until < 0:
                raise ValueError(f"first_order_until must be >= 0, got {first_order_until}")
        self.first_order = first_order
        self.until = first_order_until

    def at(self, step: int) -> bool:
        """first_order for outer step ``step``."""
        if self.until is None:
            return self.first_order
        if isinstance(self.until, int):
            return step < self.until
        fo = self.until(step)
        if not isinstance(fo, bool):
            raise TypeError(f"first_order_until(outer_step) must return a bool, got {type(fo).__name__} at step {step}")
        return fo

    def counts(self, training: bool) -> bool:
        """Whether a forward call in this mode is an outer step."""
        return training and torch.is_grad_enabled()

    def next(self, training: bool) -> bool:
        """first_order for this forward call; advances the count if it is an outer step.
        Without a schedule the count decides nothing, and a compiled call leaves it alone
        (an integer attribute that changes every call would make Dynamo recompile every
        step); with a schedule a compiled step recompiles when the count changes."""
        fo = self.at(self.outer_steps)
        if self.counts(training) and not (self.until is None and torch.compiler.is_compiling()):
            self.outer_steps += 1
        return fo


class MetaState:
    """What one ``MAML`` module carries from one outer step to the next beyond its
    parameters: the derivative-order schedule and the per-step layers
    (:class:`fastmaml.nn.StepSchedule`). ``begin`` decides a forward call's order and
    whether it updates per-step running statistics (an outer step of a model whose
    per-step layers keep them); the generic path then runs its tasks in the per-task
    loop, where the layers can record their batch statistics from plain tensors."""

    def __init__(self, model: torch.nn.Module, steps: int, first_order: bool,
                 first_order_until: int | Schedule | None) -> None:
        self.order = OrderSchedule(first_order, first_order_until)
        self.layers = StepSchedule(model, steps)

    def begin(self, first_order: bool, training: bool, r: Route) -> tuple[bool, bool, Route, Callable | None]:
        """(first_order, record, route, step_hook) of a forward call."""
        record = bool(self.layers) and self.order.counts(training) and self.layers.recording
        self.order.first_order = first_order  # the attribute may be changed after construction
        fo = self.order.next(training)
        if record:
            self.layers.begin()
            if r.path == "generic" and r.task_map != "loop":
                r = replace(r, task_map="loop", reason=r.reason + "; per-step running statistics recorded in "
                                                                  "the per-task loop")
        return fo, record, r, (self.layers.hook(record) if self.layers else None)

    def end(self, record: bool, model: torch.nn.Module, versions: list[int]) -> None:
        """After the meta-step: the per-step running statistics' update (``record``), and
        the check that the model modified no other buffer (``versions`` from before)."""
        if record:
            self.layers.end()
        if self.versions(model) != versions:
            raise RuntimeError("the model modified one of its buffers in place during forward; MAML needs a model "
                               "whose forward is a pure function of its parameters and inputs")

    def set_outer_steps(self, n: object) -> None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"outer_steps must be an int >= 0, got {n!r}")
        self.order.outer_steps = n

    def versions(self, model: torch.nn.Module) -> list[int]:
        """Version counters of the model's buffers, except the per-step running
        statistics (updated once per outer step: the exemption from the rule that
        forward modifies no buffer)."""
        exempt = self.layers.running_buffers()
        return [b._version for b in model.buffers() if id(b) not in exempt]
