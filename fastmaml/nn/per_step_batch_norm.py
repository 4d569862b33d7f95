"""MAML++'s per-step BatchNorm (Antoniou et al. 2019, "How to train your MAML").

BNWB (per-step weights and biases): the layer holds γ, β of shape ``[K, C]``; at inner
step k the normalised input is scaled and shifted by γ[k], β[k]. The step index of a
forward follows MAML++'s code: the support forward at θ_k (k = 0..K−1) uses index k,
and the query forward after k+1 steps (at θ_{k+1}) uses index k too, so K entries
cover a K-step meta-step. Evaluation with more steps than K reuses the last entry:
the index is min(k, K−1).

BNRS (per-step running statistics): ``running_mean`` and ``running_var`` ``[K, C]``. In
training mode the layer normalises with batch statistics (the forward stays a pure
function of the parameters, as MAML's meta-gradient needs); the MAML layer *records*
the batch statistics of the support forward of every task at every inner step and,
once per meta-step after the inner loop, updates the running statistics of step k as
PyTorch's BatchNorm does with the mean over tasks:

    running_mean[k] ← (1 − m) running_mean[k] + m · mean_t μ_{t,k}
    running_var[k]  ← (1 − m) running_var[k]  + m · mean_t σ²_{t,k}   (unbiased σ²)

(m = ``momentum``). That update is the one exemption from ``fastmaml.MAML``'s rule that
forward modifies no buffer. In eval mode the layer normalises with the running
statistics of its step index (``track_running_stats=True``) or with batch statistics.

The step index and the recording switch live in a small state object that copies of
the module share (``copy.deepcopy`` returns the same object): the MAML layer's task
workers run replicas of the model's structure, and they must see the step the meta-step
is at. :class:`StepSchedule` is the handle the MAML layer (and
:mod:`fastmaml.reference.per_step_bn`) drives.

Training-mode forwards route to fastmaml's fused BatchNorm kernels where those apply
(``F.batch_norm`` with batch statistics on the CPU inside the MAML layer's per-task
loop; see :mod:`fastmaml.batch_norm`).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from fastmaml import _checks


class _StepState:
    """The shared, mutable part of a per-step layer: the step index, whether batch
    statistics are recorded, and the recorded (mean, var) per step."""

    def __init__(self) -> None:
        self.step = 0
        self.record = False
        self.stats: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self.lock = threading.Lock()

    def __deepcopy__(self, memo: dict) -> _StepState:
        return self  # replicas of the module see the step the meta-step is at


class PerStepBatchNorm2d(nn.Module):
    """BatchNorm2d with per-step affine parameters ``weight``/``bias`` ``[steps, C]`` and
    per-step running statistics ``running_mean``/``running_var`` ``[steps, C]``.

    Args:
        num_features: C, the channels of the input ``[N, C, H, W]``.
        steps: K, the number of inner steps the per-step entries cover (``MAML``'s
            ``inner_steps``; more steps at evaluation reuse entry K−1).
        eps: added to the variance.
        momentum: m of the running-statistics update, in [0, 1].
        affine: learn γ, β per step (False: none).
        track_running_stats: keep per-step running statistics (BNRS) and use them in
            eval mode; False: batch statistics always.
    """

    def __init__(self, num_features: int, steps: int, eps: float = 1e-5, momentum: float = 0.1,
                 affine: bool = True, track_running_stats: bool = True) -> None:
        super().__init__()
        self.num_features = _checks.positive_int("num_features", num_features)
        self.steps = _checks.positive_int("steps", steps)
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
            raise ValueError(f"eps must be a number > 0, got {eps!r}")
        if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be a number in [0, 1], got {momentum!r}")
        self.eps, self.momentum = float(eps), float(momentum)
        self.affine, self.track_running_stats = bool(affine), bool(track_running_stats)
        K, C = self.steps, self.num_features
        if self.affine:
            self.weight = nn.Parameter(torch.ones(K, C))
            self.bias = nn.Parameter(torch.zeros(K, C))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if self.track_running_stats:
            self.register_buffer("running_mean", torch.zeros(K, C))
            self.register_buffer("running_var", torch.ones(K, C))
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
        self._state = _StepState()

    # --- the step index ---------------------------------------------------------------
    @property
    def step(self) -> int:
        """The step index of the next forward (already clamped to K−1)."""
        return min(self._state.step, self.steps - 1)

    def set_step(self, k: int, record: bool = False) -> None:
        """Use entry min(k, K−1) from now on; ``record``: record the batch statistics
        of training-mode forwards for the running-statistics update."""
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ValueError(f"step index must be an int >= 0, got {k!r}")
        self._state.step = k
        self._state.record = bool(record)

    @property
    def recording(self) -> bool:
        """Whether this layer's running statistics are updated in a meta-step."""
        return self.training and self.track_running_stats

    def extra_repr(self) -> str:
        return (f"{self.num_features}, steps={self.steps}, eps={self.eps}, momentum={self.momentum}, "
                f"affine={self.affine}, track_running_stats={self.track_running_stats}")

    # --- forward -----------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f"PerStepBatchNorm2d expects [N, C, H, W] input, got shape {tuple(x.shape)}")
        if x.shape[1] != self.num_features:
            raise ValueError(f"PerStepBatchNorm2d expects {self.num_features} channels, got {x.shape[1]}")
        s = self.step
        w = self.weight[s] if self.weight is not None else None
        b = self.bias[s] if self.bias is not None else None
        if not self.training and self.track_running_stats:
            return F.batch_norm(x, self.running_mean[s], self.running_var[s], w, b, False, 0.0, self.eps)
        if self._state.record and self.recording:
            self._record(s, x)
        return F.batch_norm(x, None, None, w, b, True, 0.0, self.eps)

    def _record(self, s: int, x: torch.Tensor) -> None:
        if torch._C._are_functorch_transforms_active():
            raise RuntimeError("PerStepBatchNorm2d: recording batch statistics needs plain per-task tensors "
                               "(the MAML layer's per-task loop), not a torch.func transform")
        xd = x.detach()
        mean = xd.mean(dim=(0, 2, 3))
        var = xd.var(dim=(0, 2, 3), unbiased=True)
        with self._state.lock:
            self._state.stats.setdefault(s, []).append((mean, var))

    # --- the once-per-meta-step update ------------------------------------------------
    def clear_recorded(self) -> None:
        with self._state.lock:
            self._state.stats = {}

    @torch.no_grad()
    def update_running_stats(self) -> None:
        """Fold the recorded statistics into the per-step running statistics (see the
        module docstring) and clear them. The mean over tasks is summed in sorted order
        per element, so the result does not depend on the order in which concurrent
        task workers recorded."""
        with self._state.lock:
            stats, self._state.stats = self._state.stats, {}
        if not self.track_running_stats:
            return
        m = self.momentum
        for s, rec in sorted(stats.items()):
            means = torch.stack([r[0] for r in rec]).sort(dim=0).values.mean(0)
            vars_ = torch.stack([r[1] for r in rec]).sort(dim=0).values.mean(0)
            self.running_mean[s].mul_(1 - m).add_(means.to(self.running_mean.dtype), alpha=m)
            self.running_var[s].mul_(1 - m).add_(vars_.to(self.running_var.dtype), alpha=m)


def per_step_layers(model: nn.Module) -> list[PerStepBatchNorm2d]:
    """The model's :class:`PerStepBatchNorm2d` layers, in module order."""
    return [m for m in model.modules() if isinstance(m, PerStepBatchNorm2d)]


class StepSchedule:
    """The MAML layer's handle on a model's per-step layers: set the step index of all
    of them, switch recording on where statistics are kept, and apply the recorded
    statistics once per meta-step.

    ``steps``: the MAML layer's K; every layer must cover it (``layer.steps == K``)."""

    def __init__(self, model: nn.Module, steps: int | None = None) -> None:
        self.layers = per_step_layers(model)
        if steps is not None:
            bad = [(i, m.steps) for i, m in enumerate(self.layers) if m.steps != steps]
            if bad:
                raise ValueError(f"PerStepBatchNorm2d layers must have steps={steps} (the inner steps K); "
                                 f"got steps={bad[0][1]} in per-step layer {bad[0][0]}")

    def __bool__(self) -> bool:
        return bool(self.layers)

    @property
    def recording(self) -> bool:
        """Whether some layer keeps running statistics that this meta-step updates."""
        return any(m.recording for m in self.layers)

    def set_step(self, k: int, record: bool = False) -> None:
        for m in self.layers:
            m.set_step(k, record)

    def hook(self, record: bool):
        """``hook(k, support)`` for the MAML layer's inner loop: step index k, recording
        at the support forwards when ``record``."""
        def step_hook(k: int, support: bool) -> None:
            self.set_step(k, record and support)
        return step_hook

    def running_buffers(self) -> set[int]:
        """ids of the per-step running statistics (the buffers a meta-step may update)."""
        return {id(b) for m in self.layers for b in (m.running_mean, m.running_var) if b is not None}

    def at(self, k: int, record: bool = False) -> _AtStep:
        """Context: step index k (recording as asked) inside, recording off after."""
        return _AtStep(self, k, record)

    def begin(self) -> None:
        for m in self.layers:
            m.clear_recorded()

    def end(self) -> None:
        """After the inner loop: update the per-step running statistics, recording off."""
        for m in self.layers:
            m._state.record = False
            m.update_running_stats()

    def __iter__(self) -> Iterator[PerStepBatchNorm2d]:
        return iter(self.layers)


class _AtStep:
    def __init__(self, sched: StepSchedule, k: int, record: bool) -> None:
        self.sched, self.k, self.record = sched, k, record

    def __enter__(self) -> StepSchedule:
        self.sched.set_step(self.k, self.record)
        return self.sched

    def __exit__(self, *exc: object) -> None:
        for m in self.sched.layers:
            m._state.record = False
