// The dense path of reweight / reweight_logits (rows with beta > 0 and a large candidate set): the list of
// dense rows, then either the tensor-core GEMM d = pred . W^T with the fused mix / Gumbel-max / logsumexp
// epilogue ("fused"), or one cuBLAS GEMM into a float32 workspace D followed by a streaming pass over the
// dense rows ("cublas"), and the per-row merge of the token tiles.  Both variants apply the same per-token
// step (dense_tokens4), so they draw the same Gumbel keys and mix identically.  The design is described at
// the top of reweight.cu and in docs/architecture.md.
#include <cublas_v2.h>
#include <mma.h>

#include "cublas_gemm.cuh"
#include "reweight_common.cuh"

namespace esamp {
namespace {

// ------------------------------------------------------------------------------------------------
// Dense kernels
// ------------------------------------------------------------------------------------------------
__global__ void __launch_bounds__(1024) dense_list_kernel(const RwRowInfo* __restrict__ info, int64_t B,
                                                          int* __restrict__ rows, int* __restrict__ meta) {
  __shared__ int s_scan[33];
  int run = 0;
  for (int64_t base = 0; base < B; base += 1024) {
    const int64_t r = base + threadIdx.x;
    const int d = r < B && info[r].dense ? 1 : 0;
    int total;
    const int ex = block_exclusive_scan(d, s_scan, &total);
    if (d) rows[run + ex] = static_cast<int>(r);
    run += total;
  }
  if (threadIdx.x == 0) meta[0] = run;
}



// ------------------------------------------------------------------------------------------------
// The per-token step shared by both variants
// ------------------------------------------------------------------------------------------------
struct DenseRow {
  RwRowInfo in;
  float T, beta;
  uint64_t seed, step;
  const void* lrow;
  float* orow;
};

__device__ __forceinline__ DenseRow dense_row(const DenseArgs& g, int64_t r) {
  const ReweightProblem& pr = g.pr;
  DenseRow w;
  w.in = g.info[r];
  w.T = pr.p.temperature[r];
  float beta = pr.p.beta[r];
  if (!(beta > 0.0f) || !(beta <= FLT_MAX)) beta = 0.0f;
  w.beta = beta;
  w.seed = g.kout ? 0ull : static_cast<uint64_t>(pr.p.seed[r]);
  w.step = g.kout ? 0ull : static_cast<uint64_t>(pr.p.step[r]);
  w.lrow = static_cast<const char*>(pr.logits) + r * pr.logits_stride * dtype_size(pr.logits_dtype);
  w.orow = g.kout ? g.out + r * g.out_stride : nullptr;
  return w;
}

// Logits vb .. vb + 3 of a row (NaN past V).
__device__ __forceinline__ void dense_logits4(const DenseArgs& g, const void* lrow, int64_t vb, float* l) {
  const ReweightProblem& pr = g.pr;
  const int64_t V = pr.V;
  if (g.l_vec && vb + 4 <= V && pr.logits_dtype == DType::kF32) {
    const float4 t = *reinterpret_cast<const float4*>(static_cast<const float*>(lrow) + vb);
    l[0] = t.x;
    l[1] = t.y;
    l[2] = t.z;
    l[3] = t.w;
  } else if (g.l_vec && vb + 4 <= V) {  // 4 16-bit logits: one 8-byte load
    const uint2 t = *reinterpret_cast<const uint2*>(static_cast<const uint16_t*>(lrow) + vb);
    const uint16_t h[4] = {static_cast<uint16_t>(t.x & 0xffffu), static_cast<uint16_t>(t.x >> 16),
                           static_cast<uint16_t>(t.y & 0xffffu), static_cast<uint16_t>(t.y >> 16)};
#pragma unroll
    for (int e = 0; e < 4; ++e)
      l[e] = pr.logits_dtype == DType::kBF16 ? bf16_bits_to_float(h[e]) : f16_bits_to_float(h[e]);
  } else {
#pragma unroll
    for (int e = 0; e < 4; ++e) l[e] = vb + e < V ? load_as_float(lrow, pr.logits_dtype, vb + e) : NAN;
  }
}

// Tokens vb .. vb + 3 (vb % 4 == 0, vb < V) of a dense row with logits l and dot products d = pred . W_v (no
// bias): candidacy from the row kernel's thresholds, the z arg max, bias, mix; then reweight_logits writes m
// (-inf off the candidate set) and reweight adds the logsumexp terms and the Gumbel keys (the Philox words of
// the 4 ids from one call, keys only evaluated when they can still win: exact, as on the CPU).
__device__ __forceinline__ void dense_tokens4(const DenseArgs& g, const DenseRow& w, int64_t vb, const float* l,
                                              const float* d, SampleState& st) {
  const ReweightProblem& pr = g.pr;
  const int64_t V = pr.V;
  float mm[4];
  bool cand[4];
  unsigned any = 0;
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    const float z = zval(l[e], w.T);
    cand[e] = vb + e < V && z > -INFINITY && z >= w.in.theta && (!w.in.topp || expf(z - w.in.zmax) >= w.in.wtau);
    mm[e] = -INFINITY;
    if (cand[e]) {
      st.add_z(z, static_cast<int>(vb + e));
      float de = d[e];
      if (pr.bias) de = __fadd_rn(de, load_as_float(pr.bias, pr.bias_dtype, vb + e));
      mm[e] = mix(l[e], de, w.beta, w.T);
      any |= mm[e] != -INFINITY ? 1u : 0u;
    }
  }
  if (g.kout) {
    if (g.o_vec && vb + 4 <= V) {
      *reinterpret_cast<float4*>(w.orow + vb) = make_float4(cand[0] ? mm[0] : -INFINITY, cand[1] ? mm[1] : -INFINITY,
                                                            cand[2] ? mm[2] : -INFINITY, cand[3] ? mm[3] : -INFINITY);
    } else {
#pragma unroll
      for (int e = 0; e < 4; ++e)
        if (vb + e < V) w.orow[vb + e] = cand[e] ? mm[e] : -INFINITY;
    }
    return;
  }
  if (!any) return;
  bool need = st.id < 0;
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    if (mm[e] == -INFINITY) continue;
    st.add_lse(mm[e]);
    need = need || mm[e] + kGumbelBound >= st.key;
  }
  if (!need) return;
  const U32x4 wd = gumbel_words(w.seed, w.step, static_cast<uint32_t>(static_cast<uint64_t>(vb) >> 2));
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    if (mm[e] == -INFINITY) continue;
    if (!(mm[e] + kGumbelBound >= st.key) && st.id >= 0) continue;
    st.add_key(mm[e] + gumbel_from_word(wd.v[e]), mm[e], static_cast<int>(vb + e));
  }
}

__device__ __forceinline__ RwDensePartial to_partial(const SampleState& st) {
  RwDensePartial pt;
  pt.key = st.key;
  pt.m = st.m;
  pt.id = st.id;
  pt.zb = st.zb;
  pt.zid = st.zid;
  pt.mx = st.mx;
  pt.s = st.s;
  return pt;
}

namespace wm = nvcuda::wmma;

// kMode 0: bf16 x bf16, 1: fp16 x fp16 (pred and W of that dtype), 2: TF32 (pred split hi + lo; W split
// when fp32).  Work item = (64 dense rows, 128 tokens).  8 warps: warp (wm_, wn) computes rows
// 16 wm_ .. +16 and tokens 64 wn .. +64 (4 accumulator fragments).
template <int kMode>
struct DenseTraits;
template <>
struct DenseTraits<0> {
  using E = __nv_bfloat16;
  static constexpr int BK = 32, KS = 16, LD = BK + 8;
};
template <>
struct DenseTraits<1> {
  using E = __half;
  static constexpr int BK = 32, KS = 16, LD = BK + 8;
};
template <>
struct DenseTraits<2> {
  using E = float;
  static constexpr int BK = 16, KS = 8, LD = BK + 4;
};

constexpr int kDLD = kDenseBN + 4;  // epilogue tile row stride (floats)

template <int kMode>
struct DenseSmem {
  using E = typename DenseTraits<kMode>::E;
  static constexpr int LD = DenseTraits<kMode>::LD;
  union {
    struct {
      E A[kDenseBM][LD];
      E B[kDenseBN][LD];
    } s;
    float D[kDenseBM][kDLD];
  };
};

// Loads 8 consecutive elements (k .. k+7 of a row) as raw 16-bit bits (kMode 0/1) or float (kMode 2).
__device__ __forceinline__ void load8_f(const void* row, DType dt, int64_t k, int64_t H, bool vec, float* o) {
  if (vec && k + 8 <= H) {
    if (dt == DType::kF32) {
      const float4 a = *reinterpret_cast<const float4*>(static_cast<const float*>(row) + k);
      const float4 b = *reinterpret_cast<const float4*>(static_cast<const float*>(row) + k + 4);
      o[0] = a.x; o[1] = a.y; o[2] = a.z; o[3] = a.w; o[4] = b.x; o[5] = b.y; o[6] = b.z; o[7] = b.w;
    } else if (dt == DType::kBF16) {
      DT<DType::kBF16>::load_vec(row, k, o);
    } else {
      DT<DType::kF16>::load_vec(row, k, o);
    }
    return;
  }
#pragma unroll
  for (int e = 0; e < 8; ++e) o[e] = k + e < H ? load_as_float(row, dt, k + e) : 0.0f;
}
__device__ __forceinline__ uint4 load8_bits(const void* row, int64_t k, int64_t H, bool vec) {
  if (vec && k + 8 <= H) return *reinterpret_cast<const uint4*>(static_cast<const uint16_t*>(row) + k);
  uint16_t t[8];
#pragma unroll
  for (int e = 0; e < 8; ++e) t[e] = k + e < H ? static_cast<const uint16_t*>(row)[k + e] : static_cast<uint16_t>(0);
  uint4 q;
  q.x = t[0] | (static_cast<uint32_t>(t[1]) << 16);
  q.y = t[2] | (static_cast<uint32_t>(t[3]) << 16);
  q.z = t[4] | (static_cast<uint32_t>(t[5]) << 16);
  q.w = t[6] | (static_cast<uint32_t>(t[7]) << 16);
  return q;
}

template <int kMode>
__global__ void __launch_bounds__(kDenseThreads) dense_kernel(const DenseArgs g) {
  using Tr = DenseTraits<kMode>;
  using E = typename Tr::E;
  constexpr int BK = Tr::BK, KS = Tr::KS, LD = Tr::LD;
  __shared__ __align__(128) DenseSmem<kMode> sm;
  const int tid = threadIdx.x, wid = tid >> 5, lane = tid & 31;
  const int wm_ = wid >> 1, wn = wid & 1;
  const ReweightProblem& pr = g.pr;
  const int64_t V = pr.V, H = pr.H;
  const int n_dense = g.meta[0];
  const int n_rt = (n_dense + kDenseBM - 1) / kDenseBM;
  const int64_t n_items = static_cast<int64_t>(n_rt) * g.n_vtiles;
  const int64_t wes = dtype_size(pr.weight_dtype), pes = dtype_size(pr.pred_dtype);
  // load assignment: B tile row tid / 2, k-half tid % 2 (16 or 8 elements); A tile row tid / 4, k-quarter
  const int brow = tid >> 1, bk = (tid & 1) * (BK / 2);
  const int arow = tid >> 2, ak = (tid & 3) * (BK / 4);
  for (int64_t item = blockIdx.x; item < n_items; item += gridDim.x) {
    const int rt = static_cast<int>(item % n_rt);
    const int64_t vt = item / n_rt;
    const int r0 = rt * kDenseBM;
    const int nr = n_dense - r0 < kDenseBM ? n_dense - r0 : kDenseBM;
    const int64_t v0 = vt * kDenseBN;
    const void* wrow = nullptr;
    if (v0 + brow < V) wrow = static_cast<const char*>(pr.weight) + (v0 + brow) * pr.weight_stride * wes;
    const void* prow = nullptr;
    if (arow < nr)
      prow = static_cast<const char*>(pr.pred) + static_cast<int64_t>(g.rows[r0 + arow]) * pr.pred_stride * pes;

    // fragments
    using FragC = wm::fragment<wm::accumulator, 16, 16, KS, float>;
    FragC acc[4];
#pragma unroll
    for (int f = 0; f < 4; ++f) wm::fill_fragment(acc[f], 0.0f);
    const bool active = wm_ * 16 < nr;

    // register staging of the next K tile
    float bf[kMode == 2 ? 8 : 1], af[kMode == 2 ? 4 : 1];
    uint4 bq[2], aq;
    auto fetch = [&](int64_t k0) {
      if constexpr (kMode == 2) {
        if (wrow) {
          load8_f(wrow, pr.weight_dtype, k0 + bk, H, g.w_vec != 0, bf);
        } else {
#pragma unroll
          for (int e = 0; e < 8; ++e) bf[e] = 0.0f;
        }
#pragma unroll
        for (int e = 0; e < 4; ++e)
          af[e] = (prow && k0 + ak + e < H) ? load_as_float(prow, pr.pred_dtype, k0 + ak + e) : 0.0f;
      } else {
        const uint4 z = make_uint4(0u, 0u, 0u, 0u);
        bq[0] = wrow ? load8_bits(wrow, k0 + bk, H, g.w_vec != 0) : z;
        bq[1] = wrow ? load8_bits(wrow, k0 + bk + 8, H, g.w_vec != 0) : z;
        aq = prow ? load8_bits(prow, k0 + ak, H, g.p_vec != 0) : z;
      }
    };
    auto stash = [&]() {
      if constexpr (kMode == 2) {
#pragma unroll
        for (int e = 0; e < 8; ++e) sm.s.B[brow][bk + e] = bf[e];
#pragma unroll
        for (int e = 0; e < 4; ++e) sm.s.A[arow][ak + e] = af[e];
      } else {
        *reinterpret_cast<uint4*>(&sm.s.B[brow][bk]) = bq[0];
        *reinterpret_cast<uint4*>(&sm.s.B[brow][bk + 8]) = bq[1];
        *reinterpret_cast<uint4*>(&sm.s.A[arow][ak]) = aq;
      }
    };
    fetch(0);
    for (int64_t k0 = 0; k0 < H; k0 += BK) {
      __syncthreads();  // the previous tile (or item) is consumed
      stash();
      __syncthreads();
      if (k0 + BK < H) fetch(k0 + BK);  // in flight during the MMAs
      if (active) {
#pragma unroll
        for (int kk = 0; kk < BK; kk += KS) {
          if constexpr (kMode == 2) {
            wm::fragment<wm::matrix_a, 16, 16, 8, wm::precision::tf32, wm::row_major> a, alo;
            wm::load_matrix_sync(a, &sm.s.A[wm_ * 16][kk], LD);
#pragma unroll
            for (int i = 0; i < a.num_elements; ++i) {
              const float x = a.x[i];
              const float hi = wm::__float_to_tf32(x);
              a.x[i] = hi;
              alo.x[i] = wm::__float_to_tf32(x - hi);
            }
#pragma unroll
            for (int f = 0; f < 4; ++f) {
              wm::fragment<wm::matrix_b, 16, 16, 8, wm::precision::tf32, wm::col_major> b, blo;
              wm::load_matrix_sync(b, &sm.s.B[wn * 64 + f * 16][kk], LD);
              const bool wsplit = pr.weight_dtype == DType::kF32;
#pragma unroll
              for (int i = 0; i < b.num_elements; ++i) {
                const float x = b.x[i];
                const float hi = wm::__float_to_tf32(x);
                b.x[i] = hi;
                blo.x[i] = wsplit ? wm::__float_to_tf32(x - hi) : 0.0f;
              }
              wm::mma_sync(acc[f], alo, b, acc[f]);
              if (wsplit) wm::mma_sync(acc[f], a, blo, acc[f]);
              wm::mma_sync(acc[f], a, b, acc[f]);
            }
          } else {
            wm::fragment<wm::matrix_a, 16, 16, 16, E, wm::row_major> a;
            wm::load_matrix_sync(a, &sm.s.A[wm_ * 16][kk], LD);
#pragma unroll
            for (int f = 0; f < 4; ++f) {
              wm::fragment<wm::matrix_b, 16, 16, 16, E, wm::col_major> b;
              wm::load_matrix_sync(b, &sm.s.B[wn * 64 + f * 16][kk], LD);
              wm::mma_sync(acc[f], a, b, acc[f]);
            }
          }
        }
      }
    }
    __syncthreads();  // the stage buffers become the epilogue tile
    if (active) {
#pragma unroll
      for (int f = 0; f < 4; ++f)
        wm::store_matrix_sync(&sm.D[wm_ * 16][wn * 64 + f * 16], acc[f], kDLD, wm::mem_row_major);
    }
    __syncthreads();

    // ---- epilogue: thread -> row i = tid / 4, tokens c0 .. c0 + 31 of the tile
    const int i = tid >> 2, c0 = (tid & 3) * 32;
    SampleState st;
    st.init();
    if (i < nr) {
      const DenseRow w = dense_row(g, g.rows[r0 + i]);
#pragma unroll 1
      for (int q = 0; q < 8; ++q) {
        const int64_t vb = v0 + c0 + 4 * q;
        if (vb >= V) break;
        float l[4], d[4];
        dense_logits4(g, w.lrow, vb, l);
#pragma unroll
        for (int e = 0; e < 4; ++e) d[e] = sm.D[i][c0 + 4 * q + e];
        dense_tokens4(g, w, vb, l, d, st);
      }
    }
    if (!g.kout) {
      // the 4 threads of a row are consecutive lanes: merge them (fixed pattern), lane 4i writes
      st.shfl_merge(1);
      st.shfl_merge(2);
      if ((lane & 3) == 0 && i < nr) g.partials[static_cast<int64_t>(r0 + i) * g.n_vtiles + vt] = to_partial(st);
    }
  }
}

// ------------------------------------------------------------------------------------------------
// cuBLAS variant: prediction copy (compact rows / exact widening to float32) and the streaming pass
// ------------------------------------------------------------------------------------------------
__global__ void __launch_bounds__(256) dense_pcopy_kernel(const void* __restrict__ pred, DType pdt, int64_t pstride,
                                                          int64_t rows, int64_t H, DType odt, void* __restrict__ out) {
  const int64_t n = rows * H;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / H, k = i - r * H;
    const int64_t src = r * pstride + k;
    if (odt == DType::kF32) {
      static_cast<float*>(out)[i] = load_as_float(pred, pdt, src);  // exact for every input dtype
    } else {
      static_cast<uint16_t*>(out)[i] = static_cast<const uint16_t*>(pred)[src];  // same 16-bit dtype: the bits
    }
  }
}

// One warp per (dense row j, 1024-token tile t): 8 steps of 128 tokens (4 per lane, coalesced 16-byte loads of
// D), the per-token step of the fused epilogue, then a fixed-order warp merge into partials[j, t].
__global__ void __launch_bounds__(kDenseStreamThreads) dense_stream_kernel(const DenseArgs g) {
  const int lane = threadIdx.x & 31;
  const int64_t V = g.pr.V;
  const int n_dense = g.meta[0];
  const int64_t n_items = static_cast<int64_t>(n_dense) * g.n_vtiles;
  const int64_t wpb = blockDim.x >> 5;
  for (int64_t item = static_cast<int64_t>(blockIdx.x) * wpb + (threadIdx.x >> 5); item < n_items;
       item += static_cast<int64_t>(gridDim.x) * wpb) {
    const int j = static_cast<int>(item / g.n_vtiles);
    const int64_t t = item - static_cast<int64_t>(j) * g.n_vtiles;
    const int64_t r = g.rows[j];
    const DenseRow w = dense_row(g, r);
    const float* drow = g.d + r * g.d_stride;
    SampleState st;
    st.init();
    const int64_t v0 = t * kDenseStreamTile;
#pragma unroll 1
    for (int q = 0; q < kDenseStreamTile / 128; ++q) {
      const int64_t vb = v0 + q * 128 + lane * 4;
      if (vb >= V) break;
      float l[4], d[4];
      dense_logits4(g, w.lrow, vb, l);
      // D rows are 16-byte aligned with a stride that is a multiple of 4 >= V: vb .. vb + 3 are in the row
      const float4 dq = __ldcs(reinterpret_cast<const float4*>(drow + vb));
      d[0] = dq.x;
      d[1] = dq.y;
      d[2] = dq.z;
      d[3] = dq.w;
      dense_tokens4(g, w, vb, l, d, st);
    }
    if (!g.kout) {
#pragma unroll
      for (int o = 1; o < 32; o <<= 1) st.shfl_merge(o);
      if (lane == 0) g.partials[static_cast<int64_t>(j) * g.n_vtiles + t] = to_partial(st);
    }
  }
}

cudaDataType_t cuda_dtype(DType d) {
  return d == DType::kF32 ? CUDA_R_32F : (d == DType::kBF16 ? CUDA_R_16BF : CUDA_R_16F);
}

// Merges the token tiles of each dense row (in tile order per thread, then threads in a fixed order).
__global__ void __launch_bounds__(256) dense_finish_kernel(const int* __restrict__ rows, const int* __restrict__ meta,
                                                           const RwDensePartial* __restrict__ partials,
                                                           int64_t n_vtiles, int64_t* __restrict__ tokens,
                                                           float* __restrict__ logprobs) {
  __shared__ SampleState s_w[8];
  const int n_dense = meta[0];
  const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
  for (int j = blockIdx.x; j < n_dense; j += gridDim.x) {
    SampleState st;
    st.init();
    for (int64_t t = threadIdx.x; t < n_vtiles; t += blockDim.x) {
      const RwDensePartial p = partials[static_cast<int64_t>(j) * n_vtiles + t];
      st.merge(p.key, p.m, p.id, p.zb, p.zid, p.mx, p.s);
    }
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) st.shfl_merge(o);
    if (lane == 0) s_w[wid] = st;
    __syncthreads();
    if (threadIdx.x == 0) {
      SampleState b = s_w[0];
      for (int w = 1; w < static_cast<int>(blockDim.x >> 5); ++w) b.merge(s_w[w]);
      const int64_t r = rows[j];
      if (b.id < 0) {
        tokens[r] = b.zid < 0 ? 0 : b.zid;
        logprobs[r] = -INFINITY;
      } else {
        tokens[r] = b.id;
        logprobs[r] = static_cast<float>(static_cast<double>(b.m) - static_cast<double>(b.mx) - log(b.s));
      }
    }
    __syncthreads();
  }
}

// The first and last launches of both dense variants: the list of dense rows, and (reweight only: reweight_logits
// writes m in the tile pass) the merge of each dense row's tiles in tile order.
Status launch_list(const DenseArgs& g, int64_t B, cudaStream_t stream) {
  dense_list_kernel<<<1, 1024, 0, stream>>>(g.info, B, const_cast<int*>(g.rows), const_cast<int*>(g.meta));
  ESAMP_LAUNCH_TRY();
  return Status::kOk;
}

Status launch_finish(const DenseArgs& g, int64_t B, int64_t* tokens, float* logprobs, cudaStream_t stream) {
  if (g.kout) return Status::kOk;
  dense_finish_kernel<<<persistent_grid(B, 4), 256, 0, stream>>>(g.rows, g.meta, g.partials, g.n_vtiles, tokens,
                                                                logprobs);
  ESAMP_LAUNCH_TRY();
  return Status::kOk;
}

}  // namespace

namespace rw_detail {
Status launch_dense(const DenseArgs& g, int64_t B, unsigned grid, int64_t* tokens, float* logprobs,
                    cudaStream_t stream) {
  if (const Status s = launch_list(g, B, stream); s != Status::kOk) return s;
  const ReweightProblem& pr = g.pr;
  if (pr.pred_dtype == DType::kBF16 && pr.weight_dtype == DType::kBF16) {
    dense_kernel<0><<<grid, kDenseThreads, 0, stream>>>(g);
  } else if (pr.pred_dtype == DType::kF16 && pr.weight_dtype == DType::kF16) {
    dense_kernel<1><<<grid, kDenseThreads, 0, stream>>>(g);
  } else {
    dense_kernel<2><<<grid, kDenseThreads, 0, stream>>>(g);
  }
  ESAMP_LAUNCH_TRY();
  return launch_finish(g, B, tokens, logprobs, stream);
}

Status launch_dense_cublas(const DenseArgs& g, const DenseGemmPlan& dg, void* cublas_handle, float* d, void* pcopy,
                           int64_t B, unsigned stream_grid, int64_t* tokens, float* logprobs, cudaStream_t stream) {
  const ReweightProblem& pr = g.pr;
  if (!dg.cublas || !cublas_handle || !d || (dg.copy_pred && !pcopy)) return Status::kInvalidArgument;
  if (const Status s = launch_list(g, B, stream); s != Status::kOk) return s;
  const void* P = pr.pred;
  if (dg.copy_pred) {
    dense_pcopy_kernel<<<persistent_grid((dg.d_rows * pr.H + 255) / 256, 4), 256, 0, stream>>>(
        pr.pred, pr.pred_dtype, pr.B == 1 ? 0 : pr.pred_stride, dg.d_rows, pr.H, dg.op_dtype, pcopy);
    ESAMP_LAUNCH_TRY();
    P = pcopy;
  }
  // Row-major D[r, v] = P[r] . W[v] in chunks of rows x vocabulary, by the row-major GEMM of cublas_gemm.cuh.
  cublasHandle_t h = static_cast<cublasHandle_t>(cublas_handle);
  const cudaDataType_t t = cuda_dtype(dg.op_dtype);
  const cublasComputeType_t ct = dg.pedantic ? CUBLAS_COMPUTE_32F_PEDANTIC : CUBLAS_COMPUTE_32F;
  const int64_t es = dtype_size(dg.op_dtype), ws = pr.weight_stride;
  for (int64_t b0 = 0; b0 < dg.d_rows; b0 += dg.b_chunk) {
    const int64_t nb = dg.d_rows - b0 < dg.b_chunk ? dg.d_rows - b0 : dg.b_chunk;
    for (int64_t v0 = 0; v0 < pr.V; v0 += dg.v_chunk) {
      const int64_t nv = pr.V - v0 < dg.v_chunk ? pr.V - v0 : dg.v_chunk;
      const void* A = static_cast<const char*>(pr.weight) + v0 * ws * es;
      const void* Bp = static_cast<const char*>(P) + b0 * dg.ldp * es;
      float* C = d + b0 * dg.ldd + v0;
      const cublasStatus_t cs = cuda_detail::gemm_rm(h, false, true, nb, nv, pr.H, Bp, t, dg.ldp, A, t, ws, 0.0f, C,
                                                     dg.ldd, ct);
      if (cs != CUBLAS_STATUS_SUCCESS) return Status::kCublasError;
    }
  }
  dense_stream_kernel<<<stream_grid, kDenseStreamThreads, 0, stream>>>(g);
  ESAMP_LAUNCH_TRY();
  return launch_finish(g, B, tokens, logprobs, stream);
}
}  // namespace rw_detail
}  // namespace esamp
