"""The CUDA launchers' own checks, shown through the emulated build: the device check of
sgd_step (the caller switches devices), output pointers validated before any kernel is
queued, the < 2**31 per-task bound of the MLP kernels' int loops, the probe kernel behind
the ``cuda`` backend's availability, and ``python -m fastmaml info``."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from fastmaml import _ext, backends
from fastmaml.__main__ import info


def C():
    return _ext.ext()


def launches(name):
    return C().cuda_emulation_stats().get(name, {}).get("launches", 0)


def test_sgd_step_device_is_checked_not_switched():
    p = torch.randn(3)
    g = torch.randn(2, 3)
    o = torch.empty(2, 3)
    args = ([p.data_ptr()], [g.data_ptr()], [o.data_ptr()], [3], [1], 2, 0, 0, 0.1, [])
    C().sgd_step_fwd_cuda(*args, 0, 0, False)  # device 0, the current one
    assert torch.allclose(o, p - 0.1 * g)
    with pytest.raises(ValueError, match=r"device index 1 out of range \(1 devices\)"):
        C().sgd_step_fwd_cuda(*args, 1, 0, False)


def test_maml_mlp_outputs_checked_before_any_launch():
    dims, T, K, Ns, Nq = [1, 4, 1], 2, 1, 3, 3
    ws = [torch.randn(dims[i + 1], dims[i]) for i in range(2)]
    bs = [torch.randn(dims[i + 1]) for i in range(2)]
    xs, ys, xq, yq = (torch.randn(T, n, 1) for n in (Ns, Ns, Nq, Nq))
    msl = torch.ones(K)
    loss = torch.empty(())
    P = sum(w.numel() + b.numel() for w, b in zip(ws, bs))
    partials = torch.empty(T * (1 + P))
    grads = [torch.empty_like(t) for pair in zip(ws, bs) for t in pair]
    base = [0, dims, 0, 0, T, K, Ns, Nq, [w.data_ptr() for w in ws], [b.data_ptr() for b in bs], xs.data_ptr(),
            ys.data_ptr(), xq.data_ptr(), yq.data_ptr(), 0, 0, 0.1, msl.data_ptr(), False, True, 0, 1]
    good = [loss.data_ptr(), [g.data_ptr() for g in grads], 0, partials.data_ptr(), 0]
    C().maml_mlp_cuda(*base, *good)
    n = launches("maml_kernel")
    bad_grads = [g.data_ptr() for g in grads]
    bad_grads[3] = 0
    with pytest.raises(ValueError, match="out_dtheta is a null pointer"):
        C().maml_mlp_cuda(*base, loss.data_ptr(), bad_grads, 0, partials.data_ptr(), 0)
    with pytest.raises(ValueError, match="out_loss is a null pointer"):
        C().maml_mlp_cuda(*base, 0, good[1], 0, partials.data_ptr(), 0)
    with pytest.raises(ValueError, match="one pointer per parameter tensor"):
        C().maml_mlp_cuda(*base, loss.data_ptr(), good[1][:2], 0, partials.data_ptr(), 0)
    assert launches("maml_kernel") == n, "maml_kernel was queued before its outputs were checked"


@pytest.mark.parametrize("dims,N", [([65536, 32768, 1], 1), ([4, 3], 2**29)], ids=["weight", "activations"])
def test_mlp_per_task_tensors_below_2_pow_31(dims, N):
    fake = 4096  # never dereferenced: the check comes first
    L = len(dims) - 1
    with pytest.raises(ValueError, match=r"< 2\*\*31 elements on the cuda backend"):
        C().mlp_loss_and_grad_cuda(0, dims, 0, 0, 1, N, fake, fake, [fake] * L, [fake] * L, fake, [fake] * L,
                                   [fake] * L, 0)
    with pytest.raises(ValueError, match=r"< 2\*\*31 elements on the cuda backend"):
        C().maml_mlp_cuda(0, dims, 0, 0, 1, 1, N, N, [fake] * L, [fake] * L, fake, fake, fake, fake, 0, 0, 0.1,
                          fake, False, True, 0, 1, fake, [fake] * (2 * L), 0, fake, 0)


def test_probe_kernel_decides_availability(monkeypatch):
    backends._cuda_status.cache_clear()
    n = launches("probe_kernel")
    assert backends.status("cuda").available
    assert launches("probe_kernel") == n + 1
    assert C().cuda_probe() == ""

    real = _ext._C

    class NoImage:  # a build without code for the card: the probe's message is the reason
        def __getattr__(self, name):
            return getattr(real, name)

        def cuda_probe(self):
            return "a kernel of this build does not run on device 0 (sm_90): no kernel image"

    monkeypatch.setattr(_ext, "_C", NoImage())
    backends._cuda_status.cache_clear()
    try:
        st = backends.status("cuda")
        assert not st.available and "no kernel image" in st.reason
    finally:
        monkeypatch.undo()
        backends._cuda_status.cache_clear()


def test_info_says_cuda_emulated():
    assert "cuda: emulated" in info()
    out = subprocess.run([sys.executable, "-m", "fastmaml", "info"], capture_output=True, text=True, check=True).stdout
    assert "cuda: emulated" in out
    assert "cuda       available" in out and "[cpu (emulated CUDA build)]" in out
