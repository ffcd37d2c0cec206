// PLACEHOLDER (being implemented): distiller CPU kernels.
#include "esamp/distiller.h"
namespace esamp {
Status distiller_forward_cpu(const DistillerShape&, const float*, int64_t, const RowsIn&, void*, DType, int64_t,
                             CpuGemm) { return Status::kInvalidArgument; }
Status distiller_train_step_cpu(const DistillerShape&, const AdamConfig&, DistillerBank, const RowsIn&, float*,
                                double*, CpuGemm) { return Status::kInvalidArgument; }
Status distiller_reset_cpu(const DistillerShape&, DistillerBank, const int64_t*, int64_t, uint64_t, const float*) {
  return Status::kInvalidArgument;
}
}  // namespace esamp
