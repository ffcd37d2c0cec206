#include "validate.h"

#include <cmath>
#include <sstream>

namespace esamp_torch {

std::string shape_str(const at::Tensor& t) {
  std::ostringstream os;
  os << "[";
  for (int64_t i = 0; i < t.dim(); ++i) os << (i ? ", " : "") << t.size(i);
  os << "]";
  return os.str();
}

esamp::DType to_kernel_dtype(at::ScalarType t, const char* arg) {
  switch (t) {
    case at::kFloat: return esamp::DType::kF32;
    case at::kBFloat16: return esamp::DType::kBF16;
    case at::kHalf: return esamp::DType::kF16;
    default:
      TORCH_CHECK(false, arg, ": expected dtype float32, bfloat16 or float16, got ", t);
  }
}

static void check_same_device(const at::Tensor& ref, const char* ref_name, const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device() == ref.device(), name, ": expected a tensor on ", ref.device(), " (the device of ",
              ref_name, "), got ", t.device());
}

// A 2-D tensor whose rows may be strided but whose last dimension must be dense.
static void check_rows(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.stride(1) == 1 || t.size(1) <= 1 || t.size(0) == 0, name,
              ": expected the last dimension to be contiguous (stride 1), got strides [", t.stride(0), ", ",
              t.stride(1), "]; call .contiguous() first");
}

static void check_row_param(const at::Tensor& t, const char* name, int64_t B, at::ScalarType dtype,
                            const at::Tensor& ref) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == B, name, ": expected a 1-D tensor of length B = ", B, ", got shape ",
              shape_str(t));
  TORCH_CHECK(t.scalar_type() == dtype, name, ": expected dtype ", dtype, ", got ", t.scalar_type());
  check_same_device(ref, "logits", t, name);
  TORCH_CHECK(t.is_contiguous(), name, ": expected a contiguous tensor");
}

// Value checks (CPU tensors only; no host sync on CUDA).
template <typename F>
static void check_values_f(const at::Tensor& t, const char* name, F ok, const char* expect) {
  if (!t.device().is_cpu()) return;
  const float* p = t.data_ptr<float>();
  for (int64_t i = 0; i < t.numel(); ++i) {
    TORCH_CHECK(ok(p[i]), name, ": expected every value ", expect, ", got ", p[i], " at row ", i);
  }
}

esamp::ReweightProblem make_reweight_problem(const at::Tensor& logits, const at::Tensor& pred_hidden,
                                             const at::Tensor& lm_head_weight,
                                             const std::optional<at::Tensor>& lm_head_bias, const at::Tensor& beta,
                                             const at::Tensor& temperature, const at::Tensor& top_k,
                                             const at::Tensor& top_p, const at::Tensor& min_p,
                                             const at::Tensor* seed, const at::Tensor* step) {
  TORCH_CHECK(logits.dim() == 2, "logits: expected a 2-D tensor [B, V], got shape ", shape_str(logits));
  const int64_t B = logits.size(0), V = logits.size(1);
  TORCH_CHECK(V >= 1, "logits: expected V >= 1, got shape ", shape_str(logits));
  esamp::ReweightProblem pr;
  pr.B = B;
  pr.V = V;
  pr.logits_dtype = to_kernel_dtype(logits.scalar_type(), "logits");
  check_rows(logits, "logits");

  TORCH_CHECK(pred_hidden.dim() == 2, "pred_hidden: expected a 2-D tensor [B, H], got shape ",
              shape_str(pred_hidden));
  TORCH_CHECK(pred_hidden.size(0) == B, "pred_hidden: expected B = logits.size(0) = ", B, " rows, got shape ",
              shape_str(pred_hidden));
  const int64_t H = pred_hidden.size(1);
  TORCH_CHECK(H >= 1, "pred_hidden: expected H >= 1, got shape ", shape_str(pred_hidden));
  pr.H = H;
  pr.pred_dtype = to_kernel_dtype(pred_hidden.scalar_type(), "pred_hidden");
  check_same_device(logits, "logits", pred_hidden, "pred_hidden");
  check_rows(pred_hidden, "pred_hidden");

  TORCH_CHECK(lm_head_weight.dim() == 2 && lm_head_weight.size(0) == V && lm_head_weight.size(1) == H,
              "lm_head_weight: expected 2-D [V, H] with V == logits.size(1) == ", V,
              " and H == pred_hidden.size(1) == ", H, ", got ", shape_str(lm_head_weight));
  pr.weight_dtype = to_kernel_dtype(lm_head_weight.scalar_type(), "lm_head_weight");
  check_same_device(logits, "logits", lm_head_weight, "lm_head_weight");
  check_rows(lm_head_weight, "lm_head_weight");

  if (lm_head_bias.has_value()) {
    const at::Tensor& b = *lm_head_bias;
    TORCH_CHECK(b.dim() == 1 && b.size(0) == V, "lm_head_bias: expected 1-D [V] with V == ", V, ", got ",
                shape_str(b));
    pr.bias_dtype = to_kernel_dtype(b.scalar_type(), "lm_head_bias");
    check_same_device(logits, "logits", b, "lm_head_bias");
    TORCH_CHECK(b.is_contiguous(), "lm_head_bias: expected a contiguous tensor");
    pr.bias = b.data_ptr();
  }

  check_row_param(beta, "beta", B, at::kFloat, logits);
  check_row_param(temperature, "temperature", B, at::kFloat, logits);
  check_row_param(top_k, "top_k", B, at::kLong, logits);
  check_row_param(top_p, "top_p", B, at::kFloat, logits);
  check_row_param(min_p, "min_p", B, at::kFloat, logits);
  check_values_f(beta, "beta", [](float v) { return std::isfinite(v) && v >= 0.f; }, "finite and >= 0");
  check_values_f(temperature, "temperature", [](float v) { return std::isfinite(v) && v >= 0.f; },
                 "finite and >= 0");
  check_values_f(top_p, "top_p", [](float v) { return v > 0.f && v <= 1.f; }, "in (0, 1]");
  check_values_f(min_p, "min_p", [](float v) { return v >= 0.f && v < 1.f; }, "in [0, 1)");
  if (seed) {
    check_row_param(*seed, "seed", B, at::kLong, logits);
    check_row_param(*step, "step", B, at::kLong, logits);
    pr.p.seed = seed->data_ptr<int64_t>();
    pr.p.step = step->data_ptr<int64_t>();
  }

  pr.logits = logits.data_ptr();
  pr.logits_stride = logits.stride(0);
  pr.pred = pred_hidden.data_ptr();
  pr.pred_stride = pred_hidden.stride(0);
  pr.weight = lm_head_weight.data_ptr();
  pr.weight_stride = lm_head_weight.stride(0);
  pr.p.beta = beta.data_ptr<float>();
  pr.p.temperature = temperature.data_ptr<float>();
  pr.p.top_k = top_k.data_ptr<int64_t>();
  pr.p.top_p = top_p.data_ptr<float>();
  pr.p.min_p = min_p.data_ptr<float>();
  return pr;
}

esamp::MixHiddenProblem make_mix_hidden_problem(const at::Tensor& hidden, const at::Tensor& pred_hidden,
                                                const at::Tensor& beta, at::Tensor& out) {
  TORCH_CHECK(hidden.dim() == 2, "hidden: expected a 2-D tensor [B, H], got shape ", shape_str(hidden));
  const int64_t B = hidden.size(0), H = hidden.size(1);
  TORCH_CHECK(pred_hidden.dim() == 2 && pred_hidden.size(0) == B && pred_hidden.size(1) == H,
              "pred_hidden: expected shape [B, H] == ", shape_str(hidden), " (the shape of hidden), got ",
              shape_str(pred_hidden));
  check_same_device(hidden, "hidden", pred_hidden, "pred_hidden");
  TORCH_CHECK(beta.dim() == 1 && beta.size(0) == B, "beta: expected a 1-D tensor of length B = ", B,
              ", got shape ", shape_str(beta));
  TORCH_CHECK(beta.scalar_type() == at::kFloat, "beta: expected dtype float32, got ", beta.scalar_type());
  check_same_device(hidden, "hidden", beta, "beta");
  TORCH_CHECK(beta.is_contiguous(), "beta: expected a contiguous tensor");
  check_values_f(beta, "beta", [](float v) { return std::isfinite(v) && v >= 0.f; }, "finite and >= 0");
  esamp::MixHiddenProblem pr;
  pr.B = B;
  pr.H = H;
  pr.hidden_dtype = to_kernel_dtype(hidden.scalar_type(), "hidden");
  pr.pred_dtype = to_kernel_dtype(pred_hidden.scalar_type(), "pred_hidden");
  check_rows(hidden, "hidden");
  check_rows(pred_hidden, "pred_hidden");
  out = at::empty({B, H}, hidden.options());
  pr.hidden = hidden.data_ptr();
  pr.hidden_stride = hidden.stride(0);
  pr.pred = pred_hidden.data_ptr();
  pr.pred_stride = pred_hidden.stride(0);
  pr.beta = beta.data_ptr<float>();
  pr.out = out.data_ptr();
  pr.out_stride = H;
  return pr;
}

esamp::DistillerShape check_bank(const at::Tensor& params, int64_t H, int64_t rank, int64_t layers,
                                 double norm_eps) {
  TORCH_CHECK(rank >= 1, "rank: expected >= 1, got ", rank);
  TORCH_CHECK(layers >= 1, "layers: expected >= 1, got ", layers);
  TORCH_CHECK(H >= 1, "hidden_size: expected >= 1, got ", H);
  TORCH_CHECK(std::isfinite(norm_eps) && norm_eps >= 0, "norm_eps: expected finite and >= 0, got ", norm_eps);
  esamp::DistillerShape sh;
  sh.H = H;
  sh.R = rank;
  sh.L = layers;
  sh.norm_eps = static_cast<float>(norm_eps);
  TORCH_CHECK(params.dim() == 2, "params: expected a 2-D float32 tensor [S, P], got shape ", shape_str(params));
  TORCH_CHECK(params.scalar_type() == at::kFloat, "params: expected dtype float32, got ", params.scalar_type());
  TORCH_CHECK(params.is_contiguous(), "params: expected a contiguous tensor");
  TORCH_CHECK(params.size(0) >= 1, "params: expected at least one slot, got shape ", shape_str(params));
  TORCH_CHECK(params.size(1) == sh.params_per_slot(), "params: expected P = layers*(3*H*rank + rank) + H = ",
              sh.params_per_slot(), " for H = ", H, " (x.size(1) or hidden_size), rank = ", rank, ", layers = ", layers,
              ", got shape ", shape_str(params), " -- x's hidden size, rank or layers do not match the bank");
  return sh;
}

void check_bank_state(const at::Tensor& params, const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq,
                      const at::Tensor& step) {
  for (auto [t, name] : {std::pair<const at::Tensor*, const char*>{&exp_avg, "exp_avg"}, {&exp_avg_sq, "exp_avg_sq"}}) {
    TORCH_CHECK(t->sizes() == params.sizes() && t->scalar_type() == at::kFloat && t->is_contiguous(), name,
                ": expected a contiguous float32 tensor of shape ", shape_str(params), " (the shape of params), got ",
                t->scalar_type(), " ", shape_str(*t));
    check_same_device(params, "params", *t, name);
  }
  TORCH_CHECK(step.dim() == 1 && step.size(0) == params.size(0) && step.scalar_type() == at::kLong &&
                  step.is_contiguous(),
              "step: expected a contiguous int64 tensor [S] with S = ", params.size(0), ", got ", step.scalar_type(),
              " ", shape_str(step));
  check_same_device(params, "params", step, "step");
}

static void check_slot_values(const at::Tensor& slot_ids, int64_t S, const char* name) {
  if (!slot_ids.device().is_cpu()) return;
  const int64_t* p = slot_ids.data_ptr<int64_t>();
  for (int64_t i = 0; i < slot_ids.numel(); ++i) {
    TORCH_CHECK(p[i] >= 0 && p[i] < S, name, ": expected every slot id in [0, ", S, "), got ", p[i], " at position ",
                i);
  }
}

esamp::RowsIn make_rows(const at::Tensor& params, const at::Tensor& x, const at::Tensor* target,
                        const at::Tensor& slot_ids) {
  TORCH_CHECK(x.dim() == 2, "x: expected a 2-D tensor [N, H], got shape ", shape_str(x));
  check_same_device(params, "params", x, "x");
  check_rows(x, "x");
  esamp::RowsIn r;
  r.N = x.size(0);
  r.x_dtype = to_kernel_dtype(x.scalar_type(), "x");
  r.x = x.data_ptr();
  r.x_stride = x.stride(0);
  if (target) {
    TORCH_CHECK(target->sizes() == x.sizes(), "target: expected shape ", shape_str(x), " (the shape of x), got ",
                shape_str(*target));
    check_same_device(params, "params", *target, "target");
    check_rows(*target, "target");
    r.t_dtype = to_kernel_dtype(target->scalar_type(), "target");
    r.t = target->data_ptr();
    r.t_stride = target->stride(0);
  }
  TORCH_CHECK(slot_ids.dim() == 1 && slot_ids.size(0) == r.N, "slot_ids: expected a 1-D tensor of length N = ", r.N,
              " (rows of x), got shape ", shape_str(slot_ids));
  TORCH_CHECK(slot_ids.scalar_type() == at::kLong, "slot_ids: expected dtype int64, got ", slot_ids.scalar_type());
  TORCH_CHECK(slot_ids.is_contiguous(), "slot_ids: expected a contiguous tensor");
  check_same_device(params, "params", slot_ids, "slot_ids");
  check_slot_values(slot_ids, params.size(0), "slot_ids");
  r.slot_ids = slot_ids.data_ptr<int64_t>();
  return r;
}

void check_slot_list(const at::Tensor& slot_ids, int64_t S, const at::Tensor& params) {
  TORCH_CHECK(slot_ids.dim() == 1, "slot_ids: expected a 1-D int64 tensor, got shape ", shape_str(slot_ids));
  TORCH_CHECK(slot_ids.scalar_type() == at::kLong, "slot_ids: expected dtype int64, got ", slot_ids.scalar_type());
  TORCH_CHECK(slot_ids.is_contiguous(), "slot_ids: expected a contiguous tensor");
  check_same_device(params, "params", slot_ids, "slot_ids");
  check_slot_values(slot_ids, S, "slot_ids");
}

void check_adam(double lr, double beta1, double beta2, double adam_eps, double clip) {
  TORCH_CHECK(std::isfinite(lr) && lr >= 0, "lr: expected finite and >= 0, got ", lr);
  TORCH_CHECK(beta1 >= 0 && beta1 < 1, "beta1: expected in [0, 1), got ", beta1);
  TORCH_CHECK(beta2 >= 0 && beta2 < 1, "beta2: expected in [0, 1), got ", beta2);
  TORCH_CHECK(std::isfinite(adam_eps) && adam_eps > 0, "adam_eps: expected finite and > 0, got ", adam_eps);
  TORCH_CHECK(!std::isnan(clip), "clip: expected a number (<= 0 disables clipping), got ", clip);
}

esamp::AdamConfig make_adam_config(double lr, double beta1, double beta2, double adam_eps, double clip) {
  check_adam(lr, beta1, beta2, adam_eps, clip);
  esamp::AdamConfig cfg;
  cfg.lr = static_cast<float>(lr);
  cfg.beta1 = static_cast<float>(beta1);
  cfg.beta2 = static_cast<float>(beta2);
  cfg.eps = static_cast<float>(adam_eps);
  cfg.clip = static_cast<float>(clip);
  return cfg;
}

void check_train_outputs(const at::Tensor& params, const at::Tensor& losses, const at::Tensor& stats) {
  const int64_t S = params.size(0);
  TORCH_CHECK(losses.dim() == 1 && losses.size(0) == S && losses.scalar_type() == at::kFloat &&
                  losses.is_contiguous() && losses.device() == params.device(),
              "losses: expected a contiguous float32 tensor [S] with S = ", S, " on ", params.device(), ", got ",
              losses.scalar_type(), " ", shape_str(losses), " on ", losses.device());
  TORCH_CHECK(stats.dim() == 1 && stats.size(0) == esamp::kNumStats && stats.scalar_type() == at::kDouble &&
                  stats.is_contiguous() && stats.device() == params.device(),
              "stats: expected a contiguous float64 tensor [", esamp::kNumStats, "] on ", params.device(), ", got ",
              stats.scalar_type(), " ", shape_str(stats), " on ", stats.device());
}

esamp::DistillerBank make_bank(at::Tensor& params, at::Tensor& exp_avg, at::Tensor& exp_avg_sq, at::Tensor& step) {
  return esamp::DistillerBank{params.size(0), params.data_ptr<float>(), exp_avg.data_ptr<float>(),
                              exp_avg_sq.data_ptr<float>(), step.data_ptr<int64_t>()};
}

const float* gamma_init_ptr(const std::optional<at::Tensor>& gamma_init, int64_t hidden_size,
                            const at::Tensor& params) {
  if (!gamma_init.has_value()) return nullptr;
  const at::Tensor& gi = *gamma_init;
  TORCH_CHECK(gi.dim() == 1 && gi.size(0) == hidden_size && gi.scalar_type() == at::kFloat && gi.is_contiguous() &&
                  gi.device() == params.device(),
              "gamma_init: expected a contiguous float32 tensor [H] with H = ", hidden_size, " on ", params.device(),
              ", got ", gi.scalar_type(), " ", shape_str(gi), " on ", gi.device());
  return gi.data_ptr<float>();
}

ForwardArgs make_forward_args(const at::Tensor& params, const at::Tensor& x, const at::Tensor& slot_ids, int64_t rank,
                              int64_t layers, double norm_eps, std::optional<at::ScalarType> out_dtype) {
  TORCH_CHECK(x.dim() == 2, "x: expected a 2-D tensor [N, H], got shape ", shape_str(x));
  ForwardArgs a;
  a.sh = check_bank(params, x.size(1), rank, layers, norm_eps);
  a.rows = make_rows(params, x, nullptr, slot_ids);
  a.out_dtype = out_dtype.value_or(x.scalar_type());
  a.out_kernel_dtype = to_kernel_dtype(a.out_dtype, "out_dtype");
  return a;
}

TrainStepArgs make_train_step_args(at::Tensor& params, at::Tensor& exp_avg, at::Tensor& exp_avg_sq, at::Tensor& step,
                                   const at::Tensor& losses, const at::Tensor& stats, const at::Tensor& x,
                                   const at::Tensor& target, const at::Tensor& slot_ids, int64_t rank, int64_t layers,
                                   double norm_eps, double lr, double beta1, double beta2, double adam_eps,
                                   double clip) {
  TORCH_CHECK(x.dim() == 2, "x: expected a 2-D tensor [N, H], got shape ", shape_str(x));
  TrainStepArgs a;
  a.sh = check_bank(params, x.size(1), rank, layers, norm_eps);
  check_bank_state(params, exp_avg, exp_avg_sq, step);
  a.cfg = make_adam_config(lr, beta1, beta2, adam_eps, clip);
  check_train_outputs(params, losses, stats);
  a.rows = make_rows(params, x, &target, slot_ids);
  a.bank = make_bank(params, exp_avg, exp_avg_sq, step);
  return a;
}

void check_status(esamp::Status s, const char* op) {
  TORCH_CHECK(s == esamp::Status::kOk, "esamp::", op, ": kernel failed: ", esamp::status_string(s));
}

}  // namespace esamp_torch

namespace esamp_torch {

esamp::CaptureProblem make_capture_problem(const at::Tensor& hidden, const std::optional<at::Tensor>& residual,
                                           const at::Tensor& out) {
  TORCH_CHECK(hidden.dim() == 2, "hidden: expected a 2-D tensor [N, H], got shape ", shape_str(hidden));
  const int64_t N = hidden.size(0), H = hidden.size(1);
  TORCH_CHECK(out.dim() == 2 && out.size(1) == H && out.size(0) >= N,
              "out: expected a 2-D buffer [M, H] with H = ", H, " and M >= N = ", N, ", got ", shape_str(out));
  TORCH_CHECK(out.device() == hidden.device(), "out: expected a tensor on ", hidden.device(), ", got ", out.device());
  check_rows(hidden, "hidden");
  check_rows(out, "out");
  esamp::CaptureProblem pr;
  pr.N = N;
  pr.H = H;
  pr.hidden = hidden.data_ptr();
  pr.hidden_dtype = to_kernel_dtype(hidden.scalar_type(), "hidden");
  pr.hidden_stride = hidden.stride(0);
  if (residual.has_value()) {
    const at::Tensor& r = *residual;
    TORCH_CHECK(r.sizes() == hidden.sizes(), "residual: expected shape ", shape_str(hidden), " (the shape of hidden), got ",
                shape_str(r));
    TORCH_CHECK(r.device() == hidden.device(), "residual: expected a tensor on ", hidden.device(), ", got ", r.device());
    check_rows(r, "residual");
    pr.residual = r.data_ptr();
    pr.residual_dtype = to_kernel_dtype(r.scalar_type(), "residual");
    pr.residual_stride = r.stride(0);
  }
  pr.out = out.data_ptr();
  pr.out_dtype = to_kernel_dtype(out.scalar_type(), "out");
  pr.out_stride = out.stride(0);
  return pr;
}

}  // namespace esamp_torch
