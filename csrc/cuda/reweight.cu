// reweight / reweight_logits on CUDA (SPEC section 3): filter + distiller logits + mix + Gumbel-max +
// logprob.  Host-side choices (blocks per row, dense path, workspace) are in esamp/cuda_plan.h; the
// reasoning is in docs/architecture.md.
//
// Defensive rules for per-row parameters (CUDA tensors cannot be value-checked by the binding layer
// without a host synchronisation, so the kernels never trust them):
//   temperature T : NaN or T <= 0              -> the row is greedy (T == 0).
//   beta          : NaN, +-inf or beta <= 0    -> 0 (no mixing, no dot product).
//   top_k         : k <= 0 or k >= V           -> off.
//   top_p         : NaN or top_p >= 1          -> off;  top_p <= 0 -> keeps only the arg max (the
//                                                 smallest positive top_p).
//   min_p         : NaN or min_p <= 0          -> off;  min_p >= 1 -> 1 (keeps values equal to max z).
// Input values (the same rules as csrc/cpu/sampling_cpu.cpp, so that both backends agree):
//   a NaN logit counts as -inf; +inf is clamped to FLT_MAX before dividing by T; a finite logit whose
//   z = l / T overflows is clamped to +-FLT_MAX.  Tokens with z == -inf are never candidates.
//   Greedy rows: token = first arg max of the sanitised l (0 when every logit is -inf/NaN), logprob 0;
//   reweight_logits writes 0 there and -inf elsewhere.
//   Non-greedy rows without a finite logit: token 0, logprob -inf (reweight_logits: -inf everywhere).
//   Mixed logits m are clamped to [-FLT_MAX, FLT_MAX] and a NaN m (NaN/inf in the LM head, the
//   prediction or the bias) counts as -inf; when every candidate has m == -inf the token is the arg max
//   of z and the logprob is -inf.
//
// Kernels of one call:
//   row kernel  (one block per row, or a cluster of 2..8 blocks per row on sm_90 when B is small; the
//               blocks of a row split its 2048-id chunks and combine histograms and states through
//               distributed shared memory):
//     pass 1      : max / arg max of z, the count of finite z and, with top-k or min-p, the top-11-bit
//                   histogram of the order-preserving keys of z (the first radix level for free).
//                   Rows without any filter skip it.
//     min-p       : theta = max z + log(min_p) (no pass); the level-0 histogram bounds |{z >= theta}|.
//     top-k       : radix select of the k-th largest z over all finite z (11 + 11 + 10-bit digits, level
//                   0 from pass 1: two more passes); theta = max(theta, K) -- the same set as selecting
//                   among {z >= theta_minp} (when fewer than k values are >= theta_minp the k-th largest
//                   is below it).  Ties at the boundary are kept.
//     gather      : with top-p and at most 2048 candidates left, they are copied into shared memory
//                   (one pass) and everything after works on that list.
//     top-p       : one pass for the total mass Z (64-bit fixed point, an exact integer sum) fused with
//                   the level-0 mass histogram, then two levels: tau is the largest w = exp(z - max z)
//                   such that the mass of {w >= tau} is >= ceil(top_p Z) -- the probability of the last
//                   element of the shortest sorted prefix of mass >= top_p.  Light members that cannot
//                   be tau are left out of the later histograms.
//     dense rows  : beta > 0 and (no filter, or 4 |C| >= V by the exact count or the histogram bound):
//                   the row kernel only records theta/tau; the dense kernels finish the row.
//     candidates  : beta = 0: every thread evaluates its own ids (one Philox call gives the noise words
//                   of 4 consecutive ids; candidates whose key cannot win are skipped exactly, as on the
//                   CPU).  beta > 0: the candidates of a chunk are compacted, warps compute
//                   d_c = pred . W_c (+ b_c) (fp32, pred staged as float in shared memory), then every
//                   thread evaluates keys.  Per-thread (best key, logsumexp) states are merged in a fixed
//                   order: deterministic.  Histograms are 32-bit counts / 64-bit masses in shared
//                   memory with warp-aggregated atomics (integers: exact in any order).
//   dense kernels (only rows marked dense; they exit at once when there is none):
//     list        : the dense rows in row order.
//     GEMM        : d = pred . W^T for 64 dense rows x 128 tokens per work item on tensor cores with fp32
//                   accumulation -- bf16 x bf16 / fp16 x fp16 when pred and W share that dtype (exact
//                   products), else TF32 with pred split into hi + lo (and W too when it is fp32), so the
//                   product is accurate to ~2^-22 relative, below fp32 summation error.  W is read once
//                   per 64 dense rows; the epilogue reads the logits tile, mixes, draws the keys and
//                   reduces the tile to (best key, arg max z, logsumexp) -- reweight_logits writes m.
//     finish      : merges the tiles of each dense row in tile order (reweight only).
//   or, cuBLAS variant (ESAMP_CUDA_REWEIGHT_DENSE_GEMM=cublas; auto = the fused kernel above, see
//   plan_dense_gemm in esamp/cuda_plan.h):
//     list        : as above.
//     GEMM        : cublasGemmEx D = pred . W^T over all B rows (the host cannot know which rows are dense),
//                   float32 output in the workspace, fp32 accumulation (PEDANTIC for fp32 operands: no TF32).
//     stream      : one warp per (dense row, 1024-token tile): reads the logits and D once, and applies the
//                   same per-token step as the fused epilogue (dense_tokens4 in reweight_dense.cu: bias,
//                   mix, candidacy, Philox words of 4 ids, exact key pruning); reweight_logits writes m.
//     finish      : as above, over the 1024-token tiles.
// The arg max of z is always a candidate because every threshold is <= the maximum.
//
// Files: reweight.cu (this file: plan, workspace, launch order), reweight_common.cuh (shared device
// helpers), reweight_row.cuh + reweight_row_{f32,bf16,f16}.cu (the row kernel, one logits dtype per file so
// that they compile in parallel), reweight_dense.cu (the dense kernels).
#include <climits>

#include "reweight_common.cuh"

namespace esamp {
namespace {

using namespace cuda_detail;
using rw_detail::DenseArgs;
using rw_detail::RowCfg;


bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

int prepare_any(DType lt, bool out) {
  switch (lt) {
    case DType::kF32: return rw_detail::prepare_row_f32(out);
    case DType::kBF16: return rw_detail::prepare_row_bf16(out);
    case DType::kF16: return rw_detail::prepare_row_f16(out);
  }
  return 0;
}

Status check_problem(const ReweightProblem& pr, bool need_rng) {
  if (pr.B < 0 || pr.V < 1 || pr.H < 1) return Status::kInvalidArgument;
  if (pr.V > static_cast<int64_t>(INT_MAX) - kChunkList) return Status::kInvalidArgument;
  if (pr.B > static_cast<int64_t>(INT_MAX) / 8) return Status::kInvalidArgument;
  if (pr.B == 0) return Status::kOk;
  if (!pr.logits || !pr.pred || !pr.weight) return Status::kInvalidArgument;
  if (!pr.p.beta || !pr.p.temperature || !pr.p.top_k || !pr.p.top_p || !pr.p.min_p) return Status::kInvalidArgument;
  if (need_rng && (!pr.p.seed || !pr.p.step)) return Status::kInvalidArgument;
  // Input rows may alias (e.g. a broadcast prediction with row stride 0): they are only read.
  return Status::kOk;
}

ReweightPlan make_plan(const ReweightProblem& pr, int max_cluster, int dense, int dense_gemm, bool have_cublas) {
  DeviceInfo di = device_info_base();
  di.max_cluster = max_cluster;
  ReweightPlanOptions o;
  o.dense = dense;
  o.dense_gemm = dense_gemm;
  o.have_cublas = have_cublas;
  o.pred_dtype = pr.pred_dtype;
  o.weight_dtype = pr.weight_dtype;
  o.pred_stride = pr.pred_stride;
  o.weight_stride = pr.weight_stride;
  return plan_reweight(pr.B, pr.V, pr.H, di, o);
}

Status launch(bool kout, const ReweightProblem& pr, int64_t* tokens, float* logprobs, float* out, int64_t out_stride,
              void* workspace, size_t workspace_bytes, int dense, cudaStream_t stream, void* cublas_handle,
              int dense_gemm) {
  if (dense_gemm < -1 || dense_gemm > 1) return Status::kInvalidArgument;
  const int mc = prepare_any(pr.logits_dtype, kout);
  if (mc < 1) return Status::kCudaError;
  const ReweightPlan p = make_plan(pr, mc, dense, dense_gemm, cublas_handle != nullptr);
  if (!p.ok) return Status::kInvalidArgument;
  if (workspace_bytes < p.bytes) return Status::kWorkspaceTooSmall;
  if (!workspace || (reinterpret_cast<uintptr_t>(workspace) & 255u) != 0) return Status::kInvalidArgument;
  char* ws = static_cast<char*>(workspace);
  RowCfg cfg;
  cfg.Hp = p.Hp;
  cfg.pred_in_smem = p.pred_in_smem ? 1 : 0;
  cfg.pred_ws = p.pred_in_smem ? nullptr : reinterpret_cast<float*>(ws + p.off_pred);
  const int les = dtype_size(pr.logits_dtype), wes = dtype_size(pr.weight_dtype), pes = dtype_size(pr.pred_dtype);
  cfg.logits_vec_ok = aligned16(pr.logits) && (pr.B == 1 || (pr.logits_stride * les) % 16 == 0);
  cfg.weight_vec_ok = aligned16(pr.weight) && (pr.V == 1 || (pr.weight_stride * wes) % 16 == 0);
  cfg.out_vec_ok = kout && aligned16(out) && (pr.B == 1 || (out_stride * 4) % 16 == 0);
  cfg.cluster = p.cluster;
  cfg.dense_enabled = p.dense_enabled ? 1 : 0;
  cfg.dense_force = p.dense_force;
  RwRowInfo* info = reinterpret_cast<RwRowInfo*>(ws + p.off_info);
  cfg.info = info;
  const size_t smem = rw_detail::row_smem_bytes(p.pred_in_smem, p.Hp);
  Status s;
  switch (pr.logits_dtype) {
    case DType::kF32:
      s = rw_detail::launch_row_f32(kout, pr, tokens, logprobs, out, out_stride, cfg, smem, stream);
      break;
    case DType::kBF16:
      s = rw_detail::launch_row_bf16(kout, pr, tokens, logprobs, out, out_stride, cfg, smem, stream);
      break;
    case DType::kF16:
      s = rw_detail::launch_row_f16(kout, pr, tokens, logprobs, out, out_stride, cfg, smem, stream);
      break;
    default:
      return Status::kUnsupportedDType;
  }
  if (s != Status::kOk || !p.dense_enabled) return s;
  DenseArgs g;
  g.pr = pr;
  g.info = info;
  g.rows = reinterpret_cast<int*>(ws + p.off_dense_rows);
  g.meta = reinterpret_cast<int*>(ws + p.off_meta);
  g.partials = reinterpret_cast<RwDensePartial*>(ws + p.off_partials);
  g.out = out;
  g.out_stride = out_stride;
  g.n_vtiles = p.n_vtiles;
  g.kout = kout ? 1 : 0;
  g.w_vec = cfg.weight_vec_ok;
  g.p_vec = aligned16(pr.pred) && (pr.B == 1 || (pr.pred_stride * pes) % 16 == 0);
  g.l_vec = cfg.logits_vec_ok;
  g.o_vec = cfg.out_vec_ok;
  g.d = nullptr;
  g.d_stride = 0;
  if (p.gemm == DenseGemm::kCublas) {
    float* d = reinterpret_cast<float*>(ws + p.off_d);
    g.n_vtiles = p.n_stiles;
    g.d = d;
    g.d_stride = p.dg.d_rows == 1 && pr.B > 1 ? 0 : p.dg.ldd;
    return rw_detail::launch_dense_cublas(g, p.dg, cublas_handle, d, ws + p.off_pcopy, pr.B, p.stream_grid, tokens,
                                          logprobs, stream);
  }
  return rw_detail::launch_dense(g, pr.B, p.dense_grid, tokens, logprobs, stream);
}

}  // namespace

size_t reweight_cuda_workspace_bytes(const ReweightProblem& pr, int dense, bool logits_out, int dense_gemm,
                                     bool have_cublas) {
  if (pr.B <= 0 || pr.V < 1 || pr.H < 1) return 0;
  const int mc = prepare_any(pr.logits_dtype, logits_out);
  return make_plan(pr, mc < 1 ? 1 : mc, dense, dense_gemm, have_cublas).bytes;
}

Status reweight_cuda(const ReweightProblem& pr, int64_t* tokens, float* logprobs, void* workspace,
                     size_t workspace_bytes, int dense, cudaStream_t stream, void* cublas_handle, int dense_gemm) {
  Status s = check_problem(pr, true);
  if (s != Status::kOk || pr.B == 0) return s;
  if (!tokens || !logprobs) return Status::kInvalidArgument;
  return launch(false, pr, tokens, logprobs, nullptr, 0, workspace, workspace_bytes, dense, stream, cublas_handle,
                dense_gemm);
}

Status reweight_logits_cuda(const ReweightProblem& pr, float* out, int64_t out_stride, void* workspace,
                            size_t workspace_bytes, int dense, cudaStream_t stream, void* cublas_handle,
                            int dense_gemm) {
  Status s = check_problem(pr, false);
  if (s != Status::kOk || pr.B == 0) return s;
  if (!out || (pr.B > 1 && out_stride < pr.V)) return Status::kInvalidArgument;
  return launch(true, pr, nullptr, nullptr, out, out_stride, workspace, workspace_bytes, dense, stream,
                cublas_handle, dense_gemm);
}

}  // namespace esamp
