// CUDA registrations: same validation as the CPU side (validate.cpp), device guard, current stream,
// launch-error check via the returned Status.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "validate.h"

namespace esamp_torch {
namespace {

at::Tensor mix_hidden_cuda(const at::Tensor& hidden, const at::Tensor& pred_hidden, const at::Tensor& beta) {
  const c10::cuda::CUDAGuard guard(hidden.device());
  at::Tensor out;
  esamp::MixHiddenProblem pr = make_mix_hidden_problem(hidden, pred_hidden, beta, out);
  TORCH_CHECK(pr.B <= 65535, "hidden: expected at most 65535 rows on CUDA, got ", pr.B);
  if (pr.B > 0 && pr.H > 0)
    check_status(esamp::mix_hidden_cuda(pr, c10::cuda::getCurrentCUDAStream(hidden.device().index()).stream()),
                 "mix_hidden");
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(esamp, CUDA, m) {
  m.impl("mix_hidden", &mix_hidden_cuda);
}

}  // namespace esamp_torch
