// Device building blocks of the tiled kernels: 16x16 warp MMA tiles on tensor cores (fp16/bf16, fp32 accumulate)
// or CUDA cores (fp32 inputs, so fp32 results keep fp32 accuracy), tile loads into shared memory, conversions.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include <type_traits>
#if defined(LK_EMULATE)
// Tests only: a host-thread model of the CUDA runtime and device features these kernels use (tests/emulation/),
// so the kernels' own code runs, block by block and thread by thread, on a machine without a GPU.
#include "lk_emulation.h"
#else
#include <cuda_runtime.h>
#include <mma.h>
#endif

#include "lora_launch.h"
#include "philox.h"

namespace lora_kernels {

template <typename T> __device__ __forceinline__ float to_f32(T v);
template <> __device__ __forceinline__ float to_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_f32<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_f32<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// Shared-memory row pitch (elements) for a tile `cols` wide: keeps wmma's 16-byte ldm rule and 32-byte fragment
// alignment (cols is a multiple of 16) and shifts rows across banks.
template <typename T> __host__ __device__ constexpr int pitch(int cols) { return cols + 16 / (int)sizeof(T) * 2; }

// C[16x16] (fp32) += A[16 x kdim] * B[kdim x 16] with A, B in shared memory. A_ROW: A(i, k) = A[i * lda + k],
// else A[k * lda + i]; B_ROW: B(k, j) = B[k * ldb + j], else B[j * ldb + k]. kdim is a multiple of 16.
template <typename T> struct Mma16 {
  nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> c;
  __device__ void zero() { nvcuda::wmma::fill_fragment(c, 0.f); }
  __device__ void load(const float* src, int ld) { nvcuda::wmma::load_matrix_sync(c, src, ld, nvcuda::wmma::mem_row_major); }
  __device__ void store(float* dst, int ld) const { nvcuda::wmma::store_matrix_sync(dst, c, ld, nvcuda::wmma::mem_row_major); }
  template <bool A_ROW, bool B_ROW>
  __device__ void mma(const T* a, int lda, const T* b, int ldb, int kdim) {
    using LA = typename std::conditional<A_ROW, nvcuda::wmma::row_major, nvcuda::wmma::col_major>::type;
    using LB = typename std::conditional<B_ROW, nvcuda::wmma::row_major, nvcuda::wmma::col_major>::type;
    nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 16, T, LA> fa;
    nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, 16, 16, 16, T, LB> fb;
    for (int k = 0; k < kdim; k += 16) {
      nvcuda::wmma::load_matrix_sync(fa, A_ROW ? a + k : a + (int64_t)k * lda, lda);
      nvcuda::wmma::load_matrix_sync(fb, B_ROW ? b + (int64_t)k * ldb : b + k, ldb);
      nvcuda::wmma::mma_sync(c, fa, fb, c);
    }
  }
};

// fp32: lane l owns row l / 2, columns (l % 2) * 8 .. + 7, accumulated with FMAs in fp32.
template <> struct Mma16<float> {
  float c[8];
  __device__ int row() const { return (threadIdx.x & 31) >> 1; }
  __device__ int col0() const { return ((threadIdx.x & 31) & 1) * 8; }
  __device__ void zero() {
#pragma unroll
    for (int j = 0; j < 8; ++j) c[j] = 0.f;
  }
  __device__ void load(const float* src, int ld) {
    __syncwarp();
#pragma unroll
    for (int j = 0; j < 8; ++j) c[j] = src[row() * ld + col0() + j];
  }
  __device__ void store(float* dst, int ld) const {
#pragma unroll
    for (int j = 0; j < 8; ++j) dst[row() * ld + col0() + j] = c[j];
    __syncwarp();
  }
  template <bool A_ROW, bool B_ROW>
  __device__ void mma(const float* a, int lda, const float* b, int ldb, int kdim) {
    const int i = row(), j0 = col0();
    for (int k = 0; k < kdim; ++k) {
      const float av = A_ROW ? a[i * lda + k] : a[k * lda + i];
#pragma unroll
      for (int j = 0; j < 8; ++j) c[j] = fmaf(av, B_ROW ? b[k * ldb + j0 + j] : b[(j0 + j) * ldb + k], c[j]);
    }
  }
};

// A warp's 32 x 32 output tile: 2 x 2 MMA tiles, zeroed.
template <typename T> __device__ void zero_tiles(Mma16<T> (&acc)[2][2]) {
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) acc[i][j].zero();
}

// dst[rows x cols] (shared, pitch ldd) = src[row0.., col0..] (global, row stride lds), zero outside
// [0, nrows) x [0, ncols). 16-byte loads when `vec` (the caller checked alignment of base and row stride).
template <typename T>
__device__ void load_tile(T* dst, int ldd, const T* src, int64_t lds, int64_t row0, int64_t col0, int64_t nrows,
                          int64_t ncols, int rows, int cols, bool vec) {
  constexpr int V = 16 / sizeof(T);
  const T zero = from_f32<T>(0.f);
  if (vec) {
    const int per_row = cols / V;
    for (int i = threadIdx.x; i < rows * per_row; i += blockDim.x) {
      const int r = i / per_row, c = (i % per_row) * V;
      const int64_t gr = row0 + r, gc = col0 + c;
      T* d = dst + r * ldd + c;
      if (gr < nrows && gc + V <= ncols) {
        *reinterpret_cast<uint4*>(d) = __ldg(reinterpret_cast<const uint4*>(src + gr * lds + gc));
      } else {
#pragma unroll
        for (int v = 0; v < V; ++v) d[v] = (gr < nrows && gc + v < ncols) ? src[gr * lds + gc + v] : zero;
      }
    }
  } else {
    for (int i = threadIdx.x; i < rows * cols; i += blockDim.x) {
      const int r = i / cols, c = i % cols;
      const int64_t gr = row0 + r, gc = col0 + c;
      dst[r * ldd + c] = (gr < nrows && gc < ncols) ? src[gr * lds + gc] : zero;
    }
  }
}

// dst[r][c] = src[r][c] * keep(row0 + r, col0 + c) * keep_scale for a [rows x cols] shared tile of x.
// col0 and cols are multiples of 4: one Philox call serves four columns.
template <typename T>
__device__ void apply_dropout(T* dst, const T* src, int ld, int rows, int cols, int64_t row0, int64_t col0,
                              int64_t K, const Dropout& d, uint64_t seed) {
  const int quads = cols / 4;
  for (int i = threadIdx.x; i < rows * quads; i += blockDim.x) {
    const int r = i / quads, c = (i % quads) * 4;
    const uint32_t bits = keep_bits4(seed, row0 + r, (col0 + c) / 4, K, d.threshold);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const float v = ((bits >> j) & 1u) ? to_f32(src[r * ld + c + j]) * d.keep_scale : 0.f;
      dst[r * ld + c + j] = from_f32<T>(v);
    }
  }
}

// True when 16-byte loads of rows of a row-major matrix with `cols` columns starting at `p` stay aligned.
__host__ __device__ inline bool vec_ok(const void* p, int64_t cols, int elem) {
  return (reinterpret_cast<uintptr_t>(p) % 16 == 0) && ((cols * elem) % 16 == 0);
}

inline const char* cuda_error(cudaError_t e) { return e == cudaSuccess ? nullptr : cudaGetErrorString(e); }

// nullptr if this GPU gives a block `smem` bytes of shared memory (with the opt-in), else why not.
inline const char* check_shared_memory(size_t smem) {
  int dev = 0, limit = 0;
  if (auto e = cuda_error(cudaGetDevice(&dev))) return e;
  if (auto e = cuda_error(cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev))) return e;
  return smem > static_cast<size_t>(limit) ? "this rank needs more shared memory per block than this GPU has" : nullptr;
}

// Launch `kernel` with `smem` bytes of dynamic shared memory (opted in above the 48 KiB default) on `stream`;
// `cooperative`: all blocks resident at once (the decode kernel's blocks wait for one another).
template <typename... Params, typename... Args>
const char* launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, void* stream, bool cooperative,
                          Args&&... args) {
  if (smem > 48 * 1024)
    if (auto e = cuda_error(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem))) return e;
  cudaLaunchConfig_t config = {};
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeCooperative;
  attr[0].val.cooperative = 1;
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem;
  config.stream = static_cast<cudaStream_t>(stream);
  config.attrs = cooperative ? attr : nullptr;
  config.numAttrs = cooperative ? 1 : 0;
  return cuda_error(cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...));
}

}  // namespace lora_kernels
