// The FASTMAML_CUDA=emulate build puts this directory first on the include path of the
// .cu sources: their `#include <cuda_runtime.h>` gets the emulation (../cuda_emulation.h).
#pragma once
#include "../cuda_emulation.h"
