// CPU kernels of the reweight family (SPEC sections 3 and 4): esamp::reweight_cpu and
// esamp::reweight_logits_cpu.  Torch-free; OpenMP over rows.
//
// Per row r (docs/semantics.md has the user-facing version of these rules):
//   * T == 0 (or T not > 0, e.g. NaN when called directly): greedy.  token = argmax l (smallest id on
//     ties), logprob = 0; reweight_logits writes 0 at the argmax and -inf elsewhere.
//   * Non-finite inputs have a defined meaning, never a crash:
//       - a NaN logit is treated as -inf;
//       - a +inf logit is clamped to the largest finite float (FLT_MAX) BEFORE dividing by T, and a finite
//         logit whose z = l / T overflows is clamped to +-FLT_MAX, so z is -inf only for -inf/NaN logits;
//       - tokens with z == -inf are never candidates (they would carry m = -inf anyway);
//       - a row with no finite logit returns token 0 (the argmax rule) and logprob -inf, and
//         reweight_logits writes -inf on the whole row;
//       - mixed logits m are clamped to [-FLT_MAX, FLT_MAX]; a NaN m (NaN/inf in the weight, the
//         prediction or the bias) counts as -inf; when every candidate has m == -inf the row returns the
//         argmax of z and logprob -inf.
//   * Candidate set C (from z = l / T alone, min-p -> top-k -> top-p, SPEC 3.2).  Every filter keeps an
//     upper set of z, so C is stored as one threshold: C = { i : z_i >= theta }, with theta > -inf and
//     theta <= max z (the argmax of z is always in C).  top-p uses p_i proportional to
//     e_i = exp(z_i - max z) (float32, |rel. error| < 2^-22), the masses are accumulated in double, and the
//     threshold is found with an O(n) radix select on the bits of e (no sort); top-k uses nth_element.
//   * d_c = pred . W_c + b_c (fp32 accumulation, W rows converted on the fly), only for c in C and only when
//     beta != 0; m_c = ((1 + beta) l_c - beta d_c) / T  (beta == 0: m_c = z_c exactly).
//   * token = argmax_{c in C} (m_c + g_c) in float32 with g from esamp::gumbel_noise, smallest id on ties.
//     A candidate is skipped when an upper bound of its key is below the best key so far: first m_c + g_max
//     (no noise drawn), then m_c + (bound of g given the top 12 bits of its Philox word) (no logarithm).
//     The bounds hold for every word, so the pruning is exact: the result equals the full argmax.
//   * logprob = m_tok - logsumexp_C m (exp in float32, sums in double, result float32).
//
// Large candidate sets: when a row with beta != 0 has |C| >= V / kDenseFraction candidates, its distiller
// logits are computed for the whole vocabulary with one GEMM (the CpuGemm callback) shared by all such
// rows of the call, in chunks of rows, instead of |C| separate dot products.  The choice depends on the
// row alone (not on the batch), so a row's result does not depend on which other rows share the call
// (up to the GEMM library, which could round a row differently for a different number of rows).
// Results do not depend on the number of threads.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <vector>

#include "esamp/common.h"
#include "esamp/gemm.h"
#include "esamp/philox.h"
#include "esamp/sampling.h"

// Hot loops are compiled for three x86-64 levels and picked at load time (ifunc), so that a build
// without -march flags still uses AVX2/AVX-512 where the machine has them.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(ESAMP_NO_MULTIVERSION)
#define ESAMP_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define ESAMP_CLONES
#endif
#define ESAMP_INLINE inline __attribute__((always_inline))
// The 16-lane vector types below are only passed between always-inline functions of one clone, so the
// "vector return without AVX512F changes the ABI" note does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace esamp {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kFltMax = std::numeric_limits<float>::max();
// A row whose candidate set holds at least V / kDenseFraction tokens gets its distiller logits from
// the dense GEMM path.  Measured through the torch binding (ATen/MKL GEMM) with B = 64, V = 49152,
// H = 576 on 2 cores, every row with top_k = V/8 resp. V/4: sparse 58 / 104 ms, dense 51 / 58 ms.  The
// dense cost is amortised over the rows that take it, so for a few large rows the sparse path wins by far;
// V / 4 keeps those sparse and sends only clearly dense rows (e.g. no filter) to the GEMM.
constexpr int64_t kDenseFraction = 4;
// Rows per dense GEMM chunk (bounds the [rows, V] float32 buffer) and W rows per conversion chunk
// when W is not float32.
constexpr int64_t kDenseRowChunk = 64;
constexpr int64_t kWeightChunk = 2048;

// ---- element loads (branch-free, so that loops over them vectorise) ------------------------------
struct F32 { using T = float; };
struct BF16 { using T = uint16_t; };
struct F16 { using T = uint16_t; };

ESAMP_INLINE float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
ESAMP_INLINE uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

ESAMP_INLINE float load(F32, const float* p, int64_t i) { return p[i]; }
ESAMP_INLINE float load(BF16, const uint16_t* p, int64_t i) { return bits_to_float(static_cast<uint32_t>(p[i]) << 16); }
// IEEE half -> float, exact for every input (normals, subnormals, inf, NaN payloads); bit-identical to
// esamp::f16_bits_to_float but written with selects instead of a normalisation loop.
ESAMP_INLINE float load(F16, const uint16_t* p, int64_t i) {
  const uint32_t h = p[i];
  const uint32_t sign = (h & 0x8000u) << 16;
  uint32_t o = (h & 0x7fffu) << 13;
  const uint32_t e = o & 0x0f800000u;
  o += (127u - 15u) << 23;
  const uint32_t o_inf = o + ((128u - 16u) << 23);
  // zero / subnormal: (o + 2^23) reinterpreted is 2^-14 * (1 + m / 2^10); subtract 2^-14 exactly.
  const float f_sub = bits_to_float(o + (1u << 23)) - bits_to_float(113u << 23);
  const uint32_t r = e == 0x0f800000u ? o_inf : (e == 0u ? float_to_bits(f_sub) : o);
  return bits_to_float(r | sign);
}

// NaN -> -inf, +inf -> FLT_MAX (the rule stated at the top of this file).
ESAMP_INLINE float sanitize_logit(float x) {
  x = x != x ? -kInf : x;
  return x > kFltMax ? kFltMax : x;
}
// z = l / T for a sanitised l: -inf stays -inf, a finite l gives a finite z (clamped).
ESAMP_INLINE float sanitize_z(float z, float l) {
  z = z > kFltMax ? kFltMax : z;
  z = z < -kFltMax ? -kFltMax : z;
  z = z != z ? 0.f : z;  // only reachable with T == +inf (rejected by the binding layer)
  return l == -kInf ? -kInf : z;
}
// Mixed logit: clamp to the finite range, NaN -> -inf.
ESAMP_INLINE float sanitize_m(float m) {
  if (m != m) return -kInf;
  return m > kFltMax ? kFltMax : (m < -kFltMax ? -kFltMax : m);
}

// exp(x) for x <= 0 in float32: Cody-Waite reduction and a degree-7 Taylor polynomial on
// |r| <= ln2/2 (truncation error < 6e-9 relative); 0 below -87.3 (where expf is subnormal or 0);
// fexp(0) == 1 exactly.  Checked against double exp over every float in [-87.29, 0]: relative error
// <= 1.02e-7 (< 2^-23); it may step down by one ulp where expf would not (about 2900 places), which
// only matters for values within an ulp of the top-p threshold.  Vectorises (no calls, no branches).
ESAMP_INLINE float fexp_nonpos(float x) {
  const float xc = x > -87.3f ? x : -87.3f;  // also maps -inf / NaN
  const float t = xc * 1.44269504088896341f + 12582912.f;  // round to nearest integer (|n| < 2^22)
  const float n = t - 12582912.f;
  float r = xc - n * 0.693145751953125f;                 // ln2 high part (exact product)
  r = r - n * 1.428606765330187045e-06f;                 // ln2 low part
  float p = 1.f / 5040.f;
  p = p * r + 1.f / 720.f;
  p = p * r + 1.f / 120.f;
  p = p * r + 1.f / 24.f;
  p = p * r + 1.f / 6.f;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  const int32_t ni = static_cast<int32_t>(n);
  const float scale = bits_to_float(static_cast<uint32_t>(ni + 127) << 23);
  const float v = p * scale;
  return x > -87.3f ? v : 0.f;
}

// ---- vectorised building blocks (multiversioned) ---------------------------------------------------
// Reductions use kLanes explicit partial results combined in a fixed order, so GCC vectorises them in
// every clone and the summation order does not depend on the instruction set chosen at load time.
constexpr int kLanes = 16;

// z[i] = sanitize(l[i]) / T (clamped, see top of file); bmax[b] = max of z over block b of kBlock
// elements (the later passes skip blocks that cannot hold a candidate); returns max z.
constexpr int64_t kBlock = 4 * kLanes;
template <typename D, bool kUnitT>
ESAMP_INLINE float load_z_impl(const typename D::T* l, int64_t V, float T, float* z, float* bmax) {
  auto zval = [&](int64_t i) {
    const float x = sanitize_logit(load(D{}, l, i));
    return kUnitT ? x : sanitize_z(x / T, x);  // x / 1 == x exactly
  };
  float mx[kLanes];
  for (int k = 0; k < kLanes; ++k) mx[k] = -kInf;
  int64_t i = 0;
  for (; i + kBlock <= V; i += kBlock) {
    float bl[kLanes];
    for (int k = 0; k < kLanes; ++k) bl[k] = -kInf;
    for (int u = 0; u < kBlock; u += kLanes) {
      for (int k = 0; k < kLanes; ++k) {
        const float zi = zval(i + u + k);
        z[i + u + k] = zi;
        bl[k] = zi > bl[k] ? zi : bl[k];
      }
    }
    float bm = -kInf;
    for (int k = 0; k < kLanes; ++k) {
      mx[k] = bl[k] > mx[k] ? bl[k] : mx[k];
      bm = bl[k] > bm ? bl[k] : bm;
    }
    bmax[i / kBlock] = bm;
  }
  if (i < V) {
    float bm = -kInf;
    for (; i < V; ++i) {
      const float zi = zval(i);
      z[i] = zi;
      bm = zi > bm ? zi : bm;
    }
    bmax[(V - 1) / kBlock] = bm;
    mx[0] = bm > mx[0] ? bm : mx[0];
  }
  float m = -kInf;
  for (int k = 0; k < kLanes; ++k) m = mx[k] > m ? mx[k] : m;
  return m;
}
#define ESAMP_LOAD_Z(NAME, D, T_)                                                                     \
  ESAMP_CLONES float NAME(const T_* l, int64_t V, float T, float* z, float* bmax) {                 \
    return T == 1.f ? load_z_impl<D, true>(l, V, T, z, bmax) : load_z_impl<D, false>(l, V, T, z, bmax); \
  }
ESAMP_LOAD_Z(load_z_f32, F32, float)
ESAMP_LOAD_Z(load_z_bf16, BF16, uint16_t)
ESAMP_LOAD_Z(load_z_f16, F16, uint16_t)
#undef ESAMP_LOAD_Z

// One row of z with its block maxima.
struct ZRow {
  const float* z;
  const float* bmax;
  int64_t V;
};

float load_z(const void* l, DType dt, int64_t V, float T, float* z, float* bmax) {
  switch (dt) {
    case DType::kF32: return load_z_f32(static_cast<const float*>(l), V, T, z, bmax);
    case DType::kBF16: return load_z_bf16(static_cast<const uint16_t*>(l), V, T, z, bmax);
    case DType::kF16: return load_z_f16(static_cast<const uint16_t*>(l), V, T, z, bmax);
  }
  return -kInf;  // unreachable: dtype checked at entry
}

// Plain conversion of n elements to float32 (prediction rows, W chunks for the dense path).
template <typename D>
ESAMP_INLINE void convert_impl(const typename D::T* s, int64_t n, float* o) {
  for (int64_t i = 0; i < n; ++i) o[i] = load(D{}, s, i);
}
ESAMP_CLONES void convert_bf16(const uint16_t* s, int64_t n, float* o) { convert_impl<BF16>(s, n, o); }
ESAMP_CLONES void convert_f16(const uint16_t* s, int64_t n, float* o) { convert_impl<F16>(s, n, o); }
void convert(const void* s, DType dt, int64_t n, float* o) {
  switch (dt) {
    case DType::kF32: std::memcpy(o, s, static_cast<size_t>(n) * sizeof(float)); break;
    case DType::kBF16: convert_bf16(static_cast<const uint16_t*>(s), n, o); break;
    case DType::kF16: convert_f16(static_cast<const uint16_t*>(s), n, o); break;
  }
}

// ---- dot products: one 16-lane float32 accumulator --------------------------------------------------
// GCC vector extensions (lowered to 1 zmm, 2 ymm or 4 xmm registers depending on the clone): the loop is
// vectorised in every clone and sums in the same order in all of them.
typedef float VF __attribute__((vector_size(4 * kLanes)));
typedef uint32_t VU __attribute__((vector_size(4 * kLanes)));
typedef uint16_t VH __attribute__((vector_size(2 * kLanes)));

ESAMP_INLINE VF vload(F32, const float* p) {
  VF v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
ESAMP_INLINE VF bits_to_vf(VU u) {
  VF f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}
ESAMP_INLINE VF vload(BF16, const uint16_t* p) {
  VH h;
  std::memcpy(&h, p, sizeof(h));
  return bits_to_vf(__builtin_convertvector(h, VU) << 16);
}
ESAMP_INLINE VF vload(F16, const uint16_t* p) {  // the select form of load(F16, ...) on 16 lanes
  VH hh;
  std::memcpy(&hh, p, sizeof(hh));
  const VU h = __builtin_convertvector(hh, VU);
  const VU sign = (h & 0x8000u) << 16;
  VU o = (h & 0x7fffu) << 13;
  const VU e = o & 0x0f800000u;
  o += (127u - 15u) << 23;
  const VU o_inf = o + ((128u - 16u) << 23);
  VU sub;
  {
    const VF f_sub = bits_to_vf(o + (1u << 23)) - bits_to_float(113u << 23);
    std::memcpy(&sub, &f_sub, sizeof(sub));
  }
  const VU r = e == 0x0f800000u ? o_inf : (e == 0u ? sub : o);
  return bits_to_vf(r | sign);
}
// The last n < kLanes elements, zero-padded (0 * 0 adds nothing to a lane).
template <typename D>
ESAMP_INLINE VF vload_tail(D, const typename D::T* p, int64_t n) {
  float t[kLanes] = {};
  for (int64_t k = 0; k < n; ++k) t[k] = load(D{}, p, k);
  return vload(F32{}, t);
}
ESAMP_INLINE float vsum(VF v) {  // pairwise, fixed order
  float a[kLanes];
  std::memcpy(a, &v, sizeof(a));
  for (int k = kLanes / 2; k >= 1; k /= 2)
    for (int j = 0; j < k; ++j) a[j] += a[j + k];
  return a[0];
}

// fp32 dot product of a weight row (any dtype, converted on the fly) with a float32 vector.
template <typename D>
ESAMP_INLINE float dot_impl(const typename D::T* w, const float* p, int64_t H) {
  VF acc = {};
  int64_t i = 0;
  for (; i + kLanes <= H; i += kLanes) acc += vload(D{}, w + i) * vload(F32{}, p + i);
  if (i < H) acc += vload_tail(D{}, w + i, H - i) * vload_tail(F32{}, p + i, H - i);
  return vsum(acc);
}

// d[j] = pred . W[cand[j]] for j < n; W rows at stride ws elements.
template <typename D>
ESAMP_INLINE void cand_dots_impl(const typename D::T* W, int64_t ws, const float* p, int64_t H,
                                 const int32_t* cand, int64_t n, float* d) {
  for (int64_t j = 0; j < n; ++j) {
    if (j + 1 < n) {  // candidates are scattered over W: start fetching the next row early
      const char* nx = reinterpret_cast<const char*>(W + static_cast<int64_t>(cand[j + 1]) * ws);
      const int64_t bytes = H * static_cast<int64_t>(sizeof(typename D::T));
      for (int64_t o = 0; o < bytes && o < 1024; o += 64) __builtin_prefetch(nx + o);
    }
    d[j] = dot_impl<D>(W + static_cast<int64_t>(cand[j]) * ws, p, H);
  }
}
ESAMP_CLONES void cand_dots_f32(const float* W, int64_t ws, const float* p, int64_t H, const int32_t* cand,
                                int64_t n, float* d) {
  cand_dots_impl<F32>(W, ws, p, H, cand, n, d);
}
ESAMP_CLONES void cand_dots_bf16(const uint16_t* W, int64_t ws, const float* p, int64_t H, const int32_t* cand,
                                 int64_t n, float* d) {
  cand_dots_impl<BF16>(W, ws, p, H, cand, n, d);
}
ESAMP_CLONES void cand_dots_f16(const uint16_t* W, int64_t ws, const float* p, int64_t H, const int32_t* cand,
                                int64_t n, float* d) {
  cand_dots_impl<F16>(W, ws, p, H, cand, n, d);
}
void cand_dots(const void* W, DType dt, int64_t ws, const float* p, int64_t H, const int32_t* cand, int64_t n,
               float* d) {
  switch (dt) {
    case DType::kF32: cand_dots_f32(static_cast<const float*>(W), ws, p, H, cand, n, d); break;
    case DType::kBF16: cand_dots_bf16(static_cast<const uint16_t*>(W), ws, p, H, cand, n, d); break;
    case DType::kF16: cand_dots_f16(static_cast<const uint16_t*>(W), ws, p, H, cand, n, d); break;
  }
}

// Sum of n floats in double, kLanes partial sums combined in a fixed order.
ESAMP_INLINE double sum_double(const float* e, int64_t n) {
  double acc[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (int k = 0; k < kLanes; ++k) acc[k] += static_cast<double>(e[j + k]);
  for (int k = 0; j + k < n; ++k) acc[k] += static_cast<double>(e[j + k]);
  for (int k = kLanes / 2; k >= 1; k /= 2)
    for (int i = 0; i < k; ++i) acc[i] += acc[i + k];
  return acc[0];
}

// e[j] = fexp(x[j] - mx); returns sum_j e[j] accumulated in double.
ESAMP_CLONES double exp_shift_sum(const float* x, int64_t n, float mx, float* e) {
  for (int64_t j = 0; j < n; ++j) e[j] = fexp_nonpos(x[j] - mx);
  return sum_double(e, n);
}

// ---- candidate-set search -------------------------------------------------------------------------
struct Scratch {
  std::vector<float> z;     // [V] z of the current row
  std::vector<float> bmax;  // [ceil(V / kBlock)] block maxima of z
  std::vector<float> a;     // compacted kept z values
  std::vector<float> e;     // exp(z - max) aligned with a
  std::vector<float> sel;   // selection buffer
  std::vector<int32_t> cand;
  std::vector<float> m;     // mixed logits of the candidates (also holds d first)
  std::vector<float> pred;  // [H] prediction row in float32
  void reserve(int64_t V, int64_t H) {
    if (static_cast<int64_t>(z.size()) < V) {
      z.resize(V);
      bmax.resize((V + kBlock - 1) / kBlock);
      a.resize(V);
      e.resize(V);
      sel.resize(V);
      cand.resize(V);
      m.resize(V);
    }
    if (static_cast<int64_t>(pred.size()) < H) pred.resize(H);
  }
};

Scratch& scratch() {
  thread_local Scratch s;
  return s;
}

// Gathers z values >= theta into out (skipping blocks whose maximum is below theta); returns the count.
int64_t gather_ge(const ZRow& zr, float theta, float* out) {
  int64_t n = 0;
  for (int64_t b0 = 0; b0 < zr.V; b0 += kBlock) {
    if (!(zr.bmax[b0 / kBlock] >= theta)) continue;
    const int64_t b1 = std::min(zr.V, b0 + kBlock);
    for (int64_t i = b0; i < b1; ++i) {
      const float v = zr.z[i];
      out[n] = v;
      n += v >= theta ? 1 : 0;
    }
  }
  return n;
}

// Top-p threshold: the largest value t among e[0, n) with  sum_{e_j >= t} e_j >= target  (the value of
// the last element of the shortest descending prefix whose mass reaches the target; ties at t are all
// kept by the caller).  Returns -inf when rounding leaves even the full set short of the target (keep
// everything).  e holds non-negative floats, whose bit patterns order like their values, so this is a
// three-level radix select on the bits (12 + 10 + 10): each level builds a (mass, count) histogram of
// the remaining elements, walks it from the top carrying the mass above, and keeps the one bucket where
// the target is reached.  O(n), no sort, no data-dependent branches in the histogram loops; masses in
// double.  buf needs room for n floats.
float top_p_threshold(const float* e, int64_t n, double target, float* buf) {
  constexpr int kBuckets = 1024;
  double mass[kBuckets];
  int32_t count[kBuckets];
  double acc = 0.0;  // mass of the elements above the current bucket
  uint32_t prefix = 0;
  const float* cur = e;
  int64_t cn = n;
  for (int level = 0; level < 3; ++level) {
    const int shift = level == 0 ? 20 : (level == 1 ? 10 : 0);
    const uint32_t kmask = level == 0 ? 0xfffu : 0x3ffu;
    std::fill(mass, mass + kBuckets, 0.0);
    std::fill(count, count + kBuckets, 0);
    for (int64_t j = 0; j < cn; ++j) {
      // e <= 1.0f, so the level-0 key (sign, exponent, 3 mantissa bits) is at most 0x3f8.
      const uint32_t k = std::min<uint32_t>((float_to_bits(cur[j]) >> shift) & kmask, kBuckets - 1);
      mass[k] += static_cast<double>(cur[j]);
      ++count[k];
    }
    int b = -1;
    for (int k = kBuckets - 1; k >= 0; --k) {
      if (count[k] == 0) continue;
      if (acc + mass[k] >= target) {
        b = k;
        break;
      }
      acc += mass[k];
    }
    if (b < 0) return -kInf;
    prefix |= static_cast<uint32_t>(b) << shift;
    if (level == 2) return bits_to_float(prefix);  // every element left has exactly these bits
    // Keep the elements of bucket b (in place when cur == buf: writes never pass reads).
    int64_t m = 0;
    for (int64_t j = 0; j < cn; ++j) {
      const float v = cur[j];
      buf[m] = v;
      m += ((float_to_bits(v) >> shift) & kmask) == static_cast<uint32_t>(b) ? 1 : 0;
    }
    cur = buf;
    cn = m;
  }
  return -kInf;  // unreachable
}

// Returns theta with C = { i : z_i >= theta }; -FLT_MAX <= theta <= zmax (zmax finite or FLT_MAX).
float candidate_threshold(const ZRow& zr, float zmax, int64_t top_k, float top_p, float min_p,
                          Scratch& s) {
  float theta = -kFltMax;  // excludes z == -inf
  if (min_p > 0.f) {       // NaN min_p: off
    const float t = zmax + std::log(min_p);
    theta = std::max(theta, t);
  }
  if (top_k > 0 && top_k < zr.V) {
    const int64_t n = gather_ge(zr, theta, s.a.data());
    if (n > top_k) {
      std::nth_element(s.a.data(), s.a.data() + (top_k - 1), s.a.data() + n, std::greater<float>());
      theta = std::max(theta, s.a[top_k - 1]);
    }
  }
  if (top_p < 1.f) {  // NaN top_p: off
    const int64_t n = gather_ge(zr, theta, s.a.data());
    if (n > 1) {
      const double total = exp_shift_sum(s.a.data(), n, zmax, s.e.data());
      const double target = static_cast<double>(top_p > 0.f ? top_p : 0.f) * total;
      const float tau = top_p_threshold(s.e.data(), n, target, s.sel.data());
      float t3 = kInf;
      for (int64_t j = 0; j < n; ++j) t3 = s.e[j] >= tau ? std::min(t3, s.a[j]) : t3;
      if (t3 < kInf) theta = std::max(theta, t3);
    }
  }
  return std::min(theta, zmax);  // the argmax of z is always a candidate
}

// First index holding the value v = max z (0 if none, e.g. NaN everywhere when called directly).
int64_t first_index_of(const ZRow& zr, float v) {
  for (int64_t b0 = 0; b0 < zr.V; b0 += kBlock) {
    if (zr.bmax[b0 / kBlock] != v) continue;
    const int64_t b1 = std::min(zr.V, b0 + kBlock);
    for (int64_t i = b0; i < b1; ++i)
      if (zr.z[i] == v) return i;
  }
  return 0;
}

// Candidate ids (ascending): i with z_i >= theta.
int64_t collect(const ZRow& zr, float theta, int32_t* cand) {
  int64_t n = 0;
  for (int64_t b0 = 0; b0 < zr.V; b0 += kBlock) {
    if (!(zr.bmax[b0 / kBlock] >= theta)) continue;
    const int64_t b1 = std::min(zr.V, b0 + kBlock);
    for (int64_t i = b0; i < b1; ++i) {
      cand[n] = static_cast<int32_t>(i);
      n += zr.z[i] >= theta ? 1 : 0;
    }
  }
  return n;
}

// Upper bounds of the Gumbel noise by the top 12 bits of the Philox word: g(w) <= bound[w >> 20] for
// every w (g is non-decreasing in w >> 8; the bound is g of the bucket's largest word plus a 1e-3 margin
// that covers any non-monotone rounding of logf).  Lets the sampler skip both logarithms for candidates
// that cannot win, without changing the result.
struct GumbelBounds {
  float b[4096];
  float gmax;
  GumbelBounds() {
    for (uint32_t k = 0; k < 4096; ++k) b[k] = gumbel_from_word((k << 20) | 0xfffffu) + 1e-3f;
    gmax = b[4095];
  }
};
const GumbelBounds& gumbel_bounds() {
  static const GumbelBounds g;
  return g;
}

// Philox words of (seed, step) for token groups v >> 2, cached for consecutive candidates.
struct NoiseSource {
  uint64_t seed, step;
  uint32_t group = 0xffffffffu;
  bool valid = false;
  U32x4 w{};
  uint32_t word(int64_t v) {
    const uint32_t g = static_cast<uint32_t>(static_cast<uint64_t>(v) >> 2);
    if (!valid || g != group) {
      w = gumbel_words(seed, step, g);
      group = g;
      valid = true;
    }
    return w.v[v & 3];
  }
};

// ---- per-row state shared by the phases -------------------------------------------------------------
enum class RowKind : uint8_t { kGreedy, kNoFinite, kDone, kDense };
struct RowState {
  RowKind kind = RowKind::kDone;
  int64_t argmax = 0;
  float theta = 0.f;
};

struct Ctx {
  const ReweightProblem& pr;
  int64_t* tokens;     // reweight
  float* logprobs;     // reweight
  float* out;          // reweight_logits
  int64_t out_stride;
  const void* logits_row(int64_t r) const {
    return static_cast<const char*>(pr.logits) + r * pr.logits_stride * dtype_size(pr.logits_dtype);
  }
  const void* pred_row(int64_t r) const {
    return static_cast<const char*>(pr.pred) + r * pr.pred_stride * dtype_size(pr.pred_dtype);
  }
  float* out_row(int64_t r) const { return out + r * out_stride; }
};

// Given candidates (ascending ids) and their mixed logits m, write the row's result.
void finish_row(const Ctx& c, int64_t r, const int32_t* cand, const float* m, int64_t n, int64_t argmax_z) {
  if (c.out) {
    float* o = c.out_row(r);
    std::fill(o, o + c.pr.V, -kInf);
    for (int64_t j = 0; j < n; ++j) o[cand[j]] = m[j];
    return;
  }
  float mmax = -kInf;
  int64_t jmax = -1;
  for (int64_t j = 0; j < n; ++j) {
    if (m[j] > mmax) {
      mmax = m[j];
      jmax = j;
    }
  }
  if (jmax < 0) {  // every candidate has m == -inf
    c.tokens[r] = argmax_z;
    c.logprobs[r] = -kInf;
    return;
  }
  // key_c = m_c + g_c (float32); the noise of a candidate is only evaluated when its bound can reach the
  // best key so far.  Start from the candidate with the largest m, then scan all candidates in id order.
  NoiseSource noise{static_cast<uint64_t>(c.pr.p.seed[r]), static_cast<uint64_t>(c.pr.p.step[r])};
  const GumbelBounds& gb = gumbel_bounds();
  int64_t tok = cand[jmax];
  float best = mmax + gumbel_from_word(noise.word(tok));
  float best_m = mmax;
  for (int64_t j = 0; j < n; ++j) {
    if (j == jmax || !(m[j] + gb.gmax >= best)) continue;
    const uint32_t w = noise.word(cand[j]);
    if (!(m[j] + gb.b[w >> 20] >= best)) continue;
    const float key = m[j] + gumbel_from_word(w);
    if (key > best || (key == best && cand[j] < tok)) {
      best = key;
      tok = cand[j];
      best_m = m[j];
    }
  }
  const double sum = exp_shift_sum(m, n, mmax, scratch().e.data());
  c.tokens[r] = tok;
  c.logprobs[r] = static_cast<float>(static_cast<double>(best_m) - static_cast<double>(mmax) - std::log(sum));
}

// m_j = ((1 + beta) l_c - beta d_j) / T for candidates c = cand[j], d given in m on entry (overwritten).
void mix_candidates(const Ctx& c, int64_t r, const int32_t* cand, int64_t n, float beta, float T, float* m) {
  const void* l = c.logits_row(r);
  const float one_b = 1.f + beta;
  for (int64_t j = 0; j < n; ++j) {
    const int64_t v = cand[j];
    float d = m[j];
    if (c.pr.bias) d += load_as_float(c.pr.bias, c.pr.bias_dtype, v);
    const float lv = sanitize_logit(load_as_float(l, c.pr.logits_dtype, v));
    m[j] = sanitize_m((one_b * lv - beta * d) / T);
  }
}

// Phase 1 for one row: greedy / no-finite rows and sparse rows are finished here; rows with a large
// candidate set and beta != 0 are marked kDense for the GEMM phase.
RowState process_row(const Ctx& c, int64_t r, bool allow_dense) {
  const ReweightProblem& pr = c.pr;
  const int64_t V = pr.V;
  Scratch& s = scratch();
  s.reserve(V, pr.H);
  RowState st;
  const float T = pr.p.temperature[r];
  const bool greedy = !(T > 0.f);
  const float zmax = load_z(c.logits_row(r), pr.logits_dtype, V, greedy ? 1.f : T, s.z.data(), s.bmax.data());
  const ZRow zr{s.z.data(), s.bmax.data(), V};
  st.argmax = first_index_of(zr, zmax);
  if (greedy) {
    st.kind = RowKind::kGreedy;
    if (c.out) {
      float* o = c.out_row(r);
      std::fill(o, o + V, -kInf);
      o[st.argmax] = 0.f;
    } else {
      c.tokens[r] = st.argmax;
      c.logprobs[r] = 0.f;
    }
    return st;
  }
  if (!(zmax > -kInf)) {  // no finite logit (or NaN everywhere when called directly)
    st.kind = RowKind::kNoFinite;
    if (c.out) {
      float* o = c.out_row(r);
      std::fill(o, o + V, -kInf);
    } else {
      c.tokens[r] = st.argmax;
      c.logprobs[r] = -kInf;
    }
    return st;
  }
  st.theta = candidate_threshold(zr, zmax, pr.p.top_k[r], pr.p.top_p[r], pr.p.min_p[r], s);
  const float beta = pr.p.beta[r];
  const int64_t n = collect(zr, st.theta, s.cand.data());
  if (beta == 0.f) {  // m = z on C, no dot product
    for (int64_t j = 0; j < n; ++j) s.m[j] = s.z[s.cand[j]];
    finish_row(c, r, s.cand.data(), s.m.data(), n, st.argmax);
    st.kind = RowKind::kDone;
    return st;
  }
  if (allow_dense && n * kDenseFraction >= V) {
    st.kind = RowKind::kDense;
    return st;
  }
  convert(c.pred_row(r), pr.pred_dtype, pr.H, s.pred.data());
  cand_dots(pr.weight, pr.weight_dtype, pr.weight_stride, s.pred.data(), pr.H, s.cand.data(), n, s.m.data());
  mix_candidates(c, r, s.cand.data(), n, beta, T, s.m.data());
  finish_row(c, r, s.cand.data(), s.m.data(), n, st.argmax);
  st.kind = RowKind::kDone;
  return st;
}

// Phase 3 for a dense row: d for the whole vocabulary is in drow.
void finish_dense_row(const Ctx& c, int64_t r, const RowState& st, const float* drow) {
  const ReweightProblem& pr = c.pr;
  Scratch& s = scratch();
  s.reserve(pr.V, pr.H);
  const float T = pr.p.temperature[r];
  load_z(c.logits_row(r), pr.logits_dtype, pr.V, T, s.z.data(), s.bmax.data());
  const int64_t n = collect(ZRow{s.z.data(), s.bmax.data(), pr.V}, st.theta, s.cand.data());
  for (int64_t j = 0; j < n; ++j) s.m[j] = drow[s.cand[j]];
  mix_candidates(c, r, s.cand.data(), n, pr.p.beta[r], T, s.m.data());
  finish_row(c, r, s.cand.data(), s.m.data(), n, st.argmax);
}

Status check_problem(const ReweightProblem& pr) {
  if (pr.B < 0 || pr.V < 1 || pr.H < 1) return Status::kInvalidArgument;
  if (pr.V > std::numeric_limits<int32_t>::max()) return Status::kInvalidArgument;
  if (pr.B == 0) return Status::kOk;
  const RowParams& p = pr.p;
  if (!pr.logits || !pr.pred || !pr.weight || !p.beta || !p.temperature || !p.top_k || !p.top_p || !p.min_p)
    return Status::kInvalidArgument;
  for (DType d : {pr.logits_dtype, pr.pred_dtype, pr.weight_dtype, pr.bias_dtype})
    if (d != DType::kF32 && d != DType::kBF16 && d != DType::kF16) return Status::kUnsupportedDType;
  // Input rows may overlap (stride 0 = one row broadcast to all rows); they are only read.
  if (pr.logits_stride < 0 || pr.weight_stride < 0 || pr.pred_stride < 0) return Status::kInvalidArgument;
  return Status::kOk;
}

Status run(const Ctx& c, CpuGemm gemm) {
  const ReweightProblem& pr = c.pr;
  const int64_t B = pr.B, V = pr.V, H = pr.H;
  std::vector<RowState> st(static_cast<size_t>(B));
  // The dense path needs V * rows floats of scratch; it is only worth it for a real vocabulary.
  const bool allow_dense = V >= 1024;
#pragma omp parallel for schedule(dynamic)
  for (int64_t r = 0; r < B; ++r) st[r] = process_row(c, r, allow_dense);

  std::vector<int64_t> dense;
  for (int64_t r = 0; r < B; ++r)
    if (st[r].kind == RowKind::kDense) dense.push_back(r);
  if (dense.empty()) return Status::kOk;

  // Phase 2: d = P W^T for the dense rows, in chunks of rows; W converted to float32 in chunks of
  // rows when it is not float32 already.
  const int64_t nd = static_cast<int64_t>(dense.size());
  const int64_t rows_per_chunk = std::min(nd, kDenseRowChunk);
  // Uninitialised buffers (every element is written before it is read).
  std::unique_ptr<float[]> P(new float[static_cast<size_t>(rows_per_chunk * H)]);
  std::unique_ptr<float[]> D(new float[static_cast<size_t>(rows_per_chunk * V)]);
  std::unique_ptr<float[]> wbuf;
  if (pr.weight_dtype != DType::kF32) wbuf.reset(new float[static_cast<size_t>(std::min(V, kWeightChunk) * H)]);
  const int64_t wsize = dtype_size(pr.weight_dtype);
  for (int64_t r0 = 0; r0 < nd; r0 += rows_per_chunk) {
    const int64_t rc = std::min(rows_per_chunk, nd - r0);
    for (int64_t i = 0; i < rc; ++i) convert(c.pred_row(dense[r0 + i]), pr.pred_dtype, H, P.get() + i * H);
    if (pr.weight_dtype == DType::kF32) {
      gemm(false, true, rc, V, H, 1.f, P.get(), H, static_cast<const float*>(pr.weight), pr.weight_stride, 0.f,
           D.get(), V);
    } else {
      for (int64_t v0 = 0; v0 < V; v0 += kWeightChunk) {
        const int64_t vc = std::min(kWeightChunk, V - v0);
#pragma omp parallel for schedule(static)
        for (int64_t v = 0; v < vc; ++v)
          convert(static_cast<const char*>(pr.weight) + (v0 + v) * pr.weight_stride * wsize, pr.weight_dtype, H,
                  wbuf.get() + v * H);
        gemm(false, true, rc, vc, H, 1.f, P.get(), H, wbuf.get(), H, 0.f, D.get() + v0, V);
      }
    }
    // Phase 3: mix and sample (or write) the rows of this chunk.
#pragma omp parallel for schedule(dynamic)
    for (int64_t i = 0; i < rc; ++i) finish_dense_row(c, dense[r0 + i], st[dense[r0 + i]], D.get() + i * V);
  }
  return Status::kOk;
}

}  // namespace

Status reweight_cpu(const ReweightProblem& pr, int64_t* tokens, float* logprobs, CpuGemm gemm) {
  Status s = check_problem(pr);
  if (s != Status::kOk || pr.B == 0) return s;
  if (!tokens || !logprobs || !pr.p.seed || !pr.p.step) return Status::kInvalidArgument;
  Ctx c{pr, tokens, logprobs, nullptr, 0};
  return run(c, gemm);
}

Status reweight_logits_cpu(const ReweightProblem& pr, float* out, int64_t out_stride, CpuGemm gemm) {
  Status s = check_problem(pr);
  if (s != Status::kOk || pr.B == 0) return s;
  if (!out || (out_stride < pr.V && pr.B > 1)) return Status::kInvalidArgument;
  Ctx c{pr, nullptr, nullptr, out, out_stride};
  return run(c, gemm);
}

}  // namespace esamp
