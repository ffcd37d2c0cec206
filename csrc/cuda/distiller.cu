// Distiller bank on CUDA (SPEC section 2): forward, train step (forward + backward + per-slot clip +
// Adam) and reset.  Torch-free; raw pointers, a stream and a caller-provided workspace.
//
// Design (no host synchronisation anywhere, so every launcher is CUDA-graph capturable):
//   1. rows are validated (train: non-finite x or t, or a slot id outside [0, S) -> skipped) and
//      grouped by slot with a one-block counting sort into the workspace: the sorted order is
//      stable (original row order within a slot), each slot with >= 1 row gets an "active index"
//      a in [0, n_active) with a contiguous segment [seg_st[a], seg_st[a] + seg_n[a]) of sorted rows.
//      n_active and the segment sizes stay on the device; grids are sized for the worst case
//      (A_max = min(S, N) active slots, N rows per slot) and idle blocks exit at once.
//   2. the products are segmented SIMT fp32 GEMMs (fp32 accumulation, no TF32) over those segments:
//        rows_gemm : C[rows of a] (= D +) A[rows of a] . op(W_slot)    (split-K partials for K = H)
//        wgrad     : grad_a = U[rows of a]^T . V[rows of a]              (weight gradients)
//      cuBLAS is not used: its batched GEMMs need uniform M/K per batch, so a host-side row count
//      or S-fold padding would be required; the segmented kernels do exactly the rows present.
//   3. fused element-wise kernels: gate/SiLU/product (forward), RMSNorm forward + loss + MSE
//      gradient + RMSNorm backward (one block per row), gate backward, column sums for dc and
//      dgamma.  Every weight-gradient producer also writes the sum of squares of its output tile
//      to a per-slot partial array (fixed positions, so the norm is deterministic).
//   4. a small per-slot kernel reduces the slot's row losses and its norm partials: loss, global
//      gradient norm, clip coefficient, and whether the slot is updated at all (a non-finite loss or
//      norm leaves the slot untouched and counts its rows as skipped, as on the CPU).
//   5. one Adam kernel per step reads each gradient once: clip + Adam (bias corrections from the
//      slot's step counter, read on the device).
//   6. a finalize kernel writes the per-slot losses (NaN for idle slots, set by the sort kernel),
//      increments the step counters of updated slots, and accumulates the float64 stats exactly as
//      the CPU kernel does: rows trained, rows skipped, sum over updated slots of their loss, and
//      steps += 1 when at least one slot was updated.
// The element-wise formulas follow csrc/cpu/distiller_cpu.cpp (row sums of squares in double, the same
// RMSNorm backward expression), so the backends differ only by float summation order.
// All reductions have a fixed order: results do not depend on scheduling.
#include <cfloat>
#include <climits>
#include <cmath>

#include "cuda_utils.cuh"
#include "distiller_cuda.cuh"
#include "esamp/distiller.h"
#include "esamp/math.h"
#include "esamp/philox.h"

namespace esamp {
namespace {

using namespace cuda_detail;

constexpr int kRowThreads = 256;
constexpr int kSortThreads = 1024;
constexpr int kGemmThreads = 256;
constexpr int kBM = 32, kBN = 64, kBK = 32;  // rows_gemm tile (each thread: 2 x 4 outputs)
constexpr int kWM = 64, kWN = 64, kWK = 16;  // wgrad tile (each thread: 4 x 4 outputs)
constexpr int64_t kSplitK = 256;             // K chunk of split-K products (K = H)
constexpr int kMaxSplits = 32;
constexpr int kColThreads = 256;
constexpr int kAdamThreads = 256;
constexpr int64_t kMaxGridYZ = 65535;

// ------------------------------------------------------------------------------------------------
// Workspace layout
// ------------------------------------------------------------------------------------------------
struct Layout {
  int64_t N = 0, S = 0, A = 0;
  int splits = 1;
  int64_t kchunk = 0;
  int64_t parts_gamma = 0, parts_dB = 0, parts_dW = 0, parts_layer = 0, n_parts = 0;
  size_t counts = 0, cursor = 0, start = 0, act_index = 0, seg_slot = 0, seg_st = 0, seg_n = 0, meta = 0,
         valid = 0, perm = 0, pos_seg = 0, inv = 0;
  size_t X = 0, Pb = 0, Act = 0, part = 0, rinv = 0;
  size_t T = 0, dY = 0, G0 = 0, G1 = 0, dP = 0, row_loss = 0, grad = 0, norm_part = 0, slot_loss = 0, slot_coef = 0,
         slot_ok = 0;
  size_t fwd_bytes = 0, train_bytes = 0;
};

int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

Layout make_layout(const DistillerShape& sh, int64_t S, int64_t N) {
  Layout l;
  l.N = N;
  l.S = S;
  l.A = S < N ? S : N;
  const int64_t H = sh.H, R = sh.R, L = sh.L;
  int64_t sp = cdiv(H, kSplitK);
  if (sp < 1) sp = 1;
  if (sp > kMaxSplits) sp = kMaxSplits;
  l.splits = static_cast<int>(sp);
  l.kchunk = cdiv(cdiv(H, sp), kBK) * kBK;
  l.parts_gamma = cdiv(H, kColThreads);
  l.parts_dB = cdiv(H, kWN) * cdiv(R, kWM);
  l.parts_dW = cdiv(2 * R, kWN) * cdiv(H, kWM);
  l.parts_layer = 1 + l.parts_dB + l.parts_dW;
  l.n_parts = l.parts_gamma + L * l.parts_layer;

  size_t off = 0;
  auto take = [&](size_t bytes) {
    off = (off + 255) / 256 * 256;
    const size_t o = off;
    off += bytes;
    return o;
  };
  const size_t i4 = sizeof(int), f4 = sizeof(float);
  const size_t n = static_cast<size_t>(N), s = static_cast<size_t>(S), a = static_cast<size_t>(l.A);
  const size_t h = static_cast<size_t>(H), r = static_cast<size_t>(R), ll = static_cast<size_t>(L);
  l.counts = take(s * i4);
  l.cursor = take(s * i4);
  l.start = take(s * i4);
  l.act_index = take(s * i4);
  l.seg_slot = take(a * i4);
  l.seg_st = take(a * i4);
  l.seg_n = take(a * i4);
  l.meta = take(4 * i4);
  l.valid = take(n * i4);
  l.perm = take(n * i4);
  l.pos_seg = take(n * i4);
  l.inv = take(n * i4);
  l.X = take((ll + 1) * n * h * f4);
  l.Pb = take(ll * n * 2 * r * f4);
  l.Act = take(ll * n * r * f4);
  l.part = take(static_cast<size_t>(l.splits) * n * 2 * r * f4);
  l.rinv = take(n * f4);
  l.fwd_bytes = (off + 255) / 256 * 256;
  l.T = take(n * h * f4);
  l.dY = take(n * h * f4);
  l.G0 = take(n * h * f4);
  l.G1 = take(n * h * f4);
  l.dP = take(n * 2 * r * f4);
  l.row_loss = take(n * sizeof(double));
  l.grad = take(a * static_cast<size_t>(sh.params_per_slot()) * f4);
  l.norm_part = take(a * static_cast<size_t>(l.n_parts) * sizeof(double));
  l.slot_loss = take(a * f4);
  l.slot_coef = take(a * f4);
  l.slot_ok = take(a * i4);
  l.train_bytes = (off + 255) / 256 * 256;
  return l;
}

struct Ws {
  int *counts, *cursor, *start, *act_index, *seg_slot, *seg_st, *seg_n, *meta, *valid, *perm, *pos_seg, *inv;
  float *X, *Pb, *Act, *part, *rinv;
  float *T, *dY, *G0, *G1, *dP, *grad, *slot_loss, *slot_coef;
  double *row_loss, *norm_part;
  int* slot_ok;
};

Ws bind(const Layout& l, void* base, bool train) {
  char* b = static_cast<char*>(base);
  Ws w;
  w.counts = reinterpret_cast<int*>(b + l.counts);
  w.cursor = reinterpret_cast<int*>(b + l.cursor);
  w.start = reinterpret_cast<int*>(b + l.start);
  w.act_index = reinterpret_cast<int*>(b + l.act_index);
  w.seg_slot = reinterpret_cast<int*>(b + l.seg_slot);
  w.seg_st = reinterpret_cast<int*>(b + l.seg_st);
  w.seg_n = reinterpret_cast<int*>(b + l.seg_n);
  w.meta = reinterpret_cast<int*>(b + l.meta);
  w.valid = reinterpret_cast<int*>(b + l.valid);
  w.perm = reinterpret_cast<int*>(b + l.perm);
  w.pos_seg = reinterpret_cast<int*>(b + l.pos_seg);
  w.inv = reinterpret_cast<int*>(b + l.inv);
  w.X = reinterpret_cast<float*>(b + l.X);
  w.Pb = reinterpret_cast<float*>(b + l.Pb);
  w.Act = reinterpret_cast<float*>(b + l.Act);
  w.part = reinterpret_cast<float*>(b + l.part);
  w.rinv = reinterpret_cast<float*>(b + l.rinv);
  w.T = train ? reinterpret_cast<float*>(b + l.T) : nullptr;
  w.dY = train ? reinterpret_cast<float*>(b + l.dY) : nullptr;
  w.G0 = train ? reinterpret_cast<float*>(b + l.G0) : nullptr;
  w.G1 = train ? reinterpret_cast<float*>(b + l.G1) : nullptr;
  w.dP = train ? reinterpret_cast<float*>(b + l.dP) : nullptr;
  w.row_loss = train ? reinterpret_cast<double*>(b + l.row_loss) : nullptr;
  w.grad = train ? reinterpret_cast<float*>(b + l.grad) : nullptr;
  w.norm_part = train ? reinterpret_cast<double*>(b + l.norm_part) : nullptr;
  w.slot_loss = train ? reinterpret_cast<float*>(b + l.slot_loss) : nullptr;
  w.slot_coef = train ? reinterpret_cast<float*>(b + l.slot_coef) : nullptr;
  w.slot_ok = train ? reinterpret_cast<int*>(b + l.slot_ok) : nullptr;
  return w;
}

// meta[] entries
constexpr int kMetaActive = 0, kMetaRows = 1, kMetaSkipped = 2;

// ------------------------------------------------------------------------------------------------
// Row validation and grouping
// ------------------------------------------------------------------------------------------------
__global__ void __launch_bounds__(kRowThreads) row_valid_kernel(const RowsIn rows, int64_t H, int* __restrict__ valid) {
  const int64_t i = blockIdx.x;
  const void* x = static_cast<const char*>(rows.x) + i * rows.x_stride * dtype_size(rows.x_dtype);
  const void* t = static_cast<const char*>(rows.t) + i * rows.t_stride * dtype_size(rows.t_dtype);
  int ok = 1;
  for (int64_t h = threadIdx.x; h < H; h += kRowThreads) {
    if (!isfinite(load_as_float(x, rows.x_dtype, h)) || !isfinite(load_as_float(t, rows.t_dtype, h))) ok = 0;
  }
  ok = __syncthreads_and(ok);
  if (threadIdx.x == 0) valid[i] = ok;
}

// One block.  valid may be null (forward: every row with an in-range slot id is used).
__global__ void __launch_bounds__(kSortThreads) sort_kernel(const int64_t* __restrict__ slot_ids, int64_t N,
                                                            int64_t S, const int* __restrict__ valid, Ws w,
                                                            float* __restrict__ losses, double* __restrict__ stats) {
  __shared__ int s_scan[33];
  __shared__ int s_red[32];
  const int tid = threadIdx.x, lane = tid & 31, wid = tid >> 5;
  for (int64_t s = tid; s < S; s += kSortThreads) {
    w.counts[s] = 0;
    w.cursor[s] = 0;
    w.act_index[s] = -1;
    if (losses) losses[s] = NAN;
  }
  __syncthreads();
  int skipped = 0;
  for (int64_t i = tid; i < N; i += kSortThreads) {
    const int64_t sl = slot_ids[i];
    const bool ok = sl >= 0 && sl < S && (!valid || valid[i]);
    if (ok) {
      atomicAdd(&w.counts[sl], 1);
    } else {
      ++skipped;
    }
  }
  skipped = block_sum(skipped, s_red);
  __syncthreads();
  int run_rows = 0, run_act = 0;
  for (int64_t base = 0; base < S; base += kSortThreads) {
    const int64_t s = base + tid;
    const int c = s < S ? w.counts[s] : 0;
    int tot_rows, tot_act;
    const int ex_rows = block_exclusive_scan(c, s_scan, &tot_rows);
    const int ex_act = block_exclusive_scan(c > 0 ? 1 : 0, s_scan, &tot_act);
    if (s < S) {
      w.start[s] = run_rows + ex_rows;
      if (c > 0) {
        const int a = run_act + ex_act;
        w.act_index[s] = a;
        w.seg_slot[a] = static_cast<int>(s);
        w.seg_st[a] = run_rows + ex_rows;
        w.seg_n[a] = c;
      }
    }
    run_rows += tot_rows;
    run_act += tot_act;
  }
  if (tid == 0) {
    w.meta[kMetaActive] = run_act;
    w.meta[kMetaRows] = run_rows;
    w.meta[kMetaSkipped] = skipped;
    if (stats && skipped > 0) atomicAdd(&stats[kStatRowsSkipped], static_cast<double>(skipped));
  }
  __syncthreads();
  // Stable scatter by one warp: rows in order, 32 at a time; lanes with the same slot are ranked
  // among themselves and the highest of them advances the slot's cursor.
  if (wid == 0) {
    for (int64_t base = 0; base < N; base += 32) {
      const int64_t i = base + lane;
      const int64_t sl = i < N ? slot_ids[i] : -1;
      const bool ok = i < N && sl >= 0 && sl < S && (!valid || valid[i]);
      const unsigned peers = __match_any_sync(kFullMask, ok ? static_cast<int>(sl) : -1);
      int cur = 0;
      if (ok) {
        const int rank = __popc(peers & ((1u << lane) - 1u));
        cur = w.cursor[sl];
        const int pos = w.start[sl] + cur + rank;
        w.perm[pos] = static_cast<int>(i);
        w.pos_seg[pos] = w.act_index[sl];
        w.inv[i] = pos;
      } else if (i < N) {
        w.inv[i] = -1;
      }
      __syncwarp();
      if (ok && (peers >> lane) == 1u) w.cursor[sl] = cur + __popc(peers);
      __syncwarp();
    }
  }
}

// Sorted position p <- original row perm[p], converted to float.
__global__ void __launch_bounds__(kRowThreads) gather_kernel(const RowsIn rows, int64_t H, Ws w, int with_t) {
  const int64_t p = blockIdx.x;
  if (p >= w.meta[kMetaRows]) return;
  const int64_t i = w.perm[p];
  const void* x = static_cast<const char*>(rows.x) + i * rows.x_stride * dtype_size(rows.x_dtype);
  float* xo = w.X + p * H;
  for (int64_t h = threadIdx.x; h < H; h += kRowThreads) xo[h] = load_as_float(x, rows.x_dtype, h);
  if (with_t) {
    const void* t = static_cast<const char*>(rows.t) + i * rows.t_stride * dtype_size(rows.t_dtype);
    float* to = w.T + p * H;
    for (int64_t h = threadIdx.x; h < H; h += kRowThreads) to[h] = load_as_float(t, rows.t_dtype, h);
  }
}

// ------------------------------------------------------------------------------------------------
// Segmented GEMMs
// ------------------------------------------------------------------------------------------------
struct RowsGemmArgs {
  const float* A;      // sorted rows, row stride lda, K columns
  int64_t lda;
  const float* params; // W_slot(k, n) = params[slot * P + woff + k * sWk + n * sWn]
  int64_t P, woff, sWk, sWn;
  int w_n_contig;      // sWn == 1 (else sWk == 1)
  float* C;            // sorted rows, row stride ldc, Nc columns; split sp writes C + sp * split_stride
  int64_t ldc, split_stride;
  const float* D;      // optional residual rows (splits == 1): C = D + A . W
  int64_t ldd;
  int64_t K, Nc, kchunk;
  int splits;
  const int* seg_slot;
  const int* seg_st;
  const int* seg_n;
  const int* meta;
  int64_t A_max;
};

__global__ void __launch_bounds__(kGemmThreads) rows_gemm_kernel(const RowsGemmArgs g) {
  __shared__ float As[kBM][kBK + 1];
  __shared__ float Wsm[kBK][kBN + 1];
  const int tid = threadIdx.x, tx = tid & 15, ty = tid >> 4;
  const int n_active = g.meta[kMetaActive];
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kBN;
  const int64_t total_z = g.A_max * g.splits;
  for (int64_t zz = blockIdx.z; zz < total_z; zz += gridDim.z) {
    const int64_t a = zz / g.splits;
    const int64_t sp = zz % g.splits;
    if (a >= n_active) break;  // zz only grows
    const int64_t slot = g.seg_slot[a], st = g.seg_st[a], n = g.seg_n[a];
    const float* W = g.params + slot * g.P + g.woff;
    const int64_t kb = sp * g.kchunk;
    const int64_t ke = kb + g.kchunk < g.K ? kb + g.kchunk : g.K;
    float* C = g.C + sp * g.split_stride;
    for (int64_t m0 = static_cast<int64_t>(blockIdx.y) * kBM; m0 < n; m0 += static_cast<int64_t>(gridDim.y) * kBM) {
      float acc[2][4];
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int c = 0; c < 4; ++c) acc[i][c] = 0.0f;
      for (int64_t k0 = kb; k0 < ke; k0 += kBK) {
        for (int e = tid; e < kBM * kBK; e += kGemmThreads) {
          const int m = e / kBK, k = e % kBK;
          const int64_t gm = m0 + m, gk = k0 + k;
          As[m][k] = (gm < n && gk < ke) ? g.A[(st + gm) * g.lda + gk] : 0.0f;
        }
        if (g.w_n_contig) {
          for (int e = tid; e < kBK * kBN; e += kGemmThreads) {
            const int k = e / kBN, nn = e % kBN;
            const int64_t gk = k0 + k, gn = n0 + nn;
            Wsm[k][nn] = (gk < ke && gn < g.Nc) ? W[gk * g.sWk + gn * g.sWn] : 0.0f;
          }
        } else {
          for (int e = tid; e < kBK * kBN; e += kGemmThreads) {
            const int k = e % kBK, nn = e / kBK;
            const int64_t gk = k0 + k, gn = n0 + nn;
            Wsm[k][nn] = (gk < ke && gn < g.Nc) ? W[gk * g.sWk + gn * g.sWn] : 0.0f;
          }
        }
        __syncthreads();
#pragma unroll 8
        for (int k = 0; k < kBK; ++k) {
          const float a0 = As[ty][k], a1 = As[ty + 16][k];
#pragma unroll
          for (int c = 0; c < 4; ++c) {
            const float wv = Wsm[k][tx + 16 * c];
            acc[0][c] = fmaf(a0, wv, acc[0][c]);
            acc[1][c] = fmaf(a1, wv, acc[1][c]);
          }
        }
        __syncthreads();
      }
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const int64_t gm = m0 + ty + 16 * i;
        if (gm >= n) continue;
        const int64_t row = st + gm;
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          const int64_t gn = n0 + tx + 16 * c;
          if (gn >= g.Nc) continue;
          float v = acc[i][c];
          if (g.D) v += g.D[row * g.ldd + gn];
          C[row * g.ldc + gn] = v;
        }
      }
    }
  }
}

struct WgradArgs {
  const float* U;  // sorted rows [.., ldu], M columns used
  int64_t ldu;
  const float* V;  // sorted rows [.., ldv], Nc columns used
  int64_t ldv;
  int64_t M, Nc;
  float* grad;     // grad[a * P + goff + m * Nc + n]
  int64_t P, goff;
  double* norm_part;
  int64_t n_parts, part_base;
  const int* seg_st;
  const int* seg_n;
  const int* meta;
  int64_t A_max;
};

// grad_a[m, n] = sum over the rows q of segment a of U[q, m] * V[q, n].
__global__ void __launch_bounds__(kGemmThreads) wgrad_kernel(const WgradArgs g) {
  __shared__ float Us[kWK][kWM];
  __shared__ float Vs[kWK][kWN];
  __shared__ double s_red[32];
  const int tid = threadIdx.x, tx = tid & 15, ty = tid >> 4;
  const int n_active = g.meta[kMetaActive];
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kWM, n0 = static_cast<int64_t>(blockIdx.x) * kWN;
  for (int64_t a = blockIdx.z; a < g.A_max; a += gridDim.z) {
    if (a >= n_active) break;
    const int64_t st = g.seg_st[a], n = g.seg_n[a];
    float acc[4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int c = 0; c < 4; ++c) acc[i][c] = 0.0f;
    for (int64_t r0 = 0; r0 < n; r0 += kWK) {
      for (int e = tid; e < kWK * kWM; e += kGemmThreads) {
        const int k = e / kWM, mm = e % kWM;
        Us[k][mm] = (r0 + k < n && m0 + mm < g.M) ? g.U[(st + r0 + k) * g.ldu + m0 + mm] : 0.0f;
      }
      for (int e = tid; e < kWK * kWN; e += kGemmThreads) {
        const int k = e / kWN, nn = e % kWN;
        Vs[k][nn] = (r0 + k < n && n0 + nn < g.Nc) ? g.V[(st + r0 + k) * g.ldv + n0 + nn] : 0.0f;
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
    double sq = 0.0;
    float* out = g.grad + a * g.P + g.goff;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int64_t gm = m0 + ty + 16 * i;
      if (gm >= g.M) continue;
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const int64_t gn = n0 + tx + 16 * c;
        if (gn >= g.Nc) continue;
        out[gm * g.Nc + gn] = acc[i][c];
        sq += static_cast<double>(acc[i][c]) * static_cast<double>(acc[i][c]);
      }
    }
    sq = block_sum(sq, s_red);
    if (tid == 0)
      g.norm_part[a * g.n_parts + g.part_base + static_cast<int64_t>(blockIdx.y) * gridDim.x + blockIdx.x] = sq;
  }
}

// ------------------------------------------------------------------------------------------------
// Element-wise / row kernels
// ------------------------------------------------------------------------------------------------
struct RowCommon {
  const float* params;
  int64_t P, H, R, N;
  int splits;
  Ws w;
};

// Pb[p] = (U, Gp) = (sum of split partials) + (0, c); Act[p] = U * silu(Gp).
__global__ void __launch_bounds__(128) gate_fwd_kernel(const RowCommon rc, int64_t coff, float* __restrict__ Pb,
                                                       float* __restrict__ Act) {
  const int64_t p = blockIdx.x;
  if (p >= rc.w.meta[kMetaRows]) return;
  const int64_t slot = rc.w.seg_slot[rc.w.pos_seg[p]];
  const float* c = rc.params + slot * rc.P + coff;
  const int64_t R = rc.R, R2 = 2 * rc.R, sstride = rc.N * R2;
  for (int64_t r = threadIdx.x; r < R; r += blockDim.x) {
    float u = 0.0f, gp = 0.0f;
    for (int sp = 0; sp < rc.splits; ++sp) {
      u += rc.w.part[sp * sstride + p * R2 + r];
      gp += rc.w.part[sp * sstride + p * R2 + R + r];
    }
    gp += c[r];
    Pb[p * R2 + r] = u;
    Pb[p * R2 + R + r] = gp;
    Act[p * R + r] = u * siluf(gp);
  }
}

// dact = sum of split partials of G . B^T; dP = (dact * silu(Gp), dact * U * dsilu(Gp)).
__global__ void __launch_bounds__(128) gate_bwd_kernel(const RowCommon rc, const float* __restrict__ Pb) {
  const int64_t p = blockIdx.x;
  if (p >= rc.w.meta[kMetaRows]) return;
  const int64_t R = rc.R, R2 = 2 * rc.R, sstride = rc.N * R;
  for (int64_t r = threadIdx.x; r < R; r += blockDim.x) {
    float dact = 0.0f;
    for (int sp = 0; sp < rc.splits; ++sp) dact += rc.w.part[sp * sstride + p * R + r];
    const float u = Pb[p * R2 + r], gp = Pb[p * R2 + R + r];
    const float sg = sigmoidf_(gp);
    rc.w.dP[p * R2 + r] = dact * gp * sg;                                  // dact * silu(gp)
    rc.w.dP[p * R2 + R + r] = dact * u * (sg * (1.0f + gp * (1.0f - sg)));  // dact * u * dsilu(gp)
  }
}

// RMSNorm of x_L.  Forward op: writes y (out dtype) to the row's original position.  Train: loss of
// the row, dY = 2 (y - t) / (H n_slot), and the gradient G wrt x_L (RMSNorm backward).
struct NormArgs {
  RowCommon rc;
  const float* XL;
  int64_t goff;  // gamma offset in a slot
  float eps;
  void* out;     // forward op only
  DType out_dtype;
  int64_t out_stride;
  float* G;      // train only
};

__global__ void __launch_bounds__(kRowThreads) norm_kernel(const NormArgs na) {
  __shared__ double s_red[32];
  const RowCommon& rc = na.rc;
  const int64_t p = blockIdx.x;
  if (p >= rc.w.meta[kMetaRows]) return;
  const int64_t H = rc.H;
  const int a = rc.w.pos_seg[p];
  const int64_t slot = rc.w.seg_slot[a];
  const float* gamma = rc.params + slot * rc.P + na.goff;
  const float* x = na.XL + p * H;
  double ss = 0.0;
  for (int64_t h = threadIdx.x; h < H; h += kRowThreads) ss += static_cast<double>(x[h]) * static_cast<double>(x[h]);
  ss = block_sum(ss, s_red);
  const float r = 1.0f / sqrtf(static_cast<float>(ss / static_cast<double>(H)) + na.eps);
  if (na.out) {
    const int64_t i = rc.w.perm[p];
    void* o = static_cast<char*>(na.out) + i * na.out_stride * dtype_size(na.out_dtype);
    for (int64_t h = threadIdx.x; h < H; h += kRowThreads) store_from_float(o, na.out_dtype, h, x[h] * r * gamma[h]);
    return;
  }
  if (threadIdx.x == 0) rc.w.rinv[p] = r;
  const float* t = rc.w.T + p * H;
  float* dy = rc.w.dY + p * H;
  float* G = na.G + p * H;
  // loss = sum ||y - t||^2 / (n H) over the slot's rows; dy = 2 (y - t) / (n H); u = dy * gamma.
  const float inv = 2.0f / static_cast<float>(static_cast<int64_t>(rc.w.seg_n[a]) * H);
  double l = 0.0, ux = 0.0;
  for (int64_t h = threadIdx.x; h < H; h += kRowThreads) {
    const float xh = x[h] * r;
    const float d = xh * gamma[h] - t[h];
    l += static_cast<double>(d) * static_cast<double>(d);
    const float dyh = inv * d;
    dy[h] = dyh;
    const float u = dyh * gamma[h];
    G[h] = u;
    ux += static_cast<double>(u) * static_cast<double>(x[h]);
  }
  l = block_sum(l, s_red);
  ux = block_sum(ux, s_red);
  if (threadIdx.x == 0) rc.w.row_loss[p] = l;
  // RMSNorm backward: dx = r u - x (mean(u x) r^3)
  const float coef = static_cast<float>(ux / static_cast<double>(H)) * r * r * r;
  for (int64_t h = threadIdx.x; h < H; h += kRowThreads) G[h] = r * G[h] - x[h] * coef;
}

// Forward op: rows whose slot id is out of range (possible only for unchecked CUDA slot tensors)
// get NaN predictions instead of garbage.
__global__ void __launch_bounds__(kRowThreads) fill_unsorted_kernel(const int* __restrict__ inv, int64_t H, void* out,
                                                                    DType out_dtype, int64_t out_stride) {
  const int64_t i = blockIdx.x;
  if (inv[i] >= 0) return;
  void* o = static_cast<char*>(out) + i * out_stride * dtype_size(out_dtype);
  for (int64_t h = threadIdx.x; h < H; h += kRowThreads) store_from_float(o, out_dtype, h, NAN);
}

// dgamma_a[h] = sum over the segment's rows of dY * x_L * rinv.
__global__ void __launch_bounds__(kColThreads) gamma_grad_kernel(const RowCommon rc, const float* __restrict__ XL,
                                                                 int64_t goff, int64_t n_parts, int64_t A_max) {
  __shared__ double s_red[32];
  const int64_t h = static_cast<int64_t>(blockIdx.x) * kColThreads + threadIdx.x;
  const int n_active = rc.w.meta[kMetaActive];
  for (int64_t a = blockIdx.y; a < A_max; a += gridDim.y) {
    if (a >= n_active) break;
    const int64_t st = rc.w.seg_st[a], n = rc.w.seg_n[a];
    double sq = 0.0;
    if (h < rc.H) {
      float s = 0.0f;
      for (int64_t q = st; q < st + n; ++q) s = fmaf(rc.w.dY[q * rc.H + h], XL[q * rc.H + h] * rc.w.rinv[q], s);
      rc.w.grad[a * rc.P + goff + h] = s;
      sq = static_cast<double>(s) * static_cast<double>(s);
    }
    sq = block_sum(sq, s_red);
    if (threadIdx.x == 0) rc.w.norm_part[a * n_parts + blockIdx.x] = sq;
  }
}

// dc_a[r] = sum over the segment's rows of dGp.
__global__ void __launch_bounds__(kColThreads) dc_kernel(const RowCommon rc, int64_t coff, int64_t n_parts,
                                                         int64_t part_index, int64_t A_max) {
  __shared__ double s_red[32];
  const int n_active = rc.w.meta[kMetaActive];
  const int64_t R = rc.R, R2 = 2 * rc.R;
  for (int64_t a = blockIdx.x; a < A_max; a += gridDim.x) {
    if (a >= n_active) break;
    const int64_t st = rc.w.seg_st[a], n = rc.w.seg_n[a];
    double sq = 0.0;
    for (int64_t r = threadIdx.x; r < R; r += kColThreads) {
      float s = 0.0f;
      for (int64_t q = st; q < st + n; ++q) s += rc.w.dP[q * R2 + R + r];
      rc.w.grad[a * rc.P + coff + r] = s;
      sq += static_cast<double>(s) * static_cast<double>(s);
    }
    sq = block_sum(sq, s_red);
    if (threadIdx.x == 0) rc.w.norm_part[a * n_parts + part_index] = sq;
  }
}

// Per active slot: loss (mean over its rows of ||y - t||^2 / H), global gradient norm from the
// partials, clip coefficient, and whether the slot is updated (finite loss and norm).
__global__ void __launch_bounds__(kColThreads) slot_prep_kernel(const AdamConfig cfg, Ws w, int64_t H, int64_t n_parts,
                                                                int64_t A_max) {
  __shared__ double s_red[32];
  const int n_active = w.meta[kMetaActive];
  for (int64_t a = blockIdx.x; a < A_max; a += gridDim.x) {
    if (a >= n_active) break;
    const int64_t st = w.seg_st[a], n = w.seg_n[a];
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
    }
  }
}

// Clip + Adam (bias-corrected, step counter read on the device) for the updated slots.
__global__ void __launch_bounds__(kAdamThreads) adam_kernel(const AdamConfig cfg, DistillerBank bank, Ws w, int64_t P,
                                                            int64_t A_max) {
  const int n_active = w.meta[kMetaActive];
  for (int64_t a = blockIdx.y; a < A_max; a += gridDim.y) {
    if (a >= n_active) break;
    if (!w.slot_ok[a]) continue;
    const int64_t slot = w.seg_slot[a];
    const float coef = w.slot_coef[a];
    const double t = static_cast<double>(bank.step[slot] + 1);
    const float bc1 = static_cast<float>(1.0 - pow(static_cast<double>(cfg.beta1), t));
    const float bc2 = static_cast<float>(1.0 - pow(static_cast<double>(cfg.beta2), t));
    float* prm = bank.params + slot * P;
    float* m = bank.exp_avg + slot * P;
    float* v = bank.exp_avg_sq + slot * P;
    const float* g = w.grad + a * P;
    for (int64_t i = static_cast<int64_t>(blockIdx.x) * kAdamThreads + threadIdx.x; i < P;
         i += static_cast<int64_t>(gridDim.x) * kAdamThreads) {
      float pi = prm[i], mi = m[i], vi = v[i];
      adam_update(pi, mi, vi, g[i] * coef, cfg.lr, cfg.beta1, cfg.beta2, cfg.eps, bc1, bc2);
      prm[i] = pi;
      m[i] = mi;
      v[i] = vi;
    }
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

// ------------------------------------------------------------------------------------------------
// Host side
// ------------------------------------------------------------------------------------------------
bool shape_ok(const DistillerShape& sh) {
  return sh.H >= 1 && sh.R >= 1 && sh.L >= 1 && sh.H <= (1LL << 21) && sh.R <= (1LL << 20) && sh.norm_eps >= 0.0f;
}

unsigned cap_yz(int64_t n) { return static_cast<unsigned>(n < 1 ? 1 : (n > kMaxGridYZ ? kMaxGridYZ : n)); }

Status launch_rows_gemm(const Layout& l, const Ws& w, const float* params, int64_t P, const float* A, int64_t lda,
                        int64_t woff, int64_t sWk, int64_t sWn, int64_t K, int64_t Nc, float* C, int64_t ldc,
                        const float* D, int64_t ldd, bool split, cudaStream_t stream) {
  RowsGemmArgs g;
  g.A = A;
  g.lda = lda;
  g.params = params;
  g.P = P;
  g.woff = woff;
  g.sWk = sWk;
  g.sWn = sWn;
  g.w_n_contig = sWn == 1 ? 1 : 0;
  g.C = C;
  g.ldc = ldc;
  g.D = D;
  g.ldd = ldd;
  g.K = K;
  g.Nc = Nc;
  g.splits = split ? l.splits : 1;
  g.kchunk = split ? l.kchunk : K;
  g.split_stride = l.N * Nc;
  g.seg_slot = w.seg_slot;
  g.seg_st = w.seg_st;
  g.seg_n = w.seg_n;
  g.meta = w.meta;
  g.A_max = l.A;
  const dim3 grid(grid_dim(Nc, kBN), cap_yz(cdiv(l.N, kBM)), cap_yz(l.A * g.splits));
  rows_gemm_kernel<<<grid, kGemmThreads, 0, stream>>>(g);
  return launch_status();
}

Status launch_wgrad(const Layout& l, const Ws& w, const float* U, int64_t ldu, const float* V, int64_t ldv, int64_t M,
                    int64_t Nc, int64_t P, int64_t goff, int64_t part_base, cudaStream_t stream) {
  WgradArgs g;
  g.U = U;
  g.ldu = ldu;
  g.V = V;
  g.ldv = ldv;
  g.M = M;
  g.Nc = Nc;
  g.grad = w.grad;
  g.P = P;
  g.goff = goff;
  g.norm_part = w.norm_part;
  g.n_parts = l.n_parts;
  g.part_base = part_base;
  g.seg_st = w.seg_st;
  g.seg_n = w.seg_n;
  g.meta = w.meta;
  g.A_max = l.A;
  const dim3 grid(grid_dim(Nc, kWN), grid_dim(M, kWM), cap_yz(l.A));
  wgrad_kernel<<<grid, kGemmThreads, 0, stream>>>(g);
  return launch_status();
}

// Shared forward part: sort, gather, blocks.  Leaves x_L in X + L*N*H.
Status run_forward_blocks(const DistillerShape& sh, const float* params, int64_t S, const RowsIn& rows, const Layout& l,
                          const Ws& w, bool train, float* losses, double* stats, cudaStream_t stream) {
  const int64_t N = rows.N, H = sh.H, R = sh.R, P = sh.params_per_slot();
  if (train) {
    row_valid_kernel<<<static_cast<unsigned>(N), kRowThreads, 0, stream>>>(rows, H, w.valid);
    ESAMP_LAUNCH_TRY();
  }
  sort_kernel<<<1, kSortThreads, 0, stream>>>(rows.slot_ids, N, S, train ? w.valid : nullptr, w, losses, stats);
  ESAMP_LAUNCH_TRY();
  gather_kernel<<<static_cast<unsigned>(N), kRowThreads, 0, stream>>>(rows, H, w, train ? 1 : 0);
  ESAMP_LAUNCH_TRY();
  RowCommon rc{params, P, H, R, N, l.splits, w};
  for (int64_t j = 0; j < sh.L; ++j) {
    float* Xj = w.X + j * N * H;
    float* Xn = w.X + (j + 1) * N * H;
    float* Pb = w.Pb + j * N * 2 * R;
    float* Act = w.Act + j * N * R;
    // (U | Gp - c) = x_{j} . W1_j, split-K partials
    Status s = launch_rows_gemm(l, w, params, P, Xj, H, sh.off_W1(j), 2 * R, 1, H, 2 * R, w.part, 2 * R, nullptr, 0,
                                true, stream);
    if (s != Status::kOk) return s;
    gate_fwd_kernel<<<static_cast<unsigned>(N), 128, 0, stream>>>(rc, sh.off_c(j), Pb, Act);
    ESAMP_LAUNCH_TRY();
    // x_{j+1} = x_j + act . B_j
    s = launch_rows_gemm(l, w, params, P, Act, R, sh.off_B(j), H, 1, R, H, Xn, H, Xj, H, false, stream);
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

size_t distiller_cuda_forward_workspace_bytes(const DistillerShape& sh, int64_t S, int64_t N) {
  if (!shape_ok(sh) || S < 1 || N < 0) return 0;
  return make_layout(sh, S, N).fwd_bytes;
}

size_t distiller_cuda_workspace_bytes(const DistillerShape& sh, int64_t S, int64_t N) {
  if (!shape_ok(sh) || S < 1 || N < 0) return 0;
  return make_layout(sh, S, N).train_bytes;
}

Status distiller_forward_cuda(const DistillerShape& sh, const float* params, int64_t S, const RowsIn& rows, void* out,
                              DType out_dtype, int64_t out_stride, void* workspace, size_t workspace_bytes,
                              void* /*cublas_handle: unused, see the top of the file*/, cudaStream_t stream) {
  if (!shape_ok(sh) || S < 1 || S > INT_MAX || !params || !rows_ok(rows, false)) return Status::kInvalidArgument;
  if (rows.N == 0) return Status::kOk;
  if (!out || out_stride < sh.H) return Status::kInvalidArgument;
  const Layout l = make_layout(sh, S, rows.N);
  if (workspace_bytes < l.fwd_bytes) return Status::kWorkspaceTooSmall;
  if (!workspace || (reinterpret_cast<uintptr_t>(workspace) & 255u) != 0) return Status::kInvalidArgument;
  const Ws w = bind(l, workspace, false);
  Status s = run_forward_blocks(sh, params, S, rows, l, w, false, nullptr, nullptr, stream);
  if (s != Status::kOk) return s;
  NormArgs na;
  na.rc = RowCommon{params, sh.params_per_slot(), sh.H, sh.R, rows.N, l.splits, w};
  na.XL = w.X + sh.L * rows.N * sh.H;
  na.goff = sh.off_gamma();
  na.eps = sh.norm_eps;
  na.out = out;
  na.out_dtype = out_dtype;
  na.out_stride = out_stride;
  na.G = nullptr;
  norm_kernel<<<static_cast<unsigned>(rows.N), kRowThreads, 0, stream>>>(na);
  ESAMP_LAUNCH_TRY();
  fill_unsorted_kernel<<<static_cast<unsigned>(rows.N), kRowThreads, 0, stream>>>(w.inv, sh.H, out, out_dtype,
                                                                                   out_stride);
  return launch_status();
}

Status distiller_train_step_cuda(const DistillerShape& sh, const AdamConfig& cfg, DistillerBank bank,
                                 const RowsIn& rows, float* losses, double* stats, void* workspace,
                                 size_t workspace_bytes, void* /*cublas_handle: unused, see the top of the file*/,
                                 cudaStream_t stream) {
  const int64_t S = bank.S;
  if (!shape_ok(sh) || S < 1 || S > INT_MAX || !rows_ok(rows, true)) return Status::kInvalidArgument;
  if (!bank.params || !bank.exp_avg || !bank.exp_avg_sq || !bank.step || !losses || !stats)
    return Status::kInvalidArgument;
  const int64_t N = rows.N, H = sh.H, R = sh.R, L = sh.L, P = sh.params_per_slot();
  const Layout l = make_layout(sh, S, N);
  if (workspace_bytes < l.train_bytes) return Status::kWorkspaceTooSmall;
  if (!workspace || (reinterpret_cast<uintptr_t>(workspace) & 255u) != 0) return Status::kInvalidArgument;
  const Ws w = bind(l, workspace, true);
  if (N == 0) {  // no rows: every slot idle (losses NaN), nothing to count
    sort_kernel<<<1, kSortThreads, 0, stream>>>(rows.slot_ids, 0, S, nullptr, w, losses, nullptr);
    return launch_status();
  }
  Status s = run_forward_blocks(sh, bank.params, S, rows, l, w, true, losses, stats, stream);
  if (s != Status::kOk) return s;
  const RowCommon rc{bank.params, P, H, R, N, l.splits, w};

  // RMSNorm + loss + MSE gradient + RMSNorm backward -> G0 = dL/dx_L
  NormArgs na;
  na.rc = rc;
  na.XL = w.X + L * N * H;
  na.goff = sh.off_gamma();
  na.eps = sh.norm_eps;
  na.out = nullptr;
  na.out_dtype = DType::kF32;
  na.out_stride = 0;
  na.G = w.G0;
  norm_kernel<<<static_cast<unsigned>(N), kRowThreads, 0, stream>>>(na);
  ESAMP_LAUNCH_TRY();
  gamma_grad_kernel<<<dim3(grid_dim(H, kColThreads), cap_yz(l.A)), kColThreads, 0, stream>>>(rc, na.XL, sh.off_gamma(),
                                                                                            l.n_parts, l.A);
  ESAMP_LAUNCH_TRY();

  float* G = w.G0;
  float* Gn = w.G1;
  for (int64_t j = L - 1; j >= 0; --j) {
    const float* Xj = w.X + j * N * H;
    const float* Pb = w.Pb + j * N * 2 * R;
    const float* Act = w.Act + j * N * R;
    const int64_t base = l.parts_gamma + j * l.parts_layer;
    // dB_j = act^T . G
    s = launch_wgrad(l, w, Act, R, G, H, R, H, P, sh.off_B(j), base + 1, stream);
    if (s != Status::kOk) return s;
    // dact = G . B_j^T (split-K partials), then the gate backward
    s = launch_rows_gemm(l, w, bank.params, P, G, H, sh.off_B(j), 1, H, H, R, w.part, R, nullptr, 0, true, stream);
    if (s != Status::kOk) return s;
    gate_bwd_kernel<<<static_cast<unsigned>(N), 128, 0, stream>>>(rc, Pb);
    ESAMP_LAUNCH_TRY();
    dc_kernel<<<cap_yz(l.A), kColThreads, 0, stream>>>(rc, sh.off_c(j), l.n_parts, base, l.A);
    ESAMP_LAUNCH_TRY();
    // dW1_j = x_j^T . dP
    s = launch_wgrad(l, w, Xj, H, w.dP, 2 * R, H, 2 * R, P, sh.off_W1(j), base + 1 + l.parts_dB, stream);
    if (s != Status::kOk) return s;
    if (j > 0) {  // dx_j = G + dP . W1_j^T
      s = launch_rows_gemm(l, w, bank.params, P, w.dP, 2 * R, sh.off_W1(j), 1, 2 * R, 2 * R, H, Gn, H, G, H, false,
                           stream);
      if (s != Status::kOk) return s;
      float* tmp = G;
      G = Gn;
      Gn = tmp;
    }
  }

  slot_prep_kernel<<<cap_yz(l.A), kColThreads, 0, stream>>>(cfg, w, H, l.n_parts, l.A);
  ESAMP_LAUNCH_TRY();
  const dim3 agrid(grid_dim(P, kAdamThreads * 4, 1 << 16), cap_yz(l.A));
  adam_kernel<<<agrid, kAdamThreads, 0, stream>>>(cfg, bank, w, P, l.A);
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
  const dim3 grid(grid_dim(P, 256, 1 << 16), cap_yz(n));
  reset_kernel<<<grid, 256, 0, stream>>>(sh, bank, slots, n, seed, gamma_init);
  return launch_status();
}

}  // namespace esamp
