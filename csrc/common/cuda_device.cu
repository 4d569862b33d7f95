// Device queries for `python -m fastmaml info` and for the Python-side checks.
#include <string>

#include "common/cuda_check.h"
#include "common/device.h"

namespace fastmaml {

int cuda_device_count(std::string* error) {
  int n = 0;
  cudaError_t err = cudaGetDeviceCount(&n);
  if (err != cudaSuccess) {
    (void)cudaGetLastError();
    if (error) *error = cudaGetErrorString(err);
    return 0;
  }
  return n;
}

int cuda_runtime_version() {
  int v = 0;
  if (cudaRuntimeGetVersion(&v) != cudaSuccess) return 0;
  return v;
}

}  // namespace fastmaml
