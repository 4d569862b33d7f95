"""Layers for meta-learning that the MAML layer recognises.

:class:`PerStepBatchNorm2d`: MAML++'s per-step BatchNorm (weights, biases and running
statistics indexed by the inner step); :class:`StepSchedule` is the handle through which
``fastmaml.MAML`` (and the reference) set a model's step index and update its per-step
running statistics once per meta-step.
"""

from fastmaml.nn.per_step_batch_norm import PerStepBatchNorm2d, StepSchedule, per_step_layers

__all__ = ["PerStepBatchNorm2d", "StepSchedule", "per_step_layers"]
