// Distiller bank on the CPU (SPEC 2): forward, one clipped-Adam train step per slot, reset.
//
// Rows are grouped by slot with a stable counting sort.  Each active slot is processed on its own
// (gather rows -> forward -> loss -> backward into a per-thread gradient buffer -> global-norm clip ->
// Adam over the slot's P parameters in one pass).  With >= 2 active slots the slots run in an
// OpenMP loop (one slot per thread at a time, each thread with its own scratch, the GEMM callback
// single-threaded inside the region); with one active slot the GEMM callback may use every thread and
// the elementwise passes are split over fixed chunks.  Every reduction has a fixed order (chunked sums
// are combined in chunk order), so the results do not depend on the number of threads.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "esamp/distiller.h"
#include "esamp/math.h"
#include "esamp/philox.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace esamp {
namespace {

template <typename T>
T* ensure(std::vector<T>& v, size_t n) {
  if (v.size() < n) v.resize(n);
  return v.data();
}

// Per-thread scratch for one slot's rows (n rows).
struct SlotScratch {
  std::vector<float> X;     // (L+1) x [n, H]: x_0 .. x_L
  std::vector<float> AG;    // L x [n, 2R]: (a, g) with g = x G + c
  std::vector<float> Hb;    // L x [n, R]: h = a * silu(g)
  std::vector<float> rinv;  // [n]: 1 / sqrt(mean(x_L^2) + eps)
  std::vector<float> T;     // [n, H] targets (train)
  std::vector<float> dX;    // [n, H]
  std::vector<float> D;     // [n, 2R]: (da, dg)
  std::vector<float> grad;  // [P]
};

SlotScratch& thread_scratch() {
  thread_local SlotScratch s;
  return s;
}

// Stable counting sort of rows by slot id: rows of slot s are order[start[s] .. start[s+1]).
struct Grouping {
  std::vector<int64_t> start;   // [S + 1]
  std::vector<int64_t> order;   // [N]
  std::vector<int64_t> active;  // slots with >= 1 row, ascending
  std::vector<int64_t> next;    // [S] insertion cursors
};

bool group_rows(const int64_t* slot_ids, int64_t N, int64_t S, Grouping& g) {
  g.start.assign(static_cast<size_t>(S + 1), 0);
  g.order.resize(static_cast<size_t>(N));
  g.active.clear();
  for (int64_t i = 0; i < N; ++i) {
    const int64_t s = slot_ids[i];
    if (s < 0 || s >= S) return false;
    ++g.start[s + 1];
  }
  for (int64_t s = 0; s < S; ++s) {
    if (g.start[s + 1] > 0) g.active.push_back(s);
    g.start[s + 1] += g.start[s];
  }
  g.next.assign(g.start.begin(), g.start.end() - 1);
  for (int64_t i = 0; i < N; ++i) g.order[g.next[slot_ids[i]]++] = i;
  return true;
}

// Row i of a [N, H] array of dtype d with row stride `stride` (elements) converted to float32.
void load_row(const void* base, DType d, int64_t stride, int64_t i, int64_t H, float* dst) {
  const char* p = static_cast<const char*>(base) + i * stride * dtype_size(d);
  switch (d) {
    case DType::kF32: std::memcpy(dst, p, static_cast<size_t>(H) * sizeof(float)); break;
    case DType::kBF16: {
      const uint16_t* q = reinterpret_cast<const uint16_t*>(p);
      for (int64_t k = 0; k < H; ++k) dst[k] = bf16_bits_to_float(q[k]);
      break;
    }
    default: {
      const uint16_t* q = reinterpret_cast<const uint16_t*>(p);
      for (int64_t k = 0; k < H; ++k) dst[k] = f16_bits_to_float(q[k]);
      break;
    }
  }
}

void store_row(void* base, DType d, int64_t stride, int64_t i, int64_t H, const float* src) {
  char* p = static_cast<char*>(base) + i * stride * dtype_size(d);
  switch (d) {
    case DType::kF32: std::memcpy(p, src, static_cast<size_t>(H) * sizeof(float)); break;
    case DType::kBF16: {
      uint16_t* q = reinterpret_cast<uint16_t*>(p);
      for (int64_t k = 0; k < H; ++k) q[k] = float_to_bf16_bits(src[k]);
      break;
    }
    default: {
      uint16_t* q = reinterpret_cast<uint16_t*>(p);
      for (int64_t k = 0; k < H; ++k) q[k] = float_to_f16_bits(src[k]);
      break;
    }
  }
}

bool row_finite(const float* v, int64_t H) {
  float acc = 0.f;  // x - x is 0 for finite x and NaN otherwise; NaN propagates through the sum
#pragma omp simd reduction(+ : acc)
  for (int64_t k = 0; k < H; ++k) acc += v[k] - v[k];
  return acc == 0.f;
}

// Forward of one slot on n gathered rows in s.X (block 0).  Fills x_1..x_L, AG, Hb and rinv.
void slot_forward(const DistillerShape& sh, const float* p, int64_t n, SlotScratch& s, CpuGemm gemm) {
  const int64_t H = sh.H, R = sh.R, L = sh.L;
  for (int64_t j = 0; j < L; ++j) {
    const float* W1 = p + sh.off_W1(j);
    const float* c = p + sh.off_c(j);
    const float* B = p + sh.off_B(j);
    const float* xj = s.X.data() + j * n * H;
    float* xn = s.X.data() + (j + 1) * n * H;
    float* ag = s.AG.data() + j * n * 2 * R;
    float* h = s.Hb.data() + j * n * R;
    gemm(false, false, n, 2 * R, H, 1.f, xj, H, W1, 2 * R, 0.f, ag, 2 * R);  // (a, g - c) = x W1
    for (int64_t i = 0; i < n; ++i) {
      float* a = ag + i * 2 * R;
      float* g = a + R;
      float* hi = h + i * R;
      for (int64_t r = 0; r < R; ++r) {
        const float gv = g[r] + c[r];
        g[r] = gv;
        hi[r] = a[r] * siluf(gv);
      }
    }
    std::memcpy(xn, xj, static_cast<size_t>(n * H) * sizeof(float));
    gemm(false, false, n, H, R, 1.f, h, R, B, H, 1.f, xn, H);  // x' = x + h B
  }
  const float* xL = s.X.data() + L * n * H;
  for (int64_t i = 0; i < n; ++i) {
    const float* x = xL + i * H;
    double ss = 0.0;
    for (int64_t k = 0; k < H; ++k) ss += static_cast<double>(x[k]) * x[k];
    s.rinv[i] = 1.0f / std::sqrt(static_cast<float>(ss / static_cast<double>(H)) + sh.norm_eps);
  }
}

void ensure_scratch(const DistillerShape& sh, int64_t n, bool train, SlotScratch& s) {
  const size_t H = static_cast<size_t>(sh.H), R = static_cast<size_t>(sh.R), L = static_cast<size_t>(sh.L);
  const size_t nn = static_cast<size_t>(n);
  ensure(s.X, (L + 1) * nn * H);
  ensure(s.AG, L * nn * 2 * R);
  ensure(s.Hb, L * nn * R);
  ensure(s.rinv, nn);
  if (train) {
    ensure(s.T, nn * H);
    ensure(s.dX, nn * H);
    ensure(s.D, nn * 2 * R);
    ensure(s.grad, static_cast<size_t>(sh.params_per_slot()));
  }
}

// Fixed chunking of the P-element passes (independent of the thread count => deterministic sums).
constexpr int64_t kChunk = 1 << 15;

// On x86-64 the P-element passes are compiled for AVX-512 and AVX2 as well as the baseline ISA, picked
// at run time.
#if defined(__x86_64__) && defined(__ELF__) && (defined(__GNUC__) || defined(__clang__)) && \
    !defined(ESAMP_NO_X86_DISPATCH)
#define ESAMP_X86_DISPATCH 1
#define ESAMP_MULTIVERSION __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define ESAMP_MULTIVERSION
#endif

ESAMP_MULTIVERSION __attribute__((noinline)) double sum_squares_chunk(const float* g, int64_t n) {
  double acc = 0.0;
#pragma omp simd reduction(+ : acc)
  for (int64_t k = 0; k < n; ++k) acc += static_cast<double>(g[k]) * static_cast<double>(g[k]);
  return acc;
}

// Adam over n elements with the gradient scaled by coef.  Compilers do not vectorise sqrtf under the
// default -fmath-errno (the scalar loop is ~5x slower than the vector one here), so on x86-64 the loop is
// written with intrinsics.  Every vector path performs the operations of esamp::adam_update (math.h) in
// the same order (the compiler may contract a*b + c into an FMA, as it may in the scalar code):
//   m = b1 m + (1 - b1) g;  v = b2 v + ((1 - b2) g) g;  p -= (lr (m / bc1)) / (sqrt(v / bc2) + eps).
struct AdamArgs {
  float coef, lr, b1, b2, eps, bc1, bc2;
};

void adam_chunk_scalar(float* __restrict p, float* __restrict m, float* __restrict v, const float* __restrict g,
                       int64_t n, const AdamArgs& a) {
  for (int64_t k = 0; k < n; ++k) adam_update(p[k], m[k], v[k], g[k] * a.coef, a.lr, a.b1, a.b2, a.eps, a.bc1, a.bc2);
}

#if defined(ESAMP_X86_DISPATCH)
#define ESAMP_ADAM_VEC_BODY(W, VT, SFX)                                                                    \
  const VT cf = _mm##SFX##_set1_ps(a.coef), lr = _mm##SFX##_set1_ps(a.lr);                               \
  const VT b1 = _mm##SFX##_set1_ps(a.b1), ob1 = _mm##SFX##_set1_ps(1.0f - a.b1);                         \
  const VT b2 = _mm##SFX##_set1_ps(a.b2), ob2 = _mm##SFX##_set1_ps(1.0f - a.b2);                         \
  const VT bc1 = _mm##SFX##_set1_ps(a.bc1), bc2 = _mm##SFX##_set1_ps(a.bc2);                             \
  const VT eps = _mm##SFX##_set1_ps(a.eps);                                                              \
  int64_t k = 0;                                                                                         \
  for (; k + W <= n; k += W) {                                                                           \
    const VT gk = _mm##SFX##_mul_ps(_mm##SFX##_loadu_ps(g + k), cf);                                     \
    const VT mk = _mm##SFX##_add_ps(_mm##SFX##_mul_ps(b1, _mm##SFX##_loadu_ps(m + k)),                   \
                                    _mm##SFX##_mul_ps(ob1, gk));                                         \
    const VT vk = _mm##SFX##_add_ps(_mm##SFX##_mul_ps(b2, _mm##SFX##_loadu_ps(v + k)),                   \
                                    _mm##SFX##_mul_ps(_mm##SFX##_mul_ps(ob2, gk), gk));                  \
    _mm##SFX##_storeu_ps(m + k, mk);                                                                     \
    _mm##SFX##_storeu_ps(v + k, vk);                                                                     \
    const VT num = _mm##SFX##_mul_ps(lr, _mm##SFX##_div_ps(mk, bc1));                                    \
    const VT den = _mm##SFX##_add_ps(_mm##SFX##_sqrt_ps(_mm##SFX##_div_ps(vk, bc2)), eps);               \
    _mm##SFX##_storeu_ps(p + k, _mm##SFX##_sub_ps(_mm##SFX##_loadu_ps(p + k), _mm##SFX##_div_ps(num, den))); \
  }                                                                                                      \
  adam_chunk_scalar(p + k, m + k, v + k, g + k, n - k, a);

// GCC 12 reports a false -Wmaybe-uninitialized inside _mm512_sqrt_ps (_mm512_undefined_ps).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
__attribute__((target("avx512f"))) void adam_chunk_avx512(float* __restrict p, float* __restrict m,
                                                           float* __restrict v, const float* __restrict g, int64_t n,
                                                           const AdamArgs& a) {
  ESAMP_ADAM_VEC_BODY(16, __m512, 512)
}
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

__attribute__((target("avx2"))) void adam_chunk_avx2(float* __restrict p, float* __restrict m, float* __restrict v,
                                                     const float* __restrict g, int64_t n, const AdamArgs& a) {
  ESAMP_ADAM_VEC_BODY(8, __m256, 256)
}

void adam_chunk_sse2(float* __restrict p, float* __restrict m, float* __restrict v, const float* __restrict g,
                     int64_t n, const AdamArgs& a) {
  ESAMP_ADAM_VEC_BODY(4, __m128, )
}
#undef ESAMP_ADAM_VEC_BODY

using AdamChunkFn = void (*)(float*, float*, float*, const float*, int64_t, const AdamArgs&);

AdamChunkFn pick_adam_chunk() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) return &adam_chunk_avx512;
  if (__builtin_cpu_supports("avx2")) return &adam_chunk_avx2;
  return &adam_chunk_sse2;
}

void adam_chunk(float* p, float* m, float* v, const float* g, int64_t n, const AdamArgs& a) {
  static const AdamChunkFn fn = pick_adam_chunk();
  fn(p, m, v, g, n, a);
}
#else
void adam_chunk(float* p, float* m, float* v, const float* g, int64_t n, const AdamArgs& a) {
  adam_chunk_scalar(p, m, v, g, n, a);
}
#endif

// sum of squares of g[0..P) in double; chunk partial sums combined in chunk order.
double sum_squares(const float* g, int64_t P, bool parallel) {
  const int64_t nchunks = (P + kChunk - 1) / kChunk;
  thread_local std::vector<double> partial;
  double* part = ensure(partial, static_cast<size_t>(nchunks));
#pragma omp parallel for schedule(static) if (parallel && nchunks > 1)
  for (int64_t ch = 0; ch < nchunks; ++ch) {
    const int64_t b = ch * kChunk;
    part[ch] = sum_squares_chunk(g + b, std::min(P - b, kChunk));
  }
  double total = 0.0;
  for (int64_t ch = 0; ch < nchunks; ++ch) total += part[ch];
  return total;
}

void adam_pass(float* p, float* m, float* v, const float* g, int64_t P, float coef, const AdamConfig& cfg, float bc1,
               float bc2, bool parallel) {
  const AdamArgs args{coef, cfg.lr, cfg.beta1, cfg.beta2, cfg.eps, bc1, bc2};
  const int64_t nchunks = (P + kChunk - 1) / kChunk;
#pragma omp parallel for schedule(static) if (parallel && nchunks > 1)
  for (int64_t ch = 0; ch < nchunks; ++ch) {
    const int64_t b = ch * kChunk;
    adam_chunk(p + b, m + b, v + b, g + b, std::min(P - b, kChunk), args);
  }
}

struct SlotResult {
  int64_t trained = 0, skipped = 0;
  float loss = std::numeric_limits<float>::quiet_NaN();
  bool updated = false;
};

// Gathers the rows of slot `slot`, keeps the finite ones; returns the number kept.
int64_t gather_train_rows(const DistillerShape& sh, const RowsIn& rows, const int64_t* idx, int64_t cnt,
                          SlotScratch& s) {
  const int64_t H = sh.H;
  int64_t n = 0;
  for (int64_t q = 0; q < cnt; ++q) {
    const int64_t i = idx[q];
    float* xd = s.X.data() + n * H;
    float* td = s.T.data() + n * H;
    load_row(rows.x, rows.x_dtype, rows.x_stride, i, H, xd);
    load_row(rows.t, rows.t_dtype, rows.t_stride, i, H, td);
    if (row_finite(xd, H) && row_finite(td, H)) ++n;  // else the next row overwrites this one
  }
  return n;
}

SlotResult train_slot(const DistillerShape& sh, const AdamConfig& cfg, DistillerBank bank, int64_t slot,
                      const RowsIn& rows, const int64_t* idx, int64_t cnt, CpuGemm gemm, bool inner_parallel) {
  SlotResult res;
  const int64_t H = sh.H, R = sh.R, L = sh.L, P = sh.params_per_slot();
  SlotScratch& s = thread_scratch();
  ensure_scratch(sh, cnt, true, s);
  const int64_t n = gather_train_rows(sh, rows, idx, cnt, s);
  res.skipped = cnt - n;
  if (n == 0) return res;  // idle: untouched, loss NaN

  float* p = bank.params + slot * P;
  slot_forward(sh, p, n, s, gemm);

  // Loss and dL/dx_L through the RMSNorm.  loss = sum_rows ||y - t||^2 / (n H).
  float* grad = s.grad.data();
  const float* gamma = p + sh.off_gamma();
  float* dgamma = grad + sh.off_gamma();
  std::fill(dgamma, dgamma + H, 0.f);
  const float* xL = s.X.data() + L * n * H;
  const float inv = 2.0f / static_cast<float>(n * H);
  double loss = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    const float* x = xL + i * H;
    const float* t = s.T.data() + i * H;
    float* dx = s.dX.data() + i * H;
    const float r = s.rinv[i];
    double ux = 0.0;
    for (int64_t k = 0; k < H; ++k) {
      const float xh = x[k] * r;
      const float d = xh * gamma[k] - t[k];
      loss += static_cast<double>(d) * d;
      const float dy = inv * d;
      dgamma[k] += dy * xh;
      const float u = dy * gamma[k];
      dx[k] = u;
      ux += static_cast<double>(u) * x[k];
    }
    const float coef = static_cast<float>(ux / static_cast<double>(H)) * r * r * r;
    for (int64_t k = 0; k < H; ++k) dx[k] = r * dx[k] - x[k] * coef;
  }
  const float loss_f = static_cast<float>(loss / static_cast<double>(n * H));

  // Blocks in reverse.  dX holds dL/dx_{j+1} on entry and dL/dx_j on exit.
  for (int64_t j = L - 1; j >= 0; --j) {
    const float* W1 = p + sh.off_W1(j);
    const float* B = p + sh.off_B(j);
    const float* xj = s.X.data() + j * n * H;
    const float* ag = s.AG.data() + j * n * 2 * R;
    const float* h = s.Hb.data() + j * n * R;
    float* D = s.D.data();
    float* dc = grad + sh.off_c(j);
    gemm(true, false, R, H, n, 1.f, h, R, s.dX.data(), H, 0.f, grad + sh.off_B(j), H);  // dB = h^T dX
    gemm(false, true, n, R, H, 1.f, s.dX.data(), H, B, H, 0.f, D, 2 * R);               // dh = dX B^T
    std::fill(dc, dc + R, 0.f);
    for (int64_t i = 0; i < n; ++i) {
      const float* a = ag + i * 2 * R;
      const float* g = a + R;
      float* da = D + i * 2 * R;
      float* dg = da + R;
      for (int64_t r = 0; r < R; ++r) {
        const float dh = da[r];
        const float sg = sigmoidf_(g[r]);
        da[r] = dh * g[r] * sg;                               // silu(g)
        dg[r] = dh * a[r] * (sg * (1.0f + g[r] * (1.0f - sg)));  // dsilu(g)
        dc[r] += dg[r];
      }
    }
    gemm(true, false, H, 2 * R, n, 1.f, xj, H, D, 2 * R, 0.f, grad + sh.off_W1(j), 2 * R);  // dW1 = x^T (da, dg)
    if (j > 0) gemm(false, true, n, H, 2 * R, 1.f, D, 2 * R, W1, 2 * R, 1.f, s.dX.data(), H);  // dX += D W1^T
  }

  const float norm = static_cast<float>(std::sqrt(sum_squares(grad, P, inner_parallel)));
  if (!is_finite_f(norm) || !is_finite_f(loss_f)) {  // overflow: leave the slot untouched
    res.skipped = cnt;
    return res;
  }
  const float coef = clip_coef(norm, cfg.clip);
  const int64_t t = ++bank.step[slot];
  const float bc1 = static_cast<float>(1.0 - std::pow(static_cast<double>(cfg.beta1), static_cast<double>(t)));
  const float bc2 = static_cast<float>(1.0 - std::pow(static_cast<double>(cfg.beta2), static_cast<double>(t)));
  adam_pass(p, bank.exp_avg + slot * P, bank.exp_avg_sq + slot * P, grad, P, coef, cfg, bc1, bc2, inner_parallel);
  res.trained = n;
  res.loss = loss_f;
  res.updated = true;
  return res;
}

void forward_slot(const DistillerShape& sh, const float* p, const RowsIn& rows, const int64_t* idx, int64_t cnt,
                  void* out, DType out_dtype, int64_t out_stride, CpuGemm gemm) {
  const int64_t H = sh.H, L = sh.L;
  SlotScratch& s = thread_scratch();
  ensure_scratch(sh, cnt, false, s);
  for (int64_t q = 0; q < cnt; ++q) load_row(rows.x, rows.x_dtype, rows.x_stride, idx[q], H, s.X.data() + q * H);
  slot_forward(sh, p, cnt, s, gemm);
  const float* gamma = p + sh.off_gamma();
  float* xL = s.X.data() + L * cnt * H;  // normalised in place, then stored
  for (int64_t q = 0; q < cnt; ++q) {
    float* x = xL + q * H;
    const float r = s.rinv[q];
    for (int64_t k = 0; k < H; ++k) x[k] = x[k] * r * gamma[k];
    store_row(out, out_dtype, out_stride, idx[q], H, x);
  }
}

bool shape_ok(const DistillerShape& sh) { return sh.H >= 1 && sh.R >= 1 && sh.L >= 1 && sh.norm_eps >= 0.f; }

bool dtype_ok(DType d) { return d == DType::kF32 || d == DType::kBF16 || d == DType::kF16; }

Grouping& thread_grouping() {
  thread_local Grouping g;
  return g;
}

}  // namespace

Status distiller_forward_cpu(const DistillerShape& sh, const float* params, int64_t S, const RowsIn& rows, void* out,
                             DType out_dtype, int64_t out_stride, CpuGemm gemm) {
  if (!shape_ok(sh) || S < 1 || rows.N < 0) return Status::kInvalidArgument;
  if (!dtype_ok(rows.x_dtype) || !dtype_ok(out_dtype)) return Status::kUnsupportedDType;
  if (rows.N == 0) return Status::kOk;
  // Input rows may overlap (stride 0 for an expanded row, any stride for a single row); outputs may not.
  if (!params || !rows.x || !rows.slot_ids || !out || rows.x_stride < 0 || out_stride < sh.H)
    return Status::kInvalidArgument;
  Grouping& g = thread_grouping();
  if (!group_rows(rows.slot_ids, rows.N, S, g)) return Status::kInvalidArgument;
  const int64_t P = sh.params_per_slot();
  const int64_t na = static_cast<int64_t>(g.active.size());
  const int64_t* start = g.start.data();
  const int64_t* order = g.order.data();
  const int64_t* active = g.active.data();
  if (na >= 2) {
#pragma omp parallel for schedule(dynamic, 1)
    for (int64_t q = 0; q < na; ++q) {
      const int64_t s = active[q];
      forward_slot(sh, params + s * P, rows, order + start[s], start[s + 1] - start[s], out, out_dtype, out_stride,
                   gemm);
    }
  } else if (na == 1) {
    // No OpenMP region at all for a single slot: the BLAS inside may then use every thread.  (A parallel region
    // with a false `if` clause still counts as a nesting level, and a BLAS parallel region nested in it can pay
    // for a fresh thread team on every call -- measured 8x slower than the plain GEMMs for S = 1, R = 384.)
    const int64_t s = active[0];
    forward_slot(sh, params + s * P, rows, order + start[s], start[s + 1] - start[s], out, out_dtype, out_stride,
                 gemm);
  }
  return Status::kOk;
}

Status distiller_train_step_cpu(const DistillerShape& sh, const AdamConfig& cfg, DistillerBank bank,
                                const RowsIn& rows, float* losses, double* stats, CpuGemm gemm) {
  if (!shape_ok(sh) || bank.S < 1 || rows.N < 0) return Status::kInvalidArgument;
  if (!bank.params || !bank.exp_avg || !bank.exp_avg_sq || !bank.step || !losses || !stats)
    return Status::kInvalidArgument;
  if (!dtype_ok(rows.x_dtype) || !dtype_ok(rows.t_dtype)) return Status::kUnsupportedDType;
  if (rows.N > 0 && (!rows.x || !rows.t || !rows.slot_ids || rows.x_stride < 0 || rows.t_stride < 0))
    return Status::kInvalidArgument;
  Grouping& g = thread_grouping();
  if (!group_rows(rows.slot_ids, rows.N, bank.S, g)) return Status::kInvalidArgument;
  for (int64_t s = 0; s < bank.S; ++s) losses[s] = std::numeric_limits<float>::quiet_NaN();
  const int64_t na = static_cast<int64_t>(g.active.size());
  thread_local std::vector<SlotResult> results_buf;
  results_buf.assign(static_cast<size_t>(na), SlotResult{});
  SlotResult* results = results_buf.data();
  const int64_t* start = g.start.data();
  const int64_t* order = g.order.data();
  const int64_t* active = g.active.data();
  if (na >= 2) {
#pragma omp parallel for schedule(dynamic, 1)
    for (int64_t q = 0; q < na; ++q) {
      const int64_t s = active[q];
      results[q] = train_slot(sh, cfg, bank, s, rows, order + start[s], start[s + 1] - start[s], gemm, false);
    }
  } else if (na == 1) {
    const int64_t s = active[0];
    results[0] = train_slot(sh, cfg, bank, s, rows, order + start[s], start[s + 1] - start[s], gemm, true);
  }
  double trained = 0, skipped = 0, loss_sum = 0;
  bool any = false;
  for (int64_t q = 0; q < na; ++q) {
    const SlotResult& r = results[q];
    trained += static_cast<double>(r.trained);
    skipped += static_cast<double>(r.skipped);
    if (r.updated) {
      losses[active[q]] = r.loss;
      loss_sum += static_cast<double>(r.loss);
      any = true;
    }
  }
  stats[kStatRowsTrained] += trained;
  stats[kStatRowsSkipped] += skipped;
  stats[kStatLossSum] += loss_sum;
  stats[kStatSteps] += any ? 1.0 : 0.0;
  return Status::kOk;
}

Status distiller_reset_cpu(const DistillerShape& sh, DistillerBank bank, const int64_t* slots, int64_t n,
                           uint64_t seed, const float* gamma_init) {
  if (!shape_ok(sh) || bank.S < 1 || n < 0) return Status::kInvalidArgument;
  if (n == 0) return Status::kOk;
  if (!slots || !bank.params || !bank.exp_avg || !bank.exp_avg_sq || !bank.step) return Status::kInvalidArgument;
  for (int64_t q = 0; q < n; ++q)
    if (slots[q] < 0 || slots[q] >= bank.S) return Status::kInvalidArgument;
  const int64_t H = sh.H, R = sh.R, P = sh.params_per_slot();
  // Every slot gets the same initial parameters: build them once in the first listed slot, copy after.
  float* p0 = bank.params + slots[0] * P;
  for (int64_t j = 0; j < sh.L; ++j) {
    const int64_t o = sh.off_W1(j), m = 2 * H * R;
#pragma omp parallel for schedule(static) if (m > (1 << 14))
    for (int64_t e = 0; e < m; ++e) p0[o + e] = kInitStd * init_normal(seed, static_cast<uint64_t>(o + e));
    std::fill(p0 + sh.off_c(j), p0 + sh.off_c(j) + R, kInitGateBias);
    std::fill(p0 + sh.off_B(j), p0 + sh.off_B(j) + R * H, 0.f);
  }
  float* gm = p0 + sh.off_gamma();
  if (gamma_init) {
    std::memcpy(gm, gamma_init, static_cast<size_t>(H) * sizeof(float));
  } else {
    std::fill(gm, gm + H, 1.f);
  }
  for (int64_t q = 0; q < n; ++q) {
    const int64_t s = slots[q];
    if (s != slots[0]) std::memcpy(bank.params + s * P, p0, static_cast<size_t>(P) * sizeof(float));
    std::memset(bank.exp_avg + s * P, 0, static_cast<size_t>(P) * sizeof(float));
    std::memset(bank.exp_avg_sq + s * P, 0, static_cast<size_t>(P) * sizeof(float));
    bank.step[s] = 0;
  }
  return Status::kOk;
}

}  // namespace esamp
