// CUDA error handling: every runtime call and every launch is checked and turned into
// a C++ exception (RuntimeError in Python). Only included by .cu files.
#pragma once
#if defined(__CUDACC__)
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#define FM_CUDA_CHECK(expr)                                                              \
  do {                                                                                   \
    cudaError_t fm_err_ = (expr);                                                        \
    if (fm_err_ != cudaSuccess) {                                                        \
      (void)cudaGetLastError();                                                          \
      throw std::runtime_error(std::string("fastmaml CUDA error: ") +                    \
                               cudaGetErrorString(fm_err_) + " at " __FILE__ ":" +       \
                               std::to_string(__LINE__) + " (" #expr ")");               \
    }                                                                                    \
  } while (0)

// After a kernel launch: configuration errors surface from cudaGetLastError().
#define FM_CUDA_CHECK_LAUNCH() FM_CUDA_CHECK(cudaGetLastError())

namespace fastmaml {
inline cudaStream_t as_stream(std::uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }
}  // namespace fastmaml
#endif
