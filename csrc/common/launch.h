// The one kernel-launch helper of both CUDA builds.
//
//   FM_LAUNCH(kernel, grid, block, smem_bytes, stream, args...);
//   FM_CUDA_CHECK_LAUNCH();   // cuda_check.h: a refused or failed launch raises
//
// The real build (nvcc) expands it to `kernel<<<grid, block, smem, stream>>>(args...)`;
// the emulated build (FASTMAML_CUDA=emulate, cuda_emulation.h) to a call of the emulator,
// which runs every thread of the grid on the CPU before it returns. A kernel that is a
// template with several arguments is written in parentheses:
// FM_LAUNCH((kernel<A, B>), ...). The `<<<...>>>` syntax appears nowhere else.
//
//   FM_DYNAMIC_SHARED(type, name);  declares `name`, the block's dynamic shared memory
//                                   (`extern __shared__ type name[]`, 16-byte aligned).
#pragma once

// FM_DEPAREN((x)) -> x ; FM_DEPAREN(x) -> x
#define FM_DEPAREN(X) FM_DEPAREN_ESC(FM_DEPAREN_ISH X)
#define FM_DEPAREN_ISH(...) FM_DEPAREN_ISH __VA_ARGS__
#define FM_DEPAREN_ESC(...) FM_DEPAREN_ESC_(__VA_ARGS__)
#define FM_DEPAREN_ESC_(...) FM_DEPAREN_VAN##__VA_ARGS__
#define FM_DEPAREN_VANFM_DEPAREN_ISH

#if defined(FASTMAML_CUDA_EMULATE)
#include "cuda_emulation.h"
#define FM_LAUNCH(kernel, grid, block, smem, stream, ...)                                             \
  ::fastmaml::emu::launch(#kernel, &FM_DEPAREN(kernel), dim3(grid), dim3(block), size_t(smem), stream, \
                          __VA_ARGS__)
#define FM_DYNAMIC_SHARED(type, name) type* const name = reinterpret_cast<type*>(::fastmaml::emu::dynamic_shared())
#else
#include <cuda_runtime.h>
#define FM_LAUNCH(kernel, grid, block, smem, stream, ...) \
  FM_DEPAREN(kernel)<<<(grid), (block), (smem), (stream)>>>(__VA_ARGS__)
#define FM_DYNAMIC_SHARED(type, name) extern __shared__ __align__(16) type name[]
#endif
