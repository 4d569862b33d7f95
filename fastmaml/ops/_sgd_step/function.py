"""``sgd_step``: the fused multi-tensor, multi-task inner update θ' = θ − α ⊙ g.

Four faces (docs/DESIGN.md §3): kernels (``csrc/sgd_step/``,
:mod:`fastmaml.triton.sgd_step`) → launchers (:mod:`fastmaml.ops._sgd_step.launch`;
the checks before them: :mod:`fastmaml.ops._sgd_step.checks`) → :class:`_SgdStep` (``torch.autograd.Function``,
setup_context style, with a ``vmap`` rule) → :func:`sgd_step`. The reference twin is
:func:`fastmaml.reference.sgd_step`.

Call path when nothing needs a gradient (the common inner-loop call under
``torch.no_grad`` or on detached tensors): checks, one allocation per output and one
kernel call, no ``autograd.Function``. The sinusoid MLP's six tiny tensors make Python
overhead the dominant cost there (the kernel itself moves ~350 KB in ~5 µs), so a CPU
call with a Python-float lr goes through :func:`~fastmaml.ops._sgd_step.launch.lean_cpu_forward`: the extension reads
every tensor's attributes through the C API and checks them (dtype, device, shape,
contiguity; requires_grad only under grad mode), allocates the outputs with
``torch.empty_like`` and runs the kernel, which also rejects overlapping inputs.
Anything unusual, every bad input included, falls through to the general path, whose
named checks raise.

``out=`` (caller-provided outputs, like torch ops' ``out=``): the update is written into
n given contiguous tensors ``[T, *shape_i]`` instead of new ones, so an inner loop can
reuse its buffers (K steps: ping-pong two buffer sets) and skip the allocation (tiny
sets: ~1 µs per ``empty_like``) and the page faults of fresh memory (large sets). Each
``out[i]`` must be separate memory from every input and every other output (in-place
``out=params`` is refused: a shared θ is read by every task while it is written); the
C++ overlap check (cpu, cuda) and its Python twin (reference, triton) enforce this. Like
torch's ``out=``, it is not differentiable: refused when grad mode is on and any input
(or an ``out`` tensor) requires grad, and inside torch.func transforms. The kernels
write through raw pointers, so the ``out`` tensors' version counters are bumped (as an
in-place torch op would) and autograd still notices a tensor saved for backward being
overwritten.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch._C._functorch import maybe_current_level as _functorch_level

from fastmaml import backends, codes
from fastmaml import reference as ref
from fastmaml.ops._sgd_step import launch
from fastmaml.ops._sgd_step.checks import Spec, check_out, check_overlap, lr_tensors, validate
from fastmaml.reference.sgd_step import LR

# ---- autograd ------------------------------------------------------------------------


class _SgdStep(torch.autograd.Function):
    """Inputs: ``(spec, backend, *params, *grads, *lr_tensors)``; outputs the n updated
    tensors. Backward: the fused kernel, or differentiable torch ops when a graph of
    the backward is needed (double backward, torch.func transforms)."""

    @staticmethod
    def forward(spec: Spec, backend: str, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:  # type: ignore[override]
        n = spec.n
        tensors = tuple(t.contiguous() for t in tensors)  # no-op unless a transform passed a strided view
        return tuple(launch.launch_forward(backend, spec, tensors[:n], tensors[n : 2 * n], list(tensors[2 * n :])))

    @staticmethod
    def setup_context(ctx, inputs, output):  # type: ignore[override]
        spec, backend = inputs[0], inputs[1]
        n = spec.n
        ctx.spec = spec
        ctx.backend = backend
        # dg needs α and dα needs g; θ is never needed. The T copies of g are kept only
        # when α needs a gradient (in a K-step inner loop they would otherwise hold K
        # gradient-sized buffers alive for nothing).
        ctx.keep_grads = any(ctx.needs_input_grad[2 + 2 * n :])
        kept = inputs[2 + n :] if ctx.keep_grads else inputs[2 + 2 * n :]
        ctx.save_for_backward(*kept)

    @staticmethod
    def backward(ctx, *v: torch.Tensor):  # type: ignore[override]
        spec: Spec = ctx.spec
        n = spec.n
        saved = ctx.saved_tensors
        needs = ctx.needs_input_grad[2:]
        need_theta, need_grad = needs[:n], needs[n : 2 * n]
        need_lr = any(needs[2 * n :])
        if ctx.keep_grads:
            grads, lrs = saved[:n], list(saved[n:])
        else:
            grads, lrs = None, list(saved)
        if torch.is_grad_enabled() or _functorch_level() is not None:
            dtheta, dgrad, dlr = launch.backward_torch(spec, v, grads, lrs, need_lr)
        else:
            v = tuple(x.contiguous() for x in v)
            # without dα the kernels never read g; v (same shapes) stands in for it
            dtheta, dgrad, dlr = launch.launch_backward(
                ctx.backend, spec, v, grads if grads is not None else v, lrs, need_theta, need_grad, need_lr
            )
        if spec.lr_kind == codes.SGD_LR_FLOAT:
            dlr_out: tuple = ()
        elif spec.lr_kind == codes.SGD_LR_PER_ELEMENT:
            dlr_out = tuple(dlr) if dlr is not None else (None,) * n
        else:
            dlr_out = (dlr,)
        return (None, None, *dtheta, *dgrad, *dlr_out)

    @staticmethod
    def vmap(info, in_dims, spec: Spec, backend: str, *tensors: torch.Tensor):  # type: ignore[override]
        """Batching rule. When only grads (and params) carry the vmapped dimension B and
        every grad does, the batch folds into the task dimension (T → B·T) and the
        fused kernel runs once; otherwise the update is computed with torch ops."""
        n = spec.n
        dims = in_dims[2:]
        B = info.batch_size
        params, grads, lrs = list(tensors[:n]), list(tensors[n : 2 * n]), list(tensors[2 * n :])
        pd, gd, ld = dims[:n], dims[n : 2 * n], dims[2 * n :]
        T = spec.tasks
        if all(d is None for d in ld) and all(d is not None for d in gd):
            fparams, fgrads = [], []
            for i in range(n):
                g = grads[i].movedim(gd[i], 0)  # [B, T, *s]
                shape = g.shape[2:]
                fgrads.append(g.reshape(B * T, *shape))
                p = params[i] if pd[i] is None else params[i].movedim(pd[i], 0)
                if pd[i] is None and spec.shared[i]:
                    fparams.append(p)  # still shared by all B·T tasks
                else:
                    if pd[i] is None:  # per-task [T, *s], the same for every batch entry
                        p = p.unsqueeze(0)
                    elif spec.shared[i]:  # [B, *s]: one θ per batch entry
                        p = p.unsqueeze(1)
                    fparams.append(p.expand(B, T, *shape).reshape(B * T, *shape))
            lr = _lr_arg(spec, lrs)
            outs = sgd_step(fparams, fgrads, lr, backend=backend)
            return tuple(o.reshape(B, T, *o.shape[1:]) for o in outs), (0,) * n
        # General rule: bring every batched tensor's batch dim to the front, give the
        # unbatched ones a size-1 front dim, and broadcast.
        def front(x: torch.Tensor, d: int | None) -> torch.Tensor:
            return x.unsqueeze(0) if d is None else x.movedim(d, 0)

        outs = []
        for i in range(n):
            g = front(grads[i], gd[i])  # [B|1, T, *s]
            p = front(params[i], pd[i])
            if spec.shared[i]:
                p = p.unsqueeze(1)
            extra = g.dim() - 2  # number of element dims
            if spec.lr_kind == codes.SGD_LR_FLOAT:
                a = spec.lr_value
            elif spec.lr_kind == codes.SGD_LR_SCALAR:
                a = front(lrs[0], ld[0]).reshape(-1, *([1] * (extra + 1)))
            elif spec.lr_kind == codes.SGD_LR_PER_TENSOR:
                a = front(lrs[0], ld[0])[:, i].reshape(-1, *([1] * (extra + 1)))
            else:
                a = front(lrs[i], ld[i]).unsqueeze(1)
            o = p - a * g
            outs.append(o.expand(B, *o.shape[1:]) if o.shape[0] != B else o)
        return tuple(outs), (0,) * n


def _lr_arg(spec: Spec, lrs: list[torch.Tensor]) -> LR:
    if spec.lr_kind == codes.SGD_LR_FLOAT:
        return spec.lr_value
    if spec.lr_kind == codes.SGD_LR_PER_ELEMENT:
        return lrs
    return lrs[0]


# ---- public function -----------------------------------------------------------------


def sgd_step(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    lr: LR,
    *,
    backend: str | None = None,
    out: Sequence[torch.Tensor] | None = None,
) -> list[torch.Tensor]:
    """The inner SGD update of every parameter tensor for T tasks: θ'_i = θ_i − α_i ⊙ g_i.

    Args:
        params: n tensors; ``params[i]`` is ``[*shape_i]`` (shared by the T tasks, e.g.
            the meta-parameters at step 0) or ``[T, *shape_i]`` (per task).
        grads: n tensors ``[T, *shape_i]``; T >= 1, the same for every tensor.
        lr: the inner learning rate α, one of
            - a Python float: one fixed rate (not differentiable);
            - a 0-d tensor: one rate, learnable;
            - a 1-d tensor ``[n]``: one rate per parameter tensor (a row of MAML++'s
              per-step, per-layer ``[K, n]`` table);
            - a list of n tensors, ``lr[i]`` shaped ``[*shape_i]``: per element (Meta-SGD).
        backend: ``"reference" | "cpu" | "cuda" | "triton" | "auto"``; default: the
            ``FASTMAML_BACKEND`` environment variable, else auto (see
            :mod:`fastmaml.backends`).
        out: optional n tensors to write the update into (like torch ops' ``out=``):
            ``out[i]`` contiguous, shaped ``[T, *shape_i]`` like ``grads[i]``, of the
            same dtype and device, sharing no memory with any input or other output
            (so not ``params`` itself: no in-place update). Every element is
            overwritten. Lets an inner loop reuse its buffers instead of allocating
            new outputs each call (K steps: alternate two buffer sets). Not
            differentiable: with grad mode on, no input (nor ``out``) may require
            grad, and it is refused inside torch.func transforms. The ``out``
            tensors' version counters are bumped, as by an in-place torch op.

    Returns:
        n new tensors ``[T, *shape_i]``, or with ``out`` a list of the ``out`` tensors
        themselves (other inputs are never modified).

    All tensors must be contiguous, on one device, and share one dtype, float32 or
    float64 (a tensor lr included: mixed dtypes are an error, not promoted). No two
    input tensors may share memory (nor an ``out`` tensor with any other). Differentiable with respect to params, grads and
    a tensor lr (dθ = v summed over tasks for a shared θ, dg = −α ⊙ v, dα = −Σ g ⊙ v
    reduced to α's granularity), by a fused backward kernel; works under
    ``torch.func.grad``/``vjp``/``vmap`` (there the backward is computed with torch ops).
    """
    level = _functorch_level()
    if level is None and type(lr) is float:
        res = launch.lean_cpu_forward(params, grads, lr, backend, out)
        if res is not None:
            return res
    if out is not None and level is not None:
        raise RuntimeError(
            "sgd_step: out= is not supported inside torch.func transforms (grad/vjp/vmap); call sgd_step "
            "without out="
        )
    spec = validate(params, grads, lr, strict_layout=level is None)
    name = backends.resolve(backend, spec.device, "sgd_step")
    if out is not None:
        outs = check_out(out, spec, grads)
        if torch.is_grad_enabled() and (spec.requires_grad or any(o.requires_grad for o in outs)):
            raise RuntimeError(
                "sgd_step: out= does not support automatic differentiation, but an input (params, grads, "
                "lr) or an out tensor requires grad; call sgd_step without out= (or under torch.no_grad() "
                "if no gradient is wanted)"
            )
        lrs = lr_tensors(lr, spec.lr_kind)
        if name == "reference":
            check_overlap(params, grads, lrs, outs)
            with torch.no_grad():
                for o, r in zip(outs, ref.sgd_step(params, grads, lr)):
                    o.copy_(r)  # bumps o's version counter itself
            return outs
        launch.launch_forward(name, spec, params, grads, lrs, outs)
        launch.increment_version(outs)
        return outs
    if name == "reference":
        if level is None:
            check_overlap(params, grads, lr_tensors(lr, spec.lr_kind))
        return ref.sgd_step(params, grads, lr)
    lrs = lr_tensors(lr, spec.lr_kind)
    if level is None and not (spec.requires_grad and torch.is_grad_enabled()):
        return launch.launch_forward(name, spec, params, grads, lrs)  # lean path: nothing to differentiate
    return list(_SgdStep.apply(spec, name, *params, *grads, *lrs))


__all__ = ["sgd_step"]
