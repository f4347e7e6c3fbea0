// The interface between the binding (lora_kernels_cuda.cpp, torch headers) and the kernels (*.cu, CUDA headers only).
//
// All matrices are row-major and dense (the binding checks it): x [M, K], weight [N, K], lora_A [r, K],
// lora_B [N, r], grad_y / y [M, N]. Pointers to 16-bit or fp32 data as given by `dtype`. The launchers return
// nullptr on success or a message (a CUDA error string or a limit that was exceeded).
#pragma once
#include <stdint.h>

namespace lora_kernels {

enum class DType : int { f32 = 0, f16 = 1, bf16 = 2 };

struct Dropout {
  const int64_t* seed = nullptr;  // device pointer, one element; nullptr when p == 0
  uint32_t threshold = 0;         // keep iff (philox word >> 1) >= threshold, threshold = floor(p * 2^31)
  float keep_scale = 1.f;         // 1 / (1 - p)
};

struct FwdParams {
  const void *x, *w, *bias, *a, *b;  // bias may be nullptr
  void* y;                           // [M, N], x's dtype
  float* xa;                         // [M, r] fp32 = dropout(x) A^T, written when store_xa (forward_tiled) /
                                     // always used as workspace (forward_decode, which also needs `counter`)
  unsigned int* counter;             // forward_decode: one zeroed word (the launcher zeroes it and xa)
  int64_t M, N, K;
  int r;
  float scaling;
  bool store_xa;
  Dropout dropout;
};

struct BwdParams {
  const void *grad_y, *x, *w, *a, *b;
  const float* xa;     // [M, r] fp32 saved by the forward
  void* dx;            // [M, K], x's dtype; nullptr when x needs no grad
  float* da;           // [r, K] fp32 (zeroed), or partials [tiles_m, r, K] when deterministic
  float* db;           // [N, r] fp32 (zeroed), or partials [tiles_m, N, r] when deterministic
  int64_t M, N, K;
  int r;
  float scaling;
  bool deterministic;  // write one partial per row tile (summed by the caller) instead of fp32 atomics
  Dropout dropout;
};

// Row tile of the backward kernel: the number of partials in deterministic mode is ceil(M / kBwdBlockM).
constexpr int kBwdBlockM = 64;
// Largest M served by forward_decode; larger M go to forward_tiled.
constexpr int kDecodeMaxM = 16;
// Ranks are padded to a multiple of 16 inside the kernels (tensor-core tiles); the largest supported rank.
constexpr int kMaxRank = 256;

const char* forward_tiled(DType dtype, const FwdParams& p, void* stream);
const char* forward_decode(DType dtype, const FwdParams& p, void* stream);
const char* backward(DType dtype, const BwdParams& p, void* stream);

// Per-dtype entry points, one translation unit each (built in parallel).
template <typename T> const char* forward_tiled_impl(const FwdParams& p, void* stream);
template <typename T> const char* forward_decode_impl(const FwdParams& p, void* stream);
template <typename T> const char* backward_impl(const BwdParams& p, void* stream);

}  // namespace lora_kernels
