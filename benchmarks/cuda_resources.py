"""The CUDA kernels' resources on sm_90 and a roofline model of two meta-steps.

    python benchmarks/cuda_resources.py [--arch 90] [--out table.md]

Compiles every csrc/**/*.cu with ``nvcc -Xptxas -v`` for the architecture (no GPU
needed), reads each kernel's registers, stack frame, spills and static shared memory,
adds the dynamic shared memory and block size of its launch, and computes the blocks
per SM and the occupancy on an H100/H200 SM (65,536 registers in units of 256 per warp,
2,048 threads, 32 blocks, 228 KiB of shared memory of which 1 KiB is reserved per block).
Then the FLOPs and bytes of the sinusoid and wide-MLP meta-steps (fastmaml/bench/configs.py)
and their predicted times under three roofs (docs/gpu_performance_model.md explains them).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# sm_90 (H100 SXM5; the H200 has the same SM)
SM = dict(regs=65536, reg_unit=256, threads=2048, blocks=32, smem=233472, smem_reserved=1024, sms=132,
          clock_ghz=1.98, fp32_tflops=66.9, fp64_tflops=33.5, hbm_tbs=3.35, smem_bytes_per_cycle=128)


def ptxas(arch: str) -> list[dict]:
    import pybind11

    nvcc = "nvcc"
    inc = [f"-I{ROOT / 'csrc'}", f"-I{sysconfig.get_paths()['include']}", f"-I{pybind11.get_include()}"]
    out = []
    for src in sorted((ROOT / "csrc").rglob("*.cu")):
        cmd = [nvcc, "-c", "-O3", "-std=c++17", f"-arch=sm_{arch}", "-Xptxas", "-v", "--expt-relaxed-constexpr",
               "-DFASTMAML_WITH_CUDA", *inc, str(src), "-o", "/dev/null"]
        text = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
        name = None
        for line in text.splitlines():
            m = re.search(r"Compiling entry function '(\w+)'", line)
            if m:
                name = m.group(1)
                out.append({"mangled": name, "file": str(src.relative_to(ROOT))})
                continue
            m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
            if m and name:
                out[-1].update(stack=int(m.group(1)), spill_st=int(m.group(2)), spill_ld=int(m.group(3)))
            m = re.search(r"Used (\d+) registers", line)
            if m and name:
                smem = re.search(r"(\d+) bytes smem", line)
                out[-1].update(regs=int(m.group(1)), static_smem=int(smem.group(1)) if smem else 0)
    names = subprocess.run(["c++filt"], input="\n".join(k["mangled"] for k in out), capture_output=True,
                           text=True).stdout.splitlines()
    for k, n in zip(out, names):
        k["name"] = n.replace("fastmaml::", "").replace("(anonymous namespace)::", "")
        k["name"] = re.sub(r"_GLOBAL__N__\w+::", "", k["name"])
    return out


def occupancy(regs: int, threads: int, smem: int) -> tuple[int, float, str]:
    warps = -(-threads // 32)
    per_warp = -(-regs * 32 // SM["reg_unit"]) * SM["reg_unit"]
    by_regs = (SM["regs"] // per_warp) // warps
    by_threads = SM["threads"] // threads
    by_smem = SM["smem"] // (smem + SM["smem_reserved"]) if smem else SM["blocks"]
    blocks = min(by_regs, by_threads, by_smem, SM["blocks"])
    limiter = {by_regs: "registers", by_threads: "threads", by_smem: "shared memory"}.get(blocks, "blocks")
    return blocks, blocks * warps / 64, limiter


def meta_step(dims, T, K, Ns, Nq, elem=4):
    """FLOPs and bytes of one second-order meta-step of the fused per-task algorithm (csrc/mlp.h):
    forward F = 2·N·Σ d_l d_{l-1}; backward 2F; HVP (R-forward + R-backward) 6F; K inner steps
    (forward + backward), the query loss at θ_K (forward + backward) and K adjoint HVPs."""
    macs = sum(a * b for a, b in zip(dims[:-1], dims[1:]))
    P = macs + sum(dims[1:])
    Fs, Fq = 2 * Ns * macs, 2 * Nq * macs
    flops_task = K * 3 * Fs + 3 * Fq + K * 6 * Fs
    flops = T * flops_task
    # Off-chip bytes when the workspace fits on chip: θ_0 once per CTA (L2), the task's data,
    # the meta-gradient partials written and reduced.
    data = T * (Ns + Nq) * (dims[0] + dims[-1]) * elem
    fused_bytes = T * P * elem + data + 2 * T * (1 + P) * elem
    # Layer-wise path (workspace past shared memory): every product streams its operands
    # from global memory (L2/HBM): ~ one operand element per FMA that is not register-reused,
    # bounded below by the θ_k copies, activations and gradients written and read each step.
    acts_s, acts_q = 3 * Ns * sum(dims[1:]), 3 * Nq * sum(dims[1:])
    layer_bytes = T * elem * (K * (4 * P + 2 * acts_s) + (2 * P + 2 * acts_q) + K * (8 * P + 4 * acts_s))
    return dict(P=P, flops=flops, fused_bytes=fused_bytes, layer_bytes=layer_bytes, flops_task=flops_task)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="90")
    ap.add_argument("--out", default=None, help="write the Markdown there too")
    args = ap.parse_args(argv)
    from fastmaml.ops import maml_mlp_fit as MM  # fused_workspace_bytes
    lines = [f"### Kernel resources, sm_{args.arch} (nvcc -Xptxas -v)", "",
             "| kernel (instantiation) | regs | stack B | spills B | static smem B | threads/block |",
             "|---|---:|---:|---:|---:|---:|"]
    kernels = ptxas(args.arch)
    for k in kernels:
        threads = 256 if ("multi_tensor" in k["name"] or "sum_segments" in k["name"] or "reduce_tasks" in k["name"]) \
            else (1 if "probe" in k["name"] else 128)
        k["threads"] = threads
        lines.append(f"| `{k['name'][:110]}` | {k['regs']} | {k['stack']} | {k['spill_st'] + k['spill_ld']} | "
                     f"{k['static_smem']} | {threads} |")
    lines += ["", "### Occupancy of the launches of the two meta-steps (sm_90)", "",
              "| config | kernel | regs | dyn smem B | threads | blocks/SM | occupancy | limited by | CTAs |",
              "|---|---|---:|---:|---:|---:|---:|---|---:|"]
    configs = [("sinusoid", [1, 40, 40, 1], 25, 5, 10, 10), ("wide_mlp", [784, 256, 128, 64, 64, 5], 32, 5, 5, 75)]
    for name, dims, T, K, Ns, Nq in configs:
        ws = MM.fused_workspace_bytes(dims, K, Ns, Nq, torch.float32, lr_learned=False)
        fits = ws + 128 * 8 + 256 <= 227 * 1024
        regs = max(k["regs"] for k in kernels if "maml_kernel<float>" in k["name"])
        if fits:
            b, occ, lim = occupancy(regs, 128, ws + 128 * 4)
            lines.append(f"| {name} T={T} K={K} | maml_kernel<float> (fused) | {regs} | {ws + 128 * 4} | 128 | {b} | "
                         f"{occ:.0%} | {lim} | {T} |")
        else:
            r = max(k["regs"] for k in kernels if "loss_and_grad_kernel<float>" in k["name"])
            b, occ, lim = occupancy(r, 128, 128 * 4)
            lines.append(f"| {name} T={T} K={K} | loss_and_grad_kernel<float> (global workspace: {ws} B/task "
                         f"> 227 KiB) | {r} | {128 * 4} | 128 | {b} | {occ:.0%} | {lim} | {T} |")
            r = max(k["regs"] for k in kernels if "hvp_kernel<float>" in k["name"])
            b, occ, lim = occupancy(r, 128, 128 * 4)
            lines.append(f"| {name} T={T} K={K} | hvp_kernel<float> (global workspace) | {r} | {128 * 4} | 128 | "
                         f"{b} | {occ:.0%} | {lim} | {T} |")
    lines += ["", "### Roofline of one second-order meta-step (float32, H100 SXM figures)", "",
              "| config | params | GFLOP | MB off-chip (fused / layer-wise) | FP32 peak roof | HBM roof | "
              "CTA-structure roof | predicted |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, dims, T, K, Ns, Nq in configs:
        m = meta_step(dims, T, K, Ns, Nq)
        ws = MM.fused_workspace_bytes(dims, K, Ns, Nq, torch.float32, lr_learned=False)
        fused = ws + 128 * 8 + 256 <= 227 * 1024
        bytes_ = m["fused_bytes"] if fused else m["layer_bytes"]
        t_peak = m["flops"] / (SM["fp32_tflops"] * 1e12)
        t_hbm = bytes_ / (SM["hbm_tbs"] * 1e12)
        # one CTA per task; its products read one shared-memory (or L1) operand per FMA that
        # is not a broadcast: 32 FMAs per cycle per SM (128 B/cycle), on min(T, 132) SMs
        sms = min(T, SM["sms"])
        t_cta = m["flops"] / (sms * 64 * SM["clock_ghz"] * 1e9)
        launches = 2 if fused else K * 3 + 3 + 2 * K  # fused: maml + reduce; else per-step op calls
        t_pred = max(t_peak, t_hbm, t_cta) + launches * 5e-6
        lines.append(f"| {name} T={T} K={K} Ns={Ns} Nq={Nq} ({'fused' if fused else 'layer-wise'}) | {m['P']} | "
                     f"{m['flops'] / 1e9:.3f} | {m['fused_bytes'] / 1e6:.2f} / {m['layer_bytes'] / 1e6:.1f} | "
                     f"{t_peak * 1e6:.1f} µs | {t_hbm * 1e6:.1f} µs | {t_cta * 1e6:.1f} µs | "
                     f"{t_pred * 1e6:.0f} µs ({launches} launches × 5 µs) |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
