// esamp/cuda_plan.h -- host-side planning of the CUDA kernels: which engine serves which shape, how the
// per-slot row buckets, tiles and grids are sized, and the workspace layouts.  Plain C++ (no CUDA
// headers, no device code): the CUDA launchers (csrc/cuda/*.cu), the torch binding (workspace sizes) and
// the CPU unit test (tests/cpp/test_cuda_plan.cpp) all use the same functions, so every decision a GPU run
// takes can be checked here without one.  docs/architecture.md explains the choices.
#pragma once
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "esamp/distiller.h"

namespace esamp {

// What the planner needs to know about the device (queried once per device by the launchers).
struct DeviceInfo {
  int sm_count = 132;     // multiprocessors
  int cc_major = 9;       // compute capability
  int max_cluster = 1;    // largest usable thread-block cluster of the reweight row kernel (1 = none)
};

// ================================================================================================
// Distiller
// ================================================================================================
//
// Rows arrive with per-row slot ids whose distribution only the device knows.  The sort kernel groups
// them into "positions": active slot a (in slot order) owns ceil(n_a / cap) consecutive buckets of cap
// positions each, its n_a rows first (in their original order), then zero padding.  The host sizes every
// buffer and grid by the bound below, which holds for ANY distribution of N rows over at most
// A_max = min(S, N) active slots, so nothing is dropped and nothing waits for the host:
//   sum_a ceil(n_a / cap) <= min(N, floor((N + A_max (cap - 1)) / cap)).
// cap = 1 is the compact layout (positions = sorted rows, used by the SIMT engine); cap = N with S = 1 is
// one dense bucket (shared mode).

enum class RowsEngine : int { kSimt = 0, kCublas = 1 };  // the row-wise products x . W_slot
enum class WgradEngine : int { kFusedSimt = 0, kCublas = 1 };  // weight gradients + clip + Adam

// Requests for a particular engine (tests and measurements; ESAMP_CUDA_DISTILLER_ENGINE=simt|cublas).
struct DistillerPlanOptions {
  int rows_engine = -1;  // -1 auto, 0 SIMT, 1 cuBLAS
  bool have_cublas = true;  // false: SIMT only (no handle was given)
};

constexpr int kDistRowTileSmall = 16, kDistRowTileLarge = 32;  // SIMT row tiles (template instances)
constexpr int kDistGemmBK = 32;        // K step of the SIMT row products
constexpr int kDistWTile = 64;         // fused weight-gradient tile (64 x 64)
constexpr int kDistColThreads = 256;   // column-sum kernels (dgamma): columns per block
constexpr int kDistMaxSplits = 16;     // split-K of the K = H products
constexpr int64_t kDistMinSplitK = 256;  // smallest K chunk of a split
constexpr int kDistCublasMinCap = 64;  // multi-slot cuBLAS buckets only with >= 64 rows each ...
constexpr double kDistCublasMaxWaste = 1.25;  // ... and at most 25 % padded positions in the worst case

inline int64_t plan_cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Upper bound of sum_a ceil(n_a / cap) over every way to spread N rows over at most A_max slots.
inline int64_t bucket_bound(int64_t N, int64_t A_max, int64_t cap) {
  if (N <= 0 || A_max <= 0 || cap <= 0) return 0;
  if (A_max > N) A_max = N;
  const int64_t b = (N + A_max * (cap - 1)) / cap;
  return b < N ? b : N;
}

struct DistillerLayout {
  // byte offsets into the workspace (256-byte aligned); 0-sized arrays still get an offset
  size_t counts, cursor, act_index, seg_slot, seg_n, seg_pos, seg_tile0, meta, valid, inv, prow, pos_seg, tile_seg,
      tile_off, bucket_slot, ptrs;
  size_t X, G, Pb, Act, dP, part, rinv, row_loss, norm_part, sgrad, slot_loss, slot_coef, slot_bc, slot_ok, grad;
  size_t fwd_bytes = 0, train_bytes = 0;
};

struct DistillerPlan {
  bool ok = false;
  int64_t N = 0, S = 0, A_max = 0, H = 0, R = 0, L = 0, P = 0;
  RowsEngine rows = RowsEngine::kSimt;
  WgradEngine wgrad = WgradEngine::kFusedSimt;
  int64_t cap = 1;        // positions per bucket
  int64_t nb_max = 0;     // bucket bound (= number of cuBLAS batch entries)
  int64_t R_pad = 0;      // positions = nb_max * cap
  int bm = kDistRowTileSmall;  // SIMT row tile
  int64_t tiles_max = 0;  // SIMT row-tile bound
  int splits = 1;         // split-K of the K = H row products (SIMT)
  int64_t kchunk = 0;     // K per split
  bool x0_indirect = true;  // SIMT: block 0 reads the input rows in place (no fp32 copy of x)
  // fused weight-gradient tiles per slot and the per-slot norm partials
  int64_t wt_w1 = 0, wt_b = 0, wt_per_slot = 0;  // tiles of W1_j [H, 2R], B_j [R, H], total over the layers
  int64_t parts_gamma = 0, n_parts = 0;
  int64_t sgrad_per_slot = 0;  // L*R (dc) + H (dgamma)
  int64_t n_ptr_arrays = 0;    // cuBLAS batched: pointer arrays of nb_max entries
  DistillerLayout lay;
};

// Plans one distiller call.  X-sized ([R_pad, H] float32) buffers: forward 1; train the block inputs
// x_1..x_L (x_L becomes dL/dx_L in place), dL/dx_1..dL/dx_{L-1}, and x_0 when it is copied (cuBLAS);
// the SIMT engine reads x_0 from the caller's rows in place.  No buffer scales with S x parameters.
inline DistillerPlan plan_distiller(const DistillerShape& sh, int64_t S, int64_t N, const DeviceInfo& dev,
                                    const DistillerPlanOptions& opt) {
  DistillerPlan p;
  if (sh.H < 1 || sh.R < 1 || sh.L < 1 || S < 1 || N < 0) return p;
  p.N = N;
  p.S = S;
  p.H = sh.H;
  p.R = sh.R;
  p.L = sh.L;
  p.P = sh.params_per_slot();
  const int64_t Nn = N > 0 ? N : 1;  // sizes for an empty batch: one (unused) position
  p.A_max = S < Nn ? S : Nn;
  const int64_t H = sh.H, R = sh.R, L = sh.L;

  // ---- rows engine and bucket capacity
  bool cublas = false;
  int64_t cap = 1;
  if (opt.have_cublas && opt.rows_engine != 0) {
    if (S == 1) {  // shared mode: one dense bucket, exact
      cublas = true;
      cap = Nn;
    } else {
      // smallest worst-case padding over power-of-two capacities; auto mode needs cap >= 64 and
      // waste <= 1.25, a forced cuBLAS plan takes the best capacity whatever the waste (a batch entry
      // also costs one read of the slot's weights, counted as 32 positions)
      double best = 0;
      int64_t best_cap = 0;
      for (int64_t c = 1; c <= Nn; c *= 2) {
        const int64_t nb = bucket_bound(Nn, p.A_max, c);
        const double waste = static_cast<double>(nb * c) / static_cast<double>(Nn);
        const bool eligible = opt.rows_engine == 1 || (c >= kDistCublasMinCap && waste <= kDistCublasMaxWaste);
        if (!eligible) continue;
        const double cost = static_cast<double>(nb * c) + 32.0 * static_cast<double>(nb);
        if (best_cap == 0 || cost < best) {
          best = cost;
          best_cap = c;
        }
        if (c > Nn / 2) break;
      }
      if (best_cap > 0) {
        cublas = true;
        cap = best_cap;
      }
    }
  }
  if (cublas && bucket_bound(Nn, p.A_max, cap) * cap > (int64_t{1} << 30)) {  // int positions: SIMT instead
    cublas = false;
    cap = 1;
  }
  p.rows = cublas ? RowsEngine::kCublas : RowsEngine::kSimt;
  p.cap = cap;
  p.nb_max = bucket_bound(Nn, p.A_max, cap);
  p.R_pad = p.nb_max * cap;
  p.wgrad = (cublas && S == 1) ? WgradEngine::kCublas : WgradEngine::kFusedSimt;
  p.x0_indirect = !cublas;

  // ---- SIMT row tiles and split-K
  const int64_t mean_rows = Nn / p.A_max;  // rows per slot if every possible slot is active
  p.bm = mean_rows >= 24 ? kDistRowTileLarge : kDistRowTileSmall;
  p.tiles_max = bucket_bound(Nn, p.A_max, p.bm);
  if (cublas) {
    p.splits = 1;
  } else {
    // enough blocks for the K = H products (2R and R output columns) when the rows sit in few slots
    const int64_t typical_tiles = plan_cdiv(Nn, p.bm);
    const int64_t cols = plan_cdiv(R, 64);  // column tiles of the narrower (R-column) product
    int64_t sp = plan_cdiv(2 * static_cast<int64_t>(dev.sm_count), typical_tiles * cols);
    const int64_t sp_max = H / kDistMinSplitK > 1 ? H / kDistMinSplitK : 1;
    if (sp > sp_max) sp = sp_max;
    if (sp > kDistMaxSplits) sp = kDistMaxSplits;
    if (sp < 1) sp = 1;
    p.splits = static_cast<int>(sp);
  }
  p.kchunk = plan_cdiv(plan_cdiv(H, p.splits), kDistGemmBK) * kDistGemmBK;
  p.splits = static_cast<int>(plan_cdiv(H, p.kchunk));  // drop empty splits

  // ---- gradient tiles and norm partials
  p.wt_w1 = plan_cdiv(H, kDistWTile) * plan_cdiv(2 * R, kDistWTile);
  p.wt_b = plan_cdiv(R, kDistWTile) * plan_cdiv(H, kDistWTile);
  p.wt_per_slot = L * (p.wt_w1 + p.wt_b);
  p.parts_gamma = plan_cdiv(H, kDistColThreads);
  p.n_parts = p.wt_per_slot + p.parts_gamma + L;  // big tiles, dgamma column blocks, one per dc_j
  p.sgrad_per_slot = L * R + H;
  p.n_ptr_arrays = (cublas && S > 1) ? 4 * L * 3 : 0;  // (F1, F2, B1, B2) x layer x (A, B, C)

  // ---- workspace layout
  DistillerLayout& l = p.lay;
  size_t off = 0;
  auto take = [&](size_t bytes) {
    off = (off + 255) / 256 * 256;
    const size_t o = off;
    off += bytes;
    return o;
  };
  const size_t i4 = 4, f4 = 4, d8 = 8;
  const size_t n = static_cast<size_t>(Nn), s = static_cast<size_t>(S), a = static_cast<size_t>(p.A_max);
  const size_t P_ = static_cast<size_t>(p.R_pad), h = static_cast<size_t>(H), r = static_cast<size_t>(R),
               ll = static_cast<size_t>(L);
  l.counts = take(s * i4);
  l.cursor = take(s * i4);
  l.act_index = take(s * i4);
  l.seg_slot = take(a * i4);
  l.seg_n = take(a * i4);
  l.seg_pos = take(a * i4);
  l.seg_tile0 = take(a * i4);
  l.meta = take(8 * i4);
  l.valid = take(n * i4);
  l.inv = take(n * i4);
  l.prow = take(P_ * i4);
  l.pos_seg = take(P_ * i4);
  l.tile_seg = take(static_cast<size_t>(p.tiles_max) * i4);
  l.tile_off = take(static_cast<size_t>(p.tiles_max) * i4);
  l.bucket_slot = take(static_cast<size_t>(p.nb_max) * i4);
  l.ptrs = take(static_cast<size_t>(p.n_ptr_arrays) * static_cast<size_t>(p.nb_max) * sizeof(void*));
  const size_t xb = P_ * h * f4;
  // forward: one running x updated in place (x_0 is read from the input rows, or copied into it for
  // cuBLAS); train: x_1..x_L (+ x_0 for cuBLAS), x_L becoming dL/dx_L in place
  const size_t fwd_x = 1;
  const size_t train_x = ll + (p.x0_indirect ? 0 : 1);
  // Shared part of the forward and train layouts; the train layout extends it.
  l.Pb = take(ll * P_ * 2 * r * f4);  // forward uses layer 0's slice only
  l.Act = take(ll * P_ * r * f4);
  l.part = take(static_cast<size_t>(p.splits) * P_ * 2 * r * f4);
  l.rinv = take(P_ * f4);
  l.X = take(fwd_x * xb);
  l.fwd_bytes = (off + 255) / 256 * 256;
  // train: the rest of the X buffers right after the forward ones
  off = l.X + train_x * xb;
  l.G = take((ll > 1 ? ll - 1 : 0) * xb);
  l.dP = take(ll * P_ * 2 * r * f4);
  l.row_loss = take(P_ * d8);
  l.norm_part = take(a * static_cast<size_t>(p.n_parts) * d8);
  l.sgrad = take(a * static_cast<size_t>(p.sgrad_per_slot) * f4);
  l.slot_loss = take(a * f4);
  l.slot_coef = take(a * f4);
  l.slot_bc = take(2 * a * f4);
  l.slot_ok = take(a * i4);
  l.grad = take(p.wgrad == WgradEngine::kCublas ? static_cast<size_t>(p.P) * f4 : 0);
  l.train_bytes = (off + 255) / 256 * 256;
  if (l.train_bytes < l.fwd_bytes) l.train_bytes = l.fwd_bytes;
  p.ok = true;
  return p;
}

// A two-way switch from the environment: NAME = auto (default, also unset or empty) | choice0 | choice1.
// Returns -1 for auto, 0 or 1 for the choice, -2 for any other value (the binding reports it).
inline int env_choice(const char* name, const char* choice0, const char* choice1) {
  const char* e = std::getenv(name);
  if (!e || !*e || std::strcmp(e, "auto") == 0) return -1;
  if (std::strcmp(e, choice0) == 0) return 0;
  if (std::strcmp(e, choice1) == 0) return 1;
  return -2;
}

// Engine request from the environment: ESAMP_CUDA_DISTILLER_ENGINE = auto (default) | simt | cublas.
inline int distiller_engine_from_env() { return env_choice("ESAMP_CUDA_DISTILLER_ENGINE", "simt", "cublas"); }

// ================================================================================================
// Reweight
// ================================================================================================
//
// One "row kernel" (a cluster of `cluster` thread blocks per row on devices with clusters, else one block)
// does the filters and finishes every row whose candidate set is small (sparse dot products) or whose
// beta is 0 (no dot product).  Rows with beta > 0 and a large candidate set ("dense rows": no filter, or
// at least V / kDenseFraction candidates) are finished by the dense kernels: a tensor-core GEMM
// d = pred . W^T over the dense rows (read once per 64 dense rows) whose epilogue mixes, draws the Gumbel
// keys and reduces (key arg max, logsumexp) per 128-token tile, and a finish kernel that merges the tiles.
// Which rows are dense is decided on the device (per row, from the row alone); the dense kernels exit at
// once when there is none.
//
// Two variants finish the dense rows (ESAMP_CUDA_REWEIGHT_DENSE_GEMM = auto | fused | cublas; auto = fused
// until a GPU measurement says otherwise; cublas where cuBLAS can take the operands exactly, see plan_dense_gemm):
//   fused  : the tensor-core kernel above (d never leaves the chip; W read once per 64 dense rows).
//   cublas : one cublasGemmEx d = pred . W^T over ALL B rows (the host does not know which rows are dense,
//            and cuBLAS takes host-side sizes) into a workspace D[B, ldd] float32, then a streaming kernel
//            over the dense rows that reads logits and D once, mixes, draws the same Gumbel keys and reduces
//            per 1024-token tile (the finish kernel merges the tiles), or writes m (reweight_logits).  Costs a
//            write and a read of D (2 x 78 MB at B = 128, V = 152064) and the full GEMM even when no row
//            turns out dense.

constexpr int kRwThreads = 256;       // row kernel block (<= 255 registers per thread)
constexpr int kRwChunkElems = 2048;   // ids per chunk of a block (256 threads x 8 16-bit elements)
constexpr int kRwListCap = 2048;      // candidates gathered into shared memory before top-p
constexpr int64_t kRwPredSmemMaxH = 6144;  // prediction rows up to this H are staged in shared memory
constexpr int64_t kDenseFraction = 4;  // dense when 4 |C| >= V (as the CPU kernel)
constexpr int64_t kDenseMinV = 1024;   // no dense path below this vocabulary size (as the CPU kernel)
constexpr int kDenseBM = 64, kDenseBN = 128;  // dense GEMM tile: dense rows x tokens
constexpr int kDenseThreads = 256;

// Per-row result of the row kernel, read by the dense kernels.
struct RwRowInfo {
  float zmax;     // max z (only meaningful with top-p)
  float theta;    // candidates: z >= theta ...
  float wtau;     // ... and exp(z - zmax) >= wtau when topp
  int topp;
  int dense;      // 1: finished by the dense kernels
  int pad_[3];
};

// Per (dense row, token tile) partial state of the sampler: best Gumbel key, its token and mixed logit,
// arg max of z (fallback token), and the logsumexp state (mx, s) with s = sum exp(m - mx) in double.
struct RwDensePartial {
  float key;
  float m;
  int id;
  float zb;
  int zid;
  float mx;
  double s;
};

constexpr int kDenseStreamTile = 1024;  // tokens per warp item of the streaming pass (cuBLAS variant)
constexpr int kDenseStreamThreads = 256;
constexpr int64_t kGemmMaxElems = int64_t{2147483647};  // elements one cublasGemmEx operand may span (int)

enum class DenseGemm : int { kFused = 0, kCublas = 1 };

struct ReweightPlanOptions {
  int dense = -1;        // -1 auto, 0 never (sparse dot products only), 1 every beta > 0 sampled row
  int dense_gemm = -1;   // -1 auto, 0 fused tensor-core kernel, 1 cuBLAS GEMM + streaming pass
  bool have_cublas = false;  // a cuBLAS handle is given (else: fused)
  // operands of d = pred . W^T (the cuBLAS variant depends on them; the fused kernel takes any)
  DType pred_dtype = DType::kF32, weight_dtype = DType::kF32;
  int64_t pred_stride = -1, weight_stride = -1;  // row strides in elements; -1 = compact (H)
};

// The cuBLAS GEMM of the dense path: D[r, v] = pred[r] . W[v] for r < d_rows, v < V, float32 output, in
// v_chunk x b_chunk pieces so that no operand of one cublasGemmEx call spans more than 2^31 - 1 elements
// (its sizes and leading dimensions are int; the pieces also keep every index of a call in int range).
struct DenseGemmPlan {
  bool cublas = false;
  DType op_dtype = DType::kF32;  // dtype of both GEMM operands
  bool pedantic = false;         // fp32 operands: CUBLAS_COMPUTE_32F_PEDANTIC (no TF32); else COMPUTE_32F
  bool copy_pred = false;        // pred is first copied into a compact [d_rows, H] buffer of op_dtype
  int64_t d_rows = 0;            // rows of D (B, or 1 for a broadcast prediction of row stride 0)
  int64_t ldd = 0;               // row stride of D (V rounded up to 4: 16-byte aligned rows)
  int64_t ldp = 0;               // leading dimension of the prediction operand
  int64_t v_chunk = 0, b_chunk = 0, n_calls = 0;
  size_t d_bytes = 0, copy_bytes = 0;
};

// Which operand pairs cuBLAS can take exactly (cublasGemmEx needs one dtype for both operands):
//   pred and W of the same dtype                 -> that dtype (bf16/fp16: fp32 accumulation; fp32: PEDANTIC)
//   W float32, pred bf16/fp16                    -> pred widened to float32 (exact), PEDANTIC
//   W bf16/fp16, pred of another dtype           -> none: rounding pred to W's dtype would lose precision, so
//                                                   the fused kernel (TF32 with pred split hi + lo) serves it
// and the strides it can take: W rows with stride >= H (int); a prediction with row stride >= H (int), a
// single row, or a broadcast row (stride 0, one GEMM row); other prediction strides are copied compact.
inline DenseGemmPlan plan_dense_gemm(int64_t B, int64_t V, int64_t H, const ReweightPlanOptions& o) {
  DenseGemmPlan g;
  if (B < 1 || V < 1 || H < 1 || !o.have_cublas || o.dense_gemm != 1) return g;  // auto = fused (below)
  const int64_t imax = kGemmMaxElems;
  const int64_t ws = o.weight_stride < 0 ? H : o.weight_stride;
  if (H > imax || ws < H || ws > imax) return g;
  const bool same = o.pred_dtype == o.weight_dtype;
  if (!same && o.weight_dtype != DType::kF32) return g;
  g.op_dtype = o.weight_dtype;
  g.pedantic = o.weight_dtype == DType::kF32;
  const int64_t ps = (B == 1 || o.pred_stride < 0) ? H : o.pred_stride;  // one row: its stride is never used
  g.d_rows = (B > 1 && ps == 0) ? 1 : B;
  g.copy_pred = !same || (g.d_rows > 1 && (ps < H || ps > imax));
  g.ldp = g.copy_pred || g.d_rows == 1 ? H : ps;
  g.ldd = (V + 3) / 4 * 4;
  if (g.ldd > imax) return DenseGemmPlan{};
  // V pieces: (v_chunk - 1) ws + H <= imax (W), v_chunk <= ldd; a multiple of 128 unless V itself is smaller
  int64_t vc = (imax - H) / ws + 1;
  if (vc >= V) {
    vc = V;
  } else if (vc >= 128) {
    vc = vc / 128 * 128;
  }
  // row pieces: (b_chunk - 1) ldd + v_chunk <= imax (D), (b_chunk - 1) ldp + H <= imax (pred)
  int64_t bc = (imax - vc) / g.ldd + 1;
  const int64_t bc_p = (imax - H) / g.ldp + 1;
  if (bc_p < bc) bc = bc_p;
  if (bc > g.d_rows) bc = g.d_rows;
  if (vc < 1 || bc < 1) return DenseGemmPlan{};
  g.v_chunk = vc;
  g.b_chunk = bc;
  g.n_calls = plan_cdiv(V, vc) * plan_cdiv(g.d_rows, bc);
  g.d_bytes = static_cast<size_t>(g.d_rows) * static_cast<size_t>(g.ldd) * sizeof(float);
  g.copy_bytes = g.copy_pred ? static_cast<size_t>(g.d_rows) * static_cast<size_t>(H) *
                                   static_cast<size_t>(dtype_size(g.op_dtype))
                             : 0;
  g.cublas = true;
  return g;
}

struct ReweightPlan {
  bool ok = false;
  int cluster = 1;
  bool dense_enabled = false;
  int dense_force = 0;
  int64_t n_vtiles = 0, n_rtiles_max = 0;
  unsigned dense_grid = 0;
  DenseGemm gemm = DenseGemm::kFused;  // variant of the dense path (meaningful when dense_enabled)
  DenseGemmPlan dg;                    // the cuBLAS GEMM (gemm == kCublas)
  int64_t n_stiles = 0;                // cuBLAS variant: 1024-token tiles per row (partials per dense row)
  unsigned stream_grid = 0;            // blocks of the streaming pass
  bool pred_in_smem = true;
  int64_t Hp = 0;
  size_t off_info = 0, off_dense_rows = 0, off_meta = 0, off_partials = 0, off_pred = 0, off_d = 0, off_pcopy = 0,
         bytes = 0;
};

inline ReweightPlan plan_reweight(int64_t B, int64_t V, int64_t H, const DeviceInfo& dev,
                                  const ReweightPlanOptions& opt) {
  ReweightPlan p;
  if (B < 0 || V < 1 || H < 1) return p;
  // blocks per row: only when the rows alone cannot fill the device, and each block keeps >= 1 chunk
  int c = 1;
  while (c * 2 <= dev.max_cluster && B * (c * 2) <= dev.sm_count &&
         plan_cdiv(V, kRwChunkElems) >= static_cast<int64_t>(c * 2))
    c *= 2;
  p.cluster = B > 0 ? c : 1;
  p.dense_enabled = opt.dense != 0 && V >= kDenseMinV;
  p.dense_force = opt.dense == 1 ? 1 : 0;
  p.n_vtiles = plan_cdiv(V, kDenseBN);
  p.n_rtiles_max = plan_cdiv(B > 0 ? B : 1, kDenseBM);
  {
    const int64_t items = p.n_vtiles * p.n_rtiles_max;
    const int64_t cap = 4LL * dev.sm_count;
    p.dense_grid = static_cast<unsigned>(items < cap ? items : cap);
    if (p.dense_grid < 1) p.dense_grid = 1;
  }
  if (p.dense_enabled) {
    p.dg = plan_dense_gemm(B, V, H, opt);
    p.gemm = p.dg.cublas ? DenseGemm::kCublas : DenseGemm::kFused;
  }
  p.n_stiles = plan_cdiv(V, kDenseStreamTile);
  {
    const int64_t warps = (B > 0 ? B : 1) * p.n_stiles;  // one warp per (row, tile) at most
    int64_t blocks = plan_cdiv(warps, kDenseStreamThreads / 32);
    const int64_t cap = 8LL * dev.sm_count;
    if (blocks > cap) blocks = cap;
    p.stream_grid = static_cast<unsigned>(blocks < 1 ? 1 : blocks);
  }
  p.Hp = (H + 3) / 4 * 4;
  p.pred_in_smem = H <= kRwPredSmemMaxH;
  size_t off = 0;
  auto take = [&](size_t bytes) {
    off = (off + 255) / 256 * 256;
    const size_t o = off;
    off += bytes;
    return o;
  };
  const size_t b = static_cast<size_t>(B > 0 ? B : 1);
  p.off_info = take(b * sizeof(RwRowInfo));
  p.off_dense_rows = take(b * sizeof(int));
  p.off_meta = take(4 * sizeof(int));
  const bool cub = p.dense_enabled && p.gemm == DenseGemm::kCublas;
  const size_t tiles = static_cast<size_t>(cub ? p.n_stiles : p.n_vtiles);
  p.off_partials = take(p.dense_enabled ? b * tiles * sizeof(RwDensePartial) : 0);
  p.off_pred = take(p.pred_in_smem ? 0 : b * static_cast<size_t>(p.cluster) * static_cast<size_t>(p.Hp) * sizeof(float));
  p.off_d = take(cub ? p.dg.d_bytes : 0);
  p.off_pcopy = take(cub ? p.dg.copy_bytes : 0);
  p.bytes = (off + 255) / 256 * 256;
  p.ok = true;
  return p;
}

// ESAMP_CUDA_REWEIGHT_DENSE = auto (default) | off | force.
inline int reweight_dense_from_env() { return env_choice("ESAMP_CUDA_REWEIGHT_DENSE", "off", "force"); }

// ESAMP_CUDA_REWEIGHT_DENSE_GEMM = auto (default) | fused | cublas.  auto is the fused kernel until a GPU
// measurement says otherwise: the cuBLAS GEMM runs over all B rows on every call, because only the device knows
// which rows are dense and a cuBLAS call cannot be skipped from the device, so a batch with no dense row (every
// row min-p filtered, the paper's protocol) would pay one full read of W (~230 us at B = 128, V = 152064,
// H = 3584 in bf16, by arithmetic) that the fused kernel skips.  A forced cublas still falls back to the fused
// kernel for operands cuBLAS cannot take exactly (plan_dense_gemm).
inline int reweight_dense_gemm_from_env() { return env_choice("ESAMP_CUDA_REWEIGHT_DENSE_GEMM", "fused", "cublas"); }

}  // namespace esamp
