// reweight / reweight_logits on CUDA (SPEC section 3): filter + candidate dot products + mix +
// Gumbel-max + logprob, fused into one kernel with one thread block per row.
//
// Defensive rules for per-row parameters (CUDA tensors cannot be value-checked by the binding layer
// without a host synchronisation, so the kernel never trusts them):
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
// Algorithm per row (block of kThreads threads):
//   pass 1          : max / arg max of z over valid logits (16-byte vector loads when aligned).
//   min-p           : threshold theta = max z + log(min_p) (no pass).
//   top-k (if on)   : radix select over the order-preserving bits of z (4 passes of 8-bit digits,
//                     shared-memory histograms of counts) -> the k-th largest value; ties kept.
//   top-p (if on)   : one pass for the total mass Z, then the same radix select on the bits of
//                     w = exp(z - max z) weighted by w in 64-bit fixed point (integer sums and atomics,
//                     so the result is deterministic); tau is the largest w such that the mass of
//                     {w_i >= tau} is >= top_p * Z, which is exactly the probability of the last element
//                     of the shortest sorted prefix of mass >= top_p.  Members too light to be tau
//                     (see the code) are left out of the histograms.
//   candidate pass  : the row is cut in chunks of kThreads * VEC ids; the candidates of a chunk are
//                     compacted in id order into shared memory; warp w takes candidates w, w+kWarps,
//                     ... and computes d_c = pred . W_c (+ b_c) with 16-byte loads of W_c (pred row
//                     staged as float in shared memory, or in the workspace for very large H), the
//                     mixed logit m_c, the Gumbel key m_c + g_c and an online logsumexp.  Per-warp
//                     states are merged in warp order by one thread: deterministic.
// The arg max of z is always a candidate because every threshold is <= the maximum.
#include <cfloat>
#include <climits>
#include <cmath>

#include "cuda_utils.cuh"
#include "esamp/common.h"
#include "esamp/philox.h"
#include "esamp/sampling.h"

namespace esamp {
namespace {

using namespace cuda_detail;

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxVec = 8;                      // elements per 16-byte load of a 16-bit dtype
constexpr int kListCap = kThreads * kMaxVec;    // ids per candidate chunk (fits uint16 offsets)
constexpr int64_t kPredSmemMaxH = 6144;         // pred rows up to this H live in shared memory

template <DType D>
struct DT;
template <>
struct DT<DType::kF32> {
  static constexpr int kVec = 4;
  __device__ static float load(const void* p, int64_t i) { return static_cast<const float*>(p)[i]; }
  __device__ static void load_vec(const void* p, int64_t i, float* out) {
    const float4 q = *reinterpret_cast<const float4*>(static_cast<const float*>(p) + i);
    out[0] = q.x;
    out[1] = q.y;
    out[2] = q.z;
    out[3] = q.w;
  }
};
template <>
struct DT<DType::kBF16> {
  static constexpr int kVec = 8;
  __device__ static float load(const void* p, int64_t i) {
    return bf16_bits_to_float(static_cast<const uint16_t*>(p)[i]);
  }
  __device__ static void load_vec(const void* p, int64_t i, float* out) {
    const uint4 q = *reinterpret_cast<const uint4*>(static_cast<const uint16_t*>(p) + i);
    const uint32_t w[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      out[2 * k] = bf16_bits_to_float(static_cast<uint16_t>(w[k] & 0xffffu));
      out[2 * k + 1] = bf16_bits_to_float(static_cast<uint16_t>(w[k] >> 16));
    }
  }
};
template <>
struct DT<DType::kF16> {
  static constexpr int kVec = 8;
  __device__ static float load(const void* p, int64_t i) {
    return f16_bits_to_float(static_cast<const uint16_t*>(p)[i]);
  }
  __device__ static void load_vec(const void* p, int64_t i, float* out) {
    const uint4 q = *reinterpret_cast<const uint4*>(static_cast<const uint16_t*>(p) + i);
    const uint32_t w[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      out[2 * k] = f16_bits_to_float(static_cast<uint16_t>(w[k] & 0xffffu));
      out[2 * k + 1] = f16_bits_to_float(static_cast<uint16_t>(w[k] >> 16));
    }
  }
};

// Calls f(i, l) for every i in [0, V) handled by this thread.
template <DType LT, typename F>
__device__ __forceinline__ void for_each_logit(const void* row, int64_t V, bool vec_ok, F&& f) {
  constexpr int VEC = DT<LT>::kVec;
  int64_t i0 = 0;
  if (vec_ok) {
    const int64_t nv = V / VEC;
    for (int64_t v = threadIdx.x; v < nv; v += kThreads) {
      float x[VEC];
      DT<LT>::load_vec(row, v * VEC, x);
#pragma unroll
      for (int e = 0; e < VEC; ++e) f(v * VEC + e, x[e]);
    }
    i0 = nv * VEC;
  }
  for (int64_t i = i0 + threadIdx.x; i < V; i += kThreads) f(i, DT<LT>::load(row, i));
}

// Order-preserving map of a finite float to uint32 (-0 and +0 both map to the key of +0).
__device__ __forceinline__ uint32_t float_key(float z) {
  const uint32_t u = __float_as_uint(z + 0.0f);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
__device__ __forceinline__ float key_float(uint32_t k) {
  return (k & 0x80000000u) ? __uint_as_float(k & 0x7fffffffu) : __uint_as_float(~k);
}

// NaN -> -inf, +inf -> FLT_MAX.
__device__ __forceinline__ float sanitize_logit(float x) {
  x = x != x ? -INFINITY : x;
  return x > FLT_MAX ? FLT_MAX : x;
}
// z of a raw logit: sanitised, divided by T > 0 (correctly rounded, never contracted), clamped to
// +-FLT_MAX; -inf only for -inf/NaN logits.
__device__ __forceinline__ float zval(float l, float T) {
  const float x = sanitize_logit(l);
  float z = __fdiv_rn(x, T);
  z = z > FLT_MAX ? FLT_MAX : z;
  z = z < -FLT_MAX ? -FLT_MAX : z;
  z = z != z ? 0.0f : z;  // only reachable with T == +inf
  return x == -INFINITY ? -INFINITY : z;
}
// Mixed logit: NaN -> -inf, clamped to the finite range.
__device__ __forceinline__ float sanitize_m(float m) {
  if (m != m) return -INFINITY;
  return m > FLT_MAX ? FLT_MAX : (m < -FLT_MAX ? -FLT_MAX : m);
}

struct SelectShared {
  unsigned long long hist[256];
  unsigned long long above;   // weight of members whose key is above the current prefix
  unsigned long long target;  // weight to reach
  uint32_t digit;
  int active;
};

// Radix select: the largest key K such that the total weight of the set members whose key is
// >= K reaches `target` (>= 1).  kMass: 64-bit fixed-point weights, inactive when the members weigh
// less than target (cannot happen for the caller's target); otherwise unit weights and target = k,
// inactive when the set has <= k members.  member(l, key, weight) -> bool.  Returns false (in every
// thread) when inactive.
template <DType LT, bool kMass, typename Member>
__device__ bool radix_select(const void* row, int64_t V, bool vec_ok, Member member, unsigned long long target,
                             SelectShared& sh, uint32_t* out_key) {
  const int tid = threadIdx.x, lane = tid & 31, wid = tid >> 5;
  uint32_t prefix = 0, pmask = 0;
  for (int level = 0; level < 4; ++level) {
    const int shift = 24 - 8 * level;
    for (int b = tid; b < 256; b += kThreads) sh.hist[b] = 0ull;
    __syncthreads();
    for_each_logit<LT>(row, V, vec_ok, [&](int64_t, float l) {
      uint32_t key;
      unsigned long long w;
      if (member(l, key, w) && (key & pmask) == prefix)
        atomicAdd(&sh.hist[(key >> shift) & 255u], w);
    });
    __syncthreads();
    if (wid == 0) {
      unsigned long long s = 0;
#pragma unroll
      for (int b = 0; b < 8; ++b) s += sh.hist[8 * lane + b];
      bool go = true;
      if (level == 0) {
        const unsigned long long total = warp_sum(s);
        go = target >= 1ull && (kMass ? total >= target : total > target);
        if (lane == 0) {
          sh.active = go ? 1 : 0;
          sh.target = target;
          sh.above = 0ull;
        }
        __syncwarp();
      }
      if (go) {
        const unsigned long long need = sh.target - sh.above;  // >= 1 by the invariant
        unsigned long long S = s;                               // suffix sum over lanes >= lane
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
          const unsigned long long t = __shfl_down_sync(kFullMask, S, o);
          if (lane + o < 32) S += t;
        }
        const unsigned ball = __ballot_sync(kFullMask, S >= need);
        const int lstar = ball ? __popc(ball) - 1 : 0;  // S is non-increasing in lane
        if (lane == lstar) {
          unsigned long long acc = S - s;  // weight of the lanes above this one
          uint32_t digit = 8u * lane;      // fallback (unreachable while the invariant holds)
          for (int b = 7; b >= 0; --b) {
            const unsigned long long h = sh.hist[8 * lane + b];
            if (acc + h >= need) {
              digit = 8u * lane + b;
              break;
            }
            acc += h;
          }
          sh.digit = digit;
          sh.above += acc;
        }
      }
    }
    __syncthreads();
    if (!sh.active) return false;
    const uint32_t digit = sh.digit;
    prefix |= digit << shift;
    pmask |= 0xffu << shift;
    __syncthreads();  // everyone has read sh.digit before warp 0 writes it again
  }
  *out_key = prefix;
  return true;
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

struct LaunchCfg {
  float* pred_ws;        // [B, Hp] float, used when !pred_in_smem
  int64_t Hp;            // H rounded up to a multiple of 4
  int pred_in_smem;
  int logits_vec_ok;
  int weight_vec_ok;
};

template <DType LT, bool kLogitsOut>
__global__ void __launch_bounds__(kThreads, 1) reweight_kernel(const ReweightProblem pr, int64_t* __restrict__ tokens,
                                                            float* __restrict__ logprobs, float* __restrict__ out,
                                                            int64_t out_stride, const LaunchCfg cfg) {
  extern __shared__ float4 s_dyn[];
  __shared__ uint16_t s_list[kListCap];
  __shared__ SelectShared s_sel;
  __shared__ float s_redf[32];
  __shared__ int s_redi[33];
  __shared__ unsigned long long s_red64[32];
  __shared__ float s_wkey[kWarps], s_wm[kWarps], s_wmx[kWarps];
  __shared__ double s_ws[kWarps];
  __shared__ int s_wid[kWarps];

  constexpr int VEC = DT<LT>::kVec;
  const int tid = threadIdx.x, lane = tid & 31, wid = tid >> 5;
  const int64_t r = blockIdx.x;
  const int64_t V = pr.V, H = pr.H;
  const void* lrow = static_cast<const char*>(pr.logits) + r * pr.logits_stride * dtype_size(LT);
  float* orow = kLogitsOut ? out + r * out_stride : nullptr;
  const bool lvec = cfg.logits_vec_ok != 0;

  const float T = pr.p.temperature[r];
  const bool greedy = !(T > 0.0f);

  // ---- pass 1: max / arg max of z over valid logits
  float bv = -INFINITY;
  int bi = INT_MAX;
  for_each_logit<LT>(lrow, V, lvec, [&](int64_t i, float l) {
    const float z = greedy ? sanitize_logit(l) : zval(l, T);
    if (z > -INFINITY && argmax_better(z, static_cast<int>(i), bv, bi)) {
      bv = z;
      bi = static_cast<int>(i);
    }
  });
  block_argmax(bv, bi, s_redf, s_redi);
  const float zmax = bv;
  const int amax = bi;

  const bool none = amax == INT_MAX;  // no logit above -inf
  if (greedy) {
    const int tok = none ? 0 : amax;
    if (kLogitsOut) {
      for (int64_t i = tid; i < V; i += kThreads) orow[i] = i == tok ? 0.0f : -INFINITY;
    } else if (tid == 0) {
      tokens[r] = tok;
      logprobs[r] = 0.0f;
    }
    return;
  }
  if (none) {
    if (kLogitsOut) {
      for (int64_t i = tid; i < V; i += kThreads) orow[i] = -INFINITY;
    } else if (tid == 0) {
      tokens[r] = 0;
      logprobs[r] = -INFINITY;
    }
    return;
  }

  // ---- per-row parameters (defensive, see the top of the file)
  float beta = pr.p.beta[r];
  if (!(beta > 0.0f) || !(beta <= FLT_MAX)) beta = 0.0f;
  float min_p = pr.p.min_p[r];
  const int64_t top_k = pr.p.top_k[r];
  float top_p = pr.p.top_p[r];
  const bool topp_on = !(top_p >= 1.0f) && top_p == top_p;
  if (!(top_p > 0.0f)) top_p = 0.0f;  // target clamps to the smallest positive mass

  // ---- min-p
  float theta = -INFINITY;
  if (min_p > 0.0f) {
    if (!(min_p < 1.0f)) min_p = 1.0f;
    theta = zmax + logf(min_p);
  }

  // ---- top-k: k-th largest z among {valid, z >= theta}
  if (top_k > 0 && top_k < V) {
    const float th = theta;
    auto member = [&](float l, uint32_t& key, unsigned long long& w) -> bool {
      const float z = zval(l, T);
      if (!(z > -INFINITY && z >= th)) return false;
      key = float_key(z);
      w = 1ull;
      return true;
    };
    uint32_t K;
    if (radix_select<LT, false>(lrow, V, lvec, member, static_cast<unsigned long long>(top_k), s_sel, &K))
      theta = fmaxf(theta, key_float(K));
  }

  // ---- top-p on w = exp(z - zmax) over {valid, z >= theta}
  bool topp = false;
  float wtau = 0.0f;
  if (topp_on) {
    // 64-bit fixed point with 2^S scale, S chosen so that V * 2^S < 2^62.
    int bits = 0;
    for (int64_t v = V; v > 0; v >>= 1) ++bits;
    const float scale = ldexpf(1.0f, 62 - bits);
    const float th = theta;
    auto weight = [&](float l, uint32_t& key, unsigned long long& w) -> bool {
      const float z = zval(l, T);
      if (!(z > -INFINITY && z >= th)) return false;
      const float e = expf(z - zmax);
      key = __float_as_uint(e);
      w = __float2ull_rz(e * scale);
      return true;
    };
    // Total mass Z of the set: exact integer sum, independent of the summation order.
    unsigned long long zs = 0;
    for_each_logit<LT>(lrow, V, lvec, [&](int64_t, float l) {
      uint32_t key;
      unsigned long long w;
      if (weight(l, key, w)) zs += w;
    });
    zs = block_sum(zs, s_red64);
    const double tt = ceil(static_cast<double>(top_p) * static_cast<double>(zs));
    const unsigned long long target =
        tt < 1.0 ? 1ull : (tt >= static_cast<double>(zs) ? zs : static_cast<unsigned long long>(tt));
    // Members lighter than X can never be the threshold element: together they weigh less than
    // V * X <= Z - target, so the heavier members alone reach the target.  Skipping them keeps the
    // histograms (shared-memory atomics) to the head of the distribution; the result is unchanged.
    unsigned long long X = (zs - target) / static_cast<unsigned long long>(V);
    if (X < 1ull) X = 1ull;
    auto member = [&](float l, uint32_t& key, unsigned long long& w) -> bool { return weight(l, key, w) && w >= X; };
    uint32_t K;
    if (radix_select<LT, true>(lrow, V, lvec, member, target, s_sel, &K)) {
      topp = true;
      wtau = __uint_as_float(K);
    }
  }

  // ---- stage the prediction row as float (only when it is used)
  float* pred_f = nullptr;
  if (beta > 0.0f) {
    pred_f = cfg.pred_in_smem ? reinterpret_cast<float*>(s_dyn) : cfg.pred_ws + r * cfg.Hp;
    const void* prow = static_cast<const char*>(pr.pred) + r * pr.pred_stride * dtype_size(pr.pred_dtype);
    for (int64_t h = tid; h < H; h += kThreads) pred_f[h] = load_as_float(prow, pr.pred_dtype, h);
    __syncthreads();
  }

  const int64_t seed = kLogitsOut ? 0 : pr.p.seed[r];
  const int64_t step = kLogitsOut ? 0 : pr.p.step[r];
  const float th = theta;
  auto in_c = [&](float l) -> bool {
    const float z = zval(l, T);
    if (!(z > -INFINITY && z >= th)) return false;
    return !topp || expf(z - zmax) >= wtau;
  };

  // per-warp state (meaningful in lane 0); the logsumexp sum is kept in double (as on the CPU)
  float best_key = -INFINITY, best_m = -INFINITY, lmx = -INFINITY;
  double ls = 0.0;
  int best_id = -1;

  constexpr int64_t kChunkV = static_cast<int64_t>(kThreads) * VEC;
  const int64_t nchunks = (V + kChunkV - 1) / kChunkV;
  for (int64_t ch = 0; ch < nchunks; ++ch) {
    const int64_t base = ch * kChunkV + static_cast<int64_t>(tid) * VEC;
    float lv[VEC];
    if (lvec && base + VEC <= V) {
      DT<LT>::load_vec(lrow, base, lv);
    } else {
#pragma unroll
      for (int e = 0; e < VEC; ++e) lv[e] = base + e < V ? DT<LT>::load(lrow, base + e) : NAN;
    }
    unsigned mask = 0;
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      if (base + e < V && in_c(lv[e])) mask |= 1u << e;
    }
    if (kLogitsOut) {
#pragma unroll
      for (int e = 0; e < VEC; ++e)
        if (base + e < V && !((mask >> e) & 1u)) orow[base + e] = -INFINITY;
    }
    int total;
    int pos = block_exclusive_scan(__popc(mask), s_redi, &total);
    if (total == 0) continue;  // uniform over the block
#pragma unroll
    for (int e = 0; e < VEC; ++e)
      if ((mask >> e) & 1u) s_list[pos++] = static_cast<uint16_t>(tid * VEC + e);
    __syncthreads();
    for (int j = wid; j < total; j += kWarps) {
      const int64_t c = ch * kChunkV + s_list[j];
      const float l = DT<LT>::load(lrow, c);
      float m;
      if (beta > 0.0f) {
        const void* wrow = static_cast<const char*>(pr.weight) + c * pr.weight_stride * dtype_size(pr.weight_dtype);
        float d = dot_any(pr.weight_dtype, pred_f, wrow, H, cfg.weight_vec_ok != 0);
        if (pr.bias) d += load_as_float(pr.bias, pr.bias_dtype, c);
        m = sanitize_m(__fdiv_rn(__fsub_rn(__fmul_rn(1.0f + beta, sanitize_logit(l)), __fmul_rn(beta, d)), T));
      } else {
        m = zval(l, T);
      }
      if (lane == 0) {
        if (kLogitsOut) {
          orow[c] = m;
        } else if (m != -INFINITY) {
          const float key = m + gumbel_noise(seed, step, c);
          if (key > best_key) {  // this warp sees its candidates in increasing id order
            best_key = key;
            best_m = m;
            best_id = static_cast<int>(c);
          }
          if (m > lmx) {
            ls = ls * static_cast<double>(expf(lmx - m)) + 1.0;
            lmx = m;
          } else {
            ls += static_cast<double>(expf(m - lmx));
          }
        }
      }
    }
    __syncthreads();  // s_list is rewritten by the next chunk
  }
  if (kLogitsOut) return;

  if (lane == 0) {
    s_wkey[wid] = best_key;
    s_wm[wid] = best_m;
    s_wid[wid] = best_id;
    s_wmx[wid] = lmx;
    s_ws[wid] = ls;
  }
  __syncthreads();
  if (tid == 0) {
    float K = -INFINITY, M = -INFINITY, bm = -INFINITY;
    double S = 0.0;
    int id = -1;
    for (int w = 0; w < kWarps; ++w) {
      if (s_wid[w] >= 0 && (id < 0 || s_wkey[w] > K || (s_wkey[w] == K && s_wid[w] < id))) {
        K = s_wkey[w];
        id = s_wid[w];
        bm = s_wm[w];
      }
      const float wm = s_wmx[w];
      if (wm == -INFINITY) continue;
      if (wm > M) {
        S = S * static_cast<double>(expf(M - wm)) + s_ws[w];
        M = wm;
      } else {
        S += s_ws[w] * static_cast<double>(expf(wm - M));
      }
    }
    if (id < 0) {
      tokens[r] = amax;
      logprobs[r] = -INFINITY;
    } else {
      tokens[r] = id;
      // m* - max m first (exact for close values), as the CPU kernel: stays right when m saturates at FLT_MAX
      logprobs[r] =
          static_cast<float>(static_cast<double>(bm) - static_cast<double>(M) - log(S));
    }
  }
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

Status check_problem(const ReweightProblem& pr, bool need_rng) {
  if (pr.B < 0 || pr.V < 1 || pr.H < 1) return Status::kInvalidArgument;
  if (pr.V > static_cast<int64_t>(INT_MAX) - kListCap) return Status::kInvalidArgument;
  if (pr.B > static_cast<int64_t>(INT_MAX)) return Status::kInvalidArgument;
  if (pr.B == 0) return Status::kOk;
  if (!pr.logits || !pr.pred || !pr.weight) return Status::kInvalidArgument;
  if (!pr.p.beta || !pr.p.temperature || !pr.p.top_k || !pr.p.top_p || !pr.p.min_p) return Status::kInvalidArgument;
  if (need_rng && (!pr.p.seed || !pr.p.step)) return Status::kInvalidArgument;
  // Input rows may alias (e.g. a broadcast prediction with row stride 0): they are only read.
  return Status::kOk;
}

template <bool kLogitsOut>
Status launch(const ReweightProblem& pr, int64_t* tokens, float* logprobs, float* out, int64_t out_stride,
              void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  LaunchCfg cfg;
  cfg.Hp = (pr.H + 3) / 4 * 4;
  cfg.pred_in_smem = pr.H <= kPredSmemMaxH ? 1 : 0;
  cfg.pred_ws = nullptr;
  if (!cfg.pred_in_smem) {
    if (workspace_bytes < reweight_cuda_workspace_bytes(pr)) return Status::kWorkspaceTooSmall;
    if (!workspace || !aligned16(workspace)) return Status::kInvalidArgument;
    cfg.pred_ws = static_cast<float*>(workspace);
  }
  const int les = dtype_size(pr.logits_dtype), wes = dtype_size(pr.weight_dtype);
  cfg.logits_vec_ok = aligned16(pr.logits) && (pr.B == 1 || (pr.logits_stride * les) % 16 == 0);
  cfg.weight_vec_ok = aligned16(pr.weight) && (pr.V == 1 || (pr.weight_stride * wes) % 16 == 0);
  const size_t smem = cfg.pred_in_smem ? static_cast<size_t>(cfg.Hp) * sizeof(float) : 0;
  const dim3 grid(static_cast<unsigned>(pr.B));
  switch (pr.logits_dtype) {
    case DType::kF32:
      reweight_kernel<DType::kF32, kLogitsOut><<<grid, kThreads, smem, stream>>>(pr, tokens, logprobs, out,
                                                                                 out_stride, cfg);
      break;
    case DType::kBF16:
      reweight_kernel<DType::kBF16, kLogitsOut><<<grid, kThreads, smem, stream>>>(pr, tokens, logprobs, out,
                                                                                  out_stride, cfg);
      break;
    case DType::kF16:
      reweight_kernel<DType::kF16, kLogitsOut><<<grid, kThreads, smem, stream>>>(pr, tokens, logprobs, out,
                                                                                 out_stride, cfg);
      break;
    default:
      return Status::kUnsupportedDType;
  }
  return launch_status();
}

}  // namespace

size_t reweight_cuda_workspace_bytes(const ReweightProblem& pr) {
  if (pr.H <= kPredSmemMaxH || pr.B <= 0) return 0;
  return static_cast<size_t>(pr.B) * static_cast<size_t>((pr.H + 3) / 4 * 4) * sizeof(float);
}

Status reweight_cuda(const ReweightProblem& pr, int64_t* tokens, float* logprobs, void* workspace,
                     size_t workspace_bytes, void* /*cublas_handle: unused, no dense path*/, cudaStream_t stream) {
  Status s = check_problem(pr, true);
  if (s != Status::kOk || pr.B == 0) return s;
  if (!tokens || !logprobs) return Status::kInvalidArgument;
  return launch<false>(pr, tokens, logprobs, nullptr, 0, workspace, workspace_bytes, stream);
}

Status reweight_logits_cuda(const ReweightProblem& pr, float* out, int64_t out_stride, void* workspace,
                            size_t workspace_bytes, void* /*cublas_handle: unused, no dense path*/,
                            cudaStream_t stream) {
  Status s = check_problem(pr, false);
  if (s != Status::kOk || pr.B == 0) return s;
  if (!out || (pr.B > 1 && out_stride < pr.V)) return Status::kInvalidArgument;
  return launch<true>(pr, nullptr, nullptr, out, out_stride, workspace, workspace_bytes, stream);
}

}  // namespace esamp
