// dtype dispatch of the launchers (lora_launch.h); the instantiations live in instantiations/*.cu.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "lora_launch.h"

namespace lora_kernels {

#define LK_DISPATCH(fn, dtype, ...)                             \
  switch (dtype) {                                              \
    case DType::f32: return fn<float>(__VA_ARGS__);             \
    case DType::f16: return fn<__half>(__VA_ARGS__);            \
    case DType::bf16: return fn<__nv_bfloat16>(__VA_ARGS__);    \
  }                                                             \
  return "unsupported dtype";

const char* forward_tiled(DType dtype, const FwdParams& p, void* stream) { LK_DISPATCH(forward_tiled_impl, dtype, p, stream) }
const char* forward_decode(DType dtype, const FwdParams& p, void* stream) { LK_DISPATCH(forward_decode_impl, dtype, p, stream) }
const char* backward(DType dtype, const BwdParams& p, void* stream) { LK_DISPATCH(backward_impl, dtype, p, stream) }

}  // namespace lora_kernels
