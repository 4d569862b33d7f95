"""The JAX peer: ``jax.jit(jax.grad(mean(vmap(task_loss))))`` of the benchmark network,
translated layer by layer from the torch model (same weights, same batches).
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
from torch import nn

from fastmaml.bench.peers_base import Prepared, Problem, Unavailable


# ---------------------------------------------------------------------------------
# (e) JAX
# ---------------------------------------------------------------------------------

def _jax_layers(model: nn.Module) -> list[tuple[str, dict]]:
    """The nn.Sequential as a list of (op, settings), parameters in ``parameters()`` order."""
    if not isinstance(model, nn.Sequential):
        raise Unavailable(f"the JAX peer translates nn.Sequential models only, got {type(model).__name__}")
    spec: list[tuple[str, dict]] = []
    for m in model:
        if isinstance(m, nn.Linear):
            spec.append(("linear", {}))
        elif isinstance(m, nn.Conv2d):
            spec.append(("conv", {"stride": m.stride, "padding": m.padding}))
        elif isinstance(m, nn.BatchNorm2d):
            if m.track_running_stats:
                raise Unavailable("the JAX peer handles BatchNorm in batch-statistics mode only")
            spec.append(("bn", {"eps": m.eps}))
        elif isinstance(m, nn.ReLU):
            spec.append(("relu", {}))
        elif isinstance(m, nn.MaxPool2d):
            spec.append(("maxpool", {"k": m.kernel_size}))
        elif isinstance(m, nn.Flatten):
            spec.append(("flatten", {}))
        else:
            raise Unavailable(f"the JAX peer has no translation of {type(m).__name__}")
    return spec


def jax_forward(spec: list[tuple[str, dict]]) -> Callable:
    """``forward(params, x)`` in jax.numpy/jax.lax for a spec from :func:`_jax_layers`
    (NCHW activations and OIHW conv weights, as PyTorch lays them out)."""
    import jax.numpy as jnp
    from jax import lax

    def forward(params, x):
        it = iter(params)
        h = x
        for op, s in spec:
            if op == "linear":
                W, b = next(it), next(it)
                h = h @ W.T + b
            elif op == "conv":
                W, b = next(it), next(it)
                pad = [(s["padding"][0],) * 2, (s["padding"][1],) * 2]
                h = lax.conv_general_dilated(h, W, s["stride"], pad, dimension_numbers=("NCHW", "OIHW", "NCHW"))
                h = h + b[None, :, None, None]
            elif op == "bn":  # batch statistics, biased variance (as torch in training mode)
                g, b = next(it), next(it)
                mean = h.mean(axis=(0, 2, 3), keepdims=True)
                var = ((h - mean) ** 2).mean(axis=(0, 2, 3), keepdims=True)
                h = (h - mean) / jnp.sqrt(var + s["eps"]) * g[None, :, None, None] + b[None, :, None, None]
            elif op == "relu":
                h = jnp.maximum(h, 0)
            elif op == "maxpool":
                k = s["k"]
                h = lax.reduce_window(h, -jnp.inf, lax.max, (1, 1, k, k), (1, 1, k, k), "VALID")
            elif op == "flatten":
                h = h.reshape(h.shape[0], -1)
        return h

    return forward


def make_jax(p: Problem) -> Prepared:
    # JAX on a GPU would otherwise take 75 % of its memory at start-up, beside PyTorch's.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    try:
        import jax
        import jax.numpy as jnp
    except Exception as exc:
        raise Unavailable(f"jax is not installed ({exc})") from None
    cfg = p.cfg
    spec = _jax_layers(p.model)
    if p.device.type == "cuda":
        try:
            jdev = jax.devices("gpu")[0]
        except Exception as exc:
            raise Unavailable(f"jax has no GPU backend here ({exc}); a CPU JAX beside CUDA torch would not "
                              "be a like-for-like comparison") from None
    else:
        jdev = jax.devices("cpu")[0]

    forward = jax_forward(spec)

    if cfg.fam.loss == "mse":
        def loss_fn(pred, y):
            return jnp.mean((pred - y) ** 2)
    else:
        def loss_fn(pred, y):
            logp = jax.nn.log_softmax(pred, axis=-1)
            return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=-1))

    def support_loss(params, x, y):
        return loss_fn(forward(params, x), y)

    def task_loss(params, xs, ys, xq, yq):
        fast = params
        for _ in range(cfg.K):
            g = jax.grad(support_loss)(fast, xs, ys)
            if cfg.first_order:
                g = jax.lax.stop_gradient(g)
            fast = [w - cfg.inner_lr * gi for w, gi in zip(fast, g)]
        return support_loss(fast, xq, yq)

    def meta_loss(params, xs, ys, xq, yq):
        return jnp.mean(jax.vmap(task_loss, in_axes=(None, 0, 0, 0, 0))(params, xs, ys, xq, yq))

    meta_grad = jax.jit(jax.grad(meta_loss))

    def to_jax(t: torch.Tensor):
        a = t.detach().cpu().numpy()
        if a.dtype == "int64":
            a = a.astype("int32")
        return jax.device_put(a, jdev)

    params = [to_jax(q) for q in p.model.parameters()]
    batches = [tuple(to_jax(t) for t in b) for b in p.batches]

    def step(i: int):
        return meta_grad(params, *batches[i])

    def to_torch(out) -> list[torch.Tensor]:
        import numpy as np

        return [torch.from_numpy(np.array(g)).to(p.device) for g in out]

    return Prepared(step, to_torch, lambda out: jax.block_until_ready(out), framework="jax",
                    notes=[f"jax {jax.__version__} on {jdev.platform}"])
