// Latent mixing (SPEC 3): h_mix = (1 + beta) h - beta * pred, fp32 math, output in h's dtype.
#include "esamp/common.h"
#include "esamp/sampling.h"

namespace esamp {

Status mix_hidden_cpu(const MixHiddenProblem& pr) {
  if (pr.B < 0 || pr.H < 0 || (pr.B > 0 && (!pr.hidden || !pr.pred || !pr.beta || !pr.out)))
    return Status::kInvalidArgument;
  const bool all_f32 = pr.hidden_dtype == DType::kF32 && pr.pred_dtype == DType::kF32;
#pragma omp parallel for schedule(static) if (pr.B * pr.H > (1 << 15))
  for (int64_t r = 0; r < pr.B; ++r) {
    const float b = pr.beta[r];
    const void* h = static_cast<const char*>(pr.hidden) + r * pr.hidden_stride * dtype_size(pr.hidden_dtype);
    const void* t = static_cast<const char*>(pr.pred) + r * pr.pred_stride * dtype_size(pr.pred_dtype);
    void* o = static_cast<char*>(pr.out) + r * pr.out_stride * dtype_size(pr.hidden_dtype);
    if (all_f32) {  // plain, vectorisable loop; the same fp32 expression as the general path
      const float* hf = static_cast<const float*>(h);
      const float* tf = static_cast<const float*>(t);
      float* of = static_cast<float*>(o);
      for (int64_t i = 0; i < pr.H; ++i) of[i] = (1.0f + b) * hf[i] - b * tf[i];
      continue;
    }
    for (int64_t i = 0; i < pr.H; ++i) {
      const float hv = load_as_float(h, pr.hidden_dtype, i);
      const float tv = load_as_float(t, pr.pred_dtype, i);
      store_from_float(o, pr.hidden_dtype, i, (1.0f + b) * hv - b * tv);
    }
  }
  return Status::kOk;
}

}  // namespace esamp
