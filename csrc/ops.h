// Declarations of every host-callable entry point of fastmaml._C. The bindings in
// extension.cpp call these; each op's CPU launcher lives in <op>_cpu.cpp and its CUDA
// launcher in <op>_cuda.cu (compiled only when nvcc is found: FASTMAML_WITH_CUDA).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace fastmaml {

// ---- devices -------------------------------------------------------------------
int cuda_device_count(std::string* error);
int cuda_runtime_version();

}  // namespace fastmaml
