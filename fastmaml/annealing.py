"""MAML++ derivative-order annealing: first order for the first E outer steps, then
second order (Antoniou et al. 2019, "DA").

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

import torch

Schedule = Callable[[int], bool]


class OrderSchedule:
    """Which derivative order each outer step uses, and the outer-step count."""

    def __init__(self, first_order: bool, first_order_until: int | Schedule | None) -> None:
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
        self.outer_steps = 0

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
        """first_order for this forward call; advances the count if it is an outer step."""
        fo = self.at(self.outer_steps)
        if self.counts(training):
            self.outer_steps += 1
        return fo
