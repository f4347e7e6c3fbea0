// Fused backward in one launch: dX = dY W0 + ((scaling dY B) A) * D,  dA = (scaling dY B)^T (X * D),
// dB = scaling dY^T xa, with D the dropout mask (regenerated, never stored) and xa saved by the forward.
//
// Each 128-thread block owns a 64 x 64 tile of dX (rows m0.., columns k0..). Its loop over N stages dY, W0 and B
// tiles and feeds dY to two products: dY W0 (tensor cores, registers; skipped when x needs no grad) and
// G = dY B (the [64, r] low-rank gradient, fp32 in shared memory; every column of blocks recomputes it, r / 64 more
// MMA work). Blocks of column 0 also multiply dY^T by their rows of xa: their share of dB, added to an fp32 buffer
// with atomics (or written as one partial per row tile in deterministic mode). After the loop the block has G for
// its rows: it adds (G A) * D to its dX tile and (G^T (X * D)) to its columns of dA.
#pragma once
#include "tiles.cuh"

namespace lora_kernels {
namespace bwd {

constexpr int BM = kBwdBlockM, BK = 64, BN = 32, THREADS = 128;

__host__ __device__ inline size_t align128(size_t b) { return (b + 127) / 128 * 128; }

template <typename T> struct Smem {
  int rp;
  __host__ __device__ explicit Smem(int r) : rp((r + 15) / 16 * 16) {}
  __host__ __device__ int ld_n() const { return pitch<T>(BN); }
  __host__ __device__ int ld_k() const { return pitch<T>(BK); }
  __host__ __device__ int ld_r() const { return pitch<T>(rp); }
  __host__ __device__ int ld_g() const { return rp + 4; }
  __host__ __device__ int ld_c() const { return BK + 4; }
  template <typename U> __host__ __device__ static size_t bytes(int rows, int ld) { return align128(sizeof(U) * rows * ld); }
  // Whole kernel: G (fp32) and one 16 x 20 fp32 scratch tile per warp.
  __host__ __device__ size_t fixed_bytes() const { return bytes<float>(BM, ld_g()) + bytes<float>(16 * THREADS / 32, 20); }
  // Loop over N: xa rows (input type), dY, W0 and B tiles.
  __host__ __device__ size_t loop_bytes() const {
    return bytes<T>(BM, ld_r()) + bytes<T>(BM, ld_n()) + bytes<T>(BN, ld_k()) + bytes<T>(BN, ld_r());
  }
  // After the loop: G (input type), A, X, X * D tiles, two fp32 staging tiles for dX.
  __host__ __device__ size_t epi_bytes() const {
    return bytes<T>(BM, ld_r()) + bytes<T>(rp, ld_k()) + 2 * bytes<T>(BM, ld_k()) + 2 * bytes<float>(BM, ld_c());
  }
  __host__ __device__ size_t total() const { return fixed_bytes() + (loop_bytes() > epi_bytes() ? loop_bytes() : epi_bytes()); }
};

// Adds (or, in deterministic mode, stores) a warp's 16 x 16 fp32 scratch tile, times `scale`, into
// out[row0 + i, col0 + j] of a [nrows, ncols] fp32 matrix.
__device__ inline void flush_tile(const float* scratch, float* out, int64_t row0, int64_t col0, int64_t nrows,
                                  int64_t ncols, float scale, bool deterministic) {
  __syncwarp();
  for (int e = threadIdx.x % 32; e < 256; e += 32) {
    const int64_t i = row0 + e / 16, j = col0 + e % 16;
    if (i < nrows && j < ncols) {
      const float v = scale * scratch[(e / 16) * 20 + e % 16];
      if (deterministic) out[i * ncols + j] = v;
      else atomicAdd(out + i * ncols + j, v);
    }
  }
  __syncwarp();
}

template <typename T>
__global__ void __launch_bounds__(THREADS) lora_backward_kernel(BwdParams p, int vec_mask) {
  extern __shared__ __align__(128) unsigned char smem[];
  const Smem<T> s(p.r);
  const int RP = s.rp, LDN = s.ld_n(), LDK = s.ld_k(), LDR = s.ld_r(), LDG = s.ld_g(), LDC = s.ld_c();
  const int warp = threadIdx.x / 32, wm = warp / 2, wk = warp % 2;

  float* Gs = reinterpret_cast<float*>(smem);
  float* scratch = reinterpret_cast<float*>(smem + Smem<T>::template bytes<float>(BM, LDG)) + warp * 16 * 20;
  unsigned char* region = smem + s.fixed_bytes();
  // Loop buffers
  T* XAt = reinterpret_cast<T*>(region);
  T* dYs = reinterpret_cast<T*>(region + Smem<T>::template bytes<T>(BM, LDR));
  T* Ws = reinterpret_cast<T*>(region + Smem<T>::template bytes<T>(BM, LDR) + Smem<T>::template bytes<T>(BM, LDN));
  T* Bt = reinterpret_cast<T*>(region + Smem<T>::template bytes<T>(BM, LDR) + Smem<T>::template bytes<T>(BM, LDN) +
                               Smem<T>::template bytes<T>(BN, LDK));
  // Epilogue buffers (alias the loop buffers)
  T* Gt = reinterpret_cast<T*>(region);
  size_t off = Smem<T>::template bytes<T>(BM, LDR);
  T* As = reinterpret_cast<T*>(region + off);
  off += Smem<T>::template bytes<T>(RP, LDK);
  T* Xs = reinterpret_cast<T*>(region + off);
  off += Smem<T>::template bytes<T>(BM, LDK);
  T* XDs = reinterpret_cast<T*>(region + off);
  off += Smem<T>::template bytes<T>(BM, LDK);
  float* Cs = reinterpret_cast<float*>(region + off);
  off += Smem<T>::template bytes<float>(BM, LDC);
  float* Cs2 = reinterpret_cast<float*>(region + off);

  const int64_t tile_m = blockIdx.y, tile_k = blockIdx.x;
  const int64_t m0 = tile_m * BM, k0 = tile_k * BK;
  const bool need_dx = p.dx != nullptr, do_db = tile_k == 0;
  const bool dropout = p.dropout.seed != nullptr;
  const uint64_t seed = dropout ? static_cast<uint64_t>(*p.dropout.seed) : 0;
  const T* gy = static_cast<const T*>(p.grad_y);
  const T* w = static_cast<const T*>(p.w);
  const T* b = static_cast<const T*>(p.b);
  const int g_frags = (BM / 16) * (RP / 16), db_frags = (BN / 16) * (RP / 16);
  float* db = p.deterministic ? p.db + tile_m * p.N * p.r : p.db;
  float* da = p.deterministic ? p.da + tile_m * p.r * p.K : p.da;

  for (int i = threadIdx.x; i < BM * LDG; i += THREADS) Gs[i] = 0.f;
  if (do_db)
    for (int i = threadIdx.x; i < BM * RP; i += THREADS) {
      const int m = i / RP, rr = i % RP;
      XAt[m * LDR + rr] = from_f32<T>(m0 + m < p.M && rr < p.r ? p.xa[(m0 + m) * p.r + rr] : 0.f);
    }
  Mma16<T> acc[2][2];
  zero_tiles(acc);

  for (int64_t n0 = 0; n0 < p.N; n0 += BN) {
    load_tile(dYs, LDN, gy, p.N, m0, n0, p.M, p.N, BM, BN, vec_mask & 1);
    if (need_dx) load_tile(Ws, LDK, w, p.K, n0, k0, p.N, p.K, BN, BK, vec_mask & 2);
    load_tile(Bt, LDR, b, p.r, n0, 0, p.N, p.r, BN, RP, vec_mask & 4);
    __syncthreads();
    if (need_dx) {
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j)
          acc[i][j].template mma<true, true>(dYs + (wm * 32 + i * 16) * LDN, LDN, Ws + wk * 32 + j * 16, LDK, BN);
    }
    for (int f = warp; f < g_frags; f += THREADS / 32) {
      const int fm = f / (RP / 16), fr = f % (RP / 16);
      Mma16<T> c;
      c.load(Gs + fm * 16 * LDG + fr * 16, LDG);
      c.template mma<true, true>(dYs + fm * 16 * LDN, LDN, Bt + fr * 16, LDR, BN);
      c.store(Gs + fm * 16 * LDG + fr * 16, LDG);
    }
    if (do_db) {
      for (int f = warp; f < db_frags; f += THREADS / 32) {
        const int fn = f / (RP / 16), fr = f % (RP / 16);
        Mma16<T> c;
        c.zero();
        c.template mma<false, true>(dYs + fn * 16, LDN, XAt + fr * 16, LDR, BM);  // dY^T [BN x BM] xa [BM x RP]
        c.store(scratch, 20);
        flush_tile(scratch, db, n0 + fn * 16, fr * 16, p.N, p.r, p.scaling, p.deterministic);
      }
    }
    __syncthreads();
  }

  // Epilogue: G = scaling * dY B in the input type (as the reference rounds it), A and X tiles of this column.
  for (int i = threadIdx.x; i < BM * RP; i += THREADS) {
    const int m = i / RP, rr = i % RP;
    Gt[m * LDR + rr] = from_f32<T>(p.scaling * Gs[m * LDG + rr]);
  }
  load_tile(As, LDK, static_cast<const T*>(p.a), p.K, 0, k0, p.r, p.K, RP, BK, vec_mask & 8);
  load_tile(Xs, LDK, static_cast<const T*>(p.x), p.K, m0, k0, p.M, p.K, BM, BK, vec_mask & 16);
  __syncthreads();
  T* Xd = Xs;
  if (dropout) {
    apply_dropout(XDs, Xs, LDK, BM, BK, m0, k0, p.K, p.dropout, seed);
    Xd = XDs;
    __syncthreads();
  }

  if (need_dx) {
    // dX = dY W0 + (G A) * D; without dropout both products share the accumulators.
    Mma16<T> lr[2][2];
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const T* g = Gt + (wm * 32 + i * 16) * LDR;
        const T* at = As + wk * 32 + j * 16;
        if (dropout) {
          lr[i][j].zero();
          lr[i][j].template mma<true, true>(g, LDR, at, LDK, RP);
          lr[i][j].store(Cs2 + (wm * 32 + i * 16) * LDC + wk * 32 + j * 16, LDC);
        } else {
          acc[i][j].template mma<true, true>(g, LDR, at, LDK, RP);
        }
        acc[i][j].store(Cs + (wm * 32 + i * 16) * LDC + wk * 32 + j * 16, LDC);
      }
    __syncthreads();
    T* dx = static_cast<T*>(p.dx);
    for (int i = threadIdx.x; i < BM * (BK / 4); i += THREADS) {
      const int m = i / (BK / 4), c = (i % (BK / 4)) * 4;
      if (m0 + m >= p.M) continue;
      const uint32_t bits = dropout ? keep_bits4(seed, m0 + m, (k0 + c) / 4, p.K, p.dropout.threshold) : 0xFu;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        if (k0 + c + j >= p.K) break;
        float v = Cs[m * LDC + c + j];
        if (dropout && ((bits >> j) & 1u)) v += Cs2[m * LDC + c + j] * p.dropout.keep_scale;
        dx[(m0 + m) * p.K + k0 + c + j] = from_f32<T>(v);
      }
    }
  }

  // dA[:, k0..] += G^T (X * D): [RP x BM] x [BM x BK].
  const int da_frags = (RP / 16) * (BK / 16);
  for (int f = warp; f < da_frags; f += THREADS / 32) {
    const int fr = f / (BK / 16), fk = f % (BK / 16);
    Mma16<T> c;
    c.zero();
    c.template mma<false, true>(Gt + fr * 16, LDR, Xd + fk * 16, LDK, BM);
    c.store(scratch, 20);
    flush_tile(scratch, da, fr * 16, k0 + fk * 16, p.r, p.K, 1.f, p.deterministic);
  }
}

}  // namespace bwd

template <typename T> const char* backward_impl(const BwdParams& p, void* stream) {
  if (p.K == 0 || p.r == 0) return nullptr;
  if (p.r > kMaxRank) return "rank out of the supported range 1..256";
  const bwd::Smem<T> s(p.r);
  const size_t smem = s.total();
  if (auto e = check_shared_memory(smem)) return e;
  if (p.M == 0) return nullptr;  // dA and dB stay zero, dX is empty
  const int vec = (vec_ok(p.grad_y, p.N, sizeof(T)) ? 1 : 0) | (vec_ok(p.w, p.K, sizeof(T)) ? 2 : 0) |
                  (vec_ok(p.b, p.r, sizeof(T)) ? 4 : 0) | (vec_ok(p.a, p.K, sizeof(T)) ? 8 : 0) |
                  (vec_ok(p.x, p.K, sizeof(T)) ? 16 : 0);
  const int64_t tiles_m = (p.M + bwd::BM - 1) / bwd::BM, tiles_k = (p.K + bwd::BK - 1) / bwd::BK;
  if (tiles_m > 65535) return "too many row tiles for one launch (M > 4194240)";
  const dim3 grid(static_cast<unsigned>(tiles_k), static_cast<unsigned>(tiles_m));
  return launch_kernel(bwd::lora_backward_kernel<T>, grid, dim3(bwd::THREADS), smem, stream, false, p, vec);
}

}  // namespace lora_kernels
