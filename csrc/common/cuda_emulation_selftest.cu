// Small kernels that exercise the CUDA emulation itself (tests/emulated/test_emulator.py):
// a shared-memory tree reduction with and without its barriers (the race check must
// fire without them), a barrier reached by part of a block, warp shuffles/votes, the
// block order, a cross-block global-memory race and the launch limits. Compiled only in
// the emulated build (the real build gets an empty translation unit).
#if defined(FASTMAML_CUDA_EMULATE)
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "cuda_emulation_stats.h"
#include "launch.h"

namespace fastmaml {
namespace emu {
namespace {

constexpr int kSumThreads = 128;

// out[b] = Σ x[b·128 .. b·128+127]; Barriers = false drops every __syncthreads().
template <bool Barriers>
__global__ void selftest_block_sum_kernel(const float* x, float* out) {
  __shared__ float red[kSumThreads];
  red[threadIdx.x] = x[blockIdx.x * kSumThreads + threadIdx.x];
  if (Barriers) __syncthreads();
  for (int s = kSumThreads / 2; s > 0; s >>= 1) {
    if (static_cast<int>(threadIdx.x) < s) red[threadIdx.x] += red[threadIdx.x + s];
    if (Barriers) __syncthreads();
  }
  if (threadIdx.x == 0) out[blockIdx.x] = red[0];
}

// The same reduction in dynamic shared memory.
template <bool Barriers>
__global__ void selftest_dynamic_sum_kernel(const float* x, float* out) {
  FM_DYNAMIC_SHARED(float, red);
  red[threadIdx.x] = x[blockIdx.x * blockDim.x + threadIdx.x];
  if (Barriers) __syncthreads();
  for (int s = static_cast<int>(blockDim.x) / 2; s > 0; s >>= 1) {
    if (static_cast<int>(threadIdx.x) < s) red[threadIdx.x] += red[threadIdx.x + s];
    if (Barriers) __syncthreads();
  }
  if (threadIdx.x == 0) out[blockIdx.x] = red[0];
}

// Threads of the upper half exit before the barrier.
__global__ void selftest_partial_barrier_kernel(float* out) {
  if (threadIdx.x >= blockDim.x / 2) return;
  __syncthreads();
  out[threadIdx.x] = 1.0f;
}

// Per warp w (lanes l = 0..31 of thread w·32 + l), out[w·8 + ...]:
// 0: Σ lanes by __shfl_down_sync; 1: Σ by __shfl_xor_sync (lane 0's value); 2: lane 0's
// value of __shfl_sync(v, 31); 3: lane 5's __shfl_up_sync(v, 2); 4: __ballot_sync(l % 3 == 0);
// 5: __all_sync(l < 32); 6: __any_sync(l == 7); 7: __syncthreads_count(l even) (per block).
__global__ void selftest_warp_kernel(int64_t* out) {
  const unsigned full = 0xffffffffu;
  const int lane = static_cast<int>(threadIdx.x % 32), w = static_cast<int>(threadIdx.x / 32);
  const int v = static_cast<int>(threadIdx.x);
  int down = v, x = v;
  for (int o = 16; o > 0; o >>= 1) down += __shfl_down_sync(full, down, o);
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(full, x, o);
  const int idx = __shfl_sync(full, v, 31);
  const int up = __shfl_up_sync(full, v, 2);
  const unsigned ballot = __ballot_sync(full, lane % 3 == 0);
  const int all = __all_sync(full, lane < 32);
  const int any = __any_sync(full, lane == 7);
  const int count = __syncthreads_count(lane % 2 == 0);
  int64_t* o = out + w * 8;
  if (lane == 0) {
    o[0] = down;
    o[1] = x;
    o[2] = idx;
    o[4] = ballot;
    o[5] = all;
    o[6] = any;
    o[7] = count;
  }
  if (lane == 5) o[3] = up;
}

// Lanes 0..15 of warp 0 shuffle with a full mask; lanes 16..31 never do.
__global__ void selftest_warp_divergent_kernel(int* out) {
  if (threadIdx.x % 32 < 16) out[threadIdx.x] = __shfl_sync(0xffffffffu, static_cast<int>(threadIdx.x), 0);
}

// out[ticket] = block index: the order in which the blocks ran.
__global__ void selftest_block_order_kernel(int* counter, int* out) {
  if (threadIdx.x == 0) out[atomicAdd(counter, 1)] = static_cast<int>(blockIdx.x);
}

// Every block writes out[0]: a global-memory race between blocks.
__global__ void selftest_global_race_kernel(float* out) {
  if (threadIdx.x == 0) out[0] = static_cast<float>(blockIdx.x);
}

// Launch-limit probe: does nothing.
__global__ void selftest_empty_kernel(int) {}

std::string last_error() {
  const cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? std::string() : std::string(cudaGetErrorString(e));
}

}  // namespace

std::string selftest(const std::string& name, std::uintptr_t a, std::uintptr_t b, int64_t n0, int64_t n1,
                     int64_t n2, int64_t n3, int64_t n4, int64_t n5, int64_t n6, bool flag) {
  if (name == "block_sum") {  // a: x [n0·128] float32, b: out [n0]; flag: with barriers
    if (flag)
      FM_LAUNCH(selftest_block_sum_kernel<true>, unsigned(n0), kSumThreads, 0, nullptr,
                reinterpret_cast<const float*>(a), reinterpret_cast<float*>(b));
    else
      FM_LAUNCH(selftest_block_sum_kernel<false>, unsigned(n0), kSumThreads, 0, nullptr,
                reinterpret_cast<const float*>(a), reinterpret_cast<float*>(b));
  } else if (name == "dynamic_sum") {  // x [n0·n1], out [n0], n1 threads (a power of two)
    if (flag)
      FM_LAUNCH(selftest_dynamic_sum_kernel<true>, unsigned(n0), unsigned(n1), size_t(n1) * 4, nullptr,
                reinterpret_cast<const float*>(a), reinterpret_cast<float*>(b));
    else
      FM_LAUNCH(selftest_dynamic_sum_kernel<false>, unsigned(n0), unsigned(n1), size_t(n1) * 4, nullptr,
                reinterpret_cast<const float*>(a), reinterpret_cast<float*>(b));
  } else if (name == "partial_barrier") {  // a: out [n0] float32, n0 threads
    FM_LAUNCH(selftest_partial_barrier_kernel, 1, unsigned(n0), 0, nullptr, reinterpret_cast<float*>(a));
  } else if (name == "warp") {  // a: out [n0/32·8] int64, n0 threads (a multiple of 32)
    FM_LAUNCH(selftest_warp_kernel, 1, unsigned(n0), 0, nullptr, reinterpret_cast<int64_t*>(a));
  } else if (name == "warp_divergent") {  // a: out [32] int32
    FM_LAUNCH(selftest_warp_divergent_kernel, 1, 32, 0, nullptr, reinterpret_cast<int*>(a));
  } else if (name == "block_order") {  // a: counter [1] int32 (zero), b: out [n0] int32
    FM_LAUNCH(selftest_block_order_kernel, unsigned(n0), 32, 0, nullptr, reinterpret_cast<int*>(a),
              reinterpret_cast<int*>(b));
  } else if (name == "global_race") {  // a: out [1] float32, n0 blocks
    FM_LAUNCH(selftest_global_race_kernel, unsigned(n0), 32, 0, nullptr, reinterpret_cast<float*>(a));
  } else if (name == "launch") {  // grid (n0, n1, n2), block (n3, n4, n5), n6 bytes of dynamic smem; flag: opt in
    if (flag) {
      const cudaError_t e = cudaFuncSetAttribute(&selftest_empty_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                 static_cast<int>(n6));
      if (e != cudaSuccess) return last_error();
    }
    FM_LAUNCH(selftest_empty_kernel, dim3(unsigned(n0), unsigned(n1), unsigned(n2)),
              dim3(unsigned(n3), unsigned(n4), unsigned(n5)), size_t(n6), nullptr, 0);
    const std::string err = last_error();
    if (flag) (void)cudaFuncSetAttribute(&selftest_empty_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, 48 * 1024);
    return err;
  } else {
    throw std::invalid_argument("cuda_emulation_selftest: unknown kernel " + name);
  }
  return last_error();
}

}  // namespace emu
}  // namespace fastmaml
#endif  // FASTMAML_CUDA_EMULATE
