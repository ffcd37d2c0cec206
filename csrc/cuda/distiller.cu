// Distiller bank on CUDA (SPEC section 2): forward, train step (forward + backward + per-slot clip +
// Adam) and reset.  Torch-free; raw pointers, a stream, a cuBLAS handle and a caller-provided workspace.
// No host synchronisation anywhere: every launcher is CUDA-graph capturable.  The plan (which engine,
// bucket capacity, tiles, splits, workspace layout) is plain C++ in esamp/cuda_plan.h, unit-tested on
// the CPU; docs/architecture.md has the reasoning.
//
// 1. Rows are validated (train: a non-finite x or t, or a slot id outside [0, S) -> skipped and counted)
//    and grouped by slot with a one-block counting sort into "positions": active slot a owns
//    ceil(n_a / cap) buckets of cap positions, its rows first (original order), then zero padding.  The
//    host sizes everything by the bound of esamp::bucket_bound; the device lists the real tiles/buckets.
// 2. Row-wise products (x . W1_j, act . B_j, G . B_j^T, dP . W1_j^T) run on one of two engines:
//      cuBLAS  : one GEMM per product (shared mode, S = 1: cap = N, exact), or one pointer-array batched
//                GEMM over the buckets (multi-slot, when the worst-case padding is small); fp32 with
//                CUBLAS_COMPUTE_32F_PEDANTIC (no TF32), pointer arrays filled on the device.
//      SIMT    : a persistent tiled kernel over the device's list of (row tile, column tile, K split)
//                work items; the grid is bounded by the host (a few blocks per SM), idle blocks never
//                exist; block 0 reads the caller's x rows in place (no fp32 copy).
// 3. Weight gradients: the clip needs the slot's global gradient norm before any update, and storing
//    the gradients would cost a workspace of (active slots) x (parameters).  The fused SIMT engine
//    instead runs its weight-gradient tiles twice: pass 1 only sums the squares of each tile (fixed
//    positions, deterministic), pass 2 recomputes the tile and applies clip + Adam in its epilogue, so
//    the gradient is never written (and the optimizer moves 24 instead of 32 bytes per parameter).
//    Shared mode (S = 1) uses cuBLAS for dW into a one-slot gradient buffer instead.  The small
//    gradients (dc_j, dgamma) are kept in a per-slot buffer of L R + H floats.
// 4. Element-wise kernels (gate/SiLU, RMSNorm + loss + its backward, column sums) follow
//    csrc/cpu/distiller_cpu.cpp (row sums of squares in double, the same RMSNorm backward expression),
//    so the backends differ only by float summation order.  Every reduction has a fixed order.
#include <cublas_v2.h>

#include <cfloat>
#include <climits>
#include <cmath>

#include "cublas_gemm.cuh"
#include "cuda_utils.cuh"
#include "distiller_cuda.cuh"
#include "esamp/cuda_plan.h"
#include "esamp/distiller.h"
#include "esamp/math.h"
#include "esamp/philox.h"

namespace esamp {
namespace {

using namespace cuda_detail;

constexpr int kRowThreads = 256;
constexpr int kSortThreads = 512;
constexpr int kGemmThreads = 256;
constexpr int kBN = 64, kBK = kDistGemmBK;  // SIMT row products: BM x 64 output tile, K step 32
constexpr int kWT = kDistWTile, kWK = 16;   // weight-gradient tile 64 x 64, row step 16
constexpr int kColThreads = kDistColThreads;
constexpr int kAdamThreads = 256;

// meta[] entries
constexpr int kMetaActive = 0, kMetaRows = 1, kMetaSkipped = 2, kMetaTiles = 3, kMetaBuckets = 4;

struct Ws {
  int *counts, *cursor, *act_index, *seg_slot, *seg_n, *seg_pos, *seg_tile0, *meta, *valid, *inv, *prow, *pos_seg,
      *tile_seg, *tile_off, *bucket_slot;
  void** ptrs;
  float *X, *G, *Pb, *Act, *dP, *part, *rinv, *sgrad, *slot_loss, *slot_coef, *slot_bc, *grad;
  double *row_loss, *norm_part;
  int* slot_ok;
};

Ws bind(const DistillerPlan& p, void* base, bool train) {
  char* b = static_cast<char*>(base);
  const DistillerLayout& l = p.lay;
  Ws w;
  auto I = [&](size_t o) { return reinterpret_cast<int*>(b + o); };
  auto F = [&](size_t o) { return reinterpret_cast<float*>(b + o); };
  w.counts = I(l.counts);
  w.cursor = I(l.cursor);
  w.act_index = I(l.act_index);
  w.seg_slot = I(l.seg_slot);
  w.seg_n = I(l.seg_n);
  w.seg_pos = I(l.seg_pos);
  w.seg_tile0 = I(l.seg_tile0);
  w.meta = I(l.meta);
  w.valid = I(l.valid);
  w.inv = I(l.inv);
  w.prow = I(l.prow);
  w.pos_seg = I(l.pos_seg);
  w.tile_seg = I(l.tile_seg);
  w.tile_off = I(l.tile_off);
  w.bucket_slot = I(l.bucket_slot);
  w.ptrs = reinterpret_cast<void**>(b + l.ptrs);
  w.X = F(l.X);
  w.Pb = F(l.Pb);
  w.Act = F(l.Act);
  w.part = F(l.part);
  w.rinv = F(l.rinv);
  w.G = train ? F(l.G) : nullptr;
  w.dP = train ? F(l.dP) : nullptr;
  w.row_loss = train ? reinterpret_cast<double*>(b + l.row_loss) : nullptr;
  w.norm_part = train ? reinterpret_cast<double*>(b + l.norm_part) : nullptr;
  w.sgrad = train ? F(l.sgrad) : nullptr;
  w.slot_loss = train ? F(l.slot_loss) : nullptr;
  w.slot_coef = train ? F(l.slot_coef) : nullptr;
  w.slot_bc = train ? F(l.slot_bc) : nullptr;
  w.slot_ok = train ? I(l.slot_ok) : nullptr;
  w.grad = train && p.wgrad == WgradEngine::kCublas ? F(l.grad) : nullptr;
  return w;
}

// Rows of an operand by position: a float32 buffer (row stride ld), or the caller's rows through the
// position -> row map (pad positions read as 0).
struct RowSrc {
  const float* buf;
  int64_t ld;
  const void* in;
  DType dt;
  int64_t stride;
  const int* prow;
  __device__ __forceinline__ float load(int64_t pos, int64_t k) const {
    if (buf) return buf[pos * ld + k];
    const int i = prow[pos];
    if (i < 0) return 0.0f;
    return load_as_float(static_cast<const char*>(in) + static_cast<int64_t>(i) * stride * dtype_size(dt), dt, k);
  }
};

__host__ __device__ inline RowSrc direct(const float* buf, int64_t ld) {
  return RowSrc{buf, ld, nullptr, DType::kF32, 0, nullptr};
}

// ------------------------------------------------------------------------------------------------
// Row validation and grouping
// ------------------------------------------------------------------------------------------------
__global__ void __launch_bounds__(kRowThreads) row_valid_kernel(const RowsIn rows, int64_t H, int* __restrict__ valid) {
  for (int64_t i = blockIdx.x; i < rows.N; i += gridDim.x) {
    const void* x = static_cast<const char*>(rows.x) + i * rows.x_stride * dtype_size(rows.x_dtype);
    const void* t = static_cast<const char*>(rows.t) + i * rows.t_stride * dtype_size(rows.t_dtype);
    int ok = 1;
    for (int64_t h = threadIdx.x; h < H; h += kRowThreads) {
      if (!isfinite(load_as_float(x, rows.x_dtype, h)) || !isfinite(load_as_float(t, rows.t_dtype, h))) ok = 0;
    }
    ok = __syncthreads_and(ok);
    if (threadIdx.x == 0) valid[i] = ok;
  }
}

struct SortArgs {
  const int64_t* slot_ids;
  int64_t N, S;
  const int* valid;  // null: forward (every row with an in-range slot id)
  int64_t cap, bm, R_pad, tiles_max, nb_max;
  float* losses;
  double* stats;
};

// One block: counting sort into positions, active slots, the tile list (SIMT) and the bucket list (cuBLAS).
__global__ void __launch_bounds__(kSortThreads, 1) sort_kernel(const SortArgs g, Ws w) {
  __shared__ int s_scan[33];
  __shared__ int s_red[32];
  const int tid = threadIdx.x, lane = tid & 31, wid = tid >> 5;
  for (int64_t s = tid; s < g.S; s += kSortThreads) {
    w.counts[s] = 0;
    w.cursor[s] = 0;
    w.act_index[s] = -1;
    if (g.losses) g.losses[s] = NAN;
  }
  for (int64_t p = tid; p < g.R_pad; p += kSortThreads) {
    w.prow[p] = -1;
    w.pos_seg[p] = -1;
  }
  for (int64_t b = tid; b < g.nb_max; b += kSortThreads) w.bucket_slot[b] = -1;
  __syncthreads();
  int skipped = 0;
  for (int64_t i = tid; i < g.N; i += kSortThreads) {
    const int64_t sl = g.slot_ids[i];
    const bool ok = sl >= 0 && sl < g.S && (!g.valid || g.valid[i]);
    if (ok) {
      atomicAdd(&w.counts[sl], 1);
    } else {
      ++skipped;
    }
  }
  skipped = block_sum(skipped, s_red);
  __syncthreads();
  int run_rows = 0, run_act = 0, run_b = 0, run_t = 0;
  for (int64_t base = 0; base < g.S; base += kSortThreads) {
    const int64_t s = base + tid;
    const int c = s < g.S ? w.counts[s] : 0;
    const int nb = static_cast<int>((c + g.cap - 1) / g.cap), nt = static_cast<int>((c + g.bm - 1) / g.bm);
    int tot_rows, tot_act, tot_b, tot_t;
    const int ex_rows = block_exclusive_scan(c, s_scan, &tot_rows);
    const int ex_act = block_exclusive_scan(c > 0 ? 1 : 0, s_scan, &tot_act);
    const int ex_b = block_exclusive_scan(nb, s_scan, &tot_b);
    const int ex_t = block_exclusive_scan(nt, s_scan, &tot_t);
    (void)ex_rows;
    if (s < g.S && c > 0) {
      const int a = run_act + ex_act;
      w.act_index[s] = a;
      w.seg_slot[a] = static_cast<int>(s);
      w.seg_n[a] = c;
      w.seg_pos[a] = static_cast<int>((run_b + ex_b) * g.cap);
      w.seg_tile0[a] = run_t + ex_t;
    }
    run_rows += tot_rows;
    run_act += tot_act;
    run_b += tot_b;
    run_t += tot_t;
  }
  if (tid == 0) {
    w.meta[kMetaActive] = run_act;
    w.meta[kMetaRows] = run_rows;
    w.meta[kMetaSkipped] = skipped;
    w.meta[kMetaTiles] = run_t;
    w.meta[kMetaBuckets] = run_b;
    if (g.stats && skipped > 0) atomicAdd(&g.stats[kStatRowsSkipped], static_cast<double>(skipped));
  }
  __syncthreads();
  // Stable scatter by one warp: rows in order, 32 at a time; lanes with the same slot are ranked among
  // themselves and the highest of them advances the slot's cursor.
  if (wid == 0) {
    for (int64_t base = 0; base < g.N; base += 32) {
      const int64_t i = base + lane;
      const int64_t sl = i < g.N ? g.slot_ids[i] : -1;
      const bool ok = i < g.N && sl >= 0 && sl < g.S && (!g.valid || g.valid[i]);
      const unsigned peers = __match_any_sync(kFullMask, ok ? static_cast<int>(sl) : -1);
      int cur = 0;
      if (ok) {
        const int rank = __popc(peers & ((1u << lane) - 1u));
        const int a = w.act_index[sl];
        cur = w.cursor[sl];
        const int pos = w.seg_pos[a] + cur + rank;
        w.prow[pos] = static_cast<int>(i);
        w.pos_seg[pos] = a;
        w.inv[i] = pos;
      } else if (i < g.N) {
        w.inv[i] = -1;
      }
      __syncwarp();
      if (ok && (peers >> lane) == 1u) w.cursor[sl] = cur + __popc(peers);
      __syncwarp();
    }
  }
  // Tile list (SIMT engine) and bucket list (cuBLAS engine) of the active slots.
  const int n_act = run_act;
  for (int a = tid; a < n_act; a += kSortThreads) {
    const int n = w.seg_n[a];
    const int t0 = w.seg_tile0[a];
    for (int t = 0; t * g.bm < n; ++t) {
      w.tile_seg[t0 + t] = a;
      w.tile_off[t0 + t] = static_cast<int>(t * g.bm);
    }
    const int64_t b0 = w.seg_pos[a] / g.cap;
    for (int64_t b = 0; b * g.cap < n; ++b) w.bucket_slot[b0 + b] = w.seg_slot[a];
  }
}

// Positions <- caller's x rows as float32 (pad positions 0); the cuBLAS engine's x_0.
__global__ void __launch_bounds__(kRowThreads) gather_kernel(const RowsIn rows, int64_t H, int64_t R_pad, Ws w,
                                                             float* __restrict__ X0) {
  for (int64_t p = blockIdx.x; p < R_pad; p += gridDim.x) {
    const int i = w.prow[p];
    float* xo = X0 + p * H;
    if (i < 0) {
      for (int64_t h = threadIdx.x; h < H; h += kRowThreads) xo[h] = 0.0f;
      continue;
    }
    const void* x = static_cast<const char*>(rows.x) + static_cast<int64_t>(i) * rows.x_stride * dtype_size(rows.x_dtype);
    for (int64_t h = threadIdx.x; h < H; h += kRowThreads) xo[h] = load_as_float(x, rows.x_dtype, h);
  }
}

// ------------------------------------------------------------------------------------------------
// SIMT row products over the device's tile list
// ------------------------------------------------------------------------------------------------
struct RowsGemmArgs {
  RowSrc A;            // positions x K
  const float* params; // W_slot(k, n) = params[slot * P + woff + k * sWk + n * sWn]
  int64_t P, woff, sWk, sWn;
  int w_n_contig;      // sWn == 1 (else sWk == 1)
  float* C;            // positions x Nc (row stride ldc); split sp writes C + sp * split_stride
  int64_t ldc, split_stride;
  RowSrc D;            // optional residual (splits == 1): C = D + A . W
  int has_d;
  int64_t K, Nc, kchunk, n_ct;
  int splits;
  Ws w;
};

// Work item = (tile, column tile, split).  MR rows per thread: BM = 16 * MR rows per tile.
template <int MR>
__global__ void __launch_bounds__(kGemmThreads, 2) rows_gemm_kernel(const RowsGemmArgs g) {
  constexpr int BM = 16 * MR;
  __shared__ float As[BM][kBK + 1];
  __shared__ float Wsm[kBK][kBN + 1];
  const int tid = threadIdx.x, tx = tid & 15, ty = tid >> 4;
  const int n_ct = static_cast<int>(g.n_ct), splits = g.splits;
  const int K = static_cast<int>(g.K), Nc = static_cast<int>(g.Nc), kchunk = static_cast<int>(g.kchunk);
  const int64_t n_items = static_cast<int64_t>(g.w.meta[kMetaTiles]) * n_ct * splits;
  for (int64_t item = blockIdx.x; item < n_items; item += gridDim.x) {
    const int sp = static_cast<int>(item % splits);
    const int ct = static_cast<int>((item / splits) % n_ct);
    const int64_t tile = item / (static_cast<int64_t>(splits) * n_ct);
    const int a = g.w.tile_seg[tile];
    const int off = g.w.tile_off[tile];
    const int rem = g.w.seg_n[a] - off;
    const int n = rem < BM ? rem : BM;
    const int st = g.w.seg_pos[a] + off;
    const float* W = g.params + static_cast<int64_t>(g.w.seg_slot[a]) * g.P + g.woff;
    const int n0 = ct * kBN;
    const int kb = sp * kchunk;
    const int ke = kb + kchunk < K ? kb + kchunk : K;
    float acc[MR][4];
#pragma unroll
    for (int i = 0; i < MR; ++i)
#pragma unroll
      for (int c = 0; c < 4; ++c) acc[i][c] = 0.0f;
    for (int k0 = kb; k0 < ke; k0 += kBK) {
      for (int e = tid; e < BM * kBK; e += kGemmThreads) {
        const int m = e / kBK, k = e % kBK;
        const int gk = k0 + k;
        As[m][k] = (m < n && gk < ke) ? g.A.load(st + m, gk) : 0.0f;
      }
      if (g.w_n_contig) {
        for (int e = tid; e < kBK * kBN; e += kGemmThreads) {
          const int k = e / kBN, nn = e % kBN;
          const int gk = k0 + k, gn = n0 + nn;
          Wsm[k][nn] = (gk < ke && gn < Nc) ? W[static_cast<int64_t>(gk) * g.sWk + gn] : 0.0f;
        }
      } else {
        for (int e = tid; e < kBK * kBN; e += kGemmThreads) {
          const int k = e % kBK, nn = e / kBK;
          const int gk = k0 + k, gn = n0 + nn;
          Wsm[k][nn] = (gk < ke && gn < Nc) ? W[gk + static_cast<int64_t>(gn) * g.sWn] : 0.0f;
        }
      }
      __syncthreads();
#pragma unroll 8
      for (int k = 0; k < kBK; ++k) {
        float av[MR];
#pragma unroll
        for (int i = 0; i < MR; ++i) av[i] = As[ty + 16 * i][k];
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          const float wv = Wsm[k][tx + 16 * c];
#pragma unroll
          for (int i = 0; i < MR; ++i) acc[i][c] = fmaf(av[i], wv, acc[i][c]);
        }
      }
      __syncthreads();
    }
    float* C = g.C + static_cast<int64_t>(sp) * g.split_stride;
#pragma unroll
    for (int i = 0; i < MR; ++i) {
      const int gm = ty + 16 * i;
      if (gm >= n) continue;
      const int64_t row = st + gm;
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const int gn = n0 + tx + 16 * c;
        if (gn >= Nc) continue;
        float v = acc[i][c];
        if (g.has_d) v += g.D.load(row, gn);
        C[row * g.ldc + gn] = v;
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Element-wise / row kernels (grid-stride over positions)
// ------------------------------------------------------------------------------------------------
struct RowCommon {
  const float* params;
  int64_t P, H, R, R_pad, split_stride;
  int splits;
  Ws w;
};

// Pb[p] = (U, Gp) = (sum of split partials) + (0, c); Act[p] = U * silu(Gp).  Pad positions: 0.
__global__ void __launch_bounds__(128) gate_fwd_kernel(const RowCommon rc, int64_t coff, float* __restrict__ Pb,
                                                       float* __restrict__ Act) {
  const int64_t R = rc.R, R2 = 2 * rc.R;
  for (int64_t p = blockIdx.x; p < rc.R_pad; p += gridDim.x) {
    const int a = rc.w.pos_seg[p];
    if (a < 0) {
      for (int64_t r = threadIdx.x; r < R; r += blockDim.x) {
        Pb[p * R2 + r] = 0.0f;
        Pb[p * R2 + R + r] = 0.0f;
        Act[p * R + r] = 0.0f;
      }
      continue;
    }
    const float* c = rc.params + static_cast<int64_t>(rc.w.seg_slot[a]) * rc.P + coff;
    for (int64_t r = threadIdx.x; r < R; r += blockDim.x) {
      float u = 0.0f, gp = 0.0f;
      for (int sp = 0; sp < rc.splits; ++sp) {
        u += rc.w.part[sp * rc.split_stride + p * R2 + r];
        gp += rc.w.part[sp * rc.split_stride + p * R2 + R + r];
      }
      gp += c[r];
      Pb[p * R2 + r] = u;
      Pb[p * R2 + R + r] = gp;
      Act[p * R + r] = u * siluf(gp);
    }
  }
}

// dact = sum of split partials of G . B^T; dP = (dact * silu(Gp), dact * U * dsilu(Gp)).  Pad: 0.
__global__ void __launch_bounds__(128) gate_bwd_kernel(const RowCommon rc, const float* __restrict__ Pb,
                                                       float* __restrict__ dP) {
  const int64_t R = rc.R, R2 = 2 * rc.R;
  for (int64_t p = blockIdx.x; p < rc.R_pad; p += gridDim.x) {
    const bool pad = rc.w.pos_seg[p] < 0;
    for (int64_t r = threadIdx.x; r < R; r += blockDim.x) {
      if (pad) {
        dP[p * R2 + r] = 0.0f;
        dP[p * R2 + R + r] = 0.0f;
        continue;
      }
      float dact = 0.0f;
      for (int sp = 0; sp < rc.splits; ++sp) dact += rc.w.part[sp * rc.split_stride + p * R + r];
      const float u = Pb[p * R2 + r], gp = Pb[p * R2 + R + r];
      const float sg = sigmoidf_(gp);
      dP[p * R2 + r] = dact * gp * sg;                                  // dact * silu(gp)
      dP[p * R2 + R + r] = dact * u * (sg * (1.0f + gp * (1.0f - sg)));  // dact * u * dsilu(gp)
    }
  }
}

struct NormArgs {
  RowCommon rc;
  float* XL;      // x_L; train: becomes dL/dx_L in place (norm_bwd)
  int64_t goff;   // gamma offset in a slot
  float eps;
  void* out;      // forward op only
  DType out_dtype;
  int64_t out_stride;
  RowsIn rows;    // train: targets
};

__device__ __forceinline__ const void* target_row(const RowsIn& rows, int i) {
  return static_cast<const char*>(rows.t) + static_cast<int64_t>(i) * rows.t_stride * dtype_size(rows.t_dtype);
}

// Forward op: y = x_L * rinv * gamma written to the row's original position.
__global__ void __launch_bounds__(kRowThreads) norm_fwd_kernel(const NormArgs na) {
  __shared__ double s_red[32];
  const RowCommon& rc = na.rc;
  const int64_t H = rc.H;
  for (int64_t p = blockIdx.x; p < rc.R_pad; p += gridDim.x) {
    const int a = rc.w.pos_seg[p];
    if (a < 0) continue;  // uniform over the block
    const float* gamma = rc.params + static_cast<int64_t>(rc.w.seg_slot[a]) * rc.P + na.goff;
    const float* x = na.XL + p * H;
    double ss = 0.0;
    for (int64_t h = threadIdx.x; h < H; h += kRowThreads) ss += static_cast<double>(x[h]) * static_cast<double>(x[h]);
    ss = block_sum(ss, s_red);
    const float r = 1.0f / sqrtf(static_cast<float>(ss / static_cast<double>(H)) + na.eps);
    const int64_t i = rc.w.prow[p];
    void* o = static_cast<char*>(na.out) + i * na.out_stride * dtype_size(na.out_dtype);
    for (int64_t h = threadIdx.x; h < H; h += kRowThreads) store_from_float(o, na.out_dtype, h, x[h] * r * gamma[h]);
  }
}

// Train: rinv and the row's sum of squared errors (double).  Pad positions: 0.
__global__ void __launch_bounds__(kRowThreads) norm_stats_kernel(const NormArgs na, double* __restrict__ row_loss) {
  __shared__ double s_red[32];
  const RowCommon& rc = na.rc;
  const int64_t H = rc.H;
  for (int64_t p = blockIdx.x; p < rc.R_pad; p += gridDim.x) {
    const int a = rc.w.pos_seg[p];
    if (a < 0) {
      if (threadIdx.x == 0) {
        rc.w.rinv[p] = 0.0f;
        row_loss[p] = 0.0;
      }
      continue;
    }
    const float* gamma = rc.params + static_cast<int64_t>(rc.w.seg_slot[a]) * rc.P + na.goff;
    const float* x = na.XL + p * H;
    const void* t = target_row(na.rows, rc.w.prow[p]);
    double ss = 0.0;
    for (int64_t h = threadIdx.x; h < H; h += kRowThreads) ss += static_cast<double>(x[h]) * static_cast<double>(x[h]);
    ss = block_sum(ss, s_red);
    const float r = 1.0f / sqrtf(static_cast<float>(ss / static_cast<double>(H)) + na.eps);
    double l = 0.0;
    for (int64_t h = threadIdx.x; h < H; h += kRowThreads) {
      const float d = x[h] * r * gamma[h] - load_as_float(t, na.rows.t_dtype, h);
      l += static_cast<double>(d) * static_cast<double>(d);
    }
    l = block_sum(l, s_red);
    if (threadIdx.x == 0) {
      rc.w.rinv[p] = r;
      row_loss[p] = l;
    }
  }
}

// Train: x_L -> dL/dx_L in place: u = dy * gamma with dy = 2 (y - t) / (n H), dx = r u - x mean(u x) r^3.
__global__ void __launch_bounds__(kRowThreads) norm_bwd_kernel(const NormArgs na) {
  __shared__ double s_red[32];
  const RowCommon& rc = na.rc;
  const int64_t H = rc.H;
  for (int64_t p = blockIdx.x; p < rc.R_pad; p += gridDim.x) {
    const int a = rc.w.pos_seg[p];
    float* x = na.XL + p * H;
    if (a < 0) {
      for (int64_t h = threadIdx.x; h < H; h += kRowThreads) x[h] = 0.0f;
      continue;
    }
    const float* gamma = rc.params + static_cast<int64_t>(rc.w.seg_slot[a]) * rc.P + na.goff;
    const void* t = target_row(na.rows, rc.w.prow[p]);
    const float r = rc.w.rinv[p];
    const float inv = 2.0f / static_cast<float>(static_cast<int64_t>(rc.w.seg_n[a]) * H);
    double ux = 0.0;
    for (int64_t h = threadIdx.x; h < H; h += kRowThreads) {
      const float d = x[h] * r * gamma[h] - load_as_float(t, na.rows.t_dtype, h);
      const float u = (inv * d) * gamma[h];
      ux += static_cast<double>(u) * static_cast<double>(x[h]);
    }
    ux = block_sum(ux, s_red);  // (its barriers also order every read of x above before the writes below)
    const float coef = static_cast<float>(ux / static_cast<double>(H)) * r * r * r;
    for (int64_t h = threadIdx.x; h < H; h += kRowThreads) {
      const float xh = x[h];
      const float d = xh * r * gamma[h] - load_as_float(t, na.rows.t_dtype, h);
      const float u = (inv * d) * gamma[h];
      x[h] = r * u - xh * coef;
    }
  }
}

// Forward op: rows whose slot id is out of range (possible only for unchecked CUDA slot tensors) get NaN.
__global__ void __launch_bounds__(kRowThreads) fill_unsorted_kernel(const int* __restrict__ inv, int64_t N, int64_t H,
                                                                    void* out, DType out_dtype, int64_t out_stride) {
  for (int64_t i = blockIdx.x; i < N; i += gridDim.x) {
    if (inv[i] >= 0) continue;
    void* o = static_cast<char*>(out) + i * out_stride * dtype_size(out_dtype);
    for (int64_t h = threadIdx.x; h < H; h += kRowThreads) store_from_float(o, out_dtype, h, NAN);
  }
}

// dgamma_a[h] = sum over the slot's rows of dy * x_hat (before norm_bwd overwrites x_L).
struct SmallArgs {
  RowCommon rc;
  const float* XL;
  RowsIn rows;
  int64_t goff, sgrad_per_slot, n_parts, part_base;
  int64_t L;
};
__global__ void __launch_bounds__(kColThreads) gamma_grad_kernel(const SmallArgs sa) {
  __shared__ double s_red[32];
  const RowCommon& rc = sa.rc;
  const int64_t H = rc.H, nb = (H + kColThreads - 1) / kColThreads;
  const int64_t n_items = static_cast<int64_t>(rc.w.meta[kMetaActive]) * nb;
  for (int64_t item = blockIdx.x; item < n_items; item += gridDim.x) {
    const int64_t a = item / nb, cb = item % nb;
    const int64_t h = cb * kColThreads + threadIdx.x;
    const int64_t st = rc.w.seg_pos[a], n = rc.w.seg_n[a];
    const float* gamma = rc.params + static_cast<int64_t>(rc.w.seg_slot[a]) * rc.P + sa.goff;
    const float inv = 2.0f / static_cast<float>(n * H);
    double sq = 0.0;
    if (h < H) {
      float s = 0.0f;
      for (int64_t q = st; q < st + n; ++q) {
        const float xh = sa.XL[q * H + h] * rc.w.rinv[q];
        const float d = xh * gamma[h] - load_as_float(target_row(sa.rows, rc.w.prow[q]), sa.rows.t_dtype, h);
        s += (inv * d) * xh;
      }
      rc.w.sgrad[a * sa.sgrad_per_slot + sa.L * rc.R + h] = s;
      sq = static_cast<double>(s) * static_cast<double>(s);
    }
    sq = block_sum(sq, s_red);
    if (threadIdx.x == 0) rc.w.norm_part[a * sa.n_parts + sa.part_base + cb] = sq;
  }
}

// dc_j of each active slot = column sums of dGp over its rows.
__global__ void __launch_bounds__(kColThreads) dc_kernel(const RowCommon rc, const float* __restrict__ dP, int64_t j,
                                                         int64_t sgrad_per_slot, int64_t n_parts, int64_t part_index) {
  __shared__ double s_red[32];
  const int n_active = rc.w.meta[kMetaActive];
  const int64_t R = rc.R, R2 = 2 * rc.R;
  for (int64_t a = blockIdx.x; a < n_active; a += gridDim.x) {
    const int64_t st = rc.w.seg_pos[a], n = rc.w.seg_n[a];
    double sq = 0.0;
    for (int64_t r = threadIdx.x; r < R; r += kColThreads) {
      float s = 0.0f;
      for (int64_t q = st; q < st + n; ++q) s += dP[q * R2 + R + r];
      rc.w.sgrad[a * sgrad_per_slot + j * R + r] = s;
      sq += static_cast<double>(s) * static_cast<double>(s);
    }
    sq = block_sum(sq, s_red);
    if (threadIdx.x == 0) rc.w.norm_part[a * n_parts + part_index] = sq;
  }
}

// ------------------------------------------------------------------------------------------------
// Weight gradients: per (active slot, 64 x 64 tile of W1_j or B_j)
// ------------------------------------------------------------------------------------------------
// Buffers by name.  Train: x_k at X + k R_pad H when x_0 is copied (cuBLAS), else X + (k - 1) R_pad H (x_0 is
// the caller's rows); dL/dx_k at G + (k - 1) R_pad H for k < L and in place of x_L for k = L.  Forward: one
// running x at X.
__host__ __device__ inline float* xbuf(const Ws& w, int64_t k, int64_t R_pad, int64_t H, bool x0_copied, bool train) {
  if (!train) return w.X;
  return w.X + (x0_copied ? k : k - 1) * R_pad * H;
}
__host__ __device__ inline float* gbuf(const Ws& w, int64_t k, int64_t L, int64_t R_pad, int64_t H, bool x0_copied) {
  return k == L ? xbuf(w, L, R_pad, H, x0_copied, true) : w.G + (k - 1) * R_pad * H;
}

enum WgradMode : int { kNormCompute = 0, kApplyCompute = 1, kNormBuffer = 2, kApplyBuffer = 3 };

struct WgradArgs {
  RowsIn rows;       // x_0 when it is read in place (x0_indirect)
  int x0_indirect;
  const float* Act;  // [L][R_pad][R]
  const float* dP;   // [L][R_pad][2R]
  int64_t H, R, L, R_pad, P;
  int64_t wt_w1, wt_b, wt_per_slot, ct_w1, ct_b, n_parts;
  DistillerShape sh;
  AdamConfig cfg;
  DistillerBank bank;
  const float* grad;  // buffer modes: the one slot's gradient (layout of a slot)
  Ws w;
};

template <int kMode>
__global__ void __launch_bounds__(kGemmThreads) wgrad_kernel(const WgradArgs g) {
  __shared__ float Us[kWK][kWT];
  __shared__ float Vs[kWK][kWT];
  __shared__ double s_red[32];
  constexpr bool kBuffer = kMode == kNormBuffer || kMode == kApplyBuffer;
  constexpr bool kApply = kMode == kApplyCompute || kMode == kApplyBuffer;
  const int tid = threadIdx.x, tx = tid & 15, ty = tid >> 4;
  const int64_t n_items = static_cast<int64_t>(g.w.meta[kMetaActive]) * g.wt_per_slot;
  for (int64_t item = blockIdx.x; item < n_items; item += gridDim.x) {
    const int64_t a = item / g.wt_per_slot, t = item % g.wt_per_slot;
    if (kApply && !g.w.slot_ok[a]) continue;
    const int64_t j = t / (g.wt_w1 + g.wt_b), tt = t % (g.wt_w1 + g.wt_b);
    const bool is_w1 = tt < g.wt_w1;
    int64_t mt, nt, M, Nc, off, pld;
    if (is_w1) {  // dW1_j = x_j^T dP_j : [H, 2R]
      mt = tt / g.ct_w1;
      nt = tt % g.ct_w1;
      M = g.H;
      Nc = 2 * g.R;
      off = g.sh.off_W1(j);
      pld = 2 * g.R;
    } else {  // dB_j = act_j^T G_{j+1} : [R, H]
      mt = (tt - g.wt_w1) / g.ct_b;
      nt = (tt - g.wt_w1) % g.ct_b;
      M = g.R;
      Nc = g.H;
      off = g.sh.off_B(j);
      pld = g.H;
    }
    const int64_t m0 = mt * kWT, n0 = nt * kWT;
    const int64_t slot = g.w.seg_slot[a];
    float acc[4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int c = 0; c < 4; ++c) acc[i][c] = 0.0f;
    if (!kBuffer) {
      const int64_t st = g.w.seg_pos[a], n = g.w.seg_n[a];
      const bool x0c = !g.x0_indirect;
      const RowSrc xs = (j == 0 && g.x0_indirect)
                            ? RowSrc{nullptr, 0, g.rows.x, g.rows.x_dtype, g.rows.x_stride, g.w.prow}
                            : direct(xbuf(g.w, j, g.R_pad, g.H, x0c, true), g.H);
      const float* act = g.Act + j * g.R_pad * g.R;
      const float* dp = g.dP + j * g.R_pad * 2 * g.R;
      const float* gg = gbuf(g.w, j + 1, g.L, g.R_pad, g.H, x0c);
      for (int64_t r0 = 0; r0 < n; r0 += kWK) {
        for (int e = tid; e < kWK * kWT; e += kGemmThreads) {
          const int k = e / kWT, mm = e % kWT;
          const int64_t q = st + r0 + k, gm = m0 + mm;
          float u = 0.0f;
          if (r0 + k < n && gm < M) u = is_w1 ? xs.load(q, gm) : act[q * g.R + gm];
          Us[k][mm] = u;
          const int64_t gn = n0 + mm;
          float v = 0.0f;
          if (r0 + k < n && gn < Nc) v = is_w1 ? dp[q * 2 * g.R + gn] : gg[q * g.H + gn];
          Vs[k][mm] = v;
        }
        __syncthreads();
#pragma unroll
        for (int k = 0; k < kWK; ++k) {
          float av[4], bv[4];
#pragma unroll
          for (int i = 0; i < 4; ++i) av[i] = Us[k][ty + 16 * i];
#pragma unroll
          for (int c = 0; c < 4; ++c) bv[c] = Vs[k][tx + 16 * c];
#pragma unroll
          for (int i = 0; i < 4; ++i)
#pragma unroll
            for (int c = 0; c < 4; ++c) acc[i][c] = fmaf(av[i], bv[c], acc[i][c]);
        }
        __syncthreads();
      }
    } else {
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          const int64_t gm = m0 + ty + 16 * i, gn = n0 + tx + 16 * c;
          acc[i][c] = (gm < M && gn < Nc) ? g.grad[off + gm * pld + gn] : 0.0f;
        }
    }
    if (!kApply) {
      double sq = 0.0;
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          const int64_t gm = m0 + ty + 16 * i, gn = n0 + tx + 16 * c;
          if (gm < M && gn < Nc) sq += static_cast<double>(acc[i][c]) * static_cast<double>(acc[i][c]);
        }
      sq = block_sum(sq, s_red);
      if (tid == 0) g.w.norm_part[a * g.n_parts + t] = sq;
    } else {
      const float coef = g.w.slot_coef[a];
      const float bc1 = g.w.slot_bc[2 * a], bc2 = g.w.slot_bc[2 * a + 1];
      float* prm = g.bank.params + slot * g.P + off;
      float* mo = g.bank.exp_avg + slot * g.P + off;
      float* vo = g.bank.exp_avg_sq + slot * g.P + off;
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          const int64_t gm = m0 + ty + 16 * i, gn = n0 + tx + 16 * c;
          if (gm >= M || gn >= Nc) continue;
          const int64_t e = gm * pld + gn;
          float pi = prm[e], mi = mo[e], vi = vo[e];
          adam_update(pi, mi, vi, acc[i][c] * coef, g.cfg.lr, g.cfg.beta1, g.cfg.beta2, g.cfg.eps, bc1, bc2);
          prm[e] = pi;
          mo[e] = mi;
          vo[e] = vi;
        }
    }
  }
}

// Per active slot: loss (mean over its rows of ||y - t||^2 / H), global gradient norm from the partials,
// clip coefficient, and whether the slot is updated (finite loss and norm).
__global__ void __launch_bounds__(kColThreads) slot_prep_kernel(const AdamConfig cfg, Ws w, const int64_t* step,
                                                                int64_t H, int64_t n_parts) {
  __shared__ double s_red[32];
  const int n_active = w.meta[kMetaActive];
  for (int64_t a = blockIdx.x; a < n_active; a += gridDim.x) {
    const int64_t st = w.seg_pos[a], n = w.seg_n[a];
    double sq = 0.0, l = 0.0;
    for (int64_t q = threadIdx.x; q < n_parts; q += kColThreads) sq += w.norm_part[a * n_parts + q];
    for (int64_t q = threadIdx.x; q < n; q += kColThreads) l += w.row_loss[st + q];
    sq = block_sum(sq, s_red);
    l = block_sum(l, s_red);
    if (threadIdx.x == 0) {
      const float norm = static_cast<float>(sqrt(sq));
      const float loss = static_cast<float>(l / static_cast<double>(n * H));
      w.slot_loss[a] = loss;
      w.slot_coef[a] = clip_coef(norm, cfg.clip);
      w.slot_ok[a] = is_finite_f(norm) && is_finite_f(loss) ? 1 : 0;
      // Adam bias corrections of this step (as the CPU kernel: powers in double, rounded to float)
      const double t = static_cast<double>(step[w.seg_slot[a]] + 1);
      w.slot_bc[2 * a] = static_cast<float>(1.0 - pow(static_cast<double>(cfg.beta1), t));
      w.slot_bc[2 * a + 1] = static_cast<float>(1.0 - pow(static_cast<double>(cfg.beta2), t));
    }
  }
}

// Clip + Adam of the small parameters (c_j, gamma) from the per-slot buffer.
__global__ void __launch_bounds__(kAdamThreads) small_adam_kernel(const AdamConfig cfg, DistillerShape sh,
                                                                  DistillerBank bank, Ws w, int64_t sgrad_per_slot) {
  const int64_t P = sh.params_per_slot(), R = sh.R, LR = sh.L * sh.R;
  const int64_t nb = (sgrad_per_slot + kAdamThreads - 1) / kAdamThreads;
  const int64_t n_items = static_cast<int64_t>(w.meta[kMetaActive]) * nb;
  for (int64_t item = blockIdx.x; item < n_items; item += gridDim.x) {
    const int64_t a = item / nb, e = (item % nb) * kAdamThreads + threadIdx.x;
    if (!w.slot_ok[a] || e >= sgrad_per_slot) continue;
    const int64_t slot = w.seg_slot[a];
    const float bc1 = w.slot_bc[2 * a], bc2 = w.slot_bc[2 * a + 1];
    const int64_t idx = slot * P + (e < LR ? sh.off_c(e / R) + e % R : sh.off_gamma() + (e - LR));
    float pi = bank.params[idx], mi = bank.exp_avg[idx], vi = bank.exp_avg_sq[idx];
    adam_update(pi, mi, vi, w.sgrad[a * sgrad_per_slot + e] * w.slot_coef[a], cfg.lr, cfg.beta1, cfg.beta2, cfg.eps,
                bc1, bc2);
    bank.params[idx] = pi;
    bank.exp_avg[idx] = mi;
    bank.exp_avg_sq[idx] = vi;
  }
}

__global__ void __launch_bounds__(256) finalize_kernel(Ws w, int64_t* __restrict__ step, float* __restrict__ losses,
                                                       double* __restrict__ stats) {
  __shared__ double s_red[32];
  const int n_active = w.meta[kMetaActive];
  double lsum = 0.0, trained = 0.0, skipped = 0.0, updated = 0.0;
  for (int a = threadIdx.x; a < n_active; a += blockDim.x) {
    const int64_t slot = w.seg_slot[a];
    const double n = static_cast<double>(w.seg_n[a]);
    if (w.slot_ok[a]) {
      const float loss = w.slot_loss[a];
      losses[slot] = loss;
      lsum += static_cast<double>(loss);
      trained += n;
      updated += 1.0;
      step[slot] += 1;
    } else {
      skipped += n;  // non-finite loss or gradient norm: the slot is left untouched (loss stays NaN)
    }
  }
  lsum = block_sum(lsum, s_red);
  trained = block_sum(trained, s_red);
  skipped = block_sum(skipped, s_red);
  updated = block_sum(updated, s_red);
  if (threadIdx.x == 0) {
    atomicAdd(&stats[kStatRowsTrained], trained);
    if (skipped > 0.0) atomicAdd(&stats[kStatRowsSkipped], skipped);
    atomicAdd(&stats[kStatLossSum], lsum);
    atomicAdd(&stats[kStatSteps], updated > 0.0 ? 1.0 : 0.0);
  }
}

__global__ void __launch_bounds__(256) reset_kernel(const DistillerShape sh, DistillerBank bank,
                                                    const int64_t* __restrict__ slots, int64_t n, uint64_t seed,
                                                    const float* __restrict__ gamma_init) {
  const int64_t P = sh.params_per_slot(), bs = sh.block_size(), body = sh.L * bs;
  const int64_t HR2 = 2 * sh.H * sh.R;
  for (int64_t q = blockIdx.y; q < n; q += gridDim.y) {
    const int64_t s = slots[q];
    if (s < 0 || s >= bank.S) continue;  // unchecked CUDA slot ids: ignore out-of-range entries
    float* prm = bank.params + s * P;
    float* m = bank.exp_avg + s * P;
    float* v = bank.exp_avg_sq + s * P;
    for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < P;
         e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
      float val;
      if (e < body) {
        const int64_t off = e % bs;
        if (off < HR2) {
          val = kInitStd * init_normal(seed, static_cast<uint64_t>(e));
        } else if (off < HR2 + sh.R) {
          val = kInitGateBias;
        } else {
          val = 0.0f;
        }
      } else {
        val = gamma_init ? gamma_init[e - body] : 1.0f;
      }
      prm[e] = val;
      m[e] = 0.0f;
      v[e] = 0.0f;
    }
    if (blockIdx.x == 0 && threadIdx.x == 0) bank.step[s] = 0;
  }
}

__global__ void stats_mirror_kernel(const double* __restrict__ stats, StatsMirror* mirror, unsigned long long seq) {
  if (threadIdx.x != 0 || blockIdx.x != 0) return;
  mirror->seq_begin = seq;
  __threadfence_system();
  for (int k = 0; k < kNumStats; ++k) mirror->v[k] = stats[k];
  __threadfence_system();
  mirror->seq_end = seq;
}

// ------------------------------------------------------------------------------------------------
// cuBLAS pointer arrays: for every (product, layer) and bucket b, the A / W / C pointers.
// ------------------------------------------------------------------------------------------------
struct PtrArgs {
  Ws w;
  const float* params;
  int64_t P, nb_max, cap, H, R, L, R_pad;
  int train;
  DistillerShape sh;
};

__global__ void ptr_fill_kernel(const PtrArgs g) {
  const int64_t total = 4 * g.L * g.nb_max;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t b = e % g.nb_max, qj = e / g.nb_max, j = qj % g.L, q = qj / g.L;
    const int sl = g.w.bucket_slot[b];
    const float* wslot = g.params + static_cast<int64_t>(sl < 0 ? 0 : sl) * g.P;
    const int64_t row0 = b * g.cap;
    const bool tr = g.train != 0;
    const float *A, *Wp;
    float* C;
    switch (q) {
      case 0:  // F1: x_j . W1_j -> part
        A = xbuf(g.w, j, g.R_pad, g.H, true, tr) + row0 * g.H;
        Wp = wslot + g.sh.off_W1(j);
        C = g.w.part + row0 * 2 * g.R;
        break;
      case 1:  // F2: act_j . B_j -> x_{j+1}
        A = g.w.Act + j * g.R_pad * g.R + row0 * g.R;
        Wp = wslot + g.sh.off_B(j);
        C = xbuf(g.w, j + 1, g.R_pad, g.H, true, tr) + row0 * g.H;
        break;
      case 2:  // B1: G_{j+1} . B_j^T -> part
        A = tr ? gbuf(g.w, j + 1, g.L, g.R_pad, g.H, true) + row0 * g.H : nullptr;
        Wp = wslot + g.sh.off_B(j);
        C = g.w.part + row0 * g.R;
        break;
      default:  // B2: dP_j . W1_j^T -> G_j
        A = tr ? g.w.dP + j * g.R_pad * 2 * g.R + row0 * 2 * g.R : nullptr;
        Wp = wslot + g.sh.off_W1(j);
        C = (tr && j > 0) ? gbuf(g.w, j, g.L, g.R_pad, g.H, true) + row0 * g.H : nullptr;
        break;
    }
    void** base = g.w.ptrs + (qj * 3) * g.nb_max;
    base[b] = const_cast<float*>(A);
    base[g.nb_max + b] = const_cast<float*>(Wp);
    base[2 * g.nb_max + b] = C;
  }
}

// ------------------------------------------------------------------------------------------------
// Host side
// ------------------------------------------------------------------------------------------------
bool shape_ok(const DistillerShape& sh) {
  return sh.H >= 1 && sh.R >= 1 && sh.L >= 1 && sh.H <= (1LL << 21) && sh.R <= (1LL << 20) && sh.norm_eps >= 0.0f;
}

DistillerPlan make_plan(const DistillerShape& sh, int64_t S, int64_t N, int engine, bool have_cublas) {
  DistillerPlanOptions o;
  o.rows_engine = engine;
  o.have_cublas = have_cublas;
  return plan_distiller(sh, S, N, device_info_base(), o);
}

// Row-major fp32 C[M, N] = op(A)[M, K] . op(B)[K, N] (+ beta C), pedantic fp32 (cublas_gemm.cuh).
Status gemm_rm(cublasHandle_t h, bool ta, bool tb, int64_t M, int64_t N, int64_t K, const float* A, int64_t lda,
               const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  const cublasStatus_t s = cuda_detail::gemm_rm(h, ta, tb, M, N, K, A, CUDA_R_32F, lda, B, CUDA_R_32F, ldb, beta, C,
                                                ldc, CUBLAS_COMPUTE_32F_PEDANTIC);
  return s == CUBLAS_STATUS_SUCCESS ? Status::kOk : Status::kCublasError;
}

struct Ctx {
  const DistillerPlan& p;
  const DistillerShape& sh;
  const Ws& w;
  const float* params;
  const RowsIn& rows;
  bool train;
  cublasHandle_t h;
  cudaStream_t stream;
};

// One row-wise product kind q (0 F1, 1 F2, 2 B1, 3 B2) of layer j on the plan's engine.
//   F1: part = x_j . W1_j (split-K)       F2: x_{j+1} = x_j + act_j . B_j
//   B1: part = G_{j+1} . B_j^T (split-K)  B2: G_j = G_{j+1} + dP_j . W1_j^T
Status row_product(const Ctx& c, int q, int64_t j) {
  const DistillerPlan& p = c.p;
  const int64_t H = p.H, R = p.R, L = p.L, Rp = p.R_pad;
  const bool cu = p.rows == RowsEngine::kCublas;
  const bool x0c = !p.x0_indirect;
  // operand buffers
  RowSrc A{};
  float* C = nullptr;
  RowSrc D{};
  bool has_d = false, split = false;
  int64_t woff = 0, sWk = 0, sWn = 0, K = 0, Nc = 0, lda = 0, ldw = 0, ldc = 0;
  bool wt = false;  // W used transposed
  auto xsrc = [&](int64_t k) -> RowSrc {
    if (k == 0 && p.x0_indirect) return RowSrc{nullptr, 0, c.rows.x, c.rows.x_dtype, c.rows.x_stride, c.w.prow};
    return direct(xbuf(c.w, k, Rp, H, x0c, c.train), H);
  };
  switch (q) {
    case 0:
      A = xsrc(j);
      lda = H;
      woff = c.sh.off_W1(j);
      sWk = 2 * R;
      sWn = 1;
      K = H;
      Nc = 2 * R;
      ldw = 2 * R;
      C = c.w.part;
      ldc = 2 * R;
      split = true;
      break;
    case 1:
      A = direct(c.w.Act + j * Rp * R, R);
      lda = R;
      woff = c.sh.off_B(j);
      sWk = H;
      sWn = 1;
      K = R;
      Nc = H;
      ldw = H;
      C = xbuf(c.w, j + 1, Rp, H, x0c, c.train);
      ldc = H;
      D = xsrc(j);
      has_d = true;
      break;
    case 2:
      A = direct(gbuf(c.w, j + 1, L, Rp, H, x0c), H);
      lda = H;
      woff = c.sh.off_B(j);
      sWk = 1;
      sWn = H;
      K = H;
      Nc = R;
      ldw = H;
      wt = true;
      C = c.w.part;
      ldc = R;
      split = true;
      break;
    default:
      A = direct(c.w.dP + j * Rp * 2 * R, 2 * R);
      lda = 2 * R;
      woff = c.sh.off_W1(j);
      sWk = 1;
      sWn = 2 * R;
      K = 2 * R;
      Nc = H;
      ldw = 2 * R;
      wt = true;
      C = gbuf(c.w, j, L, Rp, H, x0c);
      ldc = H;
      D = direct(gbuf(c.w, j + 1, L, Rp, H, x0c), H);
      has_d = true;
      break;
  }
  if (cu) {
    float beta = 0.0f;
    if (has_d) {
      beta = 1.0f;
      if (D.buf != C) {  // C = D first (the forward runs in place, D == C)
        if (cudaMemcpyAsync(C, D.buf, static_cast<size_t>(Rp * H) * sizeof(float), cudaMemcpyDeviceToDevice,
                            c.stream) != cudaSuccess)
          return Status::kCudaError;
      }
    }
    if (p.S == 1) {  // shared mode: one GEMM with the only slot's weights
      return gemm_rm(c.h, false, wt, Rp, Nc, K, A.buf, lda, c.params + woff, ldw, beta, C, ldc);
    }
    const float alpha = 1.0f;
    void** base = c.w.ptrs + ((static_cast<int64_t>(q) * L + j) * 3) * p.nb_max;
    const cublasStatus_t s = cublasGemmBatchedEx(
        c.h, wt ? CUBLAS_OP_T : CUBLAS_OP_N, CUBLAS_OP_N, static_cast<int>(Nc), static_cast<int>(p.cap),
        static_cast<int>(K), &alpha, reinterpret_cast<const void* const*>(base + p.nb_max), CUDA_R_32F,
        static_cast<int>(ldw), reinterpret_cast<const void* const*>(base), CUDA_R_32F, static_cast<int>(lda), &beta,
        base + 2 * p.nb_max, CUDA_R_32F, static_cast<int>(ldc), static_cast<int>(p.nb_max),
        CUBLAS_COMPUTE_32F_PEDANTIC, CUBLAS_GEMM_DEFAULT);
    return s == CUBLAS_STATUS_SUCCESS ? Status::kOk : Status::kCublasError;
  }
  RowsGemmArgs g;
  g.A = A;
  g.params = c.params;
  g.P = p.P;
  g.woff = woff;
  g.sWk = sWk;
  g.sWn = sWn;
  g.w_n_contig = sWn == 1 ? 1 : 0;
  g.C = C;
  g.ldc = ldc;
  g.split_stride = Rp * 2 * R;
  g.D = D;
  g.has_d = has_d ? 1 : 0;
  g.K = K;
  g.Nc = Nc;
  g.splits = split ? p.splits : 1;
  g.kchunk = split ? p.kchunk : K;
  g.n_ct = plan_cdiv(Nc, kBN);
  g.w = c.w;
  const unsigned grid = persistent_grid(p.tiles_max * g.n_ct * g.splits);
  if (p.bm == kDistRowTileLarge) {
    rows_gemm_kernel<2><<<grid, kGemmThreads, 0, c.stream>>>(g);
  } else {
    rows_gemm_kernel<1><<<grid, kGemmThreads, 0, c.stream>>>(g);
  }
  return launch_status();
}

RowCommon row_common(const Ctx& c) {
  return RowCommon{c.params, c.p.P, c.p.H, c.p.R, c.p.R_pad, c.p.R_pad * 2 * c.p.R,
                   c.p.rows == RowsEngine::kCublas ? 1 : c.p.splits, c.w};
}

unsigned pos_grid(int64_t n) { return persistent_grid(n, 8); }

// Sort, (gather, pointer arrays), and the L blocks.  Leaves x_L in xbuf(L).
Status run_forward_blocks(const Ctx& c, float* losses, double* stats) {
  const DistillerPlan& p = c.p;
  const int64_t N = c.rows.N, H = p.H, R = p.R;
  if (c.train) {
    row_valid_kernel<<<pos_grid(N), kRowThreads, 0, c.stream>>>(c.rows, H, c.w.valid);
    ESAMP_LAUNCH_TRY();
  }
  SortArgs sa{c.rows.slot_ids, N, p.S, c.train ? c.w.valid : nullptr, p.cap, p.bm, p.R_pad, p.tiles_max, p.nb_max,
              losses, stats};
  sort_kernel<<<1, kSortThreads, 0, c.stream>>>(sa, c.w);
  ESAMP_LAUNCH_TRY();
  const bool cu = p.rows == RowsEngine::kCublas;
  if (cu) {
    gather_kernel<<<pos_grid(p.R_pad), kRowThreads, 0, c.stream>>>(c.rows, H, p.R_pad, c.w,
                                                                   xbuf(c.w, 0, p.R_pad, H, true, c.train));
    ESAMP_LAUNCH_TRY();
    if (p.S > 1) {
      PtrArgs pa{c.w, c.params, p.P, p.nb_max, p.cap, H, R, p.L, p.R_pad, c.train ? 1 : 0, c.sh};
      ptr_fill_kernel<<<grid_dim(4 * p.L * p.nb_max, 256, 4096), 256, 0, c.stream>>>(pa);
      ESAMP_LAUNCH_TRY();
    }
  }
  const RowCommon rc = row_common(c);
  for (int64_t j = 0; j < p.L; ++j) {
    Status s = row_product(c, 0, j);
    if (s != Status::kOk) return s;
    gate_fwd_kernel<<<pos_grid(p.R_pad), 128, 0, c.stream>>>(rc, c.sh.off_c(j), c.w.Pb + j * p.R_pad * 2 * R,
                                                              c.w.Act + j * p.R_pad * R);
    ESAMP_LAUNCH_TRY();
    s = row_product(c, 1, j);
    if (s != Status::kOk) return s;
  }
  return Status::kOk;
}

bool rows_ok(const RowsIn& rows, bool train) {
  if (rows.N < 0 || rows.N > (1LL << 30)) return false;
  if (rows.N == 0) return true;
  if (!rows.x || !rows.slot_ids) return false;
  if (train && !rows.t) return false;
  return true;
}

}  // namespace

size_t distiller_cuda_forward_workspace_bytes(const DistillerShape& sh, int64_t S, int64_t N, int engine,
                                              bool have_cublas) {
  if (!shape_ok(sh) || S < 1 || N < 0) return 0;
  return make_plan(sh, S, N, engine, have_cublas).lay.fwd_bytes;
}

size_t distiller_cuda_workspace_bytes(const DistillerShape& sh, int64_t S, int64_t N, int engine, bool have_cublas) {
  if (!shape_ok(sh) || S < 1 || N < 0) return 0;
  return make_plan(sh, S, N, engine, have_cublas).lay.train_bytes;
}

Status distiller_forward_cuda(const DistillerShape& sh, const float* params, int64_t S, const RowsIn& rows, void* out,
                              DType out_dtype, int64_t out_stride, void* workspace, size_t workspace_bytes,
                              void* cublas_handle, cudaStream_t stream, int engine) {
  if (!shape_ok(sh) || S < 1 || S > INT_MAX || !params || !rows_ok(rows, false)) return Status::kInvalidArgument;
  if (rows.N == 0) return Status::kOk;
  if (!out || out_stride < sh.H) return Status::kInvalidArgument;
  const DistillerPlan p = make_plan(sh, S, rows.N, engine, cublas_handle != nullptr);
  if (!p.ok) return Status::kInvalidArgument;
  if (workspace_bytes < p.lay.fwd_bytes) return Status::kWorkspaceTooSmall;
  if (!workspace || (reinterpret_cast<uintptr_t>(workspace) & 255u) != 0) return Status::kInvalidArgument;
  const Ws w = bind(p, workspace, false);
  const Ctx c{p, sh, w, params, rows, false, static_cast<cublasHandle_t>(cublas_handle), stream};
  Status s = run_forward_blocks(c, nullptr, nullptr);
  if (s != Status::kOk) return s;
  NormArgs na{};
  na.rc = row_common(c);
  na.XL = xbuf(w, sh.L, p.R_pad, sh.H, !p.x0_indirect, false);
  na.goff = sh.off_gamma();
  na.eps = sh.norm_eps;
  na.out = out;
  na.out_dtype = out_dtype;
  na.out_stride = out_stride;
  na.rows = rows;
  norm_fwd_kernel<<<pos_grid(p.R_pad), kRowThreads, 0, stream>>>(na);
  ESAMP_LAUNCH_TRY();
  fill_unsorted_kernel<<<pos_grid(rows.N), kRowThreads, 0, stream>>>(w.inv, rows.N, sh.H, out, out_dtype, out_stride);
  return launch_status();
}

Status distiller_train_step_cuda(const DistillerShape& sh, const AdamConfig& cfg, DistillerBank bank,
                                 const RowsIn& rows, float* losses, double* stats, void* workspace,
                                 size_t workspace_bytes, void* cublas_handle, cudaStream_t stream, int engine) {
  const int64_t S = bank.S;
  if (!shape_ok(sh) || S < 1 || S > INT_MAX || !rows_ok(rows, true)) return Status::kInvalidArgument;
  if (!bank.params || !bank.exp_avg || !bank.exp_avg_sq || !bank.step || !losses || !stats)
    return Status::kInvalidArgument;
  const int64_t N = rows.N, H = sh.H, R = sh.R, L = sh.L;
  const DistillerPlan p = make_plan(sh, S, N, engine, cublas_handle != nullptr);
  if (!p.ok) return Status::kInvalidArgument;
  if (workspace_bytes < p.lay.train_bytes) return Status::kWorkspaceTooSmall;
  if (!workspace || (reinterpret_cast<uintptr_t>(workspace) & 255u) != 0) return Status::kInvalidArgument;
  const Ws w = bind(p, workspace, true);
  if (N == 0) {  // no rows: every slot idle (losses NaN), nothing to count
    SortArgs sa{rows.slot_ids, 0, S, nullptr, p.cap, p.bm, p.R_pad, p.tiles_max, p.nb_max, losses, nullptr};
    sort_kernel<<<1, kSortThreads, 0, stream>>>(sa, w);
    return launch_status();
  }
  const Ctx c{p, sh, w, bank.params, rows, true, static_cast<cublasHandle_t>(cublas_handle), stream};
  Status s = run_forward_blocks(c, losses, stats);
  if (s != Status::kOk) return s;
  const bool x0c = !p.x0_indirect;
  const RowCommon rc = row_common(c);
  const int64_t Rp = p.R_pad;

  // RMSNorm: rinv + row losses, dgamma (reads x_L), then x_L -> dL/dx_L in place
  NormArgs na{};
  na.rc = rc;
  na.XL = xbuf(w, L, Rp, H, x0c, true);
  na.goff = sh.off_gamma();
  na.eps = sh.norm_eps;
  na.rows = rows;
  norm_stats_kernel<<<pos_grid(Rp), kRowThreads, 0, stream>>>(na, w.row_loss);
  ESAMP_LAUNCH_TRY();
  SmallArgs sm{rc, na.XL, rows, sh.off_gamma(), p.sgrad_per_slot, p.n_parts, p.wt_per_slot, L};
  gamma_grad_kernel<<<persistent_grid(p.A_max * p.parts_gamma), kColThreads, 0, stream>>>(sm);
  ESAMP_LAUNCH_TRY();
  norm_bwd_kernel<<<pos_grid(Rp), kRowThreads, 0, stream>>>(na);
  ESAMP_LAUNCH_TRY();

  for (int64_t j = L - 1; j >= 0; --j) {
    s = row_product(c, 2, j);  // dact partials = G_{j+1} . B_j^T
    if (s != Status::kOk) return s;
    float* dPj = w.dP + j * Rp * 2 * R;
    gate_bwd_kernel<<<pos_grid(Rp), 128, 0, stream>>>(rc, w.Pb + j * Rp * 2 * R, dPj);
    ESAMP_LAUNCH_TRY();
    dc_kernel<<<persistent_grid(p.A_max), kColThreads, 0, stream>>>(rc, dPj, j, p.sgrad_per_slot, p.n_parts,
                                                                    p.wt_per_slot + p.parts_gamma + j);
    ESAMP_LAUNCH_TRY();
    if (j > 0) {
      s = row_product(c, 3, j);  // G_j = G_{j+1} + dP_j . W1_j^T
      if (s != Status::kOk) return s;
    }
  }

  WgradArgs wa{};
  wa.rows = rows;
  wa.x0_indirect = p.x0_indirect ? 1 : 0;
  wa.Act = w.Act;
  wa.dP = w.dP;
  wa.H = H;
  wa.R = R;
  wa.L = L;
  wa.R_pad = Rp;
  wa.P = p.P;
  wa.wt_w1 = p.wt_w1;
  wa.wt_b = p.wt_b;
  wa.wt_per_slot = p.wt_per_slot;
  wa.ct_w1 = plan_cdiv(2 * R, kWT);
  wa.ct_b = plan_cdiv(H, kWT);
  wa.n_parts = p.n_parts;
  wa.sh = sh;
  wa.cfg = cfg;
  wa.bank = bank;
  wa.grad = w.grad;
  wa.w = w;
  const unsigned wgrid = persistent_grid(p.A_max * p.wt_per_slot);
  if (p.wgrad == WgradEngine::kCublas) {  // shared mode: dW into the one-slot gradient buffer
    for (int64_t j = 0; j < L; ++j) {
      s = gemm_rm(c.h, true, false, H, 2 * R, Rp, xbuf(w, j, Rp, H, x0c, true), H, w.dP + j * Rp * 2 * R, 2 * R, 0.0f,
                  w.grad + sh.off_W1(j), 2 * R);
      if (s != Status::kOk) return s;
      s = gemm_rm(c.h, true, false, R, H, Rp, w.Act + j * Rp * R, R, gbuf(w, j + 1, L, Rp, H, x0c), H, 0.0f,
                  w.grad + sh.off_B(j), H);
      if (s != Status::kOk) return s;
    }
    wgrad_kernel<kNormBuffer><<<wgrid, kGemmThreads, 0, stream>>>(wa);
  } else {
    wgrad_kernel<kNormCompute><<<wgrid, kGemmThreads, 0, stream>>>(wa);
  }
  ESAMP_LAUNCH_TRY();
  slot_prep_kernel<<<persistent_grid(p.A_max), kColThreads, 0, stream>>>(cfg, w, bank.step, H, p.n_parts);
  ESAMP_LAUNCH_TRY();
  if (p.wgrad == WgradEngine::kCublas) {
    wgrad_kernel<kApplyBuffer><<<wgrid, kGemmThreads, 0, stream>>>(wa);
  } else {
    wgrad_kernel<kApplyCompute><<<wgrid, kGemmThreads, 0, stream>>>(wa);
  }
  ESAMP_LAUNCH_TRY();
  small_adam_kernel<<<persistent_grid(p.A_max * plan_cdiv(p.sgrad_per_slot, kAdamThreads)), kAdamThreads, 0, stream>>>(
      cfg, sh, bank, w, p.sgrad_per_slot);
  ESAMP_LAUNCH_TRY();
  finalize_kernel<<<1, 256, 0, stream>>>(w, bank.step, losses, stats);
  return launch_status();
}

Status distiller_reset_cuda(const DistillerShape& sh, DistillerBank bank, const int64_t* slots, int64_t n,
                            uint64_t seed, const float* gamma_init, cudaStream_t stream) {
  if (!shape_ok(sh) || bank.S < 1 || n < 0) return Status::kInvalidArgument;
  if (n == 0) return Status::kOk;
  if (!slots || !bank.params || !bank.exp_avg || !bank.exp_avg_sq || !bank.step) return Status::kInvalidArgument;
  const int64_t P = sh.params_per_slot();
  const dim3 grid(grid_dim(P, 256, 1 << 16), static_cast<unsigned>(n < 65535 ? n : 65535));
  reset_kernel<<<grid, 256, 0, stream>>>(sh, bank, slots, n, seed, gamma_init);
  return launch_status();
}

Status stats_mirror_cuda(const double* stats, StatsMirror* mirror, unsigned long long seq, cudaStream_t stream) {
  if (!stats || !mirror) return Status::kInvalidArgument;
  stats_mirror_kernel<<<1, 32, 0, stream>>>(stats, mirror, seq);
  return launch_status();
}

}  // namespace esamp
