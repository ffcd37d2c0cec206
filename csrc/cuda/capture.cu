// Engine capture point (CUDA): out[r] = hidden[r] (+ residual[r]) in out's dtype; graph-capturable.
#include "esamp/common.h"
#include "esamp/sampling.h"

namespace esamp {
namespace {

__global__ void capture_kernel(CaptureProblem pr) {
  const int64_t r = blockIdx.y;
  const void* h = static_cast<const char*>(pr.hidden) + r * pr.hidden_stride * dtype_size(pr.hidden_dtype);
  const void* res = pr.residual
                        ? static_cast<const char*>(pr.residual) + r * pr.residual_stride * dtype_size(pr.residual_dtype)
                        : nullptr;
  void* o = static_cast<char*>(pr.out) + r * pr.out_stride * dtype_size(pr.out_dtype);
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < pr.H; i += (int64_t)gridDim.x * blockDim.x) {
    float v = load_as_float(h, pr.hidden_dtype, i);
    if (res) v += load_as_float(res, pr.residual_dtype, i);
    store_from_float(o, pr.out_dtype, i, v);
  }
}

}  // namespace

Status capture_cuda(const CaptureProblem& pr, cudaStream_t stream) {
  if (pr.N == 0 || pr.H == 0) return Status::kOk;
  if (pr.N > 65535) return Status::kInvalidArgument;
  const int threads = 256;
  const int64_t bx = (pr.H + threads - 1) / threads;
  dim3 grid(static_cast<unsigned>(bx < 1024 ? bx : 1024), static_cast<unsigned>(pr.N));
  capture_kernel<<<grid, threads, 0, stream>>>(pr);
  return cudaGetLastError() == cudaSuccess ? Status::kOk : Status::kCudaError;
}

}  // namespace esamp
