// Device queries for `python -m fastmaml info` and for the Python-side checks.
#include <string>

#include "common/cuda_check.h"
#include "common/device.h"

namespace fastmaml {

namespace {
// One trivial kernel: whether this build has code that runs on the device.
__global__ void probe_kernel(int* flag) {
  if (flag != nullptr && threadIdx.x == 0) *flag = 1;
}
}  // namespace

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

std::string cuda_probe() {
  // on the current device (the caller switches to the one it asks about)
  cudaFuncAttributes attr{};
  cudaError_t err = cudaFuncGetAttributes(&attr, &probe_kernel);
  int ran = 0;
  if (err == cudaSuccess) {
    int* flag = nullptr;
    err = cudaMalloc(reinterpret_cast<void**>(&flag), sizeof(int));
    if (err == cudaSuccess) {
      err = cudaMemset(flag, 0, sizeof(int));
      if (err == cudaSuccess) {
        FM_LAUNCH(probe_kernel, 1, 1, 0, nullptr, flag);
        err = cudaGetLastError();
      }
      if (err == cudaSuccess) err = cudaMemcpy(&ran, flag, sizeof(int), cudaMemcpyDeviceToHost);
      (void)cudaFree(flag);
    }
  }
  if (err == cudaSuccess && ran != 1) return "the probe kernel was launched but did not run";
  if (err == cudaSuccess) return "";
  (void)cudaGetLastError();
  int dev = -1, major = 0, minor = 0;
  (void)cudaGetDevice(&dev);
  (void)cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
  (void)cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev);
  return "a kernel of this build does not run on device " + std::to_string(dev) + " (sm_" + std::to_string(major) +
         std::to_string(minor) + "): " + cudaGetErrorString(err) +
         " (rebuild with FASTMAML_CUDA_ARCH including this architecture)";
}

}  // namespace fastmaml
