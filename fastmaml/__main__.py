"""``python -m fastmaml info``: versions, compiled features, devices, backends."""

from __future__ import annotations

import argparse
import platform
import sys


def info() -> str:
    import torch

    import fastmaml
    from fastmaml import _ext, backends

    lines = [
        f"fastmaml   {fastmaml.__version__}",
        f"python     {platform.python_version()} ({platform.machine()}, {platform.system()})",
        f"torch      {torch.__version__} (cuda {torch.version.cuda or 'none'}, "
        f"{torch.cuda.device_count() if torch.cuda.is_available() else 0} device(s))",
    ]
    try:
        import triton

        lines.append(f"triton     {triton.__version__}")
    except Exception as exc:
        lines.append(f"triton     not importable ({exc})")
    C = _ext._C
    if C is None:
        lines.append(f"_C         {_ext.IMPORT_ERROR}")
    else:
        n, err = C.cuda_device_count()
        lines.append(f"_C         built with {C.compiler}; OpenMP {'on' if C.openmp else 'off'} "
                     f"({C.openmp_max_threads()} threads)")
        if getattr(C, "cuda_emulated", False):
            lines.append("_C CUDA    cuda: emulated (FASTMAML_CUDA=emulate build: the CUDA kernels run on the CPU, "
                         "on CPU tensors, with the race check)")
        elif C.cuda_compiled:
            v = C.cuda_runtime_version()
            lines.append(f"_C CUDA    compiled (runtime {v // 1000}.{(v % 1000) // 10}); "
                         f"{n} device(s) visible{'' if n else ': ' + err}")
        else:
            lines.append(f"_C CUDA    not compiled: {C.cuda_reason}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            lines.append(f"device {i}   {torch.cuda.get_device_name(i)}")
    lines.append("backends:")
    for name in backends.BACKENDS:
        st = backends.status(name)
        lines.append(f"  {name:<10} {'available' if st.available else 'unavailable'}"
                     f"{'' if st.available else ': ' + st.reason}  [{st.devices}]")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastmaml")
    parser.add_argument("command", choices=["info"], help="info: versions, features and backends")
    parser.parse_args(argv)
    print(info())
    return 0


if __name__ == "__main__":
    sys.exit(main())
