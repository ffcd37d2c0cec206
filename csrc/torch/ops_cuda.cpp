// CUDA registrations: the same validation as the CPU side (validate.cpp), then a device guard, the
// current stream, a workspace from the caching allocator (graph-safe: no cudaMalloc during capture
// once the pool is warm, and never a host synchronisation), and check_status on the kernel result.
//
// Values inside per-row CUDA tensors (beta, temperature, top_p, min_p, slot ids) are not read here
// (that would need a host sync); the kernels treat out-of-range values defensively, see the top of
// csrc/cuda/reweight.cu and csrc/cuda/distiller.cu.
//
// The distiller gets torch's current cuBLAS handle (bound to the current stream, with torch's workspace
// for that stream, so its GEMMs are graph-capturable); so does the cuBLAS variant of the reweight dense path.
// Engine choices are made by the plans of esamp/cuda_plan.h; ESAMP_CUDA_DISTILLER_ENGINE=auto|simt|cublas,
// ESAMP_CUDA_REWEIGHT_DENSE=auto|off|force and ESAMP_CUDA_REWEIGHT_DENSE_GEMM=auto|fused|cublas override them
// for tests and measurements.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>

#include "../cuda/distiller_cuda.cuh"
#include "esamp/cuda_plan.h"
#include "validate.h"

namespace esamp_torch {
namespace {

cudaStream_t current_stream(const at::Device& d) { return c10::cuda::getCurrentCUDAStream(d.index()).stream(); }

void check_on_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), name, ": expected a CUDA tensor (this is the CUDA kernel of the op), got a tensor on ",
              t.device());
}

// Workspace from the caching allocator (at least 1 byte so that data_ptr is valid; its blocks are 512-byte
// aligned, the kernels need 256).
at::Tensor workspace(size_t bytes, const at::Tensor& like) {
  return at::empty({static_cast<int64_t>(std::max<size_t>(bytes, 1))}, like.options().dtype(at::kByte));
}

int dense_setting() {
  const int d = esamp::reweight_dense_from_env();
  TORCH_CHECK(d != -2, "ESAMP_CUDA_REWEIGHT_DENSE: expected auto, off or force, got '",
              std::getenv("ESAMP_CUDA_REWEIGHT_DENSE"), "'");
  return d;
}

int dense_gemm_setting() {
  const int d = esamp::reweight_dense_gemm_from_env();
  TORCH_CHECK(d != -2, "ESAMP_CUDA_REWEIGHT_DENSE_GEMM: expected auto, fused or cublas, got '",
              std::getenv("ESAMP_CUDA_REWEIGHT_DENSE_GEMM"), "'");
  return d;
}

// torch's current cuBLAS handle when the dense path may use it (not for ESAMP_CUDA_REWEIGHT_DENSE_GEMM=fused).
void* dense_gemm_handle(int dense_gemm) { return dense_gemm == 0 ? nullptr : at::cuda::getCurrentCUDABlasHandle(); }

int distiller_engine() {
  const int e = esamp::distiller_engine_from_env();
  TORCH_CHECK(e != -2, "ESAMP_CUDA_DISTILLER_ENGINE: expected auto, simt or cublas, got '",
              std::getenv("ESAMP_CUDA_DISTILLER_ENGINE"), "'");
  return e;
}

std::tuple<at::Tensor, at::Tensor> reweight_cuda(const at::Tensor& logits, const at::Tensor& pred_hidden,
                                                 const at::Tensor& lm_head_weight,
                                                 const std::optional<at::Tensor>& lm_head_bias, const at::Tensor& beta,
                                                 const at::Tensor& temperature, const at::Tensor& top_k,
                                                 const at::Tensor& top_p, const at::Tensor& min_p,
                                                 const at::Tensor& seed, const at::Tensor& step) {
  esamp::ReweightProblem pr = make_reweight_problem(logits, pred_hidden, lm_head_weight, lm_head_bias, beta,
                                                    temperature, top_k, top_p, min_p, &seed, &step);
  check_on_cuda(logits, "logits");
  TORCH_CHECK(pr.V < INT_MAX - 8192, "logits: expected V < ", INT_MAX - 8192, " on CUDA, got ", pr.V);
  TORCH_CHECK(pr.B <= INT_MAX / 8, "logits: expected at most ", INT_MAX / 8, " rows on CUDA, got ", pr.B);
  const c10::cuda::CUDAGuard guard(logits.device());
  at::Tensor tokens = at::empty({pr.B}, logits.options().dtype(at::kLong));
  at::Tensor logprobs = at::empty({pr.B}, logits.options().dtype(at::kFloat));
  if (pr.B > 0) {
    const int dense = dense_setting();
    const int dense_gemm = dense_gemm_setting();
    void* handle = dense_gemm_handle(dense_gemm);
    const size_t ws_bytes = esamp::reweight_cuda_workspace_bytes(pr, dense, false, dense_gemm, handle != nullptr);
    at::Tensor ws = workspace(ws_bytes, logits);
    check_status(esamp::reweight_cuda(pr, tokens.data_ptr<int64_t>(), logprobs.data_ptr<float>(), ws.data_ptr(),
                                      ws_bytes, dense, current_stream(logits.device()),
                                      handle, dense_gemm),
                 "reweight");
  }
  return {tokens, logprobs};
}

at::Tensor reweight_logits_cuda(const at::Tensor& logits, const at::Tensor& pred_hidden,
                                const at::Tensor& lm_head_weight, const std::optional<at::Tensor>& lm_head_bias,
                                const at::Tensor& beta, const at::Tensor& temperature, const at::Tensor& top_k,
                                const at::Tensor& top_p, const at::Tensor& min_p) {
  esamp::ReweightProblem pr = make_reweight_problem(logits, pred_hidden, lm_head_weight, lm_head_bias, beta,
                                                    temperature, top_k, top_p, min_p, nullptr, nullptr);
  check_on_cuda(logits, "logits");
  TORCH_CHECK(pr.V < INT_MAX - 8192, "logits: expected V < ", INT_MAX - 8192, " on CUDA, got ", pr.V);
  TORCH_CHECK(pr.B <= INT_MAX / 8, "logits: expected at most ", INT_MAX / 8, " rows on CUDA, got ", pr.B);
  const c10::cuda::CUDAGuard guard(logits.device());
  at::Tensor out = at::empty({pr.B, pr.V}, logits.options().dtype(at::kFloat));
  if (pr.B > 0) {
    const int dense = dense_setting();
    const int dense_gemm = dense_gemm_setting();
    void* handle = dense_gemm_handle(dense_gemm);
    const size_t ws_bytes = esamp::reweight_cuda_workspace_bytes(pr, dense, true, dense_gemm, handle != nullptr);
    at::Tensor ws = workspace(ws_bytes, logits);
    check_status(esamp::reweight_logits_cuda(pr, out.data_ptr<float>(), pr.V, ws.data_ptr(), ws_bytes, dense,
                                             current_stream(logits.device()), handle, dense_gemm),
                 "reweight_logits");
  }
  return out;
}

at::Tensor mix_hidden_cuda(const at::Tensor& hidden, const at::Tensor& pred_hidden, const at::Tensor& beta) {
  at::Tensor out;
  esamp::MixHiddenProblem pr = make_mix_hidden_problem(hidden, pred_hidden, beta, out);
  check_on_cuda(hidden, "hidden");
  TORCH_CHECK(pr.B <= INT_MAX, "hidden: expected at most ", INT_MAX, " rows on CUDA, got ", pr.B);
  const c10::cuda::CUDAGuard guard(hidden.device());
  if (pr.B > 0 && pr.H > 0) check_status(esamp::mix_hidden_cuda(pr, current_stream(hidden.device())), "mix_hidden");
  return out;
}

// Limits of the CUDA distiller kernels (grid dimensions and 32-bit row indices).
void check_distiller_limits(const esamp::DistillerShape& sh, int64_t S, int64_t N) {
  TORCH_CHECK(sh.H <= (int64_t{1} << 21), "x: expected hidden size H <= 2097152 on CUDA, got ", sh.H);
  TORCH_CHECK(sh.R <= (int64_t{1} << 20), "rank: expected <= 1048576 on CUDA, got ", sh.R);
  TORCH_CHECK(S <= INT_MAX, "params: expected at most ", INT_MAX, " slots on CUDA, got ", S);
  TORCH_CHECK(N <= (int64_t{1} << 30), "x: expected at most 2^30 rows on CUDA, got ", N);
}

at::Tensor distiller_forward_cuda(const at::Tensor& params, const at::Tensor& x, const at::Tensor& slot_ids,
                                  int64_t rank, int64_t layers, double norm_eps,
                                  std::optional<at::ScalarType> out_dtype) {
  const ForwardArgs a = make_forward_args(params, x, slot_ids, rank, layers, norm_eps, out_dtype);
  const esamp::DistillerShape& sh = a.sh;
  const esamp::RowsIn& rows = a.rows;
  check_on_cuda(params, "params");
  const int64_t S = params.size(0);
  check_distiller_limits(sh, S, rows.N);
  const c10::cuda::CUDAGuard guard(params.device());
  at::Tensor out = at::empty({rows.N, sh.H}, x.options().dtype(a.out_dtype));
  if (rows.N > 0) {
    const int engine = distiller_engine();
    const size_t ws_bytes = esamp::distiller_cuda_forward_workspace_bytes(sh, S, rows.N, engine, true);
    at::Tensor ws = workspace(ws_bytes, params);
    check_status(esamp::distiller_forward_cuda(sh, params.data_ptr<float>(), S, rows, out.data_ptr(),
                                               a.out_kernel_dtype, sh.H, ws.data_ptr(), ws_bytes,
                                               at::cuda::getCurrentCUDABlasHandle(),
                                               current_stream(params.device()), engine),
                 "distiller_forward");
  }
  return out;
}

void distiller_train_step_cuda(at::Tensor& params, at::Tensor& exp_avg, at::Tensor& exp_avg_sq, at::Tensor& step,
                               at::Tensor& losses, at::Tensor& stats, const at::Tensor& x, const at::Tensor& target,
                               const at::Tensor& slot_ids, int64_t rank, int64_t layers, double norm_eps, double lr,
                               double beta1, double beta2, double adam_eps, double clip) {
  const TrainStepArgs a = make_train_step_args(params, exp_avg, exp_avg_sq, step, losses, stats, x, target, slot_ids,
                                               rank, layers, norm_eps, lr, beta1, beta2, adam_eps, clip);
  const esamp::DistillerShape& sh = a.sh;
  const esamp::RowsIn& rows = a.rows;
  const int64_t S = params.size(0);
  check_on_cuda(params, "params");
  check_distiller_limits(sh, S, rows.N);
  const c10::cuda::CUDAGuard guard(params.device());
  const int engine = distiller_engine();
  const size_t ws_bytes = esamp::distiller_cuda_workspace_bytes(sh, S, rows.N, engine, true);
  at::Tensor ws = workspace(ws_bytes, params);
  check_status(esamp::distiller_train_step_cuda(sh, a.cfg, a.bank, rows, losses.data_ptr<float>(),
                                                stats.data_ptr<double>(), ws.data_ptr(), ws_bytes,
                                                at::cuda::getCurrentCUDABlasHandle(),
                                                current_stream(params.device()), engine),
               "distiller_train_step");
}

void distiller_reset_cuda(at::Tensor& params, at::Tensor& exp_avg, at::Tensor& exp_avg_sq, at::Tensor& step,
                          const at::Tensor& slot_ids, int64_t hidden_size, int64_t rank, int64_t layers, int64_t seed,
                          const std::optional<at::Tensor>& gamma_init) {
  esamp::DistillerShape sh = check_bank(params, hidden_size, rank, layers, 1e-6);
  check_bank_state(params, exp_avg, exp_avg_sq, step);
  check_slot_list(slot_ids, params.size(0), params);
  const float* g = gamma_init_ptr(gamma_init, hidden_size, params);
  check_on_cuda(params, "params");
  check_distiller_limits(sh, params.size(0), 0);
  const c10::cuda::CUDAGuard guard(params.device());
  esamp::DistillerBank bank = make_bank(params, exp_avg, exp_avg_sq, step);
  check_status(esamp::distiller_reset_cuda(sh, bank, slot_ids.data_ptr<int64_t>(), slot_ids.numel(),
                                           static_cast<uint64_t>(seed), g, current_stream(params.device())),
               "distiller_reset");
}

}  // namespace

TORCH_LIBRARY_IMPL(esamp, CUDA, m) {
  m.impl("reweight", &reweight_cuda);
  m.impl("reweight_logits", &reweight_logits_cuda);
  m.impl("mix_hidden", &mix_hidden_cuda);
  m.impl("distiller_forward", &distiller_forward_cuda);
  m.impl("distiller_train_step", &distiller_train_step_cuda);
  m.impl("distiller_reset", &distiller_reset_cuda);
}

}  // namespace esamp_torch
