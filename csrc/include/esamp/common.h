// esamp/common.h -- torch-free basics shared by CPU and CUDA kernels.
#pragma once
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define ESAMP_HD __host__ __device__ __forceinline__
#else
#define ESAMP_HD inline
#endif

namespace esamp {

// Status returned by every kernel entry point (kernels never throw, never abort).
enum class Status : int {
  kOk = 0,
  kInvalidArgument = 1,   // sizes / pointers that the binding layer should have rejected
  kUnsupportedDType = 2,
  kCudaError = 3,
  kCublasError = 4,
  kWorkspaceTooSmall = 5,
};

inline const char* status_string(Status s) {
  switch (s) {
    case Status::kOk: return "ok";
    case Status::kInvalidArgument: return "invalid argument";
    case Status::kUnsupportedDType: return "unsupported dtype";
    case Status::kCudaError: return "CUDA error";
    case Status::kCublasError: return "cuBLAS error";
    case Status::kWorkspaceTooSmall: return "workspace too small";
  }
  return "unknown status";
}

// Element types the kernels accept for activations, logits and LM-head weights.
enum class DType : int { kF32 = 0, kBF16 = 1, kF16 = 2 };

ESAMP_HD int dtype_size(DType d) { return d == DType::kF32 ? 4 : 2; }

// ---- scalar conversions (bit exact, host and device) ----------------------------------------
ESAMP_HD float bf16_bits_to_float(uint16_t b) {
  uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
#if defined(__CUDA_ARCH__)
  f = __uint_as_float(u);
#else
  std::memcpy(&f, &u, 4);
#endif
  return f;
}

ESAMP_HD uint16_t float_to_bf16_bits(float f) {
  uint32_t u;
#if defined(__CUDA_ARCH__)
  u = __float_as_uint(f);
#else
  std::memcpy(&u, &f, 4);
#endif
  if ((u & 0x7f800000u) == 0x7f800000u && (u & 0x007fffffu)) return static_cast<uint16_t>((u >> 16) | 0x40u);  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
  return static_cast<uint16_t>(u >> 16);
}

ESAMP_HD float f16_bits_to_float(uint16_t h) {
  uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t man = h & 0x3ffu;
  uint32_t u;
  if (exp == 0) {
    if (man == 0) {
      u = sign;
    } else {  // subnormal: renormalise
      int e = -1;
      do { ++e; man <<= 1; } while ((man & 0x400u) == 0);
      u = sign | (static_cast<uint32_t>(127 - 15 - e) << 23) | ((man & 0x3ffu) << 13);
    }
  } else if (exp == 31) {
    u = sign | 0x7f800000u | (man << 13);
  } else {
    u = sign | ((exp + 112u) << 23) | (man << 13);
  }
  float f;
#if defined(__CUDA_ARCH__)
  f = __uint_as_float(u);
#else
  std::memcpy(&f, &u, 4);
#endif
  return f;
}

ESAMP_HD uint16_t float_to_f16_bits(float f) {
  uint32_t u;
#if defined(__CUDA_ARCH__)
  u = __float_as_uint(f);
#else
  std::memcpy(&u, &f, 4);
#endif
  uint32_t sign = (u >> 16) & 0x8000u;
  uint32_t a = u & 0x7fffffffu;
  if (a >= 0x7f800000u) return static_cast<uint16_t>(sign | 0x7c00u | (a > 0x7f800000u ? 0x200u : 0u));
  if (a >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // overflow -> inf
  if (a < 0x38800000u) {  // subnormal or zero in half
    if (a < 0x33000000u) return static_cast<uint16_t>(sign);
    uint32_t e = a >> 23;
    uint32_t m = (a & 0x7fffffu) | 0x800000u;
    uint32_t shift = 126u - e;  // 14 + (113 - e) - 1 ... maps exponent to half subnormal scale
    uint32_t r = m >> (shift);
    uint32_t rem = m & ((1u << shift) - 1u);
    uint32_t half = 1u << (shift - 1u);
    if (rem > half || (rem == half && (r & 1u))) ++r;
    return static_cast<uint16_t>(sign | r);
  }
  uint32_t r = a - 0x38000000u;  // rebias exponent 127 -> 15
  r += 0xfffu + ((r >> 13) & 1u);
  return static_cast<uint16_t>(sign | (r >> 13));
}

// Load element i of an array of dtype d as float.
ESAMP_HD float load_as_float(const void* p, DType d, int64_t i) {
  switch (d) {
    case DType::kF32: return static_cast<const float*>(p)[i];
    case DType::kBF16: return bf16_bits_to_float(static_cast<const uint16_t*>(p)[i]);
    default: return f16_bits_to_float(static_cast<const uint16_t*>(p)[i]);
  }
}

ESAMP_HD void store_from_float(void* p, DType d, int64_t i, float v) {
  switch (d) {
    case DType::kF32: static_cast<float*>(p)[i] = v; break;
    case DType::kBF16: static_cast<uint16_t*>(p)[i] = float_to_bf16_bits(v); break;
    default: static_cast<uint16_t*>(p)[i] = float_to_f16_bits(v); break;
  }
}

}  // namespace esamp
