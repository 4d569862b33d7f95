// CUDA device helpers for the launchers (.cu files only): the current-device check.
#pragma once
#if defined(__CUDACC__) || defined(FM_CUDA_EMULATED_TU)
#include <cuda_runtime.h>

#include <string>

#include "common/common.h"
#include "common/cuda_check.h"

namespace fastmaml {

// Checks that `device` is the current device (and exists). The caller switches devices
// (fastmaml._ext.cuda_launch, with torch.cuda.device): switching here and back in a
// destructor would call cudaSetDevice in a thread that never used the GPU, which creates a
// context on GPU 0.
inline void check_device(int device) {
  int count = 0;
  FM_CUDA_CHECK(cudaGetDeviceCount(&count));
  require(device >= 0 && device < count,
          "device index " + std::to_string(device) + " out of range (" + std::to_string(count) + " devices)");
  int current = 0;
  FM_CUDA_CHECK(cudaGetDevice(&current));
  require(current == device, "the current CUDA device is " + std::to_string(current) + ", the tensors are on device " +
                                 std::to_string(device) + " (switch devices before the call)");
}

}  // namespace fastmaml
#endif
