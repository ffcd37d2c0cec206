// Engine capture point (CPU): out[r] = hidden[r] (+ residual[r]) in out's dtype.
#include "esamp/sampling.h"

namespace esamp {

Status capture_cpu(const CaptureProblem& pr) {
  if (pr.N < 0 || pr.H < 0 || (pr.N > 0 && (!pr.hidden || !pr.out))) return Status::kInvalidArgument;
  const bool all_f32 = pr.hidden_dtype == DType::kF32 && pr.out_dtype == DType::kF32 &&
                       (!pr.residual || pr.residual_dtype == DType::kF32);
#pragma omp parallel for schedule(static) if (pr.N * pr.H > (1 << 16))
  for (int64_t r = 0; r < pr.N; ++r) {
    const void* h = static_cast<const char*>(pr.hidden) + r * pr.hidden_stride * dtype_size(pr.hidden_dtype);
    const void* res = pr.residual
                          ? static_cast<const char*>(pr.residual) + r * pr.residual_stride * dtype_size(pr.residual_dtype)
                          : nullptr;
    void* o = static_cast<char*>(pr.out) + r * pr.out_stride * dtype_size(pr.out_dtype);
    if (all_f32) {  // the common engine case: a plain, vectorisable loop (same float adds as the general path)
      const float* hf = static_cast<const float*>(h);
      const float* rf = static_cast<const float*>(res);
      float* of = static_cast<float*>(o);
      if (rf) {
        for (int64_t i = 0; i < pr.H; ++i) of[i] = hf[i] + rf[i];
      } else {
        for (int64_t i = 0; i < pr.H; ++i) of[i] = hf[i];
      }
      continue;
    }
    for (int64_t i = 0; i < pr.H; ++i) {
      float v = load_as_float(h, pr.hidden_dtype, i);
      if (res) v += load_as_float(res, pr.residual_dtype, i);
      store_from_float(o, pr.out_dtype, i, v);
    }
  }
  return Status::kOk;
}

}  // namespace esamp
