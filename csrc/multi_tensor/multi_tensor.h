// Host-side planning of an apex-style multi-tensor launch (pure C++17, no CUDA).
//
// Many tensors are processed by one kernel launch: each block handles one chunk of one
// tensor, found through a small table (block → tensor slot, block → chunk) that is
// passed BY VALUE as the kernel argument (no host-to-device copy). The table has fixed
// capacity (kernel parameters are limited to 4 KiB), so the plan is split into several
// launches ("flushed") whenever the tensor slots or the block slots fill; a tensor whose
// chunks do not all fit continues in the next launch.
//
// Tensor i is viewed as `rows` × cols[i] (tasks × elements per task). A chunk is
// col_chunk consecutive columns × row_chunk consecutive rows. Global block numbers
// (first_block + b) are contiguous per tensor, in tensor order, across launches, so a
// per-block partial result can be reduced per tensor afterwards in a fixed order.
//
// Kept free of CUDA so the planning (including tensors with more than 2^31 elements,
// which need 64-bit indexing) is unit-tested on machines without a GPU.
#pragma once

#include <cstdint>
#include <limits>
#include <vector>

#include "common/common.h"

namespace fastmaml {

struct LaunchPlan {
  std::vector<int> tensors;            // slot → global tensor index
  std::vector<int> block_slot;         // block → slot
  std::vector<int32_t> block_col;      // block → column-chunk index within the tensor
  std::vector<int32_t> block_row;      // block → row-chunk index
  int64_t first_block = 0;             // global number of this launch's block 0
};

struct MultiTensorPlan {
  std::vector<LaunchPlan> launches;
  std::vector<int64_t> tensor_first_block;  // per tensor: its first global block
  std::vector<int64_t> tensor_blocks;       // per tensor: its number of blocks
  int64_t total_blocks = 0;
  bool needs_index64 = false;  // some tensor has rows·cols ≥ 2^31 elements
};

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline MultiTensorPlan plan_multi_tensor(const std::vector<int64_t>& cols, int64_t rows, int64_t col_chunk,
                                         int64_t row_chunk, int max_tensors, int max_blocks) {
  require(rows >= 1, "rows (T) must be >= 1");
  require(col_chunk >= 1 && row_chunk >= 1, "chunk sizes must be >= 1");
  require(max_tensors >= 1 && max_blocks >= 1, "table capacities must be >= 1");
  MultiTensorPlan plan;
  const int n = static_cast<int>(cols.size());
  plan.tensor_first_block.assign(n, 0);
  plan.tensor_blocks.assign(n, 0);
  const int64_t row_chunks = ceil_div(rows, row_chunk);
  LaunchPlan cur;
  int64_t next_block = 0;
  auto flush = [&]() {
    if (!cur.block_slot.empty()) plan.launches.push_back(cur);
    cur = LaunchPlan();
    cur.first_block = next_block;
  };
  for (int i = 0; i < n; ++i) {
    require(cols[i] >= 0, "tensor sizes must be >= 0");
    plan.tensor_first_block[i] = next_block;
    if (cols[i] == 0) continue;
    if (static_cast<double>(cols[i]) * static_cast<double>(rows) >= 2147483648.0) plan.needs_index64 = true;
    const int64_t col_chunks = ceil_div(cols[i], col_chunk);
    require(col_chunks <= std::numeric_limits<int32_t>::max() && row_chunks <= std::numeric_limits<int32_t>::max(),
            "tensor too large for the chunk table");
    plan.tensor_blocks[i] = col_chunks * row_chunks;
    int slot = -1;
    for (int64_t r = 0; r < row_chunks; ++r) {
      for (int64_t c = 0; c < col_chunks; ++c) {
        if (slot < 0) {  // give the tensor a slot in the current launch, flushing if full
          if (static_cast<int>(cur.tensors.size()) == max_tensors) flush();
          cur.tensors.push_back(i);
          slot = static_cast<int>(cur.tensors.size()) - 1;
        }
        cur.block_slot.push_back(slot);
        cur.block_col.push_back(static_cast<int32_t>(c));
        cur.block_row.push_back(static_cast<int32_t>(r));
        ++next_block;
        if (static_cast<int>(cur.block_slot.size()) == max_blocks) {
          flush();
          slot = -1;  // the rest of this tensor continues in the next launch
        }
      }
    }
  }
  flush();
  plan.total_blocks = next_block;
  return plan;
}

}  // namespace fastmaml
