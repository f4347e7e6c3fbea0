// One kernel, one dtype per translation unit: the build compiles them in parallel.
#include "../forward_tiled.cuh"

namespace lora_kernels {
template const char* forward_tiled_impl<__half>(const FwdParams&, void*);
}
