// Shared definitions for fastmaml's C++ and CUDA kernels.
//
// Everything in this header compiles both as host C++17 and under nvcc. Per-element
// and per-task math is written once, as FM_HD functions or as templates on a
// "thread group" policy, and is used by the CPU build (one OpenMP thread = one group
// of size 1, barriers are no-ops) and by the CUDA build (one CTA = one group).
#pragma once

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "common/codes.h"

#if defined(__CUDACC__)
#define FM_HD __host__ __device__ __forceinline__
#define FM_DEVICE __device__ __forceinline__
#else
#define FM_HD inline
#define FM_DEVICE inline
#endif

namespace fastmaml {

// dtype codes used across the Python/C++ boundary (common/codes.h).
using codes::DType;
using codes::kFloat32;
using codes::kFloat64;

// A group of threads that cooperates on one task. The CPU policy is a single thread.
struct SerialGroup {
  FM_HD int size() const { return 1; }
  FM_HD int rank() const { return 0; }
  FM_HD void sync() const {}
};

#if defined(__CUDACC__)
// One CUDA thread block.
struct CtaGroup {
  __device__ __forceinline__ int size() const { return static_cast<int>(blockDim.x); }
  __device__ __forceinline__ int rank() const { return static_cast<int>(threadIdx.x); }
  __device__ __forceinline__ void sync() const { __syncthreads(); }
};
#endif

// Argument checks on the C++ side of the boundary: the Python layer validates
// everything first; these re-check what the kernels rely on and raise ValueError.
inline void require(bool ok, const std::string& what) {
  if (!ok) throw std::invalid_argument("fastmaml._C: " + what);
}

template <class T>
inline T* as_ptr(std::uintptr_t p, const char* name) {
  require(p != 0, std::string(name) + " is a null pointer");
  return reinterpret_cast<T*>(p);
}

}  // namespace fastmaml
