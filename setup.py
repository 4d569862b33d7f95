"""Build script for fastmaml's compiled extension ``fastmaml._C``.

The extension is plain pybind11: it does not link against PyTorch. Kernels take raw
pointers, sizes, strides and the CUDA stream as integers, so the module builds in
seconds and imports on machines without a GPU.

Environment switches
--------------------
FASTMAML_CUDA       ``auto`` (default): compile the CUDA sources when nvcc is found;
                    ``0``: never; ``1``: always (fail when nvcc is missing);
                    ``emulate``: compile the CUDA sources as host C++ against the CUDA
                    emulation (``csrc/common/cuda_emulation.h``): ``backend="cuda"`` then
                    runs the kernels on CPU tensors (tests/emulated; no GPU, no nvcc).
CUDA_HOME/CUDA_PATH the CUDA toolkit; default ``/usr/local/cuda``. nvcc is taken from
                    ``$CUDA_HOME/bin/nvcc``, else from the PATH.
FASTMAML_CUDA_ARCH  semicolon-separated SM list, default ``80;90``; PTX is embedded for
                    the highest one so newer cards JIT it.
FASTMAML_CPU_ARCH   value for ``-march`` (default ``native``; empty string: no flag).
FASTMAML_CXX_OPT    the host C++ optimisation flag (default ``-O3``; the sanitizer build uses
                    ``-O1``, which compiles several times faster under instrumentation).
FASTMAML_NVCC_FLAGS extra nvcc flags.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"
# csrc/ holds one folder per op (sgd_step/, mlp/, batch_norm/, multi_tensor/) and
# common/; every include is relative to csrc/ ("mlp/mlp.h").
CPP_SOURCES = sorted(CSRC.rglob("*.cpp"))
# The CUDA sources, in one place: compiled by nvcc when CUDA is used (BuildExt).
CUDA_SOURCES = sorted(CSRC.rglob("*.cu"))
HEADERS = sorted([*CSRC.rglob("*.h"), *CSRC.rglob("*.cuh")])


def _find_cuda() -> tuple[str | None, str | None, str]:
    """Return (cuda_home, nvcc, reason). nvcc on the PATH may be a wrapper script, so
    the toolkit home is never derived from its location."""
    mode = os.environ.get("FASTMAML_CUDA", "auto").strip().lower()
    if mode in ("0", "off", "false", "no"):
        return None, None, "disabled by FASTMAML_CUDA=0"
    if mode == "emulate":
        return None, None, "emulated on the CPU (FASTMAML_CUDA=emulate)"
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if not home and Path("/usr/local/cuda").is_dir():
        home = "/usr/local/cuda"
    nvcc = None
    if home and (Path(home) / "bin" / "nvcc").exists():
        nvcc = str(Path(home) / "bin" / "nvcc")
    elif shutil.which("nvcc"):
        nvcc = shutil.which("nvcc")
    reason = ""
    if nvcc is None:
        reason = "nvcc not found (set CUDA_HOME)"
    elif home is None or not (Path(home) / "lib64" / "libcudart_static.a").exists():
        reason = f"static CUDA runtime not found under CUDA_HOME={home!r}"
        nvcc = None
    if nvcc is None:
        if mode in ("1", "on", "true", "yes"):
            raise RuntimeError(f"FASTMAML_CUDA=1 but CUDA cannot be used: {reason}")
        return None, None, reason
    return home, nvcc, ""


CUDA_HOME, NVCC, CUDA_REASON = _find_cuda()


def _arch_flags() -> list[str]:
    archs = [a.strip() for a in os.environ.get("FASTMAML_CUDA_ARCH", "80;90").replace(",", ";").split(";") if a.strip()]
    flags = []
    for a in archs:
        flags += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    top = max(archs, key=int)
    flags += ["-gencode", f"arch=compute_{top},code=compute_{top}"]
    return flags


class BuildExt(build_ext):
    """Compiles ``CUDA_SOURCES`` (``csrc/**/*.cu``) with nvcc (in parallel) and links them with the static
    CUDA runtime; copies the built module atomically so running processes that have
    the old one mapped are not disturbed."""

    def build_extension(self, ext: Extension) -> None:
        # The module's build configuration (CUDA on/off, archs, flags) is stamped next to
        # it; a different one forces a full rebuild, since setuptools' up-to-date check
        # looks at file times only (switching FASTMAML_CUDA=0 -> 1 would otherwise keep a
        # module compiled without CUDA).
        if _emulating():
            _add_cuda_emulation(self, ext)
        config = repr((NVCC, CUDA_HOME, _arch_flags() if NVCC else None, ext.define_macros, ext.extra_compile_args,
                       os.environ.get("FASTMAML_NVCC_FLAGS", "")))
        stamp = Path(self.get_ext_fullpath(ext.name) + ".config")
        if not stamp.exists() or stamp.read_text() != config:
            self.force = True
        if NVCC is not None:
            objs = self._compile_cuda(ext)
            ext.extra_objects = list(ext.extra_objects or []) + objs
            ext.library_dirs = list(ext.library_dirs or []) + [str(Path(CUDA_HOME) / "lib64")]
            ext.libraries = list(ext.libraries or []) + ["cudart_static", "dl", "rt", "pthread"]
        super().build_extension(ext)
        stamp.write_text(config)

    def _compile_cuda(self, ext: Extension) -> list[str]:
        sources = [str(p) for p in CUDA_SOURCES]
        out_dir = Path(self.build_temp) / "cuda"
        out_dir.mkdir(parents=True, exist_ok=True)
        py_inc = sysconfig.get_paths()["include"]
        import pybind11

        base = [
            NVCC, "-c", "-O3", "-std=c++17", "-Xcompiler", "-fPIC", "-cudart=static",
            "-DFASTMAML_WITH_CUDA", f"-I{CSRC}", f"-I{py_inc}", f"-I{pybind11.get_include()}",
            "--expt-relaxed-constexpr", "-lineinfo",
        ] + _arch_flags() + os.environ.get("FASTMAML_NVCC_FLAGS", "").split()

        def one(src: str) -> str:
            rel = Path(src).relative_to(CSRC)
            obj = str(out_dir / (str(rel.with_suffix("")).replace(os.sep, "__") + ".o"))
            deps = [src] + [str(h) for h in HEADERS]
            if self.force or not os.path.exists(obj) or any(os.path.getmtime(d) > os.path.getmtime(obj) for d in deps):
                cmd = base + [src, "-o", obj]
                print(" ".join(cmd), flush=True)
                subprocess.run(cmd, check=True)
            return obj

        with ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1)) as pool:
            return list(pool.map(one, sources))

    def copy_file(self, infile, outfile, *args, **kwargs):  # type: ignore[override]
        if str(outfile).endswith((".so", ".pyd")):
            tmp = str(outfile) + ".tmp"
            shutil.copyfile(infile, tmp)
            os.replace(tmp, outfile)
            return outfile, True
        return super().copy_file(infile, outfile, *args, **kwargs)


# ---- FASTMAML_CUDA=emulate -----------------------------------------------------------------


def _emulating() -> bool:
    return os.environ.get("FASTMAML_CUDA", "").strip().lower() == "emulate"


def _add_cuda_emulation(build: build_ext, ext: Extension) -> None:
    """The emulated CUDA build: every ``csrc/**/*.cu`` compiled by the host C++ compiler with
    ``csrc/common/cuda_emulation.h`` force-included (``<cuda_runtime.h>`` resolves to it) and
    the compiler's ThreadSanitizer instrumentation, whose hooks the emulator's runtime
    (``cuda_emulation.cpp``, not instrumented; no TSan runtime is linked) turns into the
    shared/global-memory race check. The whole module is built with FASTMAML_WITH_CUDA and
    FASTMAML_CUDA_EMULATE, so ``backend="cuda"`` runs these kernels on CPU tensors."""
    common = CSRC / "common"
    macros = [("FASTMAML_WITH_CUDA", None), ("FASTMAML_CUDA_EMULATE", None)]
    ext.define_macros = [m for m in ext.define_macros if m[0] not in dict(macros)] + macros
    runtime = [str((common / n).relative_to(ROOT)) for n in ("cuda_emulation.cpp", "cuda_emulation_module.cpp")]
    ext.sources = list(dict.fromkeys([*ext.sources, *runtime]))
    ext.depends = list(dict.fromkeys([*ext.depends, *(str(p.relative_to(ROOT)) for p in common.glob("*"))]))
    import pybind11

    cxx = os.environ.get("CXX", "c++").split()
    flags = [
        "-x", "c++", "-c", "-O2", "-std=c++17", "-fPIC", "-fvisibility=hidden", "-Wall", "-Wno-unknown-pragmas",
        "-fsanitize=thread", "--param", "tsan-instrument-func-entry-exit=0",
        "-DFASTMAML_WITH_CUDA", "-DFASTMAML_CUDA_EMULATE", f"-I{common / 'emulated_include'}", f"-I{CSRC}",
        f"-I{sysconfig.get_paths()['include']}", f"-I{pybind11.get_include()}",
        "-include", str(common / "cuda_emulation.h"),
    ]
    out_dir = Path(build.build_temp) / "cuda_emulated"
    out_dir.mkdir(parents=True, exist_ok=True)
    headers = [*CSRC.rglob("*.h"), *CSRC.rglob("*.cuh")]

    def one(src: Path) -> str:
        rel = src.relative_to(CSRC)
        obj = out_dir / (str(rel.with_suffix("")).replace(os.sep, "__") + ".o")
        deps = [src, *headers]
        if build.force or not obj.exists() or any(d.stat().st_mtime > obj.stat().st_mtime for d in deps):
            cmd = [*cxx, *flags, str(src), "-o", str(obj)]
            print(" ".join(cmd), flush=True)
            subprocess.run(cmd, check=True)
        return str(obj)

    sources = sorted(CSRC.rglob("*.cu"))
    with ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1)) as pool:
        objs = list(pool.map(one, sources))
    ext.extra_objects = list(dict.fromkeys([*(ext.extra_objects or []), *objs]))


def _extension() -> Extension:
    import pybind11

    cpu_arch = os.environ.get("FASTMAML_CPU_ARCH", "native")
    cxx = [os.environ.get("FASTMAML_CXX_OPT", "-O3"), "-std=c++17", "-fopenmp", "-fvisibility=hidden", "-Wall", "-Wno-unknown-pragmas"]
    if cpu_arch:
        cxx.append(f"-march={cpu_arch}")
    macros = [("FASTMAML_CUDA_REASON", '"' + CUDA_REASON.replace('"', "'") + '"')]
    if NVCC is not None:
        macros.append(("FASTMAML_WITH_CUDA", None))
    return Extension(
        "fastmaml._C",
        sources=[str(p.relative_to(ROOT)) for p in CPP_SOURCES],
        include_dirs=[str(CSRC), pybind11.get_include()],
        define_macros=macros,
        # nvcc objects are built by BuildExt; list them so a change relinks the module.
        depends=[str(p.relative_to(ROOT)) for p in [*CUDA_SOURCES, *HEADERS]],
        extra_compile_args=cxx,
        extra_link_args=["-fopenmp"],
        language="c++",
    )


setup(ext_modules=[_extension()], cmdclass={"build_ext": BuildExt})
