// Engine capture point (CUDA): out[r] = hidden[r] (+ residual[r]) in out's dtype; graph-capturable.
// Rows on gridDim.x (up to 2^31 - 1 rows: any max_num_batched_tokens), column blocks on gridDim.y.
#include "esamp/common.h"
#include "esamp/sampling.h"

namespace esamp {
namespace {

constexpr int kThreads = 256;

__global__ void __launch_bounds__(kThreads) capture_kernel(CaptureProblem pr) {
  const int64_t r = blockIdx.x;
  const void* h = static_cast<const char*>(pr.hidden) + r * pr.hidden_stride * dtype_size(pr.hidden_dtype);
  const void* res = pr.residual
                        ? static_cast<const char*>(pr.residual) + r * pr.residual_stride * dtype_size(pr.residual_dtype)
                        : nullptr;
  void* o = static_cast<char*>(pr.out) + r * pr.out_stride * dtype_size(pr.out_dtype);
  for (int64_t i = blockIdx.y * static_cast<int64_t>(kThreads) + threadIdx.x; i < pr.H;
       i += static_cast<int64_t>(gridDim.y) * kThreads) {
    float v = load_as_float(h, pr.hidden_dtype, i);
    if (res) v += load_as_float(res, pr.residual_dtype, i);
    store_from_float(o, pr.out_dtype, i, v);
  }
}

}  // namespace

Status capture_cuda(const CaptureProblem& pr, cudaStream_t stream) {
  if (pr.N == 0 || pr.H == 0) return Status::kOk;
  if (pr.N < 0 || pr.H < 0 || pr.N > 0x7fffffffLL) return Status::kInvalidArgument;
  const int64_t by = (pr.H + kThreads - 1) / kThreads;
  const dim3 grid(static_cast<unsigned>(pr.N), static_cast<unsigned>(by < 1024 ? by : 1024));
  capture_kernel<<<grid, kThreads, 0, stream>>>(pr);
  return cudaGetLastError() == cudaSuccess ? Status::kOk : Status::kCudaError;
}

}  // namespace esamp
