# Type stub for the compiled extension fastmaml._C (pybind11; csrc/extension.cpp calls each
# op folder's registration, csrc/<op>/bindings.cpp).
# Pointers, strides and CUDA streams cross the boundary as Python ints.

from collections.abc import Callable

from torch import Tensor, dtype

cuda_compiled: bool
cuda_reason: str
openmp: bool
compiler: str

def openmp_max_threads() -> int: ...
def set_num_threads(n: int) -> None: ...
def cuda_device_count() -> tuple[int, str]: ...
def cuda_runtime_version() -> int: ...
def codes() -> dict[str, int]: ...  # csrc/common/codes.h by name; fastmaml/codes.py checks them

# ---- sgd_step (csrc/sgd_step/) -------------------------------------------------------
# One entry per tensor in every list. theta[i] points at [N_i] data when shared[i] == 1,
# else at [T, N_i]; grad/out/v/dgrad at [T, N_i]. dtype: 0 float32, 1 float64.
# lr_mode: 0 immediate lr_value, 1 lr[i] points at one value, 2 lr[i] points at N_i values.
# Output pointers of 0 mean "not requested". Raise ValueError on bad sizes/null pointers
# and, in the forward, when two inputs overlap or an output overlaps an input or another
# output (outputs may be caller-provided: ops.sgd_step's out=); CUDA errors raise
# RuntimeError.
def sgd_step_fwd_cpu(
    theta: list[int], grad: list[int], out: list[int], numel: list[int], shared: list[int], tasks: int,
    dtype: int, lr_mode: int, lr_value: float, lr: list[int],
) -> None: ...
# The no-autograd forward of ops.sgd_step for CPU tensors and a Python-float lr
# (ops/_sgd_step/launch.py, lean_cpu_forward): takes the tensors themselves, checks them
# (dtype is the torch.dtype, dtype_code its code; requires_grad only when asked),
# allocates the outputs with empty_like and runs the kernel. None when a check fails or
# the outputs would take max_out_bytes or more. With out (n tensors, each checked like an
# input and shaped exactly like grads[i]) it writes there instead, at any size, and
# returns a new list of those tensors; overlaps raise ValueError (the kernel's check).
def sgd_step_fwd_cpu_lean(
    params: list[Tensor] | tuple[Tensor, ...], grads: list[Tensor] | tuple[Tensor, ...], dtype: dtype,
    dtype_code: int, check_requires_grad: bool, lr_value: float, empty_like: Callable[[Tensor], Tensor],
    max_out_bytes: int, out: list[Tensor] | tuple[Tensor, ...] | None = None,
) -> list[Tensor] | None: ...
def sgd_step_bwd_cpu(
    v: list[int], grad: list[int], numel: list[int], shared: list[int], tasks: int, dtype: int, lr_mode: int,
    lr_value: float, lr: list[int], dtheta: list[int], dgrad: list[int], dlr: list[int],
) -> None: ...
def sgd_step_fwd_cuda(
    theta: list[int], grad: list[int], out: list[int], numel: list[int], shared: list[int], tasks: int,
    dtype: int, lr_mode: int, lr_value: float, lr: list[int], device: int, stream: int,
    force_index64: bool = False,
) -> None: ...
def sgd_step_bwd_cuda(
    v: list[int], grad: list[int], numel: list[int], shared: list[int], tasks: int, dtype: int, lr_mode: int,
    lr_value: float, lr: list[int], dtheta: list[int], dgrad: list[int], dlr: list[int], device: int,
    stream: int, force_index64: bool = False,
) -> None: ...
def multi_tensor_plan(
    cols: list[int], rows: int, col_chunk: int, row_chunk: int, max_tensors: int, max_blocks: int,
) -> dict[str, object]: ...

# (max tensors per launch, max blocks per launch, threads per block, forward rows per block)
SGD_STEP_CUDA_TABLE: tuple[int, int, int, int]

# batch_norm, batch-statistics mode (csrc/batch_norm/); x: contiguous [N, C, L] (layout 0) or [N, L, C] (layout 1)
def batch_norm_fwd_cpu(dtype: int, layout: int, N: int, C: int, L: int, x: int, w: int, b: int, y: int, mean: int, rstd: int,
                       eps: float, threads: int) -> None: ...
def batch_norm_bwd_cpu(dtype: int, layout: int, N: int, C: int, L: int, x: int, w: int, mean: int, rstd: int, gy: int, dx: int,
                       dw: int, db: int, threads: int) -> None: ...
def batch_norm_bwd_bwd_cpu(dtype: int, layout: int, N: int, C: int, L: int, x: int, w: int, mean: int, rstd: int, gy: int, a: int,
                           bw: int, bb: int, g_gy: int, g_x: int, g_w: int, threads: int) -> None: ...

# ---- mlp (csrc/mlp/; fastmaml/ops/mlp.py, fastmaml/ops/_maml_mlp/) ---------------------
# dims: [d_0, ..., d_L]; act: 0 relu, 1 tanh; loss: 0 mse, 1 cross_entropy; dtype: 0 f32, 1 f64
def mlp_loss_and_grad_cpu(dtype: int, dims: list[int], act: int, loss: int, T: int, N: int, x: int, y: int,
                          W: list[int], b: list[int], out_loss: int, gW: list[int], gb: list[int]) -> None: ...
def mlp_hvp_cpu(dtype: int, dims: list[int], act: int, loss: int, T: int, N: int, x: int, y: int, W: list[int],
                b: list[int], vW: list[int], vb: list[int], hW: list[int], hb: list[int]) -> None: ...
def maml_mlp_workspace_elems(dims: list[int], K: int, Ns: int, Nq: int, lr_learned: bool, n_msl: int) -> int: ...
def maml_mlp_cpu(dtype: int, dims: list[int], act: int, loss: int, T: int, K: int, Ns: int, Nq: int, W: list[int],
                 b: list[int], xs: int, ys: int, xq: int, yq: int, lr_mode: int, lr: int, lr_value: float, msl: int,
                 first_order: bool, need_grad: bool, n_lr: int, out_loss: int, out_dtheta: list[int],
                 out_dlr: int) -> None: ...
def first_nonfinite_cpu(dtype: int, ptrs: list[int], counts: list[int]) -> int: ...
def mlp_loss_and_grad_cuda(dtype: int, dims: list[int], act: int, loss: int, T: int, N: int, x: int, y: int,
                           W: list[int], b: list[int], out_loss: int, gW: list[int], gb: list[int],
                           stream: int) -> None: ...
def mlp_hvp_cuda(dtype: int, dims: list[int], act: int, loss: int, T: int, N: int, x: int, y: int, W: list[int],
                 b: list[int], vW: list[int], vb: list[int], hW: list[int], hb: list[int], stream: int) -> None: ...
def maml_mlp_cuda(dtype: int, dims: list[int], act: int, loss: int, T: int, K: int, Ns: int, Nq: int, W: list[int],
                  b: list[int], xs: int, ys: int, xq: int, yq: int, lr_mode: int, lr: int, lr_value: float, msl: int,
                  first_order: bool, need_grad: bool, n_lr: int, n_msl: int, out_loss: int,
                  out_dtheta: list[int], out_dlr: int, partials: int, stream: int) -> None: ...
def maml_mlp_cuda_smem_limit(device: int) -> int: ...
