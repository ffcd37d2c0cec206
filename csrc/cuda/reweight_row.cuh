// reweight_row.cuh -- the reweight row kernel (filters, sparse / beta = 0 candidates, sampling), a
// template over the logits dtype; each reweight_row_<dtype>.cu instantiates one dtype (parallel builds).
// The design is described at the top of reweight.cu.
#pragma once
#include "reweight_common.cuh"

namespace esamp {
namespace {

// ------------------------------------------------------------------------------------------------
// Shared memory of the row kernel (dynamic); the prediction row follows it when staged in smem.
// ------------------------------------------------------------------------------------------------
struct RowSmem {
  float lz[kListCap];   // gathered candidates (z, id), this block's part, in id order
  int lid[kListCap];
  union {
    struct {
      unsigned cnt[kBins];
      unsigned long long mass[kBins];
    } h;
    struct {
      uint16_t list[kChunkList];
      float m[kChunkList];
    } c;
  } u;
};

struct SmallSmem {
  int scan[33];
  unsigned long long scan64[33];
  float redf[32];
  int redi[33];
  double redd[32];
  // cluster-visible per-block values
  float bv;
  int bi;
  int nvalid;   // pass 1: this block's count of finite z
  int lcount;   // entries of the gathered list in this block
  unsigned long long u64v;
  unsigned sel_digit;
  unsigned long long sel_above;
  unsigned sel_cnt_above, sel_cnt_bin;
  SampleState wst[kWarps];
  SampleState bst;
};



// Warp-aggregated histogram add (integers: the result does not depend on the order).
template <bool kMass>
__device__ __forceinline__ void hist_add(RowSmem& sm, bool act, unsigned bin, unsigned long long w) {
  const unsigned am = __ballot_sync(kFullMask, act);
  if (!act) return;
  const int lane = threadIdx.x & 31;
  const unsigned peers = __match_any_sync(am, bin);
  const int leader = __ffs(peers) - 1;
  if (kMass) {
    unsigned long long sum = 0;
    for (unsigned mm = peers; mm; mm &= mm - 1) sum += __shfl_sync(peers, w, __ffs(mm) - 1);
    if (lane == leader) atomicAdd(&sm.u.h.mass[bin], sum);
  }
  if (lane == leader) atomicAdd(&sm.u.h.cnt[bin], static_cast<unsigned>(__popc(peers)));
}

__device__ __forceinline__ void hist_clear(RowSmem& sm, bool mass) {
  for (int b = threadIdx.x; b < kBins; b += kThreads) {
    sm.u.h.cnt[b] = 0u;
    if (mass) sm.u.h.mass[b] = 0ull;
  }
}

__device__ __forceinline__ unsigned digit_of(uint32_t key, int level) {
  return level == 0 ? (key >> 21) : (level == 1 ? ((key >> 10) & 0x7ffu) : (key & 0x3ffu));
}
__device__ __forceinline__ uint32_t level_mask(int level) {  // bits fixed after `level` levels
  return level == 0 ? 0u : (level == 1 ? 0xffe00000u : 0xfffffc00u);
}

// Selects the digit of the cluster-wide histogram where the weight from the top reaches `need` (>= 1,
// <= total).  Thread t owns kBinsPerThread consecutive bins counted from the top (descending), so the
// exclusive prefix over threads is the weight above.  Writes sel_digit, sel_above (weight above the digit), sel_cnt_above (count above)
// and sel_cnt_bin (count in the digit's bin) to smem.  Every block of the cluster computes the same.
template <bool kMass>
__device__ void select_digit(const Cl& cl, RowSmem& sm, SmallSmem& ss, unsigned long long need) {
  const int tid = threadIdx.x;
  unsigned long long w[kBinsPerThread];
  unsigned c[kBinsPerThread];
#pragma unroll
  for (int k = 0; k < kBinsPerThread; ++k) {
    const int b = kBins - 1 - kBinsPerThread * tid - k;
    unsigned long long wk = 0;
    unsigned ck = 0;
    for (int r = 0; r < cl.n; ++r) {
      RowSmem* o = cl.at(&sm, r);
      ck += o->u.h.cnt[b];
      if (kMass) wk += o->u.h.mass[b];
    }
    c[k] = ck;
    w[k] = kMass ? wk : static_cast<unsigned long long>(ck);
  }
  unsigned long long s = 0;
  int cs = 0;
#pragma unroll
  for (int k = 0; k < kBinsPerThread; ++k) {
    s += w[k];
    cs += static_cast<int>(c[k]);
  }
  unsigned long long tot;
  int ctot;
  if (tid == 0) {  // defaults, unreachable while the caller's invariant (1 <= need <= total) holds
    ss.sel_digit = 0u;
    ss.sel_above = 0ull;
    ss.sel_cnt_above = 0u;
    ss.sel_cnt_bin = 0u;
  }
  const unsigned long long ex = block_exclusive_scan_u64(s, ss.scan64, &tot);
  const int cex = block_exclusive_scan(cs, ss.scan, &ctot);
  if (ex < need && ex + s >= need) {
    unsigned long long acc = ex;
    unsigned cacc = static_cast<unsigned>(cex), cbin = 0u;
    int kk = kBinsPerThread - 1;
    bool found = false;
#pragma unroll
    for (int k = 0; k < kBinsPerThread; ++k) {  // static indices only (no local-memory array)
      if (!found && acc + w[k] >= need) {
        found = true;
        kk = k;
        cbin = c[k];
      } else if (!found) {
        acc += w[k];
        cacc += c[k];
      }
    }
    ss.sel_digit = static_cast<unsigned>(kBins - 1 - kBinsPerThread * tid - kk);
    ss.sel_above = acc;
    ss.sel_cnt_above = cacc;
    ss.sel_cnt_bin = cbin;
  }
  __syncthreads();
}

// Count of the cluster-wide level-0 count histogram in bins >= b0.
__device__ int hist_count_ge(const Cl& cl, RowSmem& sm, SmallSmem& ss, unsigned b0) {
  int s = 0;
  for (int b = threadIdx.x; b < kBins; b += kThreads) {
    if (static_cast<unsigned>(b) < b0) continue;
    for (int r = 0; r < cl.n; ++r) s += static_cast<int>(cl.at(&sm, r)->u.h.cnt[b]);
  }
  return block_sum(s, ss.redi);
}

// Cluster-wide sum of per-block values (each block passes its own; all get the total).
__device__ unsigned long long cluster_sum_u64(const Cl& cl, SmallSmem& ss, unsigned long long v) {
  if (threadIdx.x == 0) ss.u64v = v;
  cl.sync();
  unsigned long long t = 0;
  for (int r = 0; r < cl.n; ++r) t += cl.at(&ss, r)->u64v;
  cl.sync();
  return t;
}

// Visits this block's chunks of the row: f(base id, float l[VEC]) once per chunk (uniform over the block;
// ids >= V read as NaN).  The raw 16-byte vectors of kPrefetch chunks are loaded before any is converted
// and processed (kPrefetch loads in flight per thread, 4 registers each).
template <DType LT>
__device__ __forceinline__ void convert_raw(const uint4& q, float* out) {
  if constexpr (LT == DType::kF32) {
    out[0] = __uint_as_float(q.x);
    out[1] = __uint_as_float(q.y);
    out[2] = __uint_as_float(q.z);
    out[3] = __uint_as_float(q.w);
  } else {
    const uint32_t w[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const uint16_t lo = static_cast<uint16_t>(w[k] & 0xffffu), hi = static_cast<uint16_t>(w[k] >> 16);
      out[2 * k] = LT == DType::kBF16 ? bf16_bits_to_float(lo) : f16_bits_to_float(lo);
      out[2 * k + 1] = LT == DType::kBF16 ? bf16_bits_to_float(hi) : f16_bits_to_float(hi);
    }
  }
}

template <DType LT, typename F>
__device__ __forceinline__ void for_chunks(const void* row, int64_t V, bool vec_ok, const Cl& cl, F&& f) {
  constexpr int VEC = DT<LT>::kVec;
  constexpr int64_t CH = static_cast<int64_t>(kThreads) * VEC;
  const int64_t nch = (V + CH - 1) / CH;
  for (int64_t ch = cl.rank; ch < nch; ch += kPrefetch * cl.n) {
    uint4 raw[kPrefetch];
    bool full[kPrefetch];
#pragma unroll
    for (int u = 0; u < kPrefetch; ++u) {
      const int64_t base = (ch + u * cl.n) * CH + static_cast<int64_t>(threadIdx.x) * VEC;
      full[u] = vec_ok && base + VEC <= V;
      raw[u] = full[u] ? *reinterpret_cast<const uint4*>(static_cast<const char*>(row) + base * dtype_size(LT))
                       : make_uint4(0u, 0u, 0u, 0u);
    }
#pragma unroll
    for (int u = 0; u < kPrefetch; ++u) {
      if (u > 0 && ch + u * cl.n >= nch) break;
      const int64_t base = (ch + u * cl.n) * CH + static_cast<int64_t>(threadIdx.x) * VEC;
      float x[VEC];
      if (full[u]) {
        convert_raw<LT>(raw[u], x);
      } else {
#pragma unroll
        for (int e = 0; e < VEC; ++e) x[e] = base + e < V ? DT<LT>::load(row, base + e) : NAN;
      }
      f(base, x);
    }
  }
}

// Radix select over a source of (z) values of members: the largest key K such that the weight of the
// members with key >= K reaches `target`.  Level 0's histogram must already be in smem (built by the
// caller's pass).  visit(level, prefix, pmask) rebuilds the histogram of members with (key & pmask) ==
// prefix for levels 1, 2.  Returns the key; *cnt_ge = count of members with key >= K.
template <bool kMass, typename Visit>
__device__ uint32_t radix_select(const Cl& cl, RowSmem& sm, SmallSmem& ss, unsigned long long target, Visit visit,
                                 int* cnt_ge) {
  uint32_t prefix = 0;
  unsigned long long above = 0;
  unsigned cnt_above = 0;
  for (int level = 0; level < 3; ++level) {
    if (level > 0) {
      cl.sync();  // every block has read the previous histogram
      hist_clear(sm, kMass);
      __syncthreads();
      visit(level, prefix, level_mask(level));
      cl.sync();  // every block's histogram is complete
    }
    select_digit<kMass>(cl, sm, ss, target - above);
    const unsigned d = ss.sel_digit;
    above += ss.sel_above;
    cnt_above += ss.sel_cnt_above;
    if (level == 2) *cnt_ge = static_cast<int>(cnt_above + ss.sel_cnt_bin);
    prefix |= level == 0 ? (d << 21) : (level == 1 ? (d << 10) : d);
    __syncthreads();
  }
  cl.sync();
  return prefix;
}

// d = pred . W_row over H, warp-cooperative; every lane returns the same value.
template <DType WT>
__device__ __forceinline__ float warp_dot(const float* __restrict__ pred, const void* wrow, int64_t H, bool vec_ok) {
  const int lane = threadIdx.x & 31;
  float acc = 0.0f;
  int64_t h0 = 0;
  if (vec_ok) {
    constexpr int VEC = DT<WT>::kVec;
    const int64_t nv = H / VEC;
#pragma unroll 2
    for (int64_t v = lane; v < nv; v += 32) {
      float w[VEC];
      DT<WT>::load_vec(wrow, v * VEC, w);
      const float4* p4 = reinterpret_cast<const float4*>(pred + v * VEC);
#pragma unroll
      for (int q = 0; q < VEC / 4; ++q) {
        const float4 p = p4[q];
        acc = fmaf(w[4 * q + 0], p.x, acc);
        acc = fmaf(w[4 * q + 1], p.y, acc);
        acc = fmaf(w[4 * q + 2], p.z, acc);
        acc = fmaf(w[4 * q + 3], p.w, acc);
      }
    }
    h0 = nv * VEC;
  }
  for (int64_t h = h0 + lane; h < H; h += 32) acc = fmaf(DT<WT>::load(wrow, h), pred[h], acc);
  return warp_sum(acc);
}

__device__ __forceinline__ float dot_any(DType wt, const float* pred, const void* wrow, int64_t H, bool vec_ok) {
  switch (wt) {
    case DType::kF32: return warp_dot<DType::kF32>(pred, wrow, H, vec_ok);
    case DType::kBF16: return warp_dot<DType::kBF16>(pred, wrow, H, vec_ok);
    default: return warp_dot<DType::kF16>(pred, wrow, H, vec_ok);
  }
}

// Block-wide merge of the per-thread states into ss.bst (fixed order), then the cluster's blocks in rank
// order into `out` (every block of the cluster gets the same).
__device__ void reduce_state(const Cl& cl, SmallSmem& ss, SampleState st, SampleState& out) {
  const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) st.shfl_merge(o);
  if (lane == 0) ss.wst[wid] = st;
  __syncthreads();
  if (threadIdx.x == 0) {
    SampleState b = ss.wst[0];
    for (int w = 1; w < kWarps; ++w) b.merge(ss.wst[w]);
    ss.bst = b;
  }
  cl.sync();
  SampleState r = cl.at(&ss, 0)->bst;
  for (int q = 1; q < cl.n; ++q) r.merge(cl.at(&ss, q)->bst);
  out = r;
  cl.sync();
}

// ------------------------------------------------------------------------------------------------
// Row kernel
// ------------------------------------------------------------------------------------------------
template <DType LT, bool kOut>
__global__ void __launch_bounds__(kThreads, 1) row_kernel(const ReweightProblem pr, int64_t* __restrict__ tokens,
                                                          float* __restrict__ logprobs, float* __restrict__ out,
                                                          int64_t out_stride, const RowCfg cfg) {
  extern __shared__ float4 s_dyn[];
  __shared__ SmallSmem ss;
  RowSmem& sm = *reinterpret_cast<RowSmem*>(s_dyn);
  constexpr int VEC = DT<LT>::kVec;
  const Cl cl{static_cast<int>(blockIdx.x % static_cast<unsigned>(cfg.cluster)), cfg.cluster};
  const int tid = threadIdx.x, lane = tid & 31, wid = tid >> 5;
  const int64_t r = blockIdx.x / static_cast<unsigned>(cfg.cluster);
  const int64_t V = pr.V, H = pr.H;
  const void* lrow = static_cast<const char*>(pr.logits) + r * pr.logits_stride * dtype_size(LT);
  float* orow = kOut ? out + r * out_stride : nullptr;
  const bool lvec = cfg.logits_vec_ok != 0;
  const bool ovec = cfg.out_vec_ok != 0;
  const bool rank0 = cl.rank == 0;
  auto set_info = [&](int dense, float zmax, float theta, float wtau, int topp) {
    if (rank0 && tid == 0 && cfg.info) {
      RwRowInfo in;
      in.zmax = zmax;
      in.theta = theta;
      in.wtau = wtau;
      in.topp = topp;
      in.dense = dense;
      in.pad_[0] = in.pad_[1] = in.pad_[2] = 0;
      cfg.info[r] = in;
    }
  };
  // Writes value v to the row's ids of this block that are not `keep` (kOut only).
  auto fill_out = [&](float v, int64_t keep, float keep_v) {
    constexpr int64_t CH = static_cast<int64_t>(kThreads) * VEC;
    const int64_t nch = (V + CH - 1) / CH;
    for (int64_t ch = cl.rank; ch < nch; ch += cl.n) {
      const int64_t base = ch * CH + static_cast<int64_t>(tid) * VEC;
      if (ovec && base + VEC <= V && (keep < base || keep >= base + VEC)) {
#pragma unroll
        for (int q = 0; q < VEC / 4; ++q)
          *reinterpret_cast<float4*>(orow + base + 4 * q) = make_float4(v, v, v, v);
      } else {
#pragma unroll
        for (int e = 0; e < VEC; ++e)
          if (base + e < V) orow[base + e] = base + e == keep ? keep_v : v;
      }
    }
  };

  const float T = pr.p.temperature[r];
  const bool greedy = !(T > 0.0f);
  float beta = pr.p.beta[r];
  if (!(beta > 0.0f) || !(beta <= FLT_MAX)) beta = 0.0f;
  float min_p = pr.p.min_p[r];
  const int64_t top_k = pr.p.top_k[r];
  float top_p = pr.p.top_p[r];
  const bool minp_on = min_p > 0.0f;
  const bool topk_on = top_k > 0 && top_k < V;
  const bool topp_on = !(top_p >= 1.0f) && top_p == top_p;
  if (!(top_p > 0.0f)) top_p = 0.0f;  // target clamps to the smallest positive mass
  const bool any_filter = minp_on || topk_on || topp_on;
  const bool dense_ok = cfg.dense_enabled && beta > 0.0f && !greedy;

  if (!greedy && !any_filter && dense_ok) {  // every finite z is a candidate: the dense kernels do the row
    set_info(1, 0.0f, -INFINITY, 0.0f, 0);
    return;
  }

  float zmax = -INFINITY;
  float theta = -INFINITY;  // candidates: z > -inf, z >= theta, and (topp) exp(z - zmax) >= wtau
  int cnt_bound = INT_MAX;  // upper bound of |{z >= theta}| (before top-p)
  bool topp = false;
  float wtau = 0.0f;
  bool listed = false;

  if (greedy || any_filter) {
    // ---- pass 1: max / arg max of z (greedy: of the sanitised logits), finite count, level-0 histogram
    const bool h0 = !greedy && (topk_on || minp_on);
    if (h0) {
      hist_clear(sm, false);
      __syncthreads();
    }
    float bv = -INFINITY;
    int bi = INT_MAX, nvalid = 0;
    for_chunks<LT>(lrow, V, lvec, cl, [&](int64_t base, const float* x) {
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        const float z = greedy ? sanitize_logit(x[e]) : zval(x[e], T);
        const bool ok = z > -INFINITY;
        nvalid += ok ? 1 : 0;
        if (ok && argmax_better(z, static_cast<int>(base + e), bv, bi)) {
          bv = z;
          bi = static_cast<int>(base + e);
        }
        if (h0) hist_add<false>(sm, ok, ok ? (float_key(z) >> 21) : 0u, 1ull);
      }
    });
    block_argmax(bv, bi, ss.redf, ss.redi);
    nvalid = block_sum(nvalid, ss.redi);
    if (tid == 0) {
      ss.bv = bv;
      ss.bi = bi;
      ss.nvalid = nvalid;
    }
    cl.sync();  // also completes every block's histogram
    for (int q = 0; q < cl.n; ++q) {
      const SmallSmem* o = cl.at(&ss, q);
      if (q == 0) {
        bv = o->bv;
        bi = o->bi;
        nvalid = o->nvalid;
      } else {
        if (argmax_better(o->bv, o->bi, bv, bi)) {
          bv = o->bv;
          bi = o->bi;
        }
        nvalid += o->nvalid;
      }
    }
    cl.sync();
    zmax = bv;
    const int amax = bi;
    const bool none = nvalid == 0;
    if (greedy) {
      const int tok = none ? 0 : amax;
      if (kOut) {
        fill_out(-INFINITY, tok, 0.0f);
      } else if (rank0 && tid == 0) {
        tokens[r] = tok;
        logprobs[r] = 0.0f;
      }
      set_info(0, 0.0f, 0.0f, 0.0f, 0);
      return;
    }
    if (none) {
      if (kOut) {
        fill_out(-INFINITY, -1, 0.0f);
      } else if (rank0 && tid == 0) {
        tokens[r] = 0;
        logprobs[r] = -INFINITY;
      }
      set_info(0, 0.0f, 0.0f, 0.0f, 0);
      return;
    }
    cnt_bound = nvalid;

    // ---- min-p: theta = max z + log(min_p)
    if (minp_on) {
      if (!(min_p < 1.0f)) min_p = 1.0f;
      theta = zmax + logf(min_p);
      if (theta > -INFINITY) cnt_bound = hist_count_ge(cl, sm, ss, float_key(theta) >> 21);
    }
    // ---- top-k: k-th largest over all finite z (level 0 from pass 1)
    if (topk_on && nvalid > top_k) {
      auto visit = [&](int level, uint32_t prefix, uint32_t pmask) {
        for_chunks<LT>(lrow, V, lvec, cl, [&](int64_t, const float* x) {
#pragma unroll
          for (int e = 0; e < VEC; ++e) {
            const float z = zval(x[e], T);
            const uint32_t key = float_key(z);
            const bool act = z > -INFINITY && (key & pmask) == prefix;
            hist_add<false>(sm, act, act ? digit_of(key, level) : 0u, 1ull);
          }
        });
      };
      int cge = 0;
      const float K = key_float(radix_select<false>(cl, sm, ss, static_cast<unsigned long long>(top_k), visit, &cge));
      if (K >= theta) {
        theta = K;
        cnt_bound = cge;
      } else {
        cnt_bound = cnt_bound < static_cast<int>(top_k) ? cnt_bound : static_cast<int>(top_k);
      }
    }
    cl.sync();  // histograms are not read any more

    // ---- gather the candidates into shared memory when top-p follows and they are few
    if (topp_on && cnt_bound <= kListCap) {
      listed = true;
      int count = 0;
      const float th = theta;
      for_chunks<LT>(lrow, V, lvec, cl, [&](int64_t base, const float* x) {
        float z[VEC];
        int n = 0;
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          z[e] = zval(x[e], T);
          n += (z[e] > -INFINITY && z[e] >= th) ? 1 : 0;
        }
        int total;
        int pos = count + block_exclusive_scan(n, ss.scan, &total);
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          if (z[e] > -INFINITY && z[e] >= th && pos < kListCap) {
            sm.lz[pos] = z[e];
            sm.lid[pos] = static_cast<int>(base + e);
            ++pos;
          }
        }
        count += total;
      });
      if (tid == 0) ss.lcount = count < kListCap ? count : kListCap;
      __syncthreads();
    }

    // ---- top-p on w = exp(z - zmax) over the candidates so far
    if (topp_on) {
      int bits = 0;
      for (int64_t v = V; v > 0; v >>= 1) ++bits;
      const float scale = ldexpf(1.0f, 62 - bits);  // V * 2^S < 2^62
      const float th = theta, zm = zmax;
      const int lcount = listed ? ss.lcount : 0;
      // visits the members: f(z) for every member of this block (uniform loop over the block)
      auto members = [&](auto&& f) {
        if (listed) {
          for (int j0 = 0; j0 < lcount; j0 += kThreads) {
            const int j = j0 + tid;
            const bool ok = j < lcount;
            f(ok ? sm.lz[j] : -INFINITY, ok);
          }
        } else {
          for_chunks<LT>(lrow, V, lvec, cl, [&](int64_t, const float* x) {
#pragma unroll
            for (int e = 0; e < VEC; ++e) {
              const float z = zval(x[e], T);
              f(z, z > -INFINITY && z >= th);
            }
          });
        }
      };
      // Z and the level-0 mass histogram in one pass
      hist_clear(sm, true);
      __syncthreads();
      unsigned long long zs = 0;
      members([&](float z, bool ok) {
        const float e = ok ? expf(z - zm) : 0.0f;
        const unsigned long long w = ok ? __float2ull_rz(e * scale) : 0ull;
        zs += w;
        hist_add<true>(sm, ok, ok ? digit_of(__float_as_uint(e), 0) : 0u, w);
      });
      zs = block_sum(zs, ss.scan64);
      zs = cluster_sum_u64(cl, ss, zs);
      const double tt = ceil(static_cast<double>(top_p) * static_cast<double>(zs));
      const unsigned long long target =
          tt < 1.0 ? 1ull : (tt >= static_cast<double>(zs) ? zs : static_cast<unsigned long long>(tt));
      // Members lighter than X can never be the threshold element: together they weigh less than
      // V * X <= Z - target, so the heavier members alone reach the target.
      unsigned long long X = (zs - target) / static_cast<unsigned long long>(V);
      if (X < 1ull) X = 1ull;
      auto visit = [&](int level, uint32_t prefix, uint32_t pmask) {
        members([&](float z, bool ok) {
          const float e = ok ? expf(z - zm) : 0.0f;
          const unsigned long long w = ok ? __float2ull_rz(e * scale) : 0ull;
          const uint32_t key = __float_as_uint(e);
          const bool act = ok && w >= X && (key & pmask) == prefix;
          hist_add<true>(sm, act, act ? digit_of(key, level) : 0u, w);
        });
      };
      if (zs >= target && target >= 1ull) {
        int cge = 0;
        wtau = __uint_as_float(radix_select<true>(cl, sm, ss, target, visit, &cge));
        topp = true;
        cnt_bound = cge;
      }
    }
  }

  // ---- dense rows are finished by the dense kernels
  const bool dense = dense_ok && !listed &&
                     (cfg.dense_force || static_cast<int64_t>(cnt_bound) * kDenseFraction >= V);
  if (dense) {
    set_info(1, zmax, theta, wtau, topp ? 1 : 0);
    return;
  }
  set_info(0, zmax, theta, wtau, topp ? 1 : 0);

  // ---- stage the prediction row as float (only when it is used)
  float* pred_f = nullptr;
  if (beta > 0.0f) {
    pred_f = cfg.pred_in_smem ? reinterpret_cast<float*>(reinterpret_cast<char*>(s_dyn) + sizeof(RowSmem))
                              : cfg.pred_ws + static_cast<int64_t>(blockIdx.x) * cfg.Hp;
    const void* prow = static_cast<const char*>(pr.pred) + r * pr.pred_stride * dtype_size(pr.pred_dtype);
    for (int64_t h = tid; h < H; h += kThreads) pred_f[h] = load_as_float(prow, pr.pred_dtype, h);
    __syncthreads();
  }

  const int64_t seed = kOut ? 0 : pr.p.seed[r];
  const int64_t step = kOut ? 0 : pr.p.step[r];
  const uint64_t useed = static_cast<uint64_t>(seed), ustep = static_cast<uint64_t>(step);
  const float th = theta, zm = zmax, wt = wtau;
  auto in_c = [&](float z) -> bool {
    if (!(z > -INFINITY && z >= th)) return false;
    return !topp || expf(z - zm) >= wt;
  };
  SampleState st;
  st.init();
  const bool wvec = cfg.weight_vec_ok != 0;
  const int64_t wes = dtype_size(pr.weight_dtype);
  auto dmix = [&](int64_t c, float l) -> float {  // warp-cooperative: every lane gets m
    const void* wrow = static_cast<const char*>(pr.weight) + c * pr.weight_stride * wes;
    float d = dot_any(pr.weight_dtype, pred_f, wrow, H, wvec);
    if (pr.bias) d = __fadd_rn(d, load_as_float(pr.bias, pr.bias_dtype, c));
    return mix(l, d, beta, T);
  };

  if (!listed) {
    for_chunks<LT>(lrow, V, lvec, cl, [&](int64_t base, const float* x) {
      unsigned mask = 0;
      float z[VEC];
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        z[e] = zval(x[e], T);
        if (base + e < V && in_c(z[e])) {
          mask |= 1u << e;
          st.add_z(z[e], static_cast<int>(base + e));
        }
      }
      if (beta == 0.0f) {  // m = z: every thread evaluates its own ids, one Philox call per 4 ids
        if (kOut) {
          if (ovec && base + VEC <= V) {
#pragma unroll
            for (int q = 0; q < VEC / 4; ++q)
              *reinterpret_cast<float4*>(orow + base + 4 * q) =
                  make_float4((mask >> (4 * q)) & 1u ? z[4 * q] : -INFINITY,
                              (mask >> (4 * q + 1)) & 1u ? z[4 * q + 1] : -INFINITY,
                              (mask >> (4 * q + 2)) & 1u ? z[4 * q + 2] : -INFINITY,
                              (mask >> (4 * q + 3)) & 1u ? z[4 * q + 3] : -INFINITY);
          } else {
#pragma unroll
            for (int e = 0; e < VEC; ++e)
              if (base + e < V) orow[base + e] = (mask >> e) & 1u ? z[e] : -INFINITY;
          }
        } else {
#pragma unroll
          for (int q = 0; q < VEC / 4; ++q) {
            const unsigned m4 = (mask >> (4 * q)) & 0xfu;
            if (!m4) continue;
            bool need = st.id < 0;
#pragma unroll
            for (int e = 0; e < 4; ++e)
              if ((m4 >> e) & 1u) {
                st.add_lse(z[4 * q + e]);
                need = need || z[4 * q + e] + kGumbelBound >= st.key;
              }
            if (!need) continue;
            const int64_t v0 = base + 4 * q;
            const U32x4 wd = gumbel_words(useed, ustep, static_cast<uint32_t>(static_cast<uint64_t>(v0) >> 2));
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              if (!((m4 >> e) & 1u)) continue;
              const float mm = z[4 * q + e];
              if (!(mm + kGumbelBound >= st.key) && st.id >= 0) continue;
              st.add_key(mm + gumbel_from_word(wd.v[e]), mm, static_cast<int>(v0 + e));
            }
          }
        }
        return;
      }
      // beta > 0: compact the chunk's candidates, warps compute d, then every thread draws keys
      if (kOut) {
#pragma unroll
        for (int e = 0; e < VEC; ++e)
          if (base + e < V && !((mask >> e) & 1u)) orow[base + e] = -INFINITY;
      }
      int total;
      int pos = block_exclusive_scan(__popc(mask), ss.scan, &total);
      if (total == 0) return;  // uniform over the block
      const int64_t cbase = base - static_cast<int64_t>(tid) * VEC;
#pragma unroll
      for (int e = 0; e < VEC; ++e)
        if ((mask >> e) & 1u) sm.u.c.list[pos++] = static_cast<uint16_t>(tid * VEC + e);
      __syncthreads();
      for (int j = wid; j < total; j += kWarps) {
        const int64_t c = cbase + sm.u.c.list[j];
        const float mm = dmix(c, DT<LT>::load(lrow, c));
        if (lane == 0) {
          sm.u.c.m[j] = mm;
          if (kOut) orow[c] = mm;
        }
      }
      __syncthreads();
      if (!kOut) {
        for (int j = tid; j < total; j += kThreads) {
          const int64_t c = cbase + sm.u.c.list[j];
          const float mm = sm.u.c.m[j];
          if (mm == -INFINITY) continue;
          if (!(mm + kGumbelBound >= st.key) && st.id >= 0) {
            st.add_lse(mm);
            continue;
          }
          sample_one(st, mm, static_cast<int>(c),
                     pick_word(gumbel_words(useed, ustep, static_cast<uint32_t>(c >> 2)), static_cast<uint32_t>(c & 3)));
        }
      }
      __syncthreads();  // the list is rewritten by the next chunk
    });
  } else {
    // the gathered list: every entry has z >= theta
    const int lcount = ss.lcount;
    if (kOut) {
      fill_out(-INFINITY, -1, 0.0f);
      __syncthreads();
    }
    if (beta > 0.0f) {
      for (int j = wid; j < lcount; j += kWarps) {
        const float z = sm.lz[j];
        float mm = -INFINITY;
        if (in_c(z)) {
          const int64_t c = sm.lid[j];
          mm = dmix(c, DT<LT>::load(lrow, c));
          if (kOut && lane == 0) orow[c] = mm;
        }
        if (lane == 0) sm.u.c.m[j] = mm;
      }
      __syncthreads();
    }
    for (int j = tid; j < lcount; j += kThreads) {
      const float z = sm.lz[j];
      if (!in_c(z)) continue;
      const int c = sm.lid[j];
      st.add_z(z, c);
      const float mm = beta > 0.0f ? sm.u.c.m[j] : z;
      if (kOut) {
        if (beta == 0.0f) orow[c] = mm;
        continue;
      }
      if (mm == -INFINITY) continue;
      if (!(mm + kGumbelBound >= st.key) && st.id >= 0) {
        st.add_lse(mm);
        continue;
      }
      sample_one(st, mm, c,
                 pick_word(gumbel_words(useed, ustep, static_cast<uint32_t>(c) >> 2), static_cast<uint32_t>(c & 3)));
    }
  }
  if (kOut) {
    cl.sync();  // no block leaves while another may still read its shared memory
    return;
  }
  SampleState fin;
  reduce_state(cl, ss, st, fin);
  if (rank0 && tid == 0) {
    if (fin.id < 0) {
      tokens[r] = fin.zid < 0 ? 0 : fin.zid;
      logprobs[r] = -INFINITY;
    } else {
      tokens[r] = fin.id;
      // m* - max m first (exact for close values), as the CPU kernel: stays right when m saturates
      logprobs[r] = static_cast<float>(static_cast<double>(fin.m) - static_cast<double>(fin.mx) - log(fin.s));
    }
  }
}


constexpr size_t kRowSmemMax = sizeof(RowSmem) + static_cast<size_t>(kRwPredSmemMaxH) * sizeof(float);

// Opts into the dynamic shared memory once and finds the largest usable cluster size (sm_90).
template <DType LT, bool kOut>
int prepare_row_kernel() {
  static int max_cluster[64] = {};
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64) return 0;
  if (max_cluster[dev] > 0) return max_cluster[dev];
  auto k = row_kernel<LT, kOut>;
  if (cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(kRowSmemMax)) !=
      cudaSuccess)
    return 0;
  int mc = 1;
  const DeviceInfo di = device_info_base();
  if (di.cc_major >= 9) {
    for (int c = 8; c >= 2; c /= 2) {
      cudaLaunchConfig_t cfg = {};
      cfg.gridDim = dim3(static_cast<unsigned>(c));
      cfg.blockDim = dim3(kThreads);
      cfg.dynamicSmemBytes = kRowSmemMax;
      cudaLaunchAttribute at[1];
      at[0].id = cudaLaunchAttributeClusterDimension;
      at[0].val.clusterDim.x = static_cast<unsigned>(c);
      at[0].val.clusterDim.y = 1;
      at[0].val.clusterDim.z = 1;
      cfg.attrs = at;
      cfg.numAttrs = 1;
      int n = 0;
      if (cudaOccupancyMaxActiveClusters(&n, k, &cfg) == cudaSuccess && n >= 1) {
        mc = c;
        break;
      }
      (void)cudaGetLastError();  // an unsupported size is not an error of this call
    }
  }
  max_cluster[dev] = mc;
  return mc;
}

template <DType LT, bool kOut>
Status launch_row_kernel(const ReweightProblem& pr, int64_t* tokens, float* logprobs, float* out, int64_t out_stride,
                         const RowCfg& cfg, size_t smem, cudaStream_t stream) {
  cudaLaunchConfig_t lc = {};
  lc.gridDim = dim3(static_cast<unsigned>(pr.B * cfg.cluster));
  lc.blockDim = dim3(kThreads);
  lc.dynamicSmemBytes = smem;
  lc.stream = stream;
  cudaLaunchAttribute at[1];
  at[0].id = cudaLaunchAttributeClusterDimension;
  at[0].val.clusterDim.x = static_cast<unsigned>(cfg.cluster);
  at[0].val.clusterDim.y = 1;
  at[0].val.clusterDim.z = 1;
  lc.attrs = at;
  lc.numAttrs = cfg.cluster > 1 ? 1 : 0;
  if (cudaLaunchKernelEx(&lc, row_kernel<LT, kOut>, pr, tokens, logprobs, out, out_stride, cfg) != cudaSuccess)
    return Status::kCudaError;
  return launch_status();
}

}  // namespace
}  // namespace esamp

// One logits dtype's host entry points (used by reweight_row_<dtype>.cu).
#define ESAMP_REWEIGHT_ROW_TU(SUFFIX, LT)                                                                      \
  namespace esamp {                                                                                            \
  namespace rw_detail {                                                                                        \
  int prepare_row_##SUFFIX(bool out) {                                                                         \
    return out ? prepare_row_kernel<LT, true>() : prepare_row_kernel<LT, false>();                             \
  }                                                                                                            \
  Status launch_row_##SUFFIX(bool out, const ReweightProblem& pr, int64_t* tokens, float* logprobs, float* o,  \
                             int64_t out_stride, const RowCfg& cfg, size_t smem, cudaStream_t stream) {        \
    return out ? launch_row_kernel<LT, true>(pr, tokens, logprobs, o, out_stride, cfg, smem, stream)            \
               : launch_row_kernel<LT, false>(pr, tokens, logprobs, o, out_stride, cfg, smem, stream);          \
  }                                                                                                            \
  }                                                                                                            \
  }
