// Helpers shared by the C++ benchmark binaries (no libtorch): percentiles, command-line values, dtype names,
// and (in .cu files) a CUDA error check, device allocation and a device-side normal fill.
#pragma once
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "esamp/common.h"
#include "esamp/philox.h"

namespace esamp_bench {

// Linear-interpolated q-quantile (q in [0, 1]) of v; v must be non-empty.
inline double pct(std::vector<double> v, double q) {
  std::sort(v.begin(), v.end());
  const double pos = q * static_cast<double>(v.size() - 1);
  const size_t i = static_cast<size_t>(pos);
  const double f = pos - static_cast<double>(i);
  return i + 1 < v.size() ? v[i] * (1 - f) + v[i + 1] * f : v[i];
}

// The value after argv[i] (advancing i); exits with status 2 and a message naming the flag when it is missing.
inline const char* arg_value(int argc, char** argv, int& i) {
  if (i + 1 >= argc) {
    std::fprintf(stderr, "%s needs a value\n", argv[i]);
    std::exit(2);
  }
  return argv[++i];
}

inline esamp::DType parse_dtype(const std::string& s) {
  if (s == "f32") return esamp::DType::kF32;
  if (s == "bf16") return esamp::DType::kBF16;
  if (s == "f16") return esamp::DType::kF16;
  std::fprintf(stderr, "unknown dtype %s (f32|bf16|f16)\n", s.c_str());
  std::exit(2);
}

}  // namespace esamp_bench

#ifdef __CUDACC__
#include <cuda_runtime.h>

#define CK(x)                                                                                    \
  do {                                                                                           \
    cudaError_t e_ = (x);                                                                        \
    if (e_ != cudaSuccess) {                                                                     \
      std::fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e_));   \
      std::exit(1);                                                                              \
    }                                                                                            \
  } while (0)

namespace esamp_bench {

template <typename T>
T* dalloc(size_t n) {
  T* p = nullptr;
  CK(cudaMalloc(&p, std::max<size_t>(n, 1) * sizeof(T)));
  return p;
}

// out[i] = scale * N(0, 1) from the Philox init stream (seed, i), stored in dtype dt.
__global__ void fill_normal(void* out, esamp::DType dt, int64_t n, uint64_t seed, float scale) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    esamp::store_from_float(out, dt, i, scale * esamp::init_normal(seed, static_cast<uint64_t>(i)));
}

}  // namespace esamp_bench
#endif
