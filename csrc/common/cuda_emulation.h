// The CUDA emulation: what a .cu file of this project needs from nvcc and the CUDA
// runtime, as host C++ (the FASTMAML_CUDA=emulate build, see setup.py). The .cu sources
// are compiled unchanged with this header force-included; kernels then run on the CPU:
//
// * every CUDA thread of a block is its own fiber (its own stack), so a barrier
//   (__syncthreads) and a warp collective (__shfl_*_sync, __ballot_sync, ...) have their
//   real meaning: a fiber runs until it reaches one, and is resumed only when every
//   thread concerned has reached it. Within a barrier interval the threads run one after
//   another in a fresh random order (so code relying on an order of threads, or of
//   blocks, gives different results from run to run);
// * the blocks of a grid run one at a time in a random order;
// * a launch is checked against the limits of an sm_90 device (H100/H200): at most 1024
//   threads per block (block.z <= 64), gridDim.x < 2^31, gridDim.y/z <= 65535, dynamic
//   shared memory <= 48 KiB unless the kernel opted in with
//   cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, n), and
//   n <= 227 KiB. A refused launch sets the error that cudaGetLastError() returns, as on a
//   device, with the same error code;
// * a barrier reached by only part of a block, a warp collective whose lanes do not all
//   arrive, an out-of-bounds dynamic shared-memory access and a shared- or global-memory
//   race between threads (accesses of two threads to the same bytes between the same two
//   barriers, one of them a write; for global memory also between blocks) are reported as
//   a launch failure naming the kernel, the block and the threads (cuda_emulation.cpp:
//   the .cu objects are compiled with the compiler's ThreadSanitizer instrumentation and
//   this runtime supplies the __tsan_* hooks; no TSan runtime is linked);
// * streams are opaque handles: a launch runs to completion before it returns, so every
//   stream order is respected trivially; cudaMallocAsync is a host allocation.
//
// Every launch is counted per kernel; fastmaml._C.cuda_emulation_stats() returns the
// counts (the coverage list of tests/emulated).
#pragma once

#if !defined(FASTMAML_CUDA_EMULATE)
#error "cuda_emulation.h is only for the FASTMAML_CUDA=emulate build"
#endif

#define FM_CUDA_EMULATED_TU 1

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <typeinfo>
#include <utility>

// ---- language extensions -----------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __align__(n) __attribute__((aligned(n)))
#define __launch_bounds__(...)
// Static shared memory: one object per kernel, reused by every block (blocks run one at
// a time, under the launch lock). The runtime tells these objects from global memory by
// their address (this module's writable segments) and checks them per block.
#define __shared__ static
#define __constant__ static const

struct uint3 {
  unsigned int x, y, z;
};
struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1) : x(vx), y(vy), z(vz) {}
  constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
  constexpr operator uint3() const { return uint3{x, y, z}; }
};

// ---- runtime API subset ------------------------------------------------------------------
enum cudaError_t : int {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorMemoryAllocation = 2,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorInvalidDevice = 101,
  cudaErrorInvalidResourceHandle = 400,
  cudaErrorIllegalAddress = 700,
  cudaErrorLaunchOutOfResources = 701,
  cudaErrorLaunchFailure = 719,
  cudaErrorNoKernelImageForDevice = 209,
};
typedef cudaError_t cudaError;
struct CUstream_st;
typedef CUstream_st* cudaStream_t;
enum cudaDeviceAttr : int {
  cudaDevAttrMaxThreadsPerBlock = 1,
  cudaDevAttrMaxBlockDimX = 2,
  cudaDevAttrMaxBlockDimY = 3,
  cudaDevAttrMaxBlockDimZ = 4,
  cudaDevAttrMaxGridDimX = 5,
  cudaDevAttrMaxGridDimY = 6,
  cudaDevAttrMaxGridDimZ = 7,
  cudaDevAttrMaxSharedMemoryPerBlock = 8,
  cudaDevAttrWarpSize = 10,
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrComputeCapabilityMajor = 75,
  cudaDevAttrComputeCapabilityMinor = 76,
  cudaDevAttrMaxSharedMemoryPerMultiprocessor = 81,
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97,
};
enum cudaFuncAttribute : int {
  cudaFuncAttributeMaxDynamicSharedMemorySize = 8,
  cudaFuncAttributePreferredSharedMemoryCarveout = 9,
};
enum cudaMemcpyKind : int { cudaMemcpyHostToHost = 0, cudaMemcpyHostToDevice = 1, cudaMemcpyDeviceToHost = 2,
                            cudaMemcpyDeviceToDevice = 3, cudaMemcpyDefault = 4 };

cudaError_t cudaGetLastError();
cudaError_t cudaPeekAtLastError();
const char* cudaGetErrorString(cudaError_t err);
const char* cudaGetErrorName(cudaError_t err);
cudaError_t cudaGetDeviceCount(int* count);
cudaError_t cudaGetDevice(int* device);
cudaError_t cudaSetDevice(int device);
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device);
cudaError_t cudaRuntimeGetVersion(int* version);
cudaError_t cudaDriverGetVersion(int* version);
cudaError_t cudaMalloc(void** ptr, size_t bytes);
cudaError_t cudaFree(void* ptr);
cudaError_t cudaMallocAsync(void** ptr, size_t bytes, cudaStream_t stream);
cudaError_t cudaFreeAsync(void* ptr, cudaStream_t stream);
cudaError_t cudaMemsetAsync(void* ptr, int value, size_t bytes, cudaStream_t stream = nullptr);
cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind, cudaStream_t stream = nullptr);
cudaError_t cudaMemset(void* ptr, int value, size_t bytes);
cudaError_t cudaMemcpy(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind);
cudaError_t cudaStreamSynchronize(cudaStream_t stream);
cudaError_t cudaDeviceSynchronize();

struct cudaFuncAttributes {
  size_t sharedSizeBytes, constSizeBytes, localSizeBytes;
  int maxThreadsPerBlock, numRegs, ptxVersion, binaryVersion, cacheModeCA, maxDynamicSharedSizeBytes;
};

namespace fastmaml {
namespace emu {
cudaError_t func_set_attribute(const void* fn, cudaFuncAttribute attr, int value);
cudaError_t func_get_attributes(cudaFuncAttributes* attr, const void* fn);
}  // namespace emu
}  // namespace fastmaml

template <class F>
inline cudaError_t cudaFuncSetAttribute(F* fn, cudaFuncAttribute attr, int value) {
  return ::fastmaml::emu::func_set_attribute(reinterpret_cast<const void*>(fn), attr, value);
}
template <class F>
inline cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* attr, F* fn) {
  return ::fastmaml::emu::func_get_attributes(attr, reinterpret_cast<const void*>(fn));
}

// ---- the emulator's per-thread view --------------------------------------------------------
namespace fastmaml {
namespace emu {

// The running CUDA thread: set by the scheduler before it resumes a fiber.
struct ThreadView {
  uint3 thread_idx;
  uint3 block_idx;
  dim3 block_dim;
  dim3 grid_dim;
  int lane;  // linear thread index % 32
};
extern const ThreadView* g_view;

void syncthreads();
int syncthreads_reduce(int op, int pred);  // op: 0 count, 1 and, 2 or
// Warp collective: deposits `value`, waits for every lane of `mask`, then returns the
// 32 deposited values (lanes outside the mask: their own last value, unused).
const uint64_t* warp_collective(unsigned mask, uint64_t value);
unsigned active_mask();
unsigned char* dynamic_shared();

float atomic_add(float* p, float v);
double atomic_add(double* p, double v);
int atomic_add(int* p, int v);
unsigned atomic_add(unsigned* p, unsigned v);
unsigned long long atomic_add(unsigned long long* p, unsigned long long v);
int atomic_max(int* p, int v);
int atomic_min(int* p, int v);
int atomic_exch(int* p, int v);
int atomic_cas(int* p, int compare, int v);
unsigned long long atomic_cas(unsigned long long* p, unsigned long long compare, unsigned long long v);

struct LaunchSpec {
  const char* name;       // the kernel expression as written at the launch site
  const void* fn;         // the kernel's address (function attributes)
  const char* signature;  // mangled type of the kernel (the instantiation, for the coverage list)
  dim3 grid, block;
  size_t smem;
  cudaStream_t stream;
  size_t param_bytes;
};
// Runs `body(ctx)` as every thread of every block (or records why the launch is refused).
void run_launch(const LaunchSpec& spec, void (*body)(void*), void* ctx);

// The launch helper of the emulated build (FM_LAUNCH in launch.h). The arguments are
// converted to the kernel's parameter types once, on the host, as the CUDA runtime does;
// every thread then gets its own copy (kernel parameters are by value).
template <class... P, class... A>
inline void launch(const char* name, void (*fn)(P...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                   A&&... args) {
  static_assert(sizeof...(P) == sizeof...(A), "FM_LAUNCH: wrong number of kernel arguments");
  struct Ctx {
    void (*fn)(P...);
    std::tuple<std::decay_t<P>...> args;
  };
  Ctx ctx{fn, std::tuple<std::decay_t<P>...>(std::forward<A>(args)...)};
  LaunchSpec spec{name, reinterpret_cast<const void*>(fn), typeid(fn).name(), grid, block, smem, stream,
                  sizeof(ctx.args)};
  run_launch(spec, [](void* c) {
    Ctx* x = static_cast<Ctx*>(c);
    std::apply(x->fn, x->args);
  }, &ctx);
}

template <class T>
inline uint64_t to_bits(T v) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "shuffle of a type wider than 8 bytes");
  uint64_t b = 0;
  std::memcpy(&b, &v, sizeof(T));
  return b;
}
template <class T>
inline T from_bits(uint64_t b) {
  T v;
  std::memcpy(&v, &b, sizeof(T));
  return v;
}

}  // namespace emu
}  // namespace fastmaml

#define threadIdx (::fastmaml::emu::g_view->thread_idx)
#define blockIdx (::fastmaml::emu::g_view->block_idx)
#define blockDim (::fastmaml::emu::g_view->block_dim)
#define gridDim (::fastmaml::emu::g_view->grid_dim)
#define warpSize 32

inline void __syncthreads() { ::fastmaml::emu::syncthreads(); }
inline int __syncthreads_count(int p) { return ::fastmaml::emu::syncthreads_reduce(0, p); }
inline int __syncthreads_and(int p) { return ::fastmaml::emu::syncthreads_reduce(1, p); }
inline int __syncthreads_or(int p) { return ::fastmaml::emu::syncthreads_reduce(2, p); }
inline void __syncwarp(unsigned mask = 0xffffffffu) { (void)::fastmaml::emu::warp_collective(mask, 0); }
inline unsigned __activemask() { return ::fastmaml::emu::active_mask(); }
inline void __threadfence() {}
inline void __threadfence_block() {}

// Warp shuffles (width: a power of two <= 32; lanes are grouped in segments of `width`).
template <class T>
inline T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
  const int lane = ::fastmaml::emu::g_view->lane;
  const uint64_t* all = ::fastmaml::emu::warp_collective(mask, ::fastmaml::emu::to_bits(v));
  const int s = (lane & ~(width - 1)) + (src & (width - 1));
  return ::fastmaml::emu::from_bits<T>(all[s]);
}
template <class T>
inline T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  const int lane = ::fastmaml::emu::g_view->lane;
  const uint64_t* all = ::fastmaml::emu::warp_collective(mask, ::fastmaml::emu::to_bits(v));
  const int s = (lane & (width - 1)) >= int(delta) ? lane - int(delta) : lane;
  return ::fastmaml::emu::from_bits<T>(all[s]);
}
template <class T>
inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  const int lane = ::fastmaml::emu::g_view->lane;
  const uint64_t* all = ::fastmaml::emu::warp_collective(mask, ::fastmaml::emu::to_bits(v));
  const int s = (lane & (width - 1)) + int(delta) < width ? lane + int(delta) : lane;
  return ::fastmaml::emu::from_bits<T>(all[s]);
}
template <class T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  const int lane = ::fastmaml::emu::g_view->lane;
  const uint64_t* all = ::fastmaml::emu::warp_collective(mask, ::fastmaml::emu::to_bits(v));
  const int s = lane ^ lane_mask;
  return ::fastmaml::emu::from_bits<T>(all[(s & ~(width - 1)) == (lane & ~(width - 1)) ? s : lane]);
}
inline unsigned __ballot_sync(unsigned mask, int pred) {
  const uint64_t* all = ::fastmaml::emu::warp_collective(mask, pred != 0);
  unsigned out = 0;
  for (int i = 0; i < 32; ++i)
    if (((mask >> i) & 1u) && all[i]) out |= 1u << i;
  return out;
}
inline int __all_sync(unsigned mask, int pred) { return __ballot_sync(mask, pred) == mask; }
inline int __any_sync(unsigned mask, int pred) { return __ballot_sync(mask, pred) != 0; }

inline float atomicAdd(float* p, float v) { return ::fastmaml::emu::atomic_add(p, v); }
inline double atomicAdd(double* p, double v) { return ::fastmaml::emu::atomic_add(p, v); }
inline int atomicAdd(int* p, int v) { return ::fastmaml::emu::atomic_add(p, v); }
inline unsigned atomicAdd(unsigned* p, unsigned v) { return ::fastmaml::emu::atomic_add(p, v); }
inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) {
  return ::fastmaml::emu::atomic_add(p, v);
}
inline int atomicMax(int* p, int v) { return ::fastmaml::emu::atomic_max(p, v); }
inline int atomicMin(int* p, int v) { return ::fastmaml::emu::atomic_min(p, v); }
inline int atomicExch(int* p, int v) { return ::fastmaml::emu::atomic_exch(p, v); }
inline int atomicCAS(int* p, int c, int v) { return ::fastmaml::emu::atomic_cas(p, c, v); }
inline unsigned long long atomicCAS(unsigned long long* p, unsigned long long c, unsigned long long v) {
  return ::fastmaml::emu::atomic_cas(p, c, v);
}
