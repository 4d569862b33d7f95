// CUDA device helpers for the launchers (.cu files only): a scoped current-device switch.
#pragma once
#if defined(__CUDACC__)
#include <cuda_runtime.h>

#include <string>

#include "common/common.h"
#include "common/cuda_check.h"

namespace fastmaml {

// Makes `device` current for the scope (checked against the device count) and restores
// the previous device on exit.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    int count = 0;
    FM_CUDA_CHECK(cudaGetDeviceCount(&count));
    require(device >= 0 && device < count,
            "device index " + std::to_string(device) + " out of range (" + std::to_string(count) + " devices)");
    FM_CUDA_CHECK(cudaGetDevice(&prev_));
    if (prev_ != device) FM_CUDA_CHECK(cudaSetDevice(device));
  }
  ~DeviceGuard() { (void)cudaSetDevice(prev_); }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int prev_ = 0;
};

}  // namespace fastmaml
#endif
