// reweight_common.cuh -- device helpers shared by the reweight translation units (row kernels per logits
// dtype, dense kernels).  Included by .cu files only; everything device-side has internal linkage.
#pragma once
#include <cooperative_groups.h>

#include <cfloat>
#include <climits>
#include <cmath>

#include "cuda_utils.cuh"
#include "esamp/common.h"
#include "esamp/cuda_plan.h"
#include "esamp/philox.h"
#include "esamp/sampling.h"

namespace esamp {
namespace rw_detail {

// Row kernel configuration (host -> device).
struct RowCfg {
  float* pred_ws;  // [B * cluster, Hp] float when !pred_in_smem
  int64_t Hp;
  int pred_in_smem;
  int logits_vec_ok;
  int weight_vec_ok;
  int out_vec_ok;
  int cluster;
  int dense_enabled;
  int dense_force;
  RwRowInfo* info;
};

// Dense kernels' arguments (host -> device).
struct DenseArgs {
  ReweightProblem pr;
  const RwRowInfo* info;
  const int* rows;
  const int* meta;
  RwDensePartial* partials;
  float* out;  // reweight_logits
  int64_t out_stride;
  int64_t n_vtiles;  // token tiles (= partials) per dense row: 128-token GEMM tiles, or 1024-token stream tiles
  int kout;
  int w_vec, p_vec, l_vec, o_vec;
  const float* d;    // cuBLAS variant: D[., d_stride] float32 = pred . W^T (no bias); row r at r * d_stride
  int64_t d_stride;  // 0 for a broadcast prediction (one GEMM row)
};

// Host entry points of the translation units (reweight_row_{f32,bf16,f16}.cu, reweight_dense.cu).
int prepare_row_f32(bool out);
int prepare_row_bf16(bool out);
int prepare_row_f16(bool out);
Status launch_row_f32(bool out, const ReweightProblem& pr, int64_t* tokens, float* logprobs, float* o,
                      int64_t out_stride, const RowCfg& cfg, size_t smem, cudaStream_t stream);
Status launch_row_bf16(bool out, const ReweightProblem& pr, int64_t* tokens, float* logprobs, float* o,
                       int64_t out_stride, const RowCfg& cfg, size_t smem, cudaStream_t stream);
Status launch_row_f16(bool out, const ReweightProblem& pr, int64_t* tokens, float* logprobs, float* o,
                      int64_t out_stride, const RowCfg& cfg, size_t smem, cudaStream_t stream);
size_t row_smem_bytes(bool pred_in_smem, int64_t Hp);
Status launch_dense(const DenseArgs& g, int64_t B, unsigned grid, int64_t* tokens, float* logprobs, cudaStream_t stream);
// cuBLAS variant: list, [pred copy], GEMM pieces into g.d, streaming pass, finish (reweight only).
Status launch_dense_cublas(const DenseArgs& g, const DenseGemmPlan& dg, void* cublas_handle, float* d, void* pcopy,
                           int64_t B, unsigned stream_grid, int64_t* tokens, float* logprobs, cudaStream_t stream);

}  // namespace rw_detail

namespace {

using namespace cuda_detail;
using rw_detail::DenseArgs;
using rw_detail::RowCfg;
namespace cg = cooperative_groups;

constexpr int kThreads = kRwThreads;
constexpr int kWarps = kThreads / 32;
constexpr int kBins = 2048;                 // 11-bit radix digits (level 2 uses 10 bits)
constexpr int kListCap = kRwListCap;
constexpr int kChunkList = kThreads * 8;    // ids per chunk (fits uint16 offsets)
constexpr int kBinsPerThread = kBins / kThreads;
constexpr int kPrefetch = 4;                // chunks whose 16-byte vectors are loaded before processing
static_assert(kBins % kThreads == 0, "histogram bins per thread");
constexpr float kGumbelBound = 17.0f;       // > max over all words of gumbel_from_word (16.64)

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
// m = ((1 + beta) l - beta d) / T, every operation rounded separately (identical on both paths and on the CPU).
__device__ __forceinline__ float mix(float l, float d, float beta, float T) {
  return sanitize_m(__fdiv_rn(__fsub_rn(__fmul_rn(1.0f + beta, sanitize_logit(l)), __fmul_rn(beta, d)), T));
}

// ------------------------------------------------------------------------------------------------
// Sampler state: best Gumbel key (ties -> smaller id), logsumexp (max, sum in double), arg max of z.
// ------------------------------------------------------------------------------------------------
struct SampleState {
  float key, m;
  int id;
  float zb;
  int zid;
  float mx;
  double s;
  __device__ void init() {
    key = -INFINITY;
    m = -INFINITY;
    id = -1;
    zb = -INFINITY;
    zid = -1;
    mx = -INFINITY;
    s = 0.0;
  }
  __device__ void add_z(float z, int v) {
    if (z > zb || (z == zb && zid >= 0 && v < zid) || (zid < 0 && z > -INFINITY)) {
      zb = z;
      zid = v;
    }
  }
  __device__ void add_lse(float mm) {
    if (mm == -INFINITY) return;
    if (mm > mx) {
      s = s * static_cast<double>(expf(mx - mm)) + 1.0;
      mx = mm;
    } else {
      s += static_cast<double>(expf(mm - mx));
    }
  }
  __device__ void add_key(float k, float mm, int v) {
    if (k > key || (k == key && id >= 0 && v < id) || id < 0) {
      key = k;
      m = mm;
      id = v;
    }
  }
  // merge another state (commutative and exact for key/id/zb/zid; the logsumexp order is the caller's)
  __device__ void merge(float okey, float om, int oid, float ozb, int ozid, float omx, double os) {
    if (oid >= 0) add_key(okey, om, oid);
    if (ozid >= 0) {
      if (zid < 0 || ozb > zb || (ozb == zb && ozid < zid)) {
        zb = ozb;
        zid = ozid;
      }
    }
    if (omx == -INFINITY) return;
    if (mx == -INFINITY) {
      mx = omx;
      s = os;
    } else if (omx > mx) {
      s = s * static_cast<double>(expf(mx - omx)) + os;
      mx = omx;
    } else {
      s += os * static_cast<double>(expf(omx - mx));
    }
  }
  __device__ void merge(const SampleState& o) { merge(o.key, o.m, o.id, o.zb, o.zid, o.mx, o.s); }
  __device__ void shfl_merge(int mask_xor) {
    const float okey = __shfl_xor_sync(kFullMask, key, mask_xor);
    const float om = __shfl_xor_sync(kFullMask, m, mask_xor);
    const int oid = __shfl_xor_sync(kFullMask, id, mask_xor);
    const float ozb = __shfl_xor_sync(kFullMask, zb, mask_xor);
    const int ozid = __shfl_xor_sync(kFullMask, zid, mask_xor);
    const float omx = __shfl_xor_sync(kFullMask, mx, mask_xor);
    const double os = __shfl_xor_sync(kFullMask, s, mask_xor);
    merge(okey, om, oid, ozb, ozid, omx, os);
  }
};

// Candidate c with mixed logit m: the key is only evaluated when it can still win (exact pruning).
__device__ __forceinline__ void sample_one(SampleState& st, float mm, int c, uint32_t word) {
  st.add_lse(mm);
  if (!(mm + kGumbelBound >= st.key) && st.id >= 0) return;
  st.add_key(mm + gumbel_from_word(word), mm, c);
}

// ------------------------------------------------------------------------------------------------
// Cluster helpers (a cluster of n blocks per row on sm_90; n == 1 elsewhere)
// ------------------------------------------------------------------------------------------------
struct Cl {
  int rank, n;
  __device__ __forceinline__ void sync() const {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    if (n > 1) {
      cg::this_cluster().sync();
      return;
    }
#endif
    __syncthreads();
  }
  template <typename T>
  __device__ __forceinline__ T* at(T* p, int r) const {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    if (n > 1) return cg::this_cluster().map_shared_rank(p, static_cast<unsigned>(r));
#endif
    return p;
  }
};

}  // namespace
}  // namespace esamp
