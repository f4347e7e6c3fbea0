// Fused forward in one launch: y = x W0^T + bias + scaling * (dropout(x) A^T) B^T.
//
// Each 128-thread block owns a 64 x 64 tile of y. Its K loop stages one x tile, one W0 tile and one A tile in shared
// memory and feeds the x tile to two products: x W0^T (tensor cores, register accumulators) and dropout(x) A^T
// (the [64, r] low-rank activations, fp32 accumulators in shared memory). The epilogue rounds scaling * xa to the
// input type, multiplies it by the block's rows of B, adds the bias and stores y once. Column-0 blocks store xa (fp32)
// for the backward. Every column of blocks recomputes its xa (r / 64 more MMA work, no more memory traffic).
#pragma once
#include "tiles.cuh"

namespace lora_kernels {
namespace fwd {

constexpr int BM = 64, BN = 64, BK = 32, THREADS = 128, GROUP_M = 8;

__host__ __device__ inline size_t align128(size_t b) { return (b + 127) / 128 * 128; }

template <typename T> struct Smem {
  int rp;  // rank padded to 16
  __host__ __device__ explicit Smem(int r) : rp((r + 15) / 16 * 16) {}
  __host__ __device__ int ld_k() const { return pitch<T>(BK); }
  __host__ __device__ int ld_r() const { return pitch<T>(rp); }
  __host__ __device__ int ld_xa() const { return rp + 4; }
  __host__ __device__ int ld_c() const { return BN + 4; }
  __host__ __device__ size_t xa_bytes() const { return align128(sizeof(float) * BM * ld_xa()); }
  __host__ __device__ size_t tile_bytes(int rows) const { return align128(sizeof(T) * rows * ld_k()); }
  // K loop: x, dropout(x), W0, A tiles.
  __host__ __device__ size_t loop_bytes() const { return 2 * tile_bytes(BM) + tile_bytes(BN) + tile_bytes(rp); }
  // Epilogue: scaling * xa (input type), B rows, fp32 staging of the output tile.
  __host__ __device__ size_t r_bytes(int rows) const { return align128(sizeof(T) * rows * ld_r()); }
  __host__ __device__ size_t epi_bytes() const { return r_bytes(BM) + r_bytes(BN) + align128(sizeof(float) * BM * ld_c()); }
  __host__ __device__ size_t total() const { return xa_bytes() + (loop_bytes() > epi_bytes() ? loop_bytes() : epi_bytes()); }
};

template <typename T>
__global__ void __launch_bounds__(THREADS) lora_forward_tiled_kernel(FwdParams p, int vec_mask) {
  extern __shared__ __align__(128) unsigned char smem[];
  const Smem<T> s(p.r);
  const int RP = s.rp, LDK = s.ld_k(), LDR = s.ld_r(), LDXA = s.ld_xa(), LDC = s.ld_c();
  float* XAs = reinterpret_cast<float*>(smem);
  unsigned char* region = smem + s.xa_bytes();
  T* Xs = reinterpret_cast<T*>(region);
  T* XDs = reinterpret_cast<T*>(region + s.tile_bytes(BM));
  T* Ws = reinterpret_cast<T*>(region + 2 * s.tile_bytes(BM));
  T* As = reinterpret_cast<T*>(region + 2 * s.tile_bytes(BM) + s.tile_bytes(BN));
  T* XAt = reinterpret_cast<T*>(region);
  T* Bs = reinterpret_cast<T*>(region + s.r_bytes(BM));
  float* Cs = reinterpret_cast<float*>(region + s.r_bytes(BM) + s.r_bytes(BN));

  // Grouped tile order: GROUP_M row tiles walk the columns of W0 together while they sit in L2.
  const int64_t tiles_m = (p.M + BM - 1) / BM, tiles_n = (p.N + BN - 1) / BN;
  const int64_t pid = blockIdx.x, per_group = GROUP_M * tiles_n, group = pid / per_group;
  const int64_t first_m = group * GROUP_M;
  const int64_t group_size = tiles_m - first_m < GROUP_M ? tiles_m - first_m : GROUP_M;
  const int64_t tile_m = first_m + (pid % per_group) % group_size, tile_n = (pid % per_group) / group_size;
  const int64_t m0 = tile_m * BM, n0 = tile_n * BN;

  const T* x = static_cast<const T*>(p.x);
  const T* w = static_cast<const T*>(p.w);
  const T* a = static_cast<const T*>(p.a);
  const T* b = static_cast<const T*>(p.b);
  const bool dropout = p.dropout.seed != nullptr;
  const uint64_t seed = dropout ? static_cast<uint64_t>(*p.dropout.seed) : 0;
  T* Xd = dropout ? XDs : Xs;

  const int warp = threadIdx.x / 32, wm = warp / 2, wn = warp % 2;
  const int xa_frags = (BM / 16) * (RP / 16);

  for (int i = threadIdx.x; i < BM * LDXA; i += THREADS) XAs[i] = 0.f;
  Mma16<T> acc[2][2];
  zero_tiles(acc);

  for (int64_t k0 = 0; k0 < p.K; k0 += BK) {
    load_tile(Xs, LDK, x, p.K, m0, k0, p.M, p.K, BM, BK, vec_mask & 1);
    load_tile(Ws, LDK, w, p.K, n0, k0, p.N, p.K, BN, BK, vec_mask & 2);
    load_tile(As, LDK, a, p.K, 0, k0, p.r, p.K, RP, BK, vec_mask & 4);
    __syncthreads();
    if (dropout) {
      apply_dropout(XDs, Xs, LDK, BM, BK, m0, k0, p.K, p.dropout, seed);
      __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j)
        acc[i][j].template mma<true, false>(Xs + (wm * 32 + i * 16) * LDK, LDK, Ws + (wn * 32 + j * 16) * LDK, LDK, BK);
    for (int f = warp; f < xa_frags; f += THREADS / 32) {
      const int fm = f / (RP / 16), fr = f % (RP / 16);
      Mma16<T> c;
      c.load(XAs + fm * 16 * LDXA + fr * 16, LDXA);
      c.template mma<true, false>(Xd + fm * 16 * LDK, LDK, As + fr * 16 * LDK, LDK, BK);
      c.store(XAs + fm * 16 * LDXA + fr * 16, LDXA);
    }
    __syncthreads();
  }

  // Epilogue. The K-loop buffers are dead: XAt, Bs, Cs reuse them.
  for (int i = threadIdx.x; i < BM * RP; i += THREADS) {
    const int m = i / RP, rr = i % RP;
    const float v = XAs[m * LDXA + rr];
    XAt[m * LDR + rr] = from_f32<T>(p.scaling * v);
    if (p.store_xa && tile_n == 0 && rr < p.r && m0 + m < p.M) p.xa[(m0 + m) * p.r + rr] = v;
  }
  load_tile(Bs, LDR, b, p.r, n0, 0, p.N, p.r, BN, RP, vec_mask & 8);
  __syncthreads();
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      acc[i][j].template mma<true, false>(XAt + (wm * 32 + i * 16) * LDR, LDR, Bs + (wn * 32 + j * 16) * LDR, LDR, RP);
      acc[i][j].store(Cs + (wm * 32 + i * 16) * LDC + wn * 32 + j * 16, LDC);
    }
  __syncthreads();
  T* y = static_cast<T*>(p.y);
  const T* bias = static_cast<const T*>(p.bias);
  for (int i = threadIdx.x; i < BM * BN; i += THREADS) {
    const int m = i / BN, n = i % BN;
    if (m0 + m < p.M && n0 + n < p.N) {
      float v = Cs[m * LDC + n];
      if (bias) v += to_f32(bias[n0 + n]);
      y[(m0 + m) * p.N + n0 + n] = from_f32<T>(v);
    }
  }
}

}  // namespace fwd

template <typename T> const char* forward_tiled_impl(const FwdParams& p, void* stream) {
  if (p.M == 0 || p.N == 0) return nullptr;
  if (p.r < 1 || p.r > kMaxRank) return "rank out of the supported range 1..256";
  const fwd::Smem<T> s(p.r);
  const size_t smem = s.total();
  if (auto e = check_shared_memory(smem)) return e;
  const int vec = (vec_ok(p.x, p.K, sizeof(T)) ? 1 : 0) | (vec_ok(p.w, p.K, sizeof(T)) ? 2 : 0) |
                  (vec_ok(p.a, p.K, sizeof(T)) ? 4 : 0) | (vec_ok(p.b, p.r, sizeof(T)) ? 8 : 0);
  const int64_t blocks = ((p.M + fwd::BM - 1) / fwd::BM) * ((p.N + fwd::BN - 1) / fwd::BN);
  if (blocks > 0x7fffffff) return "too many output tiles for one launch";
  return launch_kernel(fwd::lora_forward_tiled_kernel<T>, dim3(static_cast<unsigned>(blocks)), dim3(fwd::THREADS), smem,
                       stream, false, p, vec);
}

}  // namespace lora_kernels
