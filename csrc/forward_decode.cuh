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
//
// Two kernels share this scheme: `decode` on CUDA cores (fp32 inputs, and 1..8 rows of fp16/bf16) and `decode_mma`
// on tensor cores (fp16/bf16 with 9..16 rows, where FMAs would bound the CUDA-core kernel instead of bytes).
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
template <> struct Shape<16> { static constexpr int ROWS = 2, U = 2; };  // fp32 only: 16-bit takes decode_mma

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

// Launch `kernel` (THREADS_ threads per block, one warp per item of ROWS rows of A, then of W0) over its items as a
// cooperative persistent grid: at most as many blocks as are resident at once, so a warp waiting for A's items never waits
// for a block that cannot start. The kernel is a template argument, not a parameter: the decode kernels share one
// function type, and the occupancy cache below must be one per kernel.
template <typename T, auto kernel, int THREADS_, int ROWS>
const char* launch_items(const FwdParams& p, cudaStream_t stream) {
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
    if (auto e = cuda_error(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, THREADS_, 0))) return e;
    blocks_per_sm[dev].store(per_sm, std::memory_order_relaxed);
  }
  const int64_t items = (p.r + ROWS - 1) / ROWS + (p.N + ROWS - 1) / ROWS;
  const int64_t wanted = (items + THREADS_ / 32 - 1) / (THREADS_ / 32);
  const int64_t resident = static_cast<int64_t>(sms) * (per_sm > 0 ? per_sm : 1);
  const unsigned blocks = static_cast<unsigned>(wanted < resident ? wanted : resident);
  // xa and the counter are one buffer: one memset zeroes both (the kernel needs the counter zeroed).
  if (auto e = cuda_error(cudaMemsetAsync(p.xa, 0, sizeof(float) * (p.M * p.r + 1), stream))) return e;
  return launch_kernel(kernel, dim3(blocks), dim3(THREADS_), 0, stream, true, p, vec_ok(p.x, p.K, sizeof(T)),
                       vec_ok(p.w, p.K, sizeof(T)), vec_ok(p.a, p.K, sizeof(T)));
}

template <typename T, int MB>
const char* launch(const FwdParams& p, cudaStream_t stream) {
  return launch_items<T, lora_forward_decode_kernel<T, MB>, THREADS, Shape<MB>::ROWS>(p, stream);
}

}  // namespace decode

// ---- Tensor cores for 16-bit inputs at 9..16 rows ----
// On CUDA cores every W0 element costs M FMAs plus conversions: at M = 16 that is more instructions than an SM
// issues while its share of W0 streams in. mma.m16n8k16 multiplies 16 rows of x by 8 rows of W0 (or A) over 16
// of K in one instruction, straight from the 16-byte loads: lane (g, t) = (lane / 4, lane % 4) loads
// W0[n0 + g, k0 + 8t .. + 8) and x[g], x[g + 8] at the same columns, and two MMAs take those registers as they are.
// That assigns K's columns to the MMA's k slots in a permuted order (slot 2t + i <- column 8t + i, slot 2t + 8 + i
// <- 8t + 2 + i, then + 4 for the second MMA), the same for x and W0, so the dot products are unchanged. A work
// item is 8 rows over all of K per warp; the accumulators come out per lane, no reduction across lanes.
namespace decode_mma {

constexpr int THREADS = 128;  // 4 warps: 8-row items leave fewer warps than the CUDA-core variant, spread wider
constexpr int U = 16;         // 32-column steps per iteration: 16 16-byte loads of W0 (or A) per lane in flight

template <typename T>
__device__ __forceinline__ void mma(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#if defined(LK_EMULATE)
  lk_emulation::mma_m16n8k16<T>(c, a, b);
#else
  if constexpr (std::is_same<T, __nv_bfloat16>::value) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
                 "{%8, %9}, {%0, %1, %2, %3};"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
                 "{%8, %9}, {%0, %1, %2, %3};"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
#endif
}

// row[c .. c + 8) as one 16-byte register group, zero past K: one load when `vec` and inside K.
template <typename T>
__device__ __forceinline__ uint4 load8(const T* row, int64_t c, int64_t K, bool vec, bool streamed) {
  if (vec && c + 8 <= K)
    return streamed ? decode::load_streamed(row + c) : __ldg(reinterpret_cast<const uint4*>(row + c));
  uint4 u;
  T* e = reinterpret_cast<T*>(&u);
#pragma unroll
  for (int v = 0; v < 8; ++v) e[v] = c + v < K ? row[c + v] : from_f32<T>(0.f);
  return u;
}

// dropout(x[m, c .. c + 8)) (decode::drop's mask and scale), rounded back to T as the same-dtype reference's
// dropout(x) is (c: a multiple of 4).
template <typename T>
__device__ __forceinline__ uint4 drop8(uint4 u, const Dropout& d, uint64_t seed, int m, int64_t c, int64_t K) {
  float f[8];
  decode::unpack<T>(f, u);
  decode::drop<8>(f, d, seed, m, c, K);
  T* e = reinterpret_cast<T*>(&u);
#pragma unroll
  for (int v = 0; v < 8; ++v) e[v] = from_f32<T>(f[v]);
  return u;
}

// c += x[g | g + 8, 32 columns] . rows[n0 + (0..8), same columns], as two MMAs on the loaded registers.
template <typename T> __device__ __forceinline__ void step(float (&c)[4], uint4 x0, uint4 x1, uint4 w) {
  const uint32_t a1[4] = {x0.x, x1.x, x0.y, x1.y}, b1[2] = {w.x, w.y};
  mma<T>(c, a1, b1);
  const uint32_t a2[4] = {x0.z, x1.z, x0.w, x1.w}, b2[2] = {w.z, w.w};
  mma<T>(c, a2, b2);
}

template <typename T>
__global__ void __launch_bounds__(THREADS) lora_forward_decode_mma_kernel(FwdParams p, bool vec_x, bool vec_w,
                                                                          bool vec_a) {
  const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (THREADS / 32);
  const int64_t gwarp = static_cast<int64_t>(blockIdx.x) * (THREADS / 32) + threadIdx.x / 32;
  const int64_t a_items = (p.r + 7) / 8, w_items = (p.N + 7) / 8, K = p.K;
  const int M = static_cast<int>(p.M);
  const T* b = static_cast<const T*>(p.b);
  const T* bias = static_cast<const T*>(p.bias);
  T* y = static_cast<T*>(p.y);
  // x rows g and g + 8 (rows past M clamped to the last; their outputs are not written)
  const T* x0 = static_cast<const T*>(p.x) + static_cast<int64_t>(g < M ? g : M - 1) * K;
  const T* x1 = static_cast<const T*>(p.x) + static_cast<int64_t>(g + 8 < M ? g + 8 : M - 1) * K;
  const bool dropout = p.dropout.seed != nullptr;
  const uint64_t seed = dropout ? static_cast<uint64_t>(*p.dropout.seed) : 0;
  bool xa_ready = false;

  for (int64_t item = gwarp; item < a_items + w_items; item += warps) {
    const bool is_a = item < a_items;
    const int64_t n0 = (is_a ? item : item - a_items) * 8, n_rows = is_a ? p.r : p.N;
    const T* rp = static_cast<const T*>(is_a ? p.a : p.w) + (n0 + g < n_rows ? n0 + g : n_rows - 1) * K;
    const bool vec = vec_x && (is_a ? vec_a : vec_w), drop = is_a && dropout;
    float c[4] = {0.f, 0.f, 0.f, 0.f};
    // Warp-uniform bounds (mma.sync needs all 32 lanes): whole U-step blocks, then single steps bounds-checked.
    int64_t k0 = 0;
    if (vec) {
      for (; k0 + U * 32 <= K; k0 += U * 32) {
        uint4 wv[U], xv0[U], xv1[U];
#pragma unroll
        for (int u = 0; u < U; ++u) wv[u] = decode::load_streamed(rp + k0 + 32 * u + 8 * t);
#pragma unroll
        for (int u = 0; u < U; ++u) {
          xv0[u] = __ldg(reinterpret_cast<const uint4*>(x0 + k0 + 32 * u + 8 * t));
          xv1[u] = __ldg(reinterpret_cast<const uint4*>(x1 + k0 + 32 * u + 8 * t));
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
          if (drop) {
            xv0[u] = drop8<T>(xv0[u], p.dropout, seed, g, k0 + 32 * u + 8 * t, K);
            xv1[u] = drop8<T>(xv1[u], p.dropout, seed, g + 8, k0 + 32 * u + 8 * t, K);
          }
          step<T>(c, xv0[u], xv1[u], wv[u]);
        }
      }
    }
    for (; k0 < K; k0 += 32) {
      const int64_t col = k0 + 8 * t;
      uint4 xv0 = load8(x0, col, K, vec, false), xv1 = load8(x1, col, K, vec, false);
      if (drop) {
        xv0 = drop8<T>(xv0, p.dropout, seed, g, col, K);
        xv1 = drop8<T>(xv1, p.dropout, seed, g + 8, col, K);
      }
      step<T>(c, xv0, xv1, load8(rp, col, K, vec, true));
    }
    // c[i]: input row m = g + 8 (i / 2), item row n0 + 2t + i % 2.
    if (is_a) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int m = g + 8 * (i / 2);
        const int64_t rr = n0 + 2 * t + i % 2;
        if (m < M && rr < p.r) p.xa[m * p.r + rr] = c[i];
      }
      __threadfence();
      __syncwarp();
      if (lane == 0) atomicAdd(p.counter, 1u);
      continue;
    }
    if (!xa_ready) {
      if (lane == 0)
        while (decode::load_acquire(p.counter) < static_cast<unsigned int>(a_items)) __nanosleep(64);
      __syncwarp();
      xa_ready = true;
    }
    // + scaling * xa[m, :] . B[n, :] for the lane's two input rows and two output columns; xa from L2 (written by
    // other SMs during this launch).
    const int m0 = g < M ? g : M - 1, m1 = g + 8 < M ? g + 8 : M - 1;
    const int64_t nA = n0 + 2 * t < p.N ? n0 + 2 * t : p.N - 1, nB = n0 + 2 * t + 1 < p.N ? n0 + 2 * t + 1 : p.N - 1;
    float lora[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll 4
    for (int rr = 0; rr < p.r; ++rr) {
      const float xa0 = __ldcg(p.xa + m0 * p.r + rr), xa1 = __ldcg(p.xa + m1 * p.r + rr);
      const float bA = to_f32(b[nA * p.r + rr]), bB = to_f32(b[nB * p.r + rr]);
      lora[0] = fmaf(xa0, bA, lora[0]);
      lora[1] = fmaf(xa0, bB, lora[1]);
      lora[2] = fmaf(xa1, bA, lora[2]);
      lora[3] = fmaf(xa1, bB, lora[3]);
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int m = g + 8 * (i / 2);
      const int64_t n = n0 + 2 * t + i % 2;
      if (m < M && n < p.N) {
        float v = c[i] + p.scaling * lora[i];
        if (bias) v += to_f32(bias[n]);
        y[m * p.N + n] = from_f32<T>(v);
      }
    }
  }
}

template <typename T> const char* launch(const FwdParams& p, cudaStream_t stream) {
  return decode::launch_items<T, lora_forward_decode_mma_kernel<T>, THREADS, 8>(p, stream);
}

}  // namespace decode_mma

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
  if constexpr (std::is_same<T, float>::value) return decode::launch<T, 16>(p, stream);
  else return decode_mma::launch<T>(p, stream);
}

}  // namespace lora_kernels
