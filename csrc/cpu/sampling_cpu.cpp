// PLACEHOLDER (being implemented): reweight / reweight_logits CPU kernels.
#include "esamp/sampling.h"
namespace esamp {
Status reweight_cpu(const ReweightProblem&, int64_t*, float*, CpuGemm) { return Status::kInvalidArgument; }
Status reweight_logits_cpu(const ReweightProblem&, float*, int64_t, CpuGemm) { return Status::kInvalidArgument; }
}  // namespace esamp
