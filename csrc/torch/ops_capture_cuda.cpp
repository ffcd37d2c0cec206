// CUDA registration of esamp::capture (kept apart from ops_cuda.cpp so the two evolve independently).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <climits>

#include "validate.h"

namespace esamp_torch {
namespace {

void capture_cuda(const at::Tensor& hidden, const std::optional<at::Tensor>& residual, at::Tensor& out) {
  const c10::cuda::CUDAGuard guard(hidden.device());
  esamp::CaptureProblem pr = make_capture_problem(hidden, residual, out);
  TORCH_CHECK(pr.N <= INT_MAX, "hidden: expected at most ", INT_MAX, " rows on CUDA, got ", pr.N);
  check_status(esamp::capture_cuda(pr, c10::cuda::getCurrentCUDAStream(hidden.device().index()).stream()), "capture");
}

}  // namespace

TORCH_LIBRARY_IMPL(esamp, CUDA, m) { m.impl("capture", &capture_cuda); }

}  // namespace esamp_torch
