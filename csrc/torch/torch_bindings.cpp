// The one file that declares every esamp operator schema.  Backends register their
// implementations beside their kernels (ops_cpu.cpp, ops_cuda.cpp); fake (meta) kernels live in
// python/esamp/_ops.py.  Mutated arguments are marked with (x!).
#include <torch/library.h>

TORCH_LIBRARY(esamp, m) {
  // SPEC 3, steps 1-5 fused.  Per-row parameter tensors have length B:
  // beta/temperature/top_p/min_p float32, top_k/seed/step int64.
  m.def(
      "reweight(Tensor logits, Tensor pred_hidden, Tensor lm_head_weight, Tensor? lm_head_bias, "
      "Tensor beta, Tensor temperature, Tensor top_k, Tensor top_p, Tensor min_p, Tensor seed, Tensor step) "
      "-> (Tensor tokens, Tensor logprobs)");
  // SPEC 3 without sampling: float32 [B, V], m on the candidate set, -inf elsewhere.
  m.def(
      "reweight_logits(Tensor logits, Tensor pred_hidden, Tensor lm_head_weight, Tensor? lm_head_bias, "
      "Tensor beta, Tensor temperature, Tensor top_k, Tensor top_p, Tensor min_p) -> Tensor");
  // Latent mixing (1 + beta) h - beta * pred, beta float32 [B].
  m.def("mix_hidden(Tensor hidden, Tensor pred_hidden, Tensor beta) -> Tensor");
  // Distiller bank: params/exp_avg/exp_avg_sq float32 [S, P], step int64 [S], stats float64 [4].
  m.def(
      "distiller_forward(Tensor params, Tensor x, Tensor slot_ids, int rank, int layers, float norm_eps, "
      "ScalarType? out_dtype=None) -> Tensor");
  m.def(
      "distiller_train_step(Tensor(a!) params, Tensor(b!) exp_avg, Tensor(c!) exp_avg_sq, Tensor(d!) step, "
      "Tensor(e!) losses, Tensor(f!) stats, Tensor x, Tensor target, Tensor slot_ids, int rank, int layers, "
      "float norm_eps, float lr, float beta1, float beta2, float adam_eps, float clip) -> ()");
  m.def(
      "distiller_reset(Tensor(a!) params, Tensor(b!) exp_avg, Tensor(c!) exp_avg_sq, Tensor(d!) step, "
      "Tensor slot_ids, int hidden_size, int rank, int layers, int seed, Tensor? gamma_init) -> ()");
  // Engine capture point: out[:N] = hidden (+ residual), converted to out's dtype; N = hidden.size(0)
  // <= out.size(0).  A real op (not a Python hook) so it survives torch.compile and CUDA-graph replay.
  m.def("capture(Tensor hidden, Tensor? residual, Tensor(a!) out) -> ()");
}
