"""GPU dry run: a pytest plugin (``-p gpu_dry_run``, with tests/emulated on the path) that
runs the device check's test selection on a CPU-only machine as if it had one GPU (by
default the first parametrization of each selected test function except ``TOO_SLOW``,
``--dry-run-all`` for all: the emulated kernels and Triton's interpreter are slow).

Loaded before any conftest.py, it makes PyTorch report one CUDA device
(``torch.cuda.is_available()``, ``device_count``, ``current_device``, streams and device
guards) and turns every tensor that is put on ``"cuda"`` (``.cuda()``, ``.to("cuda")``,
``device="cuda"`` in a factory) into a :class:`FakeCudaTensor`: CPU memory that reports
``device`` ``cuda:0``. The emulated CUDA build (``FASTMAML_CUDA=emulate``) runs the
``cuda`` backend's kernels on that memory; Triton's interpreter stands in for compiled
Triton kernels; and the ``triton`` backend refuses true CPU tensors, as it does on a GPU
machine (where the interpreter is off). So a test the device check selects but that
cannot run on a GPU machine fails here, on the CPU: the selection mistake of the first
GPU run (``-m 'cuda or triton'`` picking the CPU-tensor Triton tests) is one.

An operation mixing a fake CUDA tensor with a CPU tensor of more than one element raises,
as on a GPU. What cannot be checked here: real device memory, streams and compiled code.
"""

from __future__ import annotations

import contextlib
import os

import pytest
import torch
from torch.overrides import TorchFunctionMode

# Compiled Triton kernels cannot run here: fastmaml's Triton modules are imported (their
# kernels decorated) under the interpreter, then TRITON_INTERPRET is cleared, so that the
# test configuration sees what a GPU machine has: no interpreter.
os.environ["TRITON_INTERPRET"] = "1"
try:
    import fastmaml.triton.mlp  # noqa: F401,E402
    import fastmaml.triton.sgd_step  # noqa: F401,E402
except ImportError:  # no triton: the Triton tests fail as they would on the GPU
    pass
del os.environ["TRITON_INTERPRET"]
try:  # ... while Triton's runtime keeps interpreting (it reads its knob at launch)
    from triton import knobs as _knobs

    _knobs.runtime.interpret = True  # (the knob keeps its value; setting it also sets the variable)
except (ImportError, AttributeError):
    pass
os.environ.pop("TRITON_INTERPRET", None)
DEVICE = torch.device("cuda", 0)


def _is_cuda(d) -> bool:
    if isinstance(d, torch.device):
        return d.type == "cuda"
    if isinstance(d, str):
        return d.split(":")[0] == "cuda"
    return isinstance(d, int) and not isinstance(d, bool)  # a bare index means a CUDA device


def _plain(t: torch.Tensor) -> torch.Tensor:
    with torch._C.DisableTorchFunctionSubclass():
        return torch.Tensor.as_subclass(t, torch.Tensor)


def _fake(x):
    if isinstance(x, torch.Tensor) and not isinstance(x, FakeCudaTensor):
        with torch._C.DisableTorchFunctionSubclass():
            return torch.Tensor.as_subclass(x, FakeCudaTensor)
    if isinstance(x, (list, tuple)):
        return type(x)(_fake(y) for y in x)
    return x


def _walk(x):
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, (list, tuple)):
        for y in x:
            yield from _walk(y)
    elif isinstance(x, dict):
        for y in x.values():
            yield from _walk(y)


class FakeCudaTensor(torch.Tensor):
    """CPU memory that reports ``device == cuda:0`` (see the module docstring)."""

    @property
    def device(self):  # type: ignore[override]
        return DEVICE

    @property
    def is_cuda(self):  # type: ignore[override]
        return True

    @property
    def is_cpu(self):  # type: ignore[override]
        return False

    def cpu(self, *args, **kwargs):  # type: ignore[override]
        return _plain(self).clone()

    def cuda(self, *args, **kwargs):  # type: ignore[override]
        return self

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = list(_walk(args)) + list(_walk(kwargs))
        if (any(isinstance(t, FakeCudaTensor) for t in tensors) and func not in _NO_DEVICE_CHECK
                and not torch._C._are_functorch_transforms_active()):  # (functorch's own wrappers are plain)
            for t in tensors:
                if not isinstance(t, FakeCudaTensor) and t.dim() > 0 and t.numel() > 1:
                    raise RuntimeError(f"{getattr(func, '__name__', func)}: expected all tensors to be on the same "
                                       f"device, but found cuda:0 and cpu (GPU dry run)")
        return super().__torch_function__(func, types, args, kwargs)


_NO_DEVICE_CHECK = {torch._has_compatible_shallow_copy_type, torch.Tensor.copy_, torch.Tensor.to, torch.Tensor.cpu, torch.Tensor.cuda, torch.Tensor.__repr__,
                    torch.Tensor.__format__}


class _CudaToFake(TorchFunctionMode):
    """Every request for CUDA memory gets a FakeCudaTensor; ``.to(cpu)`` a plain tensor."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch._has_compatible_shallow_copy_type:  # Module.cuda(): new (fake) parameters
            return isinstance(args[0], FakeCudaTensor) == isinstance(args[1], FakeCudaTensor)
        to_cuda = False
        if "device" in kwargs and _is_cuda(kwargs["device"]):
            kwargs["device"] = "cpu"
            to_cuda = True
        if func is torch.Tensor.cuda:
            return _fake(args[0].clone()) if not isinstance(args[0], FakeCudaTensor) else args[0]
        if func is torch.Tensor.to:
            rest = list(args[1:])
            for i, a in enumerate(rest):
                if isinstance(a, (str, torch.device)) and _is_cuda(a):
                    rest[i] = "cpu"
                    to_cuda = True
                elif isinstance(a, (str, torch.device)) and isinstance(args[0], FakeCudaTensor):
                    out = func(_plain(args[0]), *rest, **kwargs)
                    return out.clone() if out.data_ptr() == args[0].data_ptr() else out
            if isinstance(args[0], FakeCudaTensor) and "device" in kwargs and not to_cuda:
                return func(_plain(args[0]), *rest, **kwargs).clone()
            args = (args[0], *rest)
            if to_cuda and isinstance(args[0], FakeCudaTensor):
                return func(*args, **kwargs)
            if to_cuda:
                out = func(*args, **kwargs)
                return _fake(out.clone() if out.data_ptr() == args[0].data_ptr() else out)
        out = func(*args, **kwargs)
        return _fake(out) if to_cuda else out


def _factory(fn):
    def wrapped(*args, **kwargs):
        if "device" in kwargs and _is_cuda(kwargs["device"]):
            kwargs["device"] = "cpu"
            return _fake(fn(*args, **kwargs))
        return fn(*args, **kwargs)

    return wrapped


class _Stream:
    cuda_stream = 0

    def synchronize(self) -> None:
        pass

    def wait_stream(self, other) -> None:
        pass


def _install() -> None:
    c = torch.cuda
    c.is_available = lambda: True
    c.device_count = lambda: 1
    c.current_device = lambda: 0
    c.set_device = lambda d: None
    c.synchronize = lambda device=None: None
    c.get_device_name = lambda device=None: "GPU dry run (emulated CUDA build on the CPU)"
    c.get_device_capability = lambda device=None: (9, 0)
    c.current_stream = lambda device=None: _Stream()
    c.default_stream = lambda device=None: _Stream()
    c.device = lambda d: contextlib.nullcontext()
    c.manual_seed = lambda seed: None
    c.manual_seed_all = lambda seed: None
    c.empty_cache = lambda: None
    # "cuda" tensors are CPU memory here, so their random stream is the CPU generator's
    # (the generic meta-step saves and restores it for a second backward)
    c.get_rng_state = lambda device="cuda": torch.default_generator.get_state()
    c.set_rng_state = lambda state, device="cuda": torch.default_generator.set_state(state)
    _CudaToFake().__enter__()  # for the whole session (this thread)


_FACTORIES = ("empty", "zeros", "ones", "full", "tensor", "arange", "randn", "rand", "randint", "empty_strided",
              "as_tensor", "zeros_like", "empty_like", "ones_like", "full_like")


class _TorchForFastmaml:
    """``torch`` as fastmaml's modules see it in the dry run: the factories map
    ``device="cuda"`` to fake CUDA tensors also where the function mode is not active
    (autograd's backward). Only fastmaml's modules get it (TorchScript must not see it)."""

    def __init__(self):
        self._wrapped = {n: _factory(getattr(torch, n)) for n in _FACTORIES}

    def __getattr__(self, name):
        return self._wrapped[name] if name in self._wrapped else getattr(torch, name)


def _proxy_torch_in_fastmaml() -> None:
    import sys

    proxy = _TorchForFastmaml()
    for name, mod in list(sys.modules.items()):
        if (name == "fastmaml" or name.startswith("fastmaml.")) and getattr(mod, "torch", None) is torch:
            mod.torch = proxy


def _gpu_like_backends() -> None:
    """On a GPU machine the ``triton`` backend takes CUDA tensors only (no interpreter) and
    the ``cuda`` backend takes CUDA tensors: here the fake ones."""
    from fastmaml import _ext, backends

    assert _ext.cuda_emulated(), "the GPU dry run needs the emulated CUDA build (FASTMAML_CUDA=emulate)"
    # the race check runs in the emulated tests' stage; here the selection, at speed
    _ext.ext().cuda_emulation_set_race_check(False)
    original = backends._accepts

    def accepts(name, device):
        if name in ("cuda", "triton"):
            return device.type == "cuda"
        return original(name, device)

    backends._accepts = accepts


_install()


def pytest_addoption(parser):
    parser.addoption("--dry-run-all", action="store_true",
                     help="GPU dry run: execute every selected test (default: the first parametrization of each "
                          "selected test function, to fit the CI budget)")


# Left to --dry-run-all: a 784-256-128-64-64-5 net over 32 tasks through Triton's
# interpreter takes many minutes here (a second on the GPU).
TOO_SLOW = {"test_mlp_triton_cuda_wide"}
# Compiled code cannot run on fake CUDA tensors (Inductor's GPU kernels, CUDA-graph capture):
# the GPU only. Its conditions on the ops are tests/emulated/test_capture_safety.py.
COMPILED_CODE = {"test_compiled_step_cuda_graphs_equal_eager"}


@pytest.hookimpl(trylast=True)  # after -m has deselected
def pytest_collection_modifyitems(config, items):
    if config.getoption("--dry-run-all"):
        return
    seen, keep, drop = set(), [], []
    for it in items:
        key = (str(it.fspath), getattr(it, "originalname", it.name))
        (drop if key in seen or key[1] in TOO_SLOW or key[1] in COMPILED_CODE else keep).append(it)
        seen.add(key)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
    config._dry_run_counts = (len(keep), len(keep) + len(drop))


def pytest_configure(config):
    _gpu_like_backends()
    _proxy_torch_in_fastmaml()
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU")


def pytest_report_header(config):
    return "GPU dry run: torch reports one CUDA device (fake: CPU memory), the emulated CUDA build stands in"


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    run, selected = getattr(config, "_dry_run_counts", (None, None))
    if run is not None:
        terminalreporter.write_line(f"GPU dry run: executed {run} of the {selected} tests the device check selects "
                                    f"(one per test function, not {sorted(TOO_SLOW)}; --dry-run-all for every one)")
