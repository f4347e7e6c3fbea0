// The package's dropout mask, shared by the CUDA kernels (device) and the CPU mask op of the binding (host).
//
// Element (m, k) of x [M, K] is kept iff (word >> 1) >= threshold, where word is output word k % 4 of
// Philox4x32-10 with counter (c0, c1) = (low, high 32 bits of m * ceil(K / 4) + k / 4), c2 = c3 = 0 and key
// (low, high 32 bits of the seed). The Triton kernels (lora_kernels/kernels/dropout.py) and the torch
// reference (lora_kernels.reference.dropout_keep_mask) compute the same bits.
#pragma once
#include <stdint.h>

#if defined(__CUDACC__)
#define LK_HD __host__ __device__ __forceinline__
#else
#define LK_HD inline
#endif

namespace lora_kernels {

struct Philox4 {
  uint32_t w[4];
};

LK_HD uint32_t mulhi32(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

LK_HD Philox4 philox4x32_10(uint64_t counter, uint64_t seed) {
  uint32_t c0 = static_cast<uint32_t>(counter), c1 = static_cast<uint32_t>(counter >> 32), c2 = 0, c3 = 0;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int i = 0; i < 10; ++i) {
    const uint32_t n0 = mulhi32(c2, 0xCD9E8D57u) ^ c1 ^ k0;
    const uint32_t n2 = mulhi32(c0, 0xD2511F53u) ^ c3 ^ k1;
    c1 = c2 * 0xCD9E8D57u;
    c3 = c0 * 0xD2511F53u;
    c0 = n0;
    c2 = n2;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return Philox4{{c0, c1, c2, c3}};
}

// Keep bits of columns 4q .. 4q+3 of row m (bit j = column 4q + j).
LK_HD uint32_t keep_bits4(uint64_t seed, int64_t m, int64_t q, int64_t K, uint32_t threshold) {
  const int64_t k4 = (K + 3) / 4;
  const Philox4 r = philox4x32_10(static_cast<uint64_t>(m * k4 + q), seed);
  uint32_t bits = 0;
  for (int j = 0; j < 4; ++j) bits |= static_cast<uint32_t>((r.w[j] >> 1) >= threshold) << j;
  return bits;
}

LK_HD bool keep(uint64_t seed, int64_t m, int64_t k, int64_t K, uint32_t threshold) {
  return (keep_bits4(seed, m, k / 4, K, threshold) >> (k % 4)) & 1u;
}

}  // namespace lora_kernels
