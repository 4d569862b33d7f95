// mlp: the per-element math shared by every policy (activations and their derivatives
// written in terms of the stored h = σ(z)).
#pragma once

#include "mlp/layout.h"

namespace fastmaml {
namespace mlp {

FM_HD float fm_tanh(float x) { return tanhf(x); }
FM_HD double fm_tanh(double x) { return tanh(x); }
FM_HD float fm_exp(float x) { return expf(x); }
FM_HD double fm_exp(double x) { return exp(x); }
FM_HD float fm_log(float x) { return logf(x); }
FM_HD double fm_log(double x) { return log(x); }

template <class S>
FM_HD S act_fwd(int act, S z) {
  return act == kRelu ? ((z > S(0) || z != z) ? z : S(0)) : fm_tanh(z);  // relu(NaN) = NaN, as torch.relu
}
// σ'(z) and σ''(z) written in terms of h = σ(z) (what is stored).
template <class S>
FM_HD S act_d1(int act, S h) {
  return act == kRelu ? (h > S(0) ? S(1) : S(0)) : S(1) - h * h;  // relu: 1[z>0] (torch's choice at 0)
}
template <class S>
FM_HD S act_d2(int act, S h) {
  return act == kRelu ? S(0) : S(-2) * h * (S(1) - h * h);  // tanh'' = −2 tanh (1 − tanh²)
}

}  // namespace mlp
}  // namespace fastmaml
