// The reweight row kernel for bfloat16 logits (see reweight_row.cuh; one dtype per file so that the three
// compile in parallel).
#include "reweight_row.cuh"

ESAMP_REWEIGHT_ROW_TU(bf16, DType::kBF16)
