// esamp/philox.h -- Philox4x32-10 and the Gumbel noise of SPEC section 4 (host and device).
#pragma once
#include <cmath>
#include "esamp/common.h"

namespace esamp {

struct U32x4 {
  uint32_t v[4];
};

ESAMP_HD void mulhilo32(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
  uint64_t p = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  hi = static_cast<uint32_t>(p >> 32);
  lo = static_cast<uint32_t>(p);
}

// Philox4x32 with 10 rounds (Salmon et al. 2011, Random123 constants).
ESAMP_HD U32x4 philox4x32_10(U32x4 c, uint32_t k0, uint32_t k1) {
  constexpr uint32_t M0 = 0xD2511F53u, M1 = 0xCD9E8D57u;
  constexpr uint32_t W0 = 0x9E3779B9u, W1 = 0xBB67AE85u;
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int r = 0; r < 10; ++r) {
    uint32_t hi0, lo0, hi1, lo1;
    mulhilo32(M0, c.v[0], hi0, lo0);
    mulhilo32(M1, c.v[2], hi1, lo1);
    U32x4 n;
    n.v[0] = hi1 ^ c.v[1] ^ k0;
    n.v[1] = lo1;
    n.v[2] = hi0 ^ c.v[3] ^ k1;
    n.v[3] = lo0;
    c = n;
    k0 += W0;
    k1 += W1;
  }
  return c;
}

constexpr uint32_t kGumbelTag = 0x45534D50u;  // "ESMP"
constexpr uint32_t kInitTag = 0x494E4954u;    // "INIT" (distiller initialisation)

// The four raw words for token ids 4*(v>>2) .. 4*(v>>2)+3.
ESAMP_HD U32x4 gumbel_words(uint64_t seed, uint64_t step, uint32_t v_hi) {
  U32x4 c;
  c.v[0] = v_hi;
  c.v[1] = static_cast<uint32_t>(step);
  c.v[2] = static_cast<uint32_t>(step >> 32);
  c.v[3] = kGumbelTag;
  return philox4x32_10(c, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

// u = ((w >> 8) + 0.5) * 2^-24 as float32, in (0, 1).  Computed as the exact integer
// 2*(w>>8)+1 (< 2^25) converted with round-to-nearest-even and scaled by 2^-25 (exact), which is
// bit-identical on every IEEE backend.  The one value that rounds to 1.0f (w>>8 == 2^24-1) is
// clamped to the largest float below 1 so that u stays in (0, 1) -- see docs/semantics.md.
ESAMP_HD float uniform_from_word(uint32_t w) {
  float u = static_cast<float>(2u * (w >> 8) + 1u) * 2.98023223876953125e-8f;  // 2^-25
  return u < 1.0f ? u : 0.99999994039535522f;
}

ESAMP_HD float gumbel_from_word(uint32_t w) {
  float u = uniform_from_word(w);
  return -logf(-logf(u));
}

// Word i (0..3) of a Philox result with selects (no dynamically indexed array: registers on the GPU).
ESAMP_HD uint32_t pick_word(const U32x4& w, uint32_t i) {
  const uint32_t lo = (i & 1u) ? w.v[1] : w.v[0];
  const uint32_t hi = (i & 1u) ? w.v[3] : w.v[2];
  return (i & 2u) ? hi : lo;
}

// Gumbel noise for (seed, step, token id v) exactly as SPEC section 4.
ESAMP_HD float gumbel_noise(int64_t seed, int64_t step, int64_t v) {
  U32x4 r = gumbel_words(static_cast<uint64_t>(seed), static_cast<uint64_t>(step),
                         static_cast<uint32_t>(static_cast<uint64_t>(v) >> 2));
  return gumbel_from_word(pick_word(r, static_cast<uint32_t>(v & 3)));
}

// Standard normal from Philox (Box-Muller), used for distiller initialisation: element p of a slot.
ESAMP_HD float init_normal(uint64_t seed, uint64_t p) {
  U32x4 c;
  c.v[0] = static_cast<uint32_t>(p);
  c.v[1] = static_cast<uint32_t>(p >> 32);
  c.v[2] = 0u;
  c.v[3] = kInitTag;
  U32x4 r = philox4x32_10(c, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  float u1 = uniform_from_word(r.v[0]);
  float u2 = uniform_from_word(r.v[1]);
  return sqrtf(-2.0f * logf(u1)) * cosf(6.28318530717958647692f * u2);
}

// splitmix64 finaliser: used by the Python layer to derive distinct per-row seeds from one seed.
ESAMP_HD uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

}  // namespace esamp
