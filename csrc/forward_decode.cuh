// Forward for small M (decode, M <= 16): one pass over W0 with 16-byte loads, W0 x and A x in the same launch.
//
// Work items, taken by warps in order (item i by warp i mod total_warps, so every warp finishes its A items before
// its W0 items):
//   * A items (first): one 32 x 16-byte column chunk of x and A. The warp computes that chunk's part of
//     xa = dropout(x) A^T for all M rows and r ranks and adds it to the fp32 xa buffer; then it counts the chunk
//     done in `counter`.
//   * W0 items: ROWS rows of W0. Each lane keeps its x columns in registers and streams the rows' 16-byte
//     vectors; after the K loop the warp reduces, waits until all A chunks are counted (normally long done), and
//     writes y = x W0^T + bias + scaling * xa B^T for its rows.
// The wait is safe because the launch is cooperative: every block is resident, so every A item gets done.
#pragma once
#include "tiles.cuh"

namespace lora_kernels {
namespace decode {

constexpr int THREADS = 256;

template <typename T> struct Vec {
  static constexpr int N = 16 / sizeof(T);  // elements per 16-byte vector
};

// out[0..N) = row[c..c+N) as floats, zero past K; one 16-byte load when `vec`.
template <typename T>
__device__ __forceinline__ void load_vec(float* out, const T* row, int64_t c, int64_t K, bool vec) {
  constexpr int V = Vec<T>::N;
  if (vec && c + V <= K) {
    const uint4 u = __ldg(reinterpret_cast<const uint4*>(row + c));
    const T* e = reinterpret_cast<const T*>(&u);
#pragma unroll
    for (int v = 0; v < V; ++v) out[v] = to_f32(e[v]);
  } else {
#pragma unroll
    for (int v = 0; v < V; ++v) out[v] = c + v < K ? to_f32(row[c + v]) : 0.f;
  }
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ unsigned int load_acquire(const unsigned int* p) {
#if defined(LK_EMULATE)
  return lk_emulation::load_acquire(p);
#else
  unsigned int v;
  asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
#endif
}

template <typename T, int MB, int ROWS>
__global__ void __launch_bounds__(THREADS) lora_forward_decode_kernel(FwdParams p, bool vec_x, bool vec_w, bool vec_a) {
  constexpr int V = Vec<T>::N, CHUNK = 32 * V;
  const int lane = threadIdx.x % 32;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (THREADS / 32);
  const int64_t gwarp = static_cast<int64_t>(blockIdx.x) * (THREADS / 32) + threadIdx.x / 32;
  const int64_t a_items = (p.K + CHUNK - 1) / CHUNK, w_items = (p.N + ROWS - 1) / ROWS;
  const T* x = static_cast<const T*>(p.x);
  const T* w = static_cast<const T*>(p.w);
  const T* a = static_cast<const T*>(p.a);
  const T* b = static_cast<const T*>(p.b);
  const T* bias = static_cast<const T*>(p.bias);
  T* y = static_cast<T*>(p.y);
  const int M = static_cast<int>(p.M);
  const bool dropout = p.dropout.seed != nullptr;
  const uint64_t seed = dropout ? static_cast<uint64_t>(*p.dropout.seed) : 0;
  bool xa_ready = false;

  for (int64_t item = gwarp; item < a_items + w_items; item += warps) {
    if (item < a_items) {
      // xa[m, :] += dropout(x[m, chunk]) A[:, chunk]^T
      const int64_t c = item * CHUNK + lane * V;
      for (int m = 0; m < M; ++m) {
        float xv[V];
        load_vec(xv, x + m * p.K, c, p.K, vec_x);
        if (dropout) {
#pragma unroll
          for (int q = 0; q < V; q += 4) {
            // V is a multiple of 4 and c too: a vector covers whole Philox quads.
            const uint32_t bits = keep_bits4(seed, m, (c + q) / 4, p.K, p.dropout.threshold);
#pragma unroll
            for (int j = 0; j < 4; ++j) xv[q + j] = ((bits >> j) & 1u) ? xv[q + j] * p.dropout.keep_scale : 0.f;
          }
        }
        for (int rr = 0; rr < p.r; ++rr) {
          float av[V];
          load_vec(av, a + rr * p.K, c, p.K, vec_a);
          float part = 0.f;
#pragma unroll
          for (int v = 0; v < V; ++v) part = fmaf(xv[v], av[v], part);
          part = warp_sum(part);
          if (lane == 0) atomicAdd(p.xa + m * p.r + rr, part);
        }
      }
      __threadfence();
      __syncwarp();
      if (lane == 0) atomicAdd(p.counter, 1u);
      continue;
    }
    // Rows n0 .. n0 + ROWS - 1 of W0.
    const int64_t n0 = (item - a_items) * ROWS;
    float acc[ROWS][MB];
#pragma unroll
    for (int j = 0; j < ROWS; ++j)
#pragma unroll
      for (int m = 0; m < MB; ++m) acc[j][m] = 0.f;
    for (int64_t c = lane * V; c < p.K; c += CHUNK) {
      float xv[MB][V];
#pragma unroll
      for (int m = 0; m < MB; ++m) {
        if (m < M) load_vec(xv[m], x + m * p.K, c, p.K, vec_x);
        else {
#pragma unroll
          for (int v = 0; v < V; ++v) xv[m][v] = 0.f;
        }
      }
#pragma unroll
      for (int j = 0; j < ROWS; ++j) {
        if (n0 + j >= p.N) break;
        float wv[V];
        load_vec(wv, w + (n0 + j) * p.K, c, p.K, vec_w);
#pragma unroll
        for (int m = 0; m < MB; ++m)
#pragma unroll
          for (int v = 0; v < V; ++v) acc[j][m] = fmaf(wv[v], xv[m][v], acc[j][m]);
      }
    }
#pragma unroll
    for (int j = 0; j < ROWS; ++j)
#pragma unroll
      for (int m = 0; m < MB; ++m) acc[j][m] = warp_sum(acc[j][m]);
    if (!xa_ready) {
      if (lane == 0)
        while (load_acquire(p.counter) < static_cast<unsigned int>(a_items)) __nanosleep(64);
      __syncwarp();
      xa_ready = true;
    }
    // Lane (j, m) finishes y[m, n0 + j].
#pragma unroll
    for (int j = 0; j < ROWS; ++j)
#pragma unroll
      for (int m = 0; m < MB; ++m) {
        if (lane != (j * MB + m) % 32 || m >= M || n0 + j >= p.N) continue;
        const int64_t n = n0 + j;
        float lr = 0.f;
        for (int rr = 0; rr < p.r; ++rr) lr = fmaf(to_f32(b[n * p.r + rr]), __ldcg(p.xa + m * p.r + rr), lr);
        float v = acc[j][m] + p.scaling * lr;
        if (bias) v += to_f32(bias[n]);
        y[m * p.N + n] = from_f32<T>(v);
      }
  }
}

template <typename T, int MB, int ROWS>
const char* launch(const FwdParams& p, cudaStream_t stream) {
  auto kernel = lora_forward_decode_kernel<T, MB, ROWS>;
  int dev = 0, sms = 0, per_sm = 0, coop = 0;
  if (auto e = cuda_error(cudaGetDevice(&dev))) return e;
  if (auto e = cuda_error(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev))) return e;
  if (auto e = cuda_error(cudaDeviceGetAttribute(&coop, cudaDevAttrCooperativeLaunch, dev))) return e;
  if (!coop) return "this GPU does not support cooperative launches (needed by the decode kernel)";
  if (auto e = cuda_error(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, THREADS, 0))) return e;
  constexpr int64_t CHUNK = 32 * Vec<T>::N;
  const int64_t items = (p.K + CHUNK - 1) / CHUNK + (p.N + ROWS - 1) / ROWS;
  const int64_t wanted = (items + THREADS / 32 - 1) / (THREADS / 32);
  const int64_t resident = static_cast<int64_t>(sms) * (per_sm > 0 ? per_sm : 1);
  const unsigned blocks = static_cast<unsigned>(wanted < resident ? wanted : resident);
  // xa and the counter are one buffer: one memset zeroes both.
  if (auto e = cuda_error(cudaMemsetAsync(p.xa, 0, sizeof(float) * (p.M * p.r + 1), stream))) return e;
  return launch_kernel(kernel, dim3(blocks), dim3(THREADS), 0, stream, true, p, vec_ok(p.x, p.K, sizeof(T)),
                       vec_ok(p.w, p.K, sizeof(T)), vec_ok(p.a, p.K, sizeof(T)));
}

}  // namespace decode

template <typename T> const char* forward_decode_impl(const FwdParams& p, void* stream_ptr) {
  if (p.M < 1 || p.M > kDecodeMaxM) return "the decode kernel takes 1 to 16 rows";
  if (p.r < 1 || p.r > kMaxRank) return "rank out of the supported range 1..256";
  if (p.counter != reinterpret_cast<unsigned int*>(p.xa + p.M * p.r)) return "decode: counter must follow xa";
  if (p.N == 0) return nullptr;
  const cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  // Rows of W0 per warp: more rows keep more 16-byte loads in flight; fewer leave registers for x.
  if (p.M <= 1) return decode::launch<T, 1, 8>(p, stream);
  if (p.M <= 2) return decode::launch<T, 2, 8>(p, stream);
  if (p.M <= 4) return decode::launch<T, 4, 4>(p, stream);
  if (p.M <= 8) return decode::launch<T, 8, 2>(p, stream);
  return decode::launch<T, 16, 2>(p, stream);
}

}  // namespace lora_kernels
