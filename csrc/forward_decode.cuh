// Forward for small M (decode, M <= 16): one pass over W0 with many 16-byte loads in flight, W0 x and A x in the
// same launch.
//
// A and W0 are both "rows times x": a work item is ROWS rows of one of them over all of K, taken by one warp
// (item i by warp i mod total_warps, A's items first, so every warp finishes its A items before its W0 items):
//   * A items: xa[:, rows] = dropout(x) A[rows]^T, stored as fp32; then the warp counts the item done in `counter`.
//   * W0 items: the warp waits until every A item is counted (normally long done), then writes
//     y[:, rows] = x W0[rows]^T + bias + scaling * xa B[rows]^T.
// The wait is safe because the launch is cooperative: every block is resident, so every A item gets done.
//
// Streaming W0 at full bandwidth takes many bytes in flight per SM (bandwidth x latency, ~2 MB on an H100). So the
// main loop issues all of an iteration's loads (ROWS rows x U chunks of W0 or A, 16 bytes a lane each, and x's)
// before any arithmetic, without branches between them: rows past the end are clamped to the last row (their
// results are dropped), and only K's tail and unaligned inputs take the bounds-checked loop. Per-lane partial sums
// are reduced across the warp once per item, ROWS x MB values with halving exchanges.
#pragma once
#include <atomic>

#include "tiles.cuh"

namespace lora_kernels {
namespace decode {

constexpr int THREADS = 256;
constexpr int kMaxDevices = 64;

template <typename T> struct Vec {
  static constexpr int N = 16 / sizeof(T);  // elements per 16-byte vector
};

// Rows per item and 16-byte chunks per lane and iteration, by MB (M rounded up to a power of two). Loads in flight
// per warp: ROWS * U of the streamed matrix (x's come from L1/L2). ROWS * MB partial sums per lane (<= 32, a power of
// two) bound the registers; more rows per item would leave SMs idle at N = 4096.
template <int MB> struct Shape;
template <> struct Shape<1> { static constexpr int ROWS = 4, U = 4; };
template <> struct Shape<2> { static constexpr int ROWS = 4, U = 2; };
template <> struct Shape<4> { static constexpr int ROWS = 4, U = 2; };
template <> struct Shape<8> { static constexpr int ROWS = 4, U = 2; };
template <> struct Shape<16> { static constexpr int ROWS = 2, U = 2; };

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

template <typename T> __device__ __forceinline__ void unpack(float* out, const uint4& u) {
  const T* e = reinterpret_cast<const T*>(&u);
#pragma unroll
  for (int v = 0; v < Vec<T>::N; ++v) out[v] = to_f32(e[v]);
}

// A 16-byte load of data read once (W0, A): not kept in L1, which holds x for the other warps of the SM.
__device__ __forceinline__ uint4 load_streamed(const void* p) {
#if defined(LK_EMULATE)
  return *static_cast<const uint4*>(p);
#else
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
#endif
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

// One halving exchange of warp_sum_spread, then the next (H: values still held in pairs, halved each step; a
// template recursion so every index is a compile-time constant and `v` stays in registers).
template <int H, int NV> __device__ __forceinline__ void exchange_halves(float (&v)[NV], int lane) {
  if constexpr (H >= 1) {
    const bool upper = (lane & H) != 0;
#pragma unroll
    for (int i = 0; i < H; ++i) {
      const float send = upper ? v[i] : v[i + H];
      const float keep = upper ? v[i + H] : v[i];
      v[i] = keep + __shfl_xor_sync(0xffffffffu, send, H);
    }
    exchange_halves<H / 2>(v, lane);
  }
}

// Sums each of the NV values of `v` over the warp (NV a power of two <= 32); lane l gets the total of value
// l % NV. Each halving exchange sends half of the values still held and keeps the other half: NV - 1 shuffles,
// then 5 - log2(NV) for the lanes that differ in higher bits, instead of 5 per value.
template <int NV> __device__ __forceinline__ float warp_sum_spread(float (&v)[NV]) {
  static_assert(NV >= 1 && NV <= 32 && (NV & (NV - 1)) == 0, "NV: a power of two <= 32");
  exchange_halves<NV / 2>(v, static_cast<int>(threadIdx.x % 32));
  float s = v[0];
#pragma unroll
  for (int o = NV; o < 32; o *= 2) s += __shfl_xor_sync(0xffffffffu, s, o);
  return s;
}

// The item's sums over the warp: lane l gets value l % (ROWS * MB), that is row j = (l % (ROWS * MB)) / MB,
// input row m = l % MB.
template <int ROWS, int MB> __device__ __forceinline__ float reduce_item(const float (&acc)[ROWS][MB]) {
  float flat[ROWS * MB];
#pragma unroll
  for (int j = 0; j < ROWS; ++j)
#pragma unroll
    for (int m = 0; m < MB; ++m) flat[j * MB + m] = acc[j][m];
  return warp_sum_spread<ROWS * MB>(flat);
}

// x[m, c .. c+V) (as floats) times its dropout keep mask and scale.
template <int V>
__device__ __forceinline__ void drop(float* xf, const Dropout& d, uint64_t seed, int m, int64_t c, int64_t K) {
#pragma unroll
  for (int q = 0; q < V; q += 4) {
    // V is a multiple of 4 and c too: a vector covers whole Philox quads.
    const uint32_t bits = keep_bits4(seed, m, (c + q) / 4, K, d.threshold);
#pragma unroll
    for (int j = 0; j < 4; ++j) xf[q + j] = ((bits >> j) & 1u) ? xf[q + j] * d.keep_scale : 0.f;
  }
}

// acc[j][m] = this lane's part of sum_k rows[row j, k] * x'[m, k], for rows n0 .. n0 + ROWS - 1 of a row-major
// [n_rows, K] matrix and x' = dropout(x) when `dropout`, else x. `fast`: rows and x allow aligned 16-byte loads.
template <typename T, int MB, int ROWS, int U>
__device__ __forceinline__ void rows_times_x(float (&acc)[ROWS][MB], const T* rows, int64_t n0, int64_t n_rows,
                                             const T* x, int M, int64_t K, bool fast, bool vec_x, bool vec_rows,
                                             bool dropout, const Dropout& d, uint64_t seed) {
  constexpr int V = Vec<T>::N, CHUNK = 32 * V;
  const int lane = threadIdx.x % 32;
  const T* rp[ROWS];
  const T* xp[MB];
#pragma unroll
  for (int j = 0; j < ROWS; ++j) rp[j] = rows + (n0 + j < n_rows ? n0 + j : n_rows - 1) * K;
#pragma unroll
  for (int m = 0; m < MB; ++m) xp[m] = x + static_cast<int64_t>(m < M ? m : M - 1) * K;
#pragma unroll
  for (int j = 0; j < ROWS; ++j)
#pragma unroll
    for (int m = 0; m < MB; ++m) acc[j][m] = 0.f;
  int64_t c = lane * V;
  if (fast) {
    // K is a multiple of V here, so a chunk that starts inside K ends inside it.
    for (; c + (U - 1) * CHUNK < K; c += U * CHUNK) {
      uint4 wv[U][ROWS], xv[U][MB];
#pragma unroll
      for (int u = 0; u < U; ++u)
#pragma unroll
        for (int j = 0; j < ROWS; ++j) wv[u][j] = load_streamed(rp[j] + c + u * CHUNK);
#pragma unroll
      for (int u = 0; u < U; ++u)
#pragma unroll
        for (int m = 0; m < MB; ++m) xv[u][m] = __ldg(reinterpret_cast<const uint4*>(xp[m] + c + u * CHUNK));
#pragma unroll
      for (int u = 0; u < U; ++u) {
        float wf[ROWS][V];
#pragma unroll
        for (int j = 0; j < ROWS; ++j) unpack<T>(wf[j], wv[u][j]);
#pragma unroll
        for (int m = 0; m < MB; ++m) {
          float xf[V];
          unpack<T>(xf, xv[u][m]);
          if (dropout) drop<V>(xf, d, seed, m, c + u * CHUNK, K);
#pragma unroll
          for (int v = 0; v < V; ++v)
#pragma unroll
            for (int j = 0; j < ROWS; ++j) acc[j][m] = fmaf(wf[j][v], xf[v], acc[j][m]);
        }
      }
    }
  }
  // K's tail, or all of K for unaligned inputs: one chunk at a time, bounds-checked.
  for (; c < K; c += CHUNK) {
    float wf[ROWS][V];
#pragma unroll
    for (int j = 0; j < ROWS; ++j) load_vec(wf[j], rp[j], c, K, vec_rows);
#pragma unroll
    for (int m = 0; m < MB; ++m) {
      float xf[V];
      load_vec(xf, xp[m], c, K, vec_x);
      if (dropout) drop<V>(xf, d, seed, m, c, K);
#pragma unroll
      for (int v = 0; v < V; ++v)
#pragma unroll
        for (int j = 0; j < ROWS; ++j) acc[j][m] = fmaf(wf[j][v], xf[v], acc[j][m]);
    }
  }
}

template <typename T, int MB>
__global__ void __launch_bounds__(THREADS) lora_forward_decode_kernel(FwdParams p, bool vec_x, bool vec_w, bool vec_a) {
  constexpr int ROWS = Shape<MB>::ROWS, U = Shape<MB>::U, NV = ROWS * MB;
  static_assert(NV <= 32, "one reduced value per lane");
  const int lane = threadIdx.x % 32;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (THREADS / 32);
  const int64_t gwarp = static_cast<int64_t>(blockIdx.x) * (THREADS / 32) + threadIdx.x / 32;
  const int64_t a_items = (p.r + ROWS - 1) / ROWS, w_items = (p.N + ROWS - 1) / ROWS;
  const T* x = static_cast<const T*>(p.x);
  const T* b = static_cast<const T*>(p.b);
  const T* bias = static_cast<const T*>(p.bias);
  T* y = static_cast<T*>(p.y);
  const int M = static_cast<int>(p.M);
  const bool dropout = p.dropout.seed != nullptr;
  const uint64_t seed = dropout ? static_cast<uint64_t>(*p.dropout.seed) : 0;
  // The value lane l holds after warp_sum_spread: row j, input row m of the item.
  const int j_out = (lane % NV) / MB, m_out = (lane % NV) % MB;
  const bool writes = lane < NV && m_out < M;
  bool xa_ready = false;

  for (int64_t item = gwarp; item < a_items + w_items; item += warps) {
    float acc[ROWS][MB];
    if (item < a_items) {
      const int64_t r0 = item * ROWS;
      rows_times_x<T, MB, ROWS, U>(acc, static_cast<const T*>(p.a), r0, p.r, x, M, p.K, vec_x && vec_a, vec_x, vec_a,
                                   dropout, p.dropout, seed);
      const float s = reduce_item<ROWS, MB>(acc);
      if (writes && r0 + j_out < p.r) p.xa[m_out * p.r + r0 + j_out] = s;
      __threadfence();
      __syncwarp();
      if (lane == 0) atomicAdd(p.counter, 1u);
      continue;
    }
    const int64_t n0 = (item - a_items) * ROWS;
    const bool mine = writes && n0 + j_out < p.N;
    // Loaded before the long loop so they are in registers by its end: this lane's bias and the first 32 ranks
    // of the item's rows of B (lane l takes rank l).
    const float bias_v = mine && bias ? to_f32(bias[n0 + j_out]) : 0.f;
    float bv[ROWS];
#pragma unroll
    for (int j = 0; j < ROWS; ++j) bv[j] = lane < p.r && n0 + j < p.N ? to_f32(b[(n0 + j) * p.r + lane]) : 0.f;
    rows_times_x<T, MB, ROWS, U>(acc, static_cast<const T*>(p.w), n0, p.N, x, M, p.K, vec_x && vec_w, vec_x, vec_w,
                                 false, p.dropout, seed);
    if (!xa_ready) {
      if (lane == 0)
        while (load_acquire(p.counter) < static_cast<unsigned int>(a_items)) __nanosleep(64);
      __syncwarp();
      xa_ready = true;
    }
    // acc[j][m] += scaling * (this lane's ranks of) xa[m, :] . B[n0 + j, :]; xa was written by other SMs during
    // this launch, so it is read from L2 (__ldcg), never from a possibly stale L1.
    for (int rr0 = 0; rr0 < p.r; rr0 += 32) {
      const int rr = rr0 + lane;
      if (rr0 > 0) {
#pragma unroll
        for (int j = 0; j < ROWS; ++j) bv[j] = rr < p.r && n0 + j < p.N ? to_f32(b[(n0 + j) * p.r + rr]) : 0.f;
      }
#pragma unroll
      for (int m = 0; m < MB; ++m) {
        const float xam = rr < p.r && m < M ? __ldcg(p.xa + m * p.r + rr) : 0.f;
#pragma unroll
        for (int j = 0; j < ROWS; ++j) acc[j][m] = fmaf(p.scaling * bv[j], xam, acc[j][m]);
      }
    }
    const float s = reduce_item<ROWS, MB>(acc);
    if (mine) y[m_out * p.N + n0 + j_out] = from_f32<T>(s + bias_v);
  }
}

template <typename T, int MB>
const char* launch(const FwdParams& p, cudaStream_t stream) {
  constexpr int ROWS = Shape<MB>::ROWS;
  auto kernel = lora_forward_decode_kernel<T, MB>;
  int dev = 0, sms = 0, per_sm = 0, coop = 0;
  if (auto e = cuda_error(cudaGetDevice(&dev))) return e;
  if (auto e = cuda_error(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev))) return e;
  if (auto e = cuda_error(cudaDeviceGetAttribute(&coop, cudaDevAttrCooperativeLaunch, dev))) return e;
  if (!coop) return "this GPU does not support cooperative launches (needed by the decode kernel)";
  // Blocks per SM depend on the kernel and the device only: asked once per device (a runtime call per decode step
  // is host time the step does not need).
  static std::atomic<int> blocks_per_sm[kMaxDevices];
  if (dev < 0 || dev >= kMaxDevices) return "decode: device index out of range";
  per_sm = blocks_per_sm[dev].load(std::memory_order_relaxed);
  if (per_sm == 0) {
    if (auto e = cuda_error(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, THREADS, 0))) return e;
    blocks_per_sm[dev].store(per_sm, std::memory_order_relaxed);
  }
  const int64_t items = (p.r + ROWS - 1) / ROWS + (p.N + ROWS - 1) / ROWS;
  const int64_t wanted = (items + THREADS / 32 - 1) / (THREADS / 32);
  const int64_t resident = static_cast<int64_t>(sms) * (per_sm > 0 ? per_sm : 1);
  const unsigned blocks = static_cast<unsigned>(wanted < resident ? wanted : resident);
  // xa and the counter are one buffer: one memset zeroes both (the kernel needs the counter zeroed).
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
  if (p.M <= 1) return decode::launch<T, 1>(p, stream);
  if (p.M <= 2) return decode::launch<T, 2>(p, stream);
  if (p.M <= 4) return decode::launch<T, 4>(p, stream);
  if (p.M <= 8) return decode::launch<T, 8>(p, stream);
  return decode::launch<T, 16>(p, stream);
}

}  // namespace lora_kernels
