// Device queries (common/cuda_device.cu; compiled only with FASTMAML_WITH_CUDA).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace fastmaml {

int cuda_device_count(std::string* error);
int cuda_runtime_version();

}  // namespace fastmaml
