// The csrc/ launchers and kernels compiled for the host against lk_emulation.h, behind a C interface for ctypes
// (tests/test_cuda_emulation.py). The argument conventions are those of csrc/lora_kernels_cuda.cpp.
#include "forward_decode.cuh"
#include "forward_tiled.cuh"
#include "backward.cuh"
#include "dispatch.cu"

namespace lora_kernels {
namespace fwd {
alignas(128) unsigned char smem[kEmulatedSmemBytes];
}
namespace bwd {
alignas(128) unsigned char smem[kEmulatedSmemBytes];
}
}  // namespace lora_kernels

using namespace lora_kernels;

namespace {
Dropout dropout(const int64_t* seed, unsigned threshold, float keep_scale) {
  Dropout d;
  d.seed = seed;
  d.threshold = threshold;
  d.keep_scale = keep_scale;
  return d;
}
}  // namespace

extern "C" const char* lk_emu_forward(int dtype, int decode, const void* x, const void* w, const void* bias,
                                      const void* a, const void* b, void* y, float* xa, long long M, long long N,
                                      long long K, int r, float scaling, int store_xa, const int64_t* seed,
                                      unsigned threshold, float keep_scale, int sm_count) {
  lk_emulation::g_sm_count = sm_count;
  FwdParams p{};
  p.x = x; p.w = w; p.bias = bias; p.a = a; p.b = b; p.y = y; p.xa = xa;
  p.M = M; p.N = N; p.K = K; p.r = r; p.scaling = scaling; p.store_xa = store_xa != 0;
  p.dropout = dropout(seed, threshold, keep_scale);
  if (decode) {
    p.counter = reinterpret_cast<unsigned int*>(xa + M * r);
    return forward_decode(static_cast<DType>(dtype), p, nullptr);
  }
  return forward_tiled(static_cast<DType>(dtype), p, nullptr);
}

extern "C" const char* lk_emu_backward(int dtype, const void* grad_y, const void* x, const void* w, const void* a,
                                       const void* b, const float* xa, void* dx, float* da, float* db, long long M,
                                       long long N, long long K, int r, float scaling, int deterministic,
                                       const int64_t* seed, unsigned threshold, float keep_scale) {
  BwdParams p{};
  p.grad_y = grad_y; p.x = x; p.w = w; p.a = a; p.b = b; p.xa = xa; p.dx = dx; p.da = da; p.db = db;
  p.M = M; p.N = N; p.K = K; p.r = r; p.scaling = scaling; p.deterministic = deterministic != 0;
  p.dropout = dropout(seed, threshold, keep_scale);
  return backward(static_cast<DType>(dtype), p, nullptr);
}

extern "C" void lk_emu_set_shared_memory_limit(unsigned long long bytes) {
  lk_emulation::g_smem_optin = bytes ? bytes : kEmulatedSmemBytes;
}

// Blocks per multiprocessor the emulated device reports for the decode kernel serving `M` rows of `dtype`
// (0: back to the default, 1).
extern "C" void lk_emu_set_decode_blocks_per_sm(int dtype, int M, int blocks) {
  const void* kernel = nullptr;
  auto pick = [&](auto tag) {
    using T = decltype(tag);
    if constexpr (!std::is_same<T, float>::value)
      if (M > 8) return reinterpret_cast<const void*>(&decode_mma::lora_forward_decode_mma_kernel<T>);
    const int mb = M <= 1 ? 1 : M <= 2 ? 2 : M <= 4 ? 4 : M <= 8 ? 8 : 16;
    switch (mb) {
      case 1: return reinterpret_cast<const void*>(&decode::lora_forward_decode_kernel<T, 1>);
      case 2: return reinterpret_cast<const void*>(&decode::lora_forward_decode_kernel<T, 2>);
      case 4: return reinterpret_cast<const void*>(&decode::lora_forward_decode_kernel<T, 4>);
      case 8: return reinterpret_cast<const void*>(&decode::lora_forward_decode_kernel<T, 8>);
      default: return reinterpret_cast<const void*>(&decode::lora_forward_decode_kernel<T, 16>);
    }
  };
  kernel = dtype == 0 ? pick(float{}) : dtype == 1 ? pick(__half{}) : pick(__nv_bfloat16{});
  if (blocks) lk_emulation::g_blocks_per_sm[kernel] = blocks;
  else lk_emulation::g_blocks_per_sm.erase(kernel);
}
