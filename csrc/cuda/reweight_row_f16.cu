// The reweight row kernel for float16 logits (see reweight_row.cuh; one dtype per file so that the three
// compile in parallel).
#include "reweight_row.cuh"

ESAMP_REWEIGHT_ROW_TU(f16, DType::kF16)
