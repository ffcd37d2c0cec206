// The reweight row kernel for float32 logits (see reweight_row.cuh; one dtype per file so that the three
// compile in parallel).
#include "reweight_row.cuh"

ESAMP_REWEIGHT_ROW_TU(f32, DType::kF32)

namespace esamp {
namespace rw_detail {
size_t row_smem_bytes(bool pred_in_smem, int64_t Hp) {
  return sizeof(RowSmem) + (pred_in_smem ? static_cast<size_t>(Hp) * sizeof(float) : 0);
}
}  // namespace rw_detail
}  // namespace esamp
