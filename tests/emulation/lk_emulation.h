// A host-thread model of the CUDA features the csrc/ kernels use, for running them on a machine without a GPU
// (tests/test_cuda_emulation.py). Every CUDA thread is an OS thread; __syncthreads / __syncwarp are barriers over the
// block / warp; shuffles go through a per-warp exchange array; atomics are std::atomic_ref; WMMA fragments hold the
// whole 16x16 tile in every lane (loads read it all, MMAs compute it all in fp32, stores write lane-strided parts, so
// reading another lane's stored elements still needs the __syncwarp the hardware needs). Blocks run one after the
// other, or all at once for cooperative launches. This checks the kernels' indexing, tiling, synchronization and
// arithmetic; it says nothing of speed, and hardware-only behaviour (tensor-core rounding order, memory model corner
// cases, shared-memory limits of real GPUs) is left to the GPU tests.
#pragma once
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstring>
#include <map>
#include <memory>
#include <thread>
#include <tuple>
#include <type_traits>
#include <vector>

// The CUDA headers the kernels include (cuda_fp16.h, cuda_bf16.h) bring the host-side types (dim3, uint4,
// cudaError_t, cudaLaunchConfig_t, ...) and the runtime's C declarations; the qualifiers become plain C++ here.
#include <cuda_runtime_api.h>
#undef __global__
#undef __device__
#undef __host__
#undef __forceinline__
#undef __launch_bounds__
#undef __shared__
#undef __align__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(x)
#define __shared__
#define __align__(n) __attribute__((aligned(n)))

namespace lk_emulation {
constexpr int kMaxWarps = 32;
struct BlockContext {
  std::unique_ptr<std::barrier<>> all;
  std::vector<std::unique_ptr<std::barrier<>>> warps;
  float exchange[kMaxWarps][32];
  uint32_t mma_a[kMaxWarps][32][4], mma_b[kMaxWarps][32][2];  // mma.sync operands, as each lane holds them
};
inline thread_local BlockContext* tl_block = nullptr;
inline int g_sm_count = 2;  // multiprocessors the emulated device reports (cooperative grids are capped by it)
// Resident blocks per multiprocessor the emulated device reports per kernel (1 unless a test sets one: on a GPU it
// follows each kernel's registers); a cooperative launch of more than g_sm_count times that many blocks fails, as
// the runtime's does (cudaErrorCooperativeLaunchTooLarge).
inline std::map<const void*, int> g_blocks_per_sm;
inline int blocks_per_sm(const void* kernel) {
  const auto it = g_blocks_per_sm.find(kernel);
  return it == g_blocks_per_sm.end() ? 1 : it->second;
}

inline unsigned load_acquire(const unsigned* p) {
  return std::atomic_ref<unsigned>(*const_cast<unsigned*>(p)).load(std::memory_order_acquire);
}
}  // namespace lk_emulation

// The kernels' built-in variables: one thread's index (thread-local), the launch's shape (shared).
inline thread_local dim3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;

namespace lk_emulation {
inline void warp_barrier() { tl_block->warps[::threadIdx.x / 32]->arrive_and_wait(); }
}  // namespace lk_emulation

inline void __syncthreads() { lk_emulation::tl_block->all->arrive_and_wait(); }
inline void __syncwarp(unsigned = 0xffffffffu) { lk_emulation::warp_barrier(); }
inline float __shfl_xor_sync(unsigned, float v, int offset) {
  using namespace lk_emulation;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  tl_block->exchange[warp][lane] = v;
  warp_barrier();
  const float out = tl_block->exchange[warp][lane ^ offset];
  warp_barrier();
  return out;
}
inline float atomicAdd(float* p, float v) { return std::atomic_ref<float>(*p).fetch_add(v); }
inline unsigned atomicAdd(unsigned* p, unsigned v) { return std::atomic_ref<unsigned>(*p).fetch_add(v); }
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __nanosleep(unsigned) { std::this_thread::yield(); }
template <typename T> inline T __ldg(const T* p) { return *p; }
inline float __ldcg(const float* p) { return std::atomic_ref<float>(*const_cast<float*>(p)).load(); }

// ---- mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16} ----
// The PTX ISA's fragment layout, lane = 4 * groupID + threadID_in_group (g, t): register i of A holds the two
// elements (row g + 8 * (i % 2), columns 2t + 8 * (i / 2) + {0, 1}); register i of B holds (rows 2t + 8i + {0, 1},
// column g); C/D element i is (row g + 8 * (i / 2), column 2t + i % 2). Low half of a register = the lower column
// (A) or row (B). Every lane posts its registers, then computes its own four outputs in fp32, in k order.
namespace lk_emulation {
template <typename T> inline float half_of(uint32_t reg, int hi) {
  const uint16_t bits = static_cast<uint16_t>(hi ? reg >> 16 : reg);
  T v;
  std::memcpy(&v, &bits, 2);
  return static_cast<float>(v);
}
template <typename T> inline void mma_m16n8k16(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  const int warp = ::threadIdx.x / 32, lane = ::threadIdx.x % 32;
  std::memcpy(tl_block->mma_a[warp][lane], a, sizeof(a));
  std::memcpy(tl_block->mma_b[warp][lane], b, sizeof(b));
  warp_barrier();
  const auto& A = tl_block->mma_a[warp];
  const auto& B = tl_block->mma_b[warp];
  const int g = lane / 4, t = lane % 4;
  for (int i = 0; i < 4; ++i) {
    const int row = g + 8 * (i / 2), col = 2 * t + i % 2;
    float s = c[i];
    for (int k = 0; k < 16; ++k) {
      const float av = half_of<T>(A[(row % 8) * 4 + (k % 8) / 2][(row / 8) + 2 * (k / 8)], k % 2);
      const float bv = half_of<T>(B[col * 4 + (k % 8) / 2][k / 8], k % 2);
      s += av * bv;
    }
    c[i] = s;
  }
  warp_barrier();
}
}  // namespace lk_emulation

// ---- WMMA ----
namespace nvcuda {
namespace wmma {
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };
template <typename Use, int M, int N, int K, typename T, typename Layout = void> struct fragment {
  float v[16 * 16];
};
template <typename F> inline void fill_fragment(F& f, float x) {
  for (float& e : f.v) e = x;
}
template <typename Use, typename T, typename L, typename P>
inline void load_matrix_sync(fragment<Use, 16, 16, 16, T, L>& f, const P* p, unsigned ld) {
  // matrix_a: (row i, k); matrix_b: (k, column j); element (a, b) of the fragment's 16 x 16 tile.
  constexpr bool row = std::is_same<L, row_major>::value;
  for (int a = 0; a < 16; ++a)
    for (int b = 0; b < 16; ++b) f.v[a * 16 + b] = static_cast<float>(row ? p[a * ld + b] : p[b * ld + a]);
}
inline void load_matrix_sync(fragment<accumulator, 16, 16, 16, float>& f, const float* p, unsigned ld, layout_t l) {
  for (int a = 0; a < 16; ++a)
    for (int b = 0; b < 16; ++b) f.v[a * 16 + b] = l == mem_row_major ? p[a * ld + b] : p[b * ld + a];
}
inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& f, unsigned ld, layout_t l) {
  for (int e = ::threadIdx.x % 32; e < 256; e += 32) {
    const int a = e / 16, b = e % 16;
    (l == mem_row_major ? p[a * ld + b] : p[b * ld + a]) = f.v[e];
  }
}
template <typename T, typename LA, typename LB>
inline void mma_sync(fragment<accumulator, 16, 16, 16, float>& d, const fragment<matrix_a, 16, 16, 16, T, LA>& a,
                     const fragment<matrix_b, 16, 16, 16, T, LB>& b, const fragment<accumulator, 16, 16, 16, float>& c) {
  float out[256];
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) {
      float s = c.v[i * 16 + j];
      for (int k = 0; k < 16; ++k) s += a.v[i * 16 + k] * b.v[k * 16 + j];
      out[i * 16 + j] = s;
    }
  std::memcpy(d.v, out, sizeof(out));
}
}  // namespace wmma
}  // namespace nvcuda

// ---- runtime: the functions the launchers call ----
constexpr size_t kEmulatedSmemBytes = 227 * 1024;  // the buffer: an H100's opt-in limit
namespace lk_emulation {
inline size_t g_smem_optin = kEmulatedSmemBytes;  // what the emulated device reports (tests lower it: an A100's)
}

inline const char* cudaGetErrorString(cudaError_t e) { return e == cudaSuccess ? "no error" : "error (emulation)"; }
inline cudaError_t cudaGetDevice(int* d) {
  *d = 0;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr a, int) {
  *v = a == cudaDevAttrMaxSharedMemoryPerBlockOptin ? static_cast<int>(lk_emulation::g_smem_optin)
     : a == cudaDevAttrMultiProcessorCount ? lk_emulation::g_sm_count : 1;
  return cudaSuccess;
}
template <typename... P> inline cudaError_t cudaFuncSetAttribute(void (*)(P...), cudaFuncAttribute, int) { return cudaSuccess; }
template <typename... P>
inline cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* n, void (*kernel)(P...), int, size_t) {
  *n = lk_emulation::blocks_per_sm(reinterpret_cast<const void*>(kernel));
  return cudaSuccess;
}
inline cudaError_t cudaMemsetAsync(void* p, int v, size_t n, cudaStream_t) {
  std::memset(p, v, n);
  return cudaSuccess;
}

template <typename... Params, typename... Args>
cudaError_t cudaLaunchKernelEx(const cudaLaunchConfig_t* cfg, void (*kernel)(Params...), Args&&... args) {
  using namespace lk_emulation;
  if (cfg->dynamicSmemBytes > kEmulatedSmemBytes || cfg->blockDim.x % 32 || cfg->blockDim.x / 32 > kMaxWarps ||
      cfg->blockDim.y != 1 || cfg->blockDim.z != 1 || cfg->gridDim.z != 1)
    return cudaErrorInvalidValue;
  const std::tuple<std::decay_t<Params>...> params(std::forward<Args>(args)...);
  const bool cooperative = cfg->numAttrs && cfg->attrs[0].id == cudaLaunchAttributeCooperative && cfg->attrs[0].val.cooperative;
  if (cooperative && cfg->gridDim.x * cfg->gridDim.y >
                         static_cast<unsigned>(g_sm_count * blocks_per_sm(reinterpret_cast<const void*>(kernel))))
    return cudaErrorCooperativeLaunchTooLarge;
  ::gridDim = cfg->gridDim;
  ::blockDim = cfg->blockDim;
  std::vector<dim3> blocks;
  for (unsigned y = 0; y < cfg->gridDim.y; ++y)
    for (unsigned x = 0; x < cfg->gridDim.x; ++x) blocks.emplace_back(x, y);
  // Non-cooperative blocks run one at a time (they share the one emulated shared-memory buffer).
  const size_t group = cooperative ? blocks.size() : 1;
  for (size_t first = 0; first < blocks.size(); first += group) {
    std::vector<std::unique_ptr<BlockContext>> contexts;
    std::vector<std::thread> threads;
    for (size_t bi = first; bi < first + group && bi < blocks.size(); ++bi) {
      auto ctx = std::make_unique<BlockContext>();
      ctx->all = std::make_unique<std::barrier<>>(cfg->blockDim.x);
      for (unsigned w = 0; w < cfg->blockDim.x / 32; ++w) ctx->warps.push_back(std::make_unique<std::barrier<>>(32));
      for (unsigned t = 0; t < cfg->blockDim.x; ++t)
        threads.emplace_back([&params, kernel, c = ctx.get(), b = blocks[bi], t] {
          tl_block = c;
          ::blockIdx = b;
          ::threadIdx = dim3(t);
          std::apply(kernel, params);
        });
      contexts.push_back(std::move(ctx));
    }
    for (auto& th : threads) th.join();
  }
  return cudaSuccess;
}
