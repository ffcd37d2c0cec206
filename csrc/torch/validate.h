// Argument validation shared by the CPU and CUDA registrations.  Every message names the argument,
// what was expected and what was given.  Value checks of per-row parameter tensors are done here
// only for CPU tensors (reading CUDA tensors would need a host sync); see docs/semantics.md.
#pragma once
#include <ATen/ATen.h>
#include <optional>
#include "esamp/common.h"
#include "esamp/distiller.h"
#include "esamp/sampling.h"

namespace esamp_torch {

esamp::DType to_kernel_dtype(at::ScalarType t, const char* arg);
std::string shape_str(const at::Tensor& t);

// Builds a kernel problem from validated tensors (also used by the CUDA registration).
esamp::ReweightProblem make_reweight_problem(const at::Tensor& logits, const at::Tensor& pred_hidden,
                                             const at::Tensor& lm_head_weight,
                                             const std::optional<at::Tensor>& lm_head_bias, const at::Tensor& beta,
                                             const at::Tensor& temperature, const at::Tensor& top_k,
                                             const at::Tensor& top_p, const at::Tensor& min_p,
                                             const at::Tensor* seed, const at::Tensor* step);

esamp::MixHiddenProblem make_mix_hidden_problem(const at::Tensor& hidden, const at::Tensor& pred_hidden,
                                                const at::Tensor& beta, at::Tensor& out);

// Checks the bank tensors and returns the shape; H is taken from x (forward/train) or given (reset).
esamp::DistillerShape check_bank(const at::Tensor& params, int64_t H, int64_t rank, int64_t layers,
                                 double norm_eps);
void check_bank_state(const at::Tensor& params, const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq,
                      const at::Tensor& step);
esamp::RowsIn make_rows(const at::Tensor& params, const at::Tensor& x, const at::Tensor* target,
                        const at::Tensor& slot_ids);
void check_slot_list(const at::Tensor& slot_ids, int64_t S, const at::Tensor& params);
void check_adam(double lr, double beta1, double beta2, double adam_eps, double clip);
// Everything distiller_forward validates and derives before a backend allocates and launches.
struct ForwardArgs {
  esamp::DistillerShape sh;
  esamp::RowsIn rows;
  at::ScalarType out_dtype;
  esamp::DType out_kernel_dtype;
};
ForwardArgs make_forward_args(const at::Tensor& params, const at::Tensor& x, const at::Tensor& slot_ids, int64_t rank,
                              int64_t layers, double norm_eps, std::optional<at::ScalarType> out_dtype);

// Everything distiller_train_step validates and derives before a backend launches.
struct TrainStepArgs {
  esamp::DistillerShape sh;
  esamp::AdamConfig cfg;
  esamp::RowsIn rows;
  esamp::DistillerBank bank;
};
TrainStepArgs make_train_step_args(at::Tensor& params, at::Tensor& exp_avg, at::Tensor& exp_avg_sq, at::Tensor& step,
                                   const at::Tensor& losses, const at::Tensor& stats, const at::Tensor& x,
                                   const at::Tensor& target, const at::Tensor& slot_ids, int64_t rank, int64_t layers,
                                   double norm_eps, double lr, double beta1, double beta2, double adam_eps,
                                   double clip);

// check_adam + conversion to the kernel's AdamConfig.
esamp::AdamConfig make_adam_config(double lr, double beta1, double beta2, double adam_eps, double clip);
// The per-slot losses [S] float32 and stats [kNumStats] float64 outputs of distiller_train_step.
void check_train_outputs(const at::Tensor& params, const at::Tensor& losses, const at::Tensor& stats);
// The bank view of validated tensors (check_bank + check_bank_state first).
esamp::DistillerBank make_bank(at::Tensor& params, at::Tensor& exp_avg, at::Tensor& exp_avg_sq, at::Tensor& step);
// gamma_init of distiller_reset: nullptr when absent, else a checked float32 [H] on params' device.
const float* gamma_init_ptr(const std::optional<at::Tensor>& gamma_init, int64_t hidden_size, const at::Tensor& params);

void check_status(esamp::Status s, const char* op);

}  // namespace esamp_torch

namespace esamp_torch {
esamp::CaptureProblem make_capture_problem(const at::Tensor& hidden, const std::optional<at::Tensor>& residual,
                                           const at::Tensor& out);
}  // namespace esamp_torch
