"""The backend registry, the extension's import on a machine without a GPU, and
``python -m fastmaml info``."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import fastmaml
from fastmaml import _ext, backends


def test_extension_imports_and_reports_features():
    C = _ext.ext()
    assert isinstance(C.cuda_compiled, bool)
    assert C.openmp_max_threads() >= 1
    n, err = C.cuda_device_count()
    assert n >= 0
    if n == 0:
        assert err  # it says why there is no device


def test_reference_and_cpu_available():
    assert backends.status("reference").available
    assert backends.status("cpu").available, backends.status("cpu").reason


def test_unknown_backend_is_a_clear_error():
    with pytest.raises(ValueError, match="backend must be one of"):
        backends.resolve("tpu", torch.device("cpu"), "sgd_step")


def test_env_var_selects_backend(monkeypatch):
    monkeypatch.setenv("FASTMAML_BACKEND", "reference")
    assert backends.resolve(None, torch.device("cpu"), "sgd_step") == "reference"
    monkeypatch.setenv("FASTMAML_BACKEND", "cpu")
    assert backends.resolve(None, torch.device("cpu"), "sgd_step") == "cpu"
    # the explicit argument wins over the environment
    assert backends.resolve("reference", torch.device("cpu"), "sgd_step") == "reference"


def test_auto_on_cpu_prefers_compiled(monkeypatch):
    monkeypatch.delenv("FASTMAML_BACKEND", raising=False)
    assert backends.resolve(None, torch.device("cpu"), "sgd_step") == "cpu"
    assert backends.resolve("auto", torch.device("cpu"), "sgd_step") == "cpu"


def test_cuda_backend_refuses_cpu_tensors_or_is_unavailable():
    st = backends.status("cuda")
    with pytest.raises((ValueError, RuntimeError), match="cuda"):
        backends.resolve("cuda", torch.device("cpu"), "sgd_step")
    if not torch.cuda.is_available():
        assert not st.available and st.reason


def test_info_command_runs():
    out = subprocess.run([sys.executable, "-m", "fastmaml", "info"], capture_output=True, text=True, check=True).stdout
    assert "fastmaml" in out and fastmaml.__version__ in out
    for name in backends.BACKENDS:
        assert name in out


def _toolkit_present() -> bool:
    """setup.py's rule: a toolkit with nvcc and the static CUDA runtime."""
    import os
    import shutil
    from pathlib import Path

    if os.environ.get("FASTMAML_CUDA", "auto").lower() in ("0", "off", "false", "no"):
        return False
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    has_nvcc = (Path(home) / "bin" / "nvcc").exists() or shutil.which("nvcc") is not None
    return has_nvcc and (Path(home) / "lib64" / "libcudart_static.a").exists()


def test_cuda_sources_compiled_wherever_nvcc_exists():
    # The install compiles and links the CUDA kernels whenever a toolkit is present: CI's
    # compile check. Without a toolkit the module must say why CUDA is missing.
    C = _ext.ext()
    if C.cuda_reason.startswith("disabled by FASTMAML_CUDA"):
        pytest.skip("this build was made with FASTMAML_CUDA=0 on purpose")
    assert C.cuda_compiled == _toolkit_present(), (C.cuda_compiled, C.cuda_reason)
    if not C.cuda_compiled:
        assert C.cuda_reason
