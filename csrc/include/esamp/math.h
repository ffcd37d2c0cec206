// esamp/math.h -- scalar math shared by the CPU and CUDA kernels.
#pragma once
#include <cmath>
#include "esamp/common.h"

namespace esamp {

ESAMP_HD float sigmoidf_(float x) { return 1.0f / (1.0f + expf(-x)); }
ESAMP_HD float siluf(float x) { return x * sigmoidf_(x); }
// d/dx silu(x) = s + x s (1 - s), s = sigmoid(x)
ESAMP_HD float dsiluf(float x) {
  float s = sigmoidf_(x);
  return s * (1.0f + x * (1.0f - s));
}

// One Adam update of a single parameter (bias-corrected, no weight decay).
// bc1 = 1 - beta1^t, bc2 = 1 - beta2^t for this slot's step t (>= 1).
ESAMP_HD void adam_update(float& p, float& m, float& v, float g, float lr, float beta1, float beta2, float eps,
                          float bc1, float bc2) {
  m = beta1 * m + (1.0f - beta1) * g;
  v = beta2 * v + (1.0f - beta2) * g * g;
  float mhat = m / bc1;
  float vhat = v / bc2;
  p -= lr * mhat / (sqrtf(vhat) + eps);
}

// Clip scale for a gradient of global L2 norm `norm` (torch.nn.utils.clip_grad_norm_ semantics:
// coef = clip / (norm + 1e-6), applied only when coef < 1).
ESAMP_HD float clip_coef(float norm, float clip) {
  if (!(clip > 0.0f)) return 1.0f;
  float c = clip / (norm + 1e-6f);
  return c < 1.0f ? c : 1.0f;
}

ESAMP_HD bool is_finite_f(float x) { return (x - x) == 0.0f; }

}  // namespace esamp
