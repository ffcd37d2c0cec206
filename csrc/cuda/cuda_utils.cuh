// cuda_utils.cuh -- small device helpers shared by the esamp CUDA kernels (torch-free).
//
// Every reduction here is deterministic: the order of floating-point operations depends only on
// the launch shape, never on scheduling (no float atomics), so that a replayed CUDA graph gives
// bit-identical results to the eager launch.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "esamp/common.h"
#include "esamp/cuda_plan.h"

namespace esamp {
namespace cuda_detail {

constexpr unsigned kFullMask = 0xffffffffu;

// Launch-error check used right after every <<<...>>> launch.
inline Status launch_status() { return cudaGetLastError() == cudaSuccess ? Status::kOk : Status::kCudaError; }

#define ESAMP_CUDA_TRY(expr)                                 \
  do {                                                       \
    if ((expr) != cudaSuccess) return ::esamp::Status::kCudaError; \
  } while (0)

#define ESAMP_LAUNCH_TRY()                                                  \
  do {                                                                      \
    ::esamp::Status _s = ::esamp::cuda_detail::launch_status();             \
    if (_s != ::esamp::Status::kOk) return _s;                              \
  } while (0)

// Butterfly (xor) warp sum: every lane ends with the bit-identical result, because at each step the
// two lanes of a pair add the same two operands (a + b == b + a exactly in IEEE arithmetic).
template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(kFullMask, v, o));
  return v;
}

// Block-wide sum (blockDim.x a multiple of 32, at most 1024).  Every thread returns the same value.
// `scratch` holds >= 32 elements.  Contains __syncthreads(); call from all threads of the block.
template <typename T>
__device__ __forceinline__ T block_sum(T v, T* scratch) {
  const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = blockDim.x >> 5;
  v = warp_sum(v);
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 0) scratch[wid] = v;
  __syncthreads();
  T r = lane < nw ? scratch[lane] : T(0);
  return warp_sum(r);
}

// (value, index) arg-max: larger value wins, equal values -> smaller index.  "None" is
// (-inf, INT_MAX); any finite value beats it.
__device__ __forceinline__ bool argmax_better(float v, int i, float bv, int bi) {
  return v > bv || (v == bv && i < bi);
}

__device__ __forceinline__ void warp_argmax(float& v, int& i) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float ov = __shfl_xor_sync(kFullMask, v, o);
    const int oi = __shfl_xor_sync(kFullMask, i, o);
    if (argmax_better(ov, oi, v, i)) {
      v = ov;
      i = oi;
    }
  }
}

// Block-wide arg-max; every thread gets the result.  sv/si hold >= 32 elements.
__device__ __forceinline__ void block_argmax(float& v, int& i, float* sv, int* si) {
  const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = blockDim.x >> 5;
  warp_argmax(v, i);
  __syncthreads();
  if (lane == 0) {
    sv[wid] = v;
    si[wid] = i;
  }
  __syncthreads();
  v = lane < nw ? sv[lane] : -INFINITY;
  i = lane < nw ? si[lane] : 0x7fffffff;
  warp_argmax(v, i);
}

// Block-wide exclusive prefix sum of non-negative ints.  Returns the exclusive prefix of this
// thread and writes the block total to *total (same value in every thread).  scratch: >= 33 ints.
// Contains __syncthreads(); call from all threads of the block.
__device__ __forceinline__ int block_exclusive_scan(int v, int* scratch, int* total) {
  const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = blockDim.x >> 5;
  int incl = v;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int t = __shfl_up_sync(kFullMask, incl, o);
    if (lane >= o) incl += t;
  }
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 31) scratch[wid] = incl;
  __syncthreads();
  if (wid == 0) {
    const int w = lane < nw ? scratch[lane] : 0;
    int wi = w;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int t = __shfl_up_sync(kFullMask, wi, o);
      if (lane >= o) wi += t;
    }
    if (lane < nw) scratch[lane] = wi - w;  // exclusive prefix of warp totals
    if (lane == 31) scratch[32] = wi;       // block total
  }
  __syncthreads();
  *total = scratch[32];
  return scratch[wid] + incl - v;
}

// Block-wide exclusive prefix sum of non-negative 64-bit values (same contract as above, scratch: >= 33).
__device__ __forceinline__ unsigned long long block_exclusive_scan_u64(unsigned long long v, unsigned long long* scratch,
                                                                       unsigned long long* total) {
  const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = blockDim.x >> 5;
  unsigned long long incl = v;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const unsigned long long t = __shfl_up_sync(kFullMask, incl, o);
    if (lane >= o) incl += t;
  }
  __syncthreads();
  if (lane == 31) scratch[wid] = incl;
  __syncthreads();
  if (wid == 0) {
    const unsigned long long w = lane < nw ? scratch[lane] : 0ull;
    unsigned long long wi = w;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const unsigned long long t = __shfl_up_sync(kFullMask, wi, o);
      if (lane >= o) wi += t;
    }
    if (lane < nw) scratch[lane] = wi - w;
    if (lane == 31) scratch[32] = wi;
  }
  __syncthreads();
  *total = scratch[32];
  return scratch[wid] + incl - v;
}

// Device facts for the planners (host side; cached per device, no stream operation, capture-safe).
inline DeviceInfo device_info_base() {
  static DeviceInfo cache[64];
  static bool have[64] = {};
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64) return DeviceInfo{};
  if (!have[dev]) {
    DeviceInfo d;
    int v = 0;
    if (cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, dev) == cudaSuccess && v > 0) d.sm_count = v;
    if (cudaDeviceGetAttribute(&v, cudaDevAttrComputeCapabilityMajor, dev) == cudaSuccess) d.cc_major = v;
    d.max_cluster = 1;
    cache[dev] = d;
    have[dev] = true;
  }
  return cache[dev];
}

// Grid sizing helpers.
inline unsigned grid_dim(int64_t n, int64_t per_block, int64_t cap = 0x7fffffffLL) {
  int64_t g = (n + per_block - 1) / per_block;
  if (g < 1) g = 1;
  if (g > cap) g = cap;
  return static_cast<unsigned>(g);
}

// Blocks of a persistent (grid-stride) kernel over at most `items` work items.
inline unsigned persistent_grid(int64_t items, int per_sm = 4) {
  const int64_t cap = static_cast<int64_t>(device_info_base().sm_count) * per_sm;
  int64_t g = items < cap ? items : cap;
  return static_cast<unsigned>(g < 1 ? 1 : g);
}

}  // namespace cuda_detail
}  // namespace esamp
