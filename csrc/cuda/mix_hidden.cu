// Latent mixing on CUDA: h_mix = (1 + beta_r) h - beta_r * pred, fp32 math, output in h's dtype.
#include "esamp/common.h"
#include "esamp/sampling.h"

namespace esamp {
namespace {

__global__ void mix_hidden_kernel(MixHiddenProblem pr) {
  const int64_t r = blockIdx.y;
  const float b = pr.beta[r];
  const int hs = dtype_size(pr.hidden_dtype), ps = dtype_size(pr.pred_dtype);
  const void* h = static_cast<const char*>(pr.hidden) + r * pr.hidden_stride * hs;
  const void* t = static_cast<const char*>(pr.pred) + r * pr.pred_stride * ps;
  void* o = static_cast<char*>(pr.out) + r * pr.out_stride * hs;
  for (int64_t i = blockIdx.x * blockDim.x + threadIdx.x; i < pr.H; i += (int64_t)gridDim.x * blockDim.x) {
    const float hv = load_as_float(h, pr.hidden_dtype, i);
    const float tv = load_as_float(t, pr.pred_dtype, i);
    store_from_float(o, pr.hidden_dtype, i, (1.0f + b) * hv - b * tv);
  }
}

}  // namespace

Status mix_hidden_cuda(const MixHiddenProblem& pr, cudaStream_t stream) {
  if (pr.B == 0 || pr.H == 0) return Status::kOk;
  if (pr.B > 65535) return Status::kInvalidArgument;
  const int threads = 256;
  const int64_t bx = (pr.H + threads - 1) / threads;
  dim3 grid(static_cast<unsigned>(bx < 1024 ? bx : 1024), static_cast<unsigned>(pr.B));
  mix_hidden_kernel<<<grid, threads, 0, stream>>>(pr);
  return cudaGetLastError() == cudaSuccess ? Status::kOk : Status::kCudaError;
}

}  // namespace esamp
