// One kernel, one dtype per translation unit: the build compiles them in parallel.
#include "../backward.cuh"

namespace lora_kernels {
template const char* backward_impl<__nv_bfloat16>(const BwdParams&, void*);
}
