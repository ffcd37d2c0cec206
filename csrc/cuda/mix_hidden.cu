// Latent mixing on CUDA: h_mix = (1 + beta_r) h - beta_r * pred, fp32 math, output in h's dtype.
// Rows on gridDim.x (up to 2^31 - 1 rows: any max_num_batched_tokens), column blocks on gridDim.y.
#include "esamp/common.h"
#include "esamp/sampling.h"

namespace esamp {
namespace {

constexpr int kThreads = 256;

__global__ void __launch_bounds__(kThreads) mix_hidden_kernel(MixHiddenProblem pr) {
  const int64_t r = blockIdx.x;
  const float b = pr.beta[r];
  const int hs = dtype_size(pr.hidden_dtype), ps = dtype_size(pr.pred_dtype);
  const void* h = static_cast<const char*>(pr.hidden) + r * pr.hidden_stride * hs;
  const void* t = static_cast<const char*>(pr.pred) + r * pr.pred_stride * ps;
  void* o = static_cast<char*>(pr.out) + r * pr.out_stride * hs;
  for (int64_t i = blockIdx.y * static_cast<int64_t>(kThreads) + threadIdx.x; i < pr.H;
       i += static_cast<int64_t>(gridDim.y) * kThreads) {
    const float hv = load_as_float(h, pr.hidden_dtype, i);
    const float tv = load_as_float(t, pr.pred_dtype, i);
    store_from_float(o, pr.hidden_dtype, i, (1.0f + b) * hv - b * tv);
  }
}

}  // namespace

Status mix_hidden_cuda(const MixHiddenProblem& pr, cudaStream_t stream) {
  if (pr.B == 0 || pr.H == 0) return Status::kOk;
  if (pr.B < 0 || pr.H < 0 || pr.B > 0x7fffffffLL) return Status::kInvalidArgument;
  const int64_t by = (pr.H + kThreads - 1) / kThreads;
  const dim3 grid(static_cast<unsigned>(pr.B), static_cast<unsigned>(by < 1024 ? by : 1024));
  mix_hidden_kernel<<<grid, kThreads, 0, stream>>>(pr);
  return cudaGetLastError() == cudaSuccess ? Status::kOk : Status::kCudaError;
}

}  // namespace esamp
