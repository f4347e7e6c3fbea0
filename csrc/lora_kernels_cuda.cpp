// Binding of the CUDA kernels: argument checks, then one launcher call (lora_launch.h). Written against torch's
// stable ABI (no ATen, no pybind11), so one build serves every torch >= 2.10 and every Python >= 3.10 of a CUDA major.
//
// Ops (namespace lora_kernels_cuda, loaded with torch.ops.load_library; lora_kernels/backends.py is the caller and
// owns allocation, the autograd and the choice of kernel):
//   forward(x, weight, bias?, lora_A, lora_B, seed?, y!, xa!, scaling, dropout_p, store_xa, decode)
//   backward(grad_y, x, weight, lora_A, lora_B, xa, seed?, dx!?, dA!, dB!, scaling, dropout_p, deterministic)
//   dropout_mask(out!, seed, dropout_p)      (CPU: the dropout mask from the kernels' own Philox code, for tests)
#include <cuda_runtime_api.h>
// The CUDA part of the shim (aoti_torch_get_current_cuda_stream, in libtorch_cuda) is declared under USE_CUDA.
#ifndef USE_CUDA
#define USE_CUDA
#endif
#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/stable/accelerator.h>
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/Exception.h>

#include <cmath>
#include <optional>
#include <string>

#include "lora_launch.h"
#include "philox.h"

using torch::stable::Tensor;
using ST = torch::headeronly::ScalarType;

namespace lora_kernels {
namespace {

std::string dtype_name(ST t) {
  switch (t) {
    case ST::Float: return "float32";
    case ST::Half: return "float16";
    case ST::BFloat16: return "bfloat16";
    case ST::Double: return "float64";
    default: return "dtype #" + std::to_string(static_cast<int>(t));
  }
}

DType kernel_dtype(const Tensor& x) {
  switch (x.scalar_type()) {
    case ST::Float: return DType::f32;
    case ST::Half: return DType::f16;
    case ST::BFloat16: return DType::bf16;
    default:
      STD_TORCH_CHECK(false, "x: the CUDA kernels take float16, bfloat16 or float32, got ", dtype_name(x.scalar_type()));
  }
  return DType::f32;
}

std::string shape(const Tensor& t) {
  std::string s = "[";
  for (int64_t i = 0; i < t.dim(); ++i) s += (i ? ", " : "") + std::to_string(t.size(i));
  return s + "]";
}

// A dense row-major matrix of `rows` x `cols` on x's GPU, of dtype `dt`.
void check_matrix(const char* name, const Tensor& t, int64_t rows, int64_t cols, ST dt, int32_t device) {
  STD_TORCH_CHECK(t.is_cuda(), name, ": expected a CUDA tensor");
  STD_TORCH_CHECK(t.get_device_index() == device, name, ": on cuda:", t.get_device_index(), ", expected x's device cuda:",
                  device);
  STD_TORCH_CHECK(t.scalar_type() == dt, name, ": dtype ", dtype_name(t.scalar_type()), ", expected ", dtype_name(dt));
  STD_TORCH_CHECK(t.dim() == 2 && t.size(0) == rows && t.size(1) == cols, name, ": expected shape [", rows, ", ", cols,
                  "], got ", shape(t));
  STD_TORCH_CHECK(t.is_contiguous(), name, ": expected a contiguous (row-major) tensor");
}

void check_common(const Tensor& x, const Tensor& w, const Tensor& a, const Tensor& b, double scaling, double p) {
  STD_TORCH_CHECK(x.is_cuda(), "x: expected a CUDA tensor");
  STD_TORCH_CHECK(x.dim() == 2, "x: expected a 2-D tensor [M, K], got ", shape(x));
  STD_TORCH_CHECK(w.dim() == 2, "weight: expected a 2-D tensor [N, K], got ", shape(w));
  STD_TORCH_CHECK(a.dim() == 2, "lora_A: expected a 2-D tensor [r, K], got ", shape(a));
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0), r = a.size(0);
  kernel_dtype(x);
  const int32_t dev = x.get_device_index();
  check_matrix("x", x, M, K, x.scalar_type(), dev);
  check_matrix("weight", w, N, K, x.scalar_type(), dev);
  STD_TORCH_CHECK(r >= 1 && r <= kMaxRank, "lora_A: rank r = ", r, " is outside the CUDA kernels' range 1..", kMaxRank);
  check_matrix("lora_A", a, r, K, x.scalar_type(), dev);
  check_matrix("lora_B", b, N, r, x.scalar_type(), dev);
  STD_TORCH_CHECK(std::isfinite(scaling), "scaling: expected a finite number, got ", scaling);
  STD_TORCH_CHECK(p >= 0.0 && p < 1.0, "dropout_p: expected a probability in [0, 1), got ", p);
}

Dropout dropout_args(const std::optional<Tensor>& seed, double p, int32_t device) {
  Dropout d;
  if (p > 0.0) {
    STD_TORCH_CHECK(seed.has_value(), "seed: dropout_p > 0 needs a one-element int64 tensor");
    STD_TORCH_CHECK(seed->is_cuda() && seed->get_device_index() == device, "seed: expected a tensor on x's device");
    STD_TORCH_CHECK(seed->scalar_type() == ST::Long && seed->numel() == 1, "seed: expected one int64 element");
    d.seed = static_cast<const int64_t*>(seed->data_ptr());
    d.threshold = static_cast<uint32_t>(std::floor(p * 2147483648.0));
    d.keep_scale = static_cast<float>(1.0 / (1.0 - p));
  }
  return d;
}

// The fields both launch structs share.
template <typename Params>
void set_problem(Params& p, int64_t M, int64_t N, int64_t K, int64_t r, double scaling, Dropout dropout) {
  p.M = M;
  p.N = N;
  p.K = K;
  p.r = static_cast<int>(r);
  p.scaling = static_cast<float>(scaling);
  p.dropout = dropout;
}

void* current_stream(int32_t device) {
  void* stream = nullptr;
  STABLE_TORCH_ERROR_CODE_CHECK(aoti_torch_get_current_cuda_stream(device, &stream));
  return stream;
}

void check_launch(const char* what, const char* err) {
  STD_TORCH_CHECK(err == nullptr, "lora_kernels CUDA ", what, ": ", err);
}

void forward_op(Tensor x, Tensor w, std::optional<Tensor> bias, Tensor a, Tensor b, std::optional<Tensor> seed, Tensor y,
             Tensor xa, double scaling, double dropout_p, bool store_xa, bool decode) {
  check_common(x, w, a, b, scaling, dropout_p);
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0), r = a.size(0);
  const int32_t dev = x.get_device_index();
  if (bias.has_value()) {
    STD_TORCH_CHECK(bias->is_cuda() && bias->get_device_index() == dev && bias->scalar_type() == x.scalar_type() &&
                        bias->dim() == 1 && bias->size(0) == N && bias->is_contiguous(),
                    "bias: expected a contiguous [", N, "] tensor of x's dtype on x's device, got ", shape(*bias));
  }
  check_matrix("y", y, M, N, x.scalar_type(), dev);
  STD_TORCH_CHECK(xa.is_cuda() && xa.get_device_index() == dev && xa.scalar_type() == ST::Float && xa.is_contiguous(),
                  "xa: expected a contiguous float32 tensor on x's device");
  FwdParams p{};
  p.x = x.data_ptr();
  p.w = w.data_ptr();
  p.bias = bias.has_value() ? bias->data_ptr() : nullptr;
  p.a = a.data_ptr();
  p.b = b.data_ptr();
  p.y = y.data_ptr();
  set_problem(p, M, N, K, r, scaling, dropout_args(seed, dropout_p, dev));
  p.store_xa = store_xa;
  p.xa = static_cast<float*>(xa.data_ptr());
  torch::stable::accelerator::DeviceGuard guard(dev);
  if (decode) {
    STD_TORCH_CHECK(M >= 1 && M <= kDecodeMaxM, "x: the decode kernel takes 1 to ", kDecodeMaxM, " rows, got ", M);
    STD_TORCH_CHECK(xa.numel() == M * r + 1, "xa: the decode kernel needs a workspace of M * r + 1 = ", M * r + 1,
                    " elements (xa, then a counter), got ", xa.numel());
    p.counter = reinterpret_cast<unsigned int*>(p.xa + M * r);
    check_launch("forward (decode)", forward_decode(kernel_dtype(x), p, current_stream(dev)));
  } else {
    STD_TORCH_CHECK(!store_xa || xa.numel() == M * r, "xa: expected ", M * r, " elements ([M, r]), got ", xa.numel());
    check_launch("forward", forward_tiled(kernel_dtype(x), p, current_stream(dev)));
  }
}

void backward_op(Tensor grad_y, Tensor x, Tensor w, Tensor a, Tensor b, Tensor xa, std::optional<Tensor> seed,
              std::optional<Tensor> dx, Tensor da, Tensor db, double scaling, double dropout_p, bool deterministic) {
  check_common(x, w, a, b, scaling, dropout_p);
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0), r = a.size(0);
  const int32_t dev = x.get_device_index();
  check_matrix("grad_y", grad_y, M, N, x.scalar_type(), dev);
  check_matrix("xa", xa, M, r, ST::Float, dev);
  if (dx.has_value()) check_matrix("dx", *dx, M, K, x.scalar_type(), dev);
  const int64_t parts = deterministic ? (M + kBwdBlockM - 1) / kBwdBlockM : 1;
  for (auto [name, t, rows, cols] : {std::tuple{"dA", &da, r, K}, std::tuple{"dB", &db, N, r}}) {
    STD_TORCH_CHECK(t->is_cuda() && t->get_device_index() == dev && t->scalar_type() == ST::Float && t->is_contiguous() &&
                        t->numel() == parts * rows * cols,
                    name, ": expected a contiguous float32 buffer of ", parts, " x ", rows, " x ", cols,
                    " elements on x's device", deterministic ? " (one partial per 64-row tile)" : " (zeroed)");
  }
  BwdParams p{};
  p.grad_y = grad_y.data_ptr();
  p.x = x.data_ptr();
  p.w = w.data_ptr();
  p.a = a.data_ptr();
  p.b = b.data_ptr();
  p.xa = static_cast<const float*>(xa.data_ptr());
  p.dx = dx.has_value() ? dx->data_ptr() : nullptr;
  p.da = static_cast<float*>(da.data_ptr());
  p.db = static_cast<float*>(db.data_ptr());
  set_problem(p, M, N, K, r, scaling, dropout_args(seed, dropout_p, dev));
  p.deterministic = deterministic;
  torch::stable::accelerator::DeviceGuard guard(dev);
  check_launch("backward", backward(kernel_dtype(x), p, current_stream(dev)));
}

// CPU: out[M, K] (uint8) = keep-mask of the CUDA kernels' Philox code.
void dropout_mask_op(Tensor out, int64_t seed, double dropout_p) {
  STD_TORCH_CHECK(out.is_cpu() && out.scalar_type() == ST::Byte && out.dim() == 2 && out.is_contiguous(),
                  "out: expected a contiguous 2-D uint8 CPU tensor");
  STD_TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, "dropout_p: expected a probability in [0, 1), got ", dropout_p);
  const int64_t M = out.size(0), K = out.size(1);
  const uint32_t threshold = static_cast<uint32_t>(std::floor(dropout_p * 2147483648.0));
  uint8_t* o = static_cast<uint8_t*>(out.data_ptr());
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k) o[m * K + k] = keep(static_cast<uint64_t>(seed), m, k, K, threshold);
}

}  // namespace
}  // namespace lora_kernels

STABLE_TORCH_LIBRARY(lora_kernels_cuda, m) {
  m.def("forward(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, Tensor? seed, Tensor(a!) y, "
        "Tensor(b!) xa, float scaling, float dropout_p, bool store_xa, bool decode) -> ()");
  m.def("backward(Tensor grad_y, Tensor x, Tensor weight, Tensor lora_A, Tensor lora_B, Tensor xa, Tensor? seed, "
        "Tensor(a!)? dx, Tensor(b!) dA, Tensor(c!) dB, float scaling, float dropout_p, bool deterministic) -> ()");
  m.def("dropout_mask(Tensor(a!) out, int seed, float dropout_p) -> ()");
}

STABLE_TORCH_LIBRARY_IMPL(lora_kernels_cuda, CUDA, m) {
  m.impl("forward", TORCH_BOX(&lora_kernels::forward_op));
  m.impl("backward", TORCH_BOX(&lora_kernels::backward_op));
}

STABLE_TORCH_LIBRARY_IMPL(lora_kernels_cuda, CPU, m) {
  m.impl("dropout_mask", TORCH_BOX(&lora_kernels::dropout_mask_op));
}
