// The generic multi-tensor launcher (CUDA): one kernel launch per LaunchPlan of
// multi_tensor/multi_tensor.h, the chunk table passed BY VALUE as the kernel argument (no
// host-to-device copy). An op supplies
//   - a table type TensorTable<NPtr, MaxTensors, MaxBlocks> (NPtr addresses per tensor),
//   - fill(table, slot, tensor): writes a slot's addresses,
//   - op(table, block): the per-block work (a __device__ functor),
// and plans its launches with plan_multi_tensor(..., MaxTensors, MaxBlocks).
#pragma once
#if defined(__CUDACC__)
#include <cuda_runtime.h>

#include <cstdint>
#include <vector>

#include "common/cuda_check.h"
#include "multi_tensor/multi_tensor.h"

namespace fastmaml {

template <int NPtr, int MaxTensors, int MaxBlocks>
struct TensorTable {
  static_assert(MaxTensors <= 256, "block_slot is one byte");
  void* ptr[NPtr][MaxTensors];
  int64_t numel[MaxTensors];
  unsigned char shared[MaxTensors];
  unsigned char block_slot[MaxBlocks];
  int32_t block_col[MaxBlocks];
  int32_t block_row[MaxBlocks];
  int64_t first_block;  // global number of this launch's block 0 (workspace slot)
};

template <int Threads, class Table, class Op>
__global__ void __launch_bounds__(Threads) multi_tensor_kernel(Table table, Op op) {
  op(table, static_cast<int>(blockIdx.x));
}

// One launch of Threads-thread blocks per LaunchPlan; fill(table, slot, tensor) writes a
// slot's addresses.
template <int Threads, class Table, class Op, class Fill>
void multi_tensor_apply(const MultiTensorPlan& plan, const std::vector<int64_t>& numel,
                        const std::vector<int>& shared, Fill fill, const Op& op, cudaStream_t stream) {
  for (const LaunchPlan& l : plan.launches) {
    Table t{};
    for (size_t s = 0; s < l.tensors.size(); ++s) {
      const int i = l.tensors[s];
      t.numel[s] = numel[i];
      t.shared[s] = static_cast<unsigned char>(shared[i] != 0);
      fill(t, static_cast<int>(s), i);
    }
    const int nb = static_cast<int>(l.block_slot.size());
    for (int b = 0; b < nb; ++b) {
      t.block_slot[b] = static_cast<unsigned char>(l.block_slot[b]);
      t.block_col[b] = l.block_col[b];
      t.block_row[b] = l.block_row[b];
    }
    t.first_block = l.first_block;
    multi_tensor_kernel<Threads><<<nb, Threads, 0, stream>>>(t, op);
    FM_CUDA_CHECK_LAUNCH();
  }
}

}  // namespace fastmaml
#endif
