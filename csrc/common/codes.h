// Every code and mode that crosses the Python/C++ boundary, defined once. The Python
// twin is fastmaml/codes.py; the extension exports these values as fastmaml._C.codes()
// (common/bindings.cpp) and fastmaml.codes checks at import that both sides agree.
// Distinct concepts have distinct names: the sgd_step kernels' lr modes (how α is read)
// are not the fused MLP kernel's packed-lr layouts.
#pragma once

namespace fastmaml {
namespace codes {

// Scalar type of every tensor of a call.
enum DType : int { kFloat32 = 0, kFloat64 = 1 };

// MLP hidden-layer activation and per-task loss.
enum Activation : int { kRelu = 0, kTanh = 1 };
enum Loss : int { kMse = 0, kCrossEntropy = 1 };
constexpr int kMlpMaxLayers = 8;

// How the sgd_step kernels read α (sgd_step/sgd_step.h): an immediate value, a pointer to
// one value (0-d α, or element i of a per-tensor [n] α), a pointer to N_i values.
enum SgdKernelLrMode : int { kSgdLrValue = 0, kSgdLrBroadcast = 1, kSgdLrElement = 2 };

// The fused maml_mlp kernel's packed lr buffer (mlp/meta_step.h; docs/DESIGN.md §1):
// scalar [1], table [K, 2L], per element [P] (flat order W_1, b_1, ...), per step and
// element [K, P].
enum MlpLrMode : int { kMlpLrScalar = 0, kMlpLrTable = 1, kMlpLrElement = 2, kMlpLrStepElement = 3 };

}  // namespace codes
}  // namespace fastmaml
