// One kernel, one dtype per translation unit: the build compiles them in parallel.
#include "../forward_decode.cuh"

namespace lora_kernels {
template const char* forward_decode_impl<__half>(const FwdParams&, void*);
}
