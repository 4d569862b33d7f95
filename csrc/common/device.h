// Device queries (common/cuda_device.cu; compiled only with FASTMAML_WITH_CUDA).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace fastmaml {

int cuda_device_count(std::string* error);
int cuda_runtime_version();
// '' when a kernel of this build runs on the current device, else why not.
std::string cuda_probe();

}  // namespace fastmaml
