// CPU registrations: validate (validate.cpp), allocate outputs, call the torch-free kernels in csrc/cpu/.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "aten_gemm.h"
#include "validate.h"

namespace esamp_torch {
namespace {

std::tuple<at::Tensor, at::Tensor> reweight_cpu(const at::Tensor& logits, const at::Tensor& pred_hidden,
                                                const at::Tensor& lm_head_weight,
                                                const std::optional<at::Tensor>& lm_head_bias, const at::Tensor& beta,
                                                const at::Tensor& temperature, const at::Tensor& top_k,
                                                const at::Tensor& top_p, const at::Tensor& min_p,
                                                const at::Tensor& seed, const at::Tensor& step) {
  esamp::ReweightProblem pr = make_reweight_problem(logits, pred_hidden, lm_head_weight, lm_head_bias, beta,
                                                    temperature, top_k, top_p, min_p, &seed, &step);
  at::Tensor tokens = at::empty({pr.B}, logits.options().dtype(at::kLong));
  at::Tensor logprobs = at::empty({pr.B}, logits.options().dtype(at::kFloat));
  if (pr.B > 0) {
    check_status(esamp::reweight_cpu(pr, tokens.data_ptr<int64_t>(), logprobs.data_ptr<float>(), aten_gemm()),
                 "reweight");
  }
  return {tokens, logprobs};
}

at::Tensor reweight_logits_cpu(const at::Tensor& logits, const at::Tensor& pred_hidden,
                               const at::Tensor& lm_head_weight, const std::optional<at::Tensor>& lm_head_bias,
                               const at::Tensor& beta, const at::Tensor& temperature, const at::Tensor& top_k,
                               const at::Tensor& top_p, const at::Tensor& min_p) {
  esamp::ReweightProblem pr = make_reweight_problem(logits, pred_hidden, lm_head_weight, lm_head_bias, beta,
                                                    temperature, top_k, top_p, min_p, nullptr, nullptr);
  at::Tensor out = at::empty({pr.B, pr.V}, logits.options().dtype(at::kFloat));
  if (pr.B > 0) {
    check_status(esamp::reweight_logits_cpu(pr, out.data_ptr<float>(), pr.V, aten_gemm()), "reweight_logits");
  }
  return out;
}

at::Tensor mix_hidden_cpu(const at::Tensor& hidden, const at::Tensor& pred_hidden, const at::Tensor& beta) {
  at::Tensor out;
  esamp::MixHiddenProblem pr = make_mix_hidden_problem(hidden, pred_hidden, beta, out);
  if (pr.B > 0 && pr.H > 0) check_status(esamp::mix_hidden_cpu(pr), "mix_hidden");
  return out;
}

at::Tensor distiller_forward_cpu(const at::Tensor& params, const at::Tensor& x, const at::Tensor& slot_ids,
                                 int64_t rank, int64_t layers, double norm_eps,
                                 std::optional<at::ScalarType> out_dtype) {
  const ForwardArgs a = make_forward_args(params, x, slot_ids, rank, layers, norm_eps, out_dtype);
  const esamp::DistillerShape& sh = a.sh;
  const esamp::RowsIn& rows = a.rows;
  at::Tensor out = at::empty({rows.N, sh.H}, x.options().dtype(a.out_dtype));
  if (rows.N > 0) {
    check_status(esamp::distiller_forward_cpu(sh, params.data_ptr<float>(), params.size(0), rows, out.data_ptr(),
                                              a.out_kernel_dtype, sh.H, aten_gemm()),
                 "distiller_forward");
  }
  return out;
}

void distiller_train_step_cpu(at::Tensor& params, at::Tensor& exp_avg, at::Tensor& exp_avg_sq, at::Tensor& step,
                              at::Tensor& losses, at::Tensor& stats, const at::Tensor& x, const at::Tensor& target,
                              const at::Tensor& slot_ids, int64_t rank, int64_t layers, double norm_eps, double lr,
                              double beta1, double beta2, double adam_eps, double clip) {
  const TrainStepArgs a = make_train_step_args(params, exp_avg, exp_avg_sq, step, losses, stats, x, target, slot_ids,
                                               rank, layers, norm_eps, lr, beta1, beta2, adam_eps, clip);
  check_status(esamp::distiller_train_step_cpu(a.sh, a.cfg, a.bank, a.rows, losses.data_ptr<float>(),
                                               stats.data_ptr<double>(), aten_gemm()),
               "distiller_train_step");
}

void distiller_reset_cpu(at::Tensor& params, at::Tensor& exp_avg, at::Tensor& exp_avg_sq, at::Tensor& step,
                         const at::Tensor& slot_ids, int64_t hidden_size, int64_t rank, int64_t layers, int64_t seed,
                         const std::optional<at::Tensor>& gamma_init) {
  esamp::DistillerShape sh = check_bank(params, hidden_size, rank, layers, 1e-6);
  check_bank_state(params, exp_avg, exp_avg_sq, step);
  check_slot_list(slot_ids, params.size(0), params);
  const float* g = gamma_init_ptr(gamma_init, hidden_size, params);
  esamp::DistillerBank bank = make_bank(params, exp_avg, exp_avg_sq, step);
  check_status(esamp::distiller_reset_cpu(sh, bank, slot_ids.data_ptr<int64_t>(), slot_ids.numel(),
                                          static_cast<uint64_t>(seed), g),
               "distiller_reset");
}

void capture_cpu(const at::Tensor& hidden, const std::optional<at::Tensor>& residual, at::Tensor& out) {
  esamp::CaptureProblem pr = make_capture_problem(hidden, residual, out);
  check_status(esamp::capture_cpu(pr), "capture");
}

}  // namespace

TORCH_LIBRARY_IMPL(esamp, CPU, m) {
  m.impl("capture", &capture_cpu);
  m.impl("reweight", &reweight_cpu);
  m.impl("reweight_logits", &reweight_logits_cpu);
  m.impl("mix_hidden", &mix_hidden_cpu);
  m.impl("distiller_forward", &distiller_forward_cpu);
  m.impl("distiller_train_step", &distiller_train_step_cpu);
  m.impl("distiller_reset", &distiller_reset_cpu);
}

}  // namespace esamp_torch
