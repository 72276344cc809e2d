// The spngd_ext operator library: schemas (declared once, here), argument checks, and the CUDA
// registrations. Kernels live in csrc/cuda/, one .cu and one header per op family. The Python side
// (spngd_ext/ops/__init__.py) calls torch.ops.spngd_ext.<op> with exactly these signatures;
// spngd_ext/ops/extension.py registers, for each op, the CPU kernel (the pure-PyTorch path, after
// the argument checks below, through the check-only _check_<op>) and the fake implementation that
// tracing (torch.compile, FakeTensorMode) runs instead of a kernel.

#include <Python.h>

#include <ATen/ATen.h>
#include <torch/library.h>

#include <initializer_list>
#include <limits>
#include <optional>
#include <string>

#include "cuda/batchnorm.h"
#include "cuda/cholesky.h"
#include "cuda/factor.h"
#include "cuda/pack.h"

// `import spngd_ext._C` only has to load this shared object: its static initialisers (the
// TORCH_LIBRARY blocks below) register the ops. The module itself is empty.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr, nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&module);
}

namespace spngd {
namespace {

namespace ops = cuda_ops;
const std::initializer_list<at::ScalarType> kFloatTypes = {at::kFloat, at::kDouble, at::kHalf, at::kBFloat16};
const std::initializer_list<at::ScalarType> kKernelInputTypes = {at::kFloat, at::kHalf, at::kBFloat16};  // fp32 sums

int64_t packed_size(int64_t n) { return n * (n + 1) / 2; }

// Dtype names as Python spells them (torch.float32, ...), so messages match what users wrote.
std::string dtype_name(at::ScalarType dt) {
  switch (dt) {
    case at::kFloat: return "float32";
    case at::kDouble: return "float64";
    case at::kHalf: return "float16";
    case at::kBFloat16: return "bfloat16";
    case at::kLong: return "int64";
    case at::kInt: return "int32";
    case at::kShort: return "int16";
    case at::kChar: return "int8";
    case at::kByte: return "uint8";
    case at::kBool: return "bool";
    case at::kComplexFloat: return "complex64";
    case at::kComplexDouble: return "complex128";
    default: return c10::toString(dt);
  }
}

void check_cuda(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.defined(), "spngd_ext::", op, ": ", name, " is undefined");
  TORCH_CHECK_VALUE(t.is_cuda(), "spngd_ext::", op, ": ", name, " must be a CUDA tensor, got device ", t.device());
}

void check_same_device(const char* op, const char* name, const at::Tensor& t, const char* ref_name,
                       const at::Tensor& ref) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), "spngd_ext::", op, ": ", name, " is on ", t.device(), " but ",
                    ref_name, " is on ", ref.device(), "; all tensors must be on one device");
}

void check_dtype(const char* op, const char* name, const at::Tensor& t, std::initializer_list<at::ScalarType> ok) {
  for (const auto dt : ok)
    if (t.scalar_type() == dt) return;
  std::string listing;
  for (const auto dt : ok) listing += (listing.empty() ? "" : "/") + dtype_name(dt);
  TORCH_CHECK_TYPE(false, "spngd_ext::", op, ": ", name, " must be ", listing, ", got ", dtype_name(t.scalar_type()));
}

void check_dtype(const char* op, const char* name, at::ScalarType dt) {
  TORCH_CHECK_TYPE(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16, "spngd_ext::", op,
                   ": ", name, " must be a floating dtype (float32/float64/float16/bfloat16), got ", dtype_name(dt));
}

void check_contiguous(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.is_contiguous(), "spngd_ext::", op, ": ", name, " must be contiguous (shape ", t.sizes(),
                    ", strides ", t.strides(), ")");
}

void check_state(const char* op, const at::Tensor& state, int64_t numel, const at::Tensor& ref) {
  check_same_device(op, "state", state, "x", ref);
  check_dtype(op, "state", state, {at::kFloat});
  check_contiguous(op, "state", state);
  TORCH_CHECK_VALUE(state.numel() == numel, "spngd_ext::", op, ": state must have ", numel,
                    " elements (packed upper triangle), got ", state.numel(), " (shape ", state.sizes(), ")");
}

// ----------------------------------------------------------------------------------------------
// Symmetric packing

// Each op below has a device-agnostic check_<op> (everything but "is it a CUDA tensor"). The CUDA
// kernel checks that every tensor is on the GPU first (so a CPU tensor is reported as such even
// when its dtype is wrong too), then the arguments, then launches. Each check is also declared as
// the op _check_<op> (same arguments, no result), which the CPU kernels call first, so that a CPU
// and a CUDA call reject the same arguments with the same exception and message.

void check_pack_upper(at::TensorList mats, std::optional<at::ScalarType> dtype) {
  const char* op = "pack_upper";
  TORCH_CHECK_VALUE(!mats.empty(), "spngd_ext::pack_upper: mats must hold at least one matrix");
  for (size_t i = 0; i < mats.size(); ++i) {
    const std::string name = "mats[" + std::to_string(i) + "]";
    check_same_device(op, name.c_str(), mats[i], "mats[0]", mats[0]);
    check_dtype(op, name.c_str(), mats[i], kFloatTypes);
    TORCH_CHECK_VALUE(mats[i].dim() == 2 && mats[i].size(0) == mats[i].size(1), "spngd_ext::pack_upper: ", name,
                      " must be a square matrix, got shape ", mats[i].sizes());
  }
  const at::ScalarType out_dtype = dtype.value_or(mats[0].scalar_type());
  check_dtype(op, "dtype", out_dtype);
}

at::Tensor pack_upper(at::TensorList mats, std::optional<at::ScalarType> dtype) {
  for (size_t i = 0; i < mats.size(); ++i) check_cuda("pack_upper", ("mats[" + std::to_string(i) + "]").c_str(), mats[i]);
  check_pack_upper(mats, dtype);
  return ops::pack_upper(mats, dtype.value_or(mats[0].scalar_type()));  // checked: mats is not empty
}

void check_unpack_upper(const at::Tensor& buffer, at::IntArrayRef sizes, const at::Tensor& scale,
                                           int64_t offset, at::ScalarType dtype) {
  const char* op = "unpack_upper";
  check_dtype(op, "buffer", buffer, kFloatTypes);
  TORCH_CHECK_VALUE(buffer.dim() == 1, "spngd_ext::unpack_upper: buffer must be 1-D, got shape ", buffer.sizes());
  check_contiguous(op, "buffer", buffer);
  check_dtype(op, "dtype", dtype);
  int64_t need = offset;
  for (const int64_t n : sizes) {
    TORCH_CHECK_VALUE(n >= 0, "spngd_ext::unpack_upper: sizes must be non-negative, got ", sizes);
    need += packed_size(n);
  }
  TORCH_CHECK_VALUE(offset >= 0 && need <= buffer.numel(), "spngd_ext::unpack_upper: buffer has ", buffer.numel(),
                    " elements, sizes ", sizes, " at offset ", offset, " need ", need);
  check_same_device(op, "scale", scale, "buffer", buffer);
  check_dtype(op, "scale", scale, {at::kFloat});
  check_contiguous(op, "scale", scale);
  TORCH_CHECK_VALUE(scale.dim() == 1 && scale.numel() == static_cast<int64_t>(sizes.size()),
                    "spngd_ext::unpack_upper: scale must be 1-D with one entry per matrix (", sizes.size(),
                    "), got shape ", scale.sizes());
}

std::vector<at::Tensor> unpack_upper(const at::Tensor& buffer, at::IntArrayRef sizes, const at::Tensor& scale,
                                     int64_t offset, at::ScalarType dtype) {
  check_cuda("unpack_upper", "buffer", buffer);
  check_cuda("unpack_upper", "scale", scale);
  check_unpack_upper(buffer, sizes, scale, offset, dtype);
  return ops::unpack_upper(buffer, sizes, scale, offset, dtype);
}

// ----------------------------------------------------------------------------------------------
// Factor accumulation

void check_accumulate_factor(const at::Tensor& state, const at::Tensor& x, double, double) {
  const char* op = "accumulate_factor";
  check_dtype(op, "x", x, kKernelInputTypes);
  TORCH_CHECK_VALUE(x.dim() == 2, "spngd_ext::accumulate_factor: x must be 2-D (rows, d), got shape ", x.sizes());
  check_state(op, state, packed_size(x.size(1)), x);
}

void accumulate_factor(const at::Tensor& state, const at::Tensor& x, double scale, double decay) {
  check_cuda("accumulate_factor", "x", x);
  check_cuda("accumulate_factor", "state", state);
  check_accumulate_factor(state, x, scale, decay);
  ops::accumulate_factor(state, x, scale, decay);
}

void check_conv_a_factor(const at::Tensor& state, const at::Tensor& x, at::IntArrayRef kernel_size,
                         at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, bool has_bias,
                         double, double) {
  const char* op = "conv_a_factor";
  check_dtype(op, "x", x, kKernelInputTypes);
  TORCH_CHECK_VALUE(x.dim() == 4, "spngd_ext::conv_a_factor: x must be 4-D (N, C, H, W), got shape ", x.sizes());
  TORCH_CHECK_VALUE(kernel_size.size() == 2 && stride.size() == 2 && padding.size() == 2 && dilation.size() == 2,
                    "spngd_ext::conv_a_factor: kernel_size, stride, padding and dilation must have 2 entries each, got ",
                    kernel_size, ", ", stride, ", ", padding, ", ", dilation);
  for (int k = 0; k < 2; ++k) {
    TORCH_CHECK_VALUE(kernel_size[k] >= 1 && stride[k] >= 1 && dilation[k] >= 1 && padding[k] >= 0,
                      "spngd_ext::conv_a_factor: need kernel_size, stride, dilation >= 1 and padding >= 0, got ",
                      kernel_size, ", ", stride, ", ", dilation, ", ", padding);
  }
  const int64_t oh = (x.size(2) + 2 * padding[0] - dilation[0] * (kernel_size[0] - 1) - 1) / stride[0] + 1;
  const int64_t ow = (x.size(3) + 2 * padding[1] - dilation[1] * (kernel_size[1] - 1) - 1) / stride[1] + 1;
  TORCH_CHECK_VALUE(x.size(2) + 2 * padding[0] >= dilation[0] * (kernel_size[0] - 1) + 1 &&
                        x.size(3) + 2 * padding[1] >= dilation[1] * (kernel_size[1] - 1) + 1,
                    "spngd_ext::conv_a_factor: the kernel does not fit the padded input (input ", x.sizes(),
                    ", kernel_size ", kernel_size, ", padding ", padding, ", dilation ", dilation, ")");
  TORCH_CHECK_VALUE(x.size(0) * oh * ow < std::numeric_limits<int32_t>::max() &&
                        x.size(2) * x.size(3) < std::numeric_limits<int32_t>::max(),
                    "spngd_ext::conv_a_factor: too many patches (", x.size(0) * oh * ow, "); split the batch");
  check_state(op, state, packed_size(x.size(1) * kernel_size[0] * kernel_size[1] + (has_bias ? 1 : 0)), x);
}

void conv_a_factor(const at::Tensor& state, const at::Tensor& x, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                   at::IntArrayRef padding, at::IntArrayRef dilation, bool has_bias, double scale, double decay) {
  check_cuda("conv_a_factor", "x", x);
  check_cuda("conv_a_factor", "state", state);
  check_conv_a_factor(state, x, kernel_size, stride, padding, dilation, has_bias, scale, decay);
  ops::conv_a_factor(state, x, kernel_size, stride, padding, dilation, has_bias, scale, decay);
}

// ----------------------------------------------------------------------------------------------
// Inversion

void check_cholesky_inverse_damped(const at::Tensor& mats, const at::Tensor& damping) {
  const char* op = "cholesky_inverse_damped";
  check_dtype(op, "mats", mats, {at::kFloat, at::kDouble});
  TORCH_CHECK_VALUE(mats.dim() == 3 && mats.size(1) == mats.size(2),
                    "spngd_ext::cholesky_inverse_damped: mats must be (B, n, n), got shape ", mats.sizes());
  check_contiguous(op, "mats", mats);
  check_same_device(op, "damping", damping, "mats", mats);
  TORCH_CHECK_TYPE(damping.scalar_type() == mats.scalar_type(), "spngd_ext::cholesky_inverse_damped: damping must have ",
                   "the dtype of mats (", dtype_name(mats.scalar_type()), "), got ", dtype_name(damping.scalar_type()));
  TORCH_CHECK_VALUE(damping.dim() == 1 && damping.size(0) == mats.size(0),
                    "spngd_ext::cholesky_inverse_damped: damping must be (", mats.size(0), ",), got shape ",
                    damping.sizes());
  check_contiguous(op, "damping", damping);
}

std::tuple<at::Tensor, at::Tensor> cholesky_inverse_damped(const at::Tensor& mats, const at::Tensor& damping) {
  check_cuda("cholesky_inverse_damped", "mats", mats);
  check_cuda("cholesky_inverse_damped", "damping", damping);
  check_cholesky_inverse_damped(mats, damping);
  return ops::cholesky_inverse_damped(mats, damping);
}

// ----------------------------------------------------------------------------------------------
// BatchNorm, unit-wise

void check_bn_unitwise_fisher(const at::Tensor& state, const at::Tensor& grad_out, const at::Tensor& xhat, double,
                              double) {
  const char* op = "bn_unitwise_fisher";
  check_same_device(op, "xhat", xhat, "grad_out", grad_out);
  check_dtype(op, "grad_out", grad_out, kKernelInputTypes);
  TORCH_CHECK_TYPE(xhat.scalar_type() == grad_out.scalar_type(), "spngd_ext::bn_unitwise_fisher: xhat must have the ",
                   "dtype of grad_out (", dtype_name(grad_out.scalar_type()), "), got ", dtype_name(xhat.scalar_type()));
  TORCH_CHECK_VALUE(grad_out.dim() >= 2 && grad_out.sizes() == xhat.sizes(),
                    "spngd_ext::bn_unitwise_fisher: grad_out and xhat must share one (N, C, *) shape, got ",
                    grad_out.sizes(), " and ", xhat.sizes());
  check_contiguous(op, "grad_out", grad_out);
  check_contiguous(op, "xhat", xhat);
  // The kernel walks a plane with an int index that runs up to 4 * 32 lanes past its end.
  TORCH_CHECK_VALUE(c10::multiply_integers(grad_out.sizes().slice(2)) < std::numeric_limits<int32_t>::max() - 1024,
                    "spngd_ext::bn_unitwise_fisher: a (n, c) plane must hold fewer than 2^31 - 1024 elements");
  check_same_device(op, "state", state, "grad_out", grad_out);
  check_dtype(op, "state", state, {at::kFloat});
  check_contiguous(op, "state", state);
  TORCH_CHECK_VALUE(state.dim() == 2 && state.size(0) == grad_out.size(1) && state.size(1) == 3,
                    "spngd_ext::bn_unitwise_fisher: state must be (", grad_out.size(1), ", 3), got shape ",
                    state.sizes());
}

void bn_unitwise_fisher(const at::Tensor& state, const at::Tensor& grad_out, const at::Tensor& xhat, double scale,
                        double decay) {
  check_cuda("bn_unitwise_fisher", "grad_out", grad_out);
  check_cuda("bn_unitwise_fisher", "xhat", xhat);
  check_cuda("bn_unitwise_fisher", "state", state);
  check_bn_unitwise_fisher(state, grad_out, xhat, scale, decay);
  ops::bn_unitwise_fisher(state, grad_out, xhat, scale, decay);
}

void check_bn_unitwise_solve(const at::Tensor& fisher, const at::Tensor& grad_gamma,
                                                           const at::Tensor& grad_beta, double) {
  const char* op = "bn_unitwise_solve";
  check_dtype(op, "fisher", fisher, {at::kFloat});
  check_contiguous(op, "fisher", fisher);
  TORCH_CHECK_VALUE(fisher.dim() == 2 && fisher.size(1) == 3,
                    "spngd_ext::bn_unitwise_solve: fisher must be (C, 3), got shape ", fisher.sizes());
  auto check_grad = [&](const char* name, const at::Tensor& t) {
    check_same_device(op, name, t, "fisher", fisher);
    check_dtype(op, name, t, {at::kFloat});
    check_contiguous(op, name, t);
    TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == fisher.size(0), "spngd_ext::bn_unitwise_solve: ", name,
                      " must be (", fisher.size(0), ",), got shape ", t.sizes());
  };
  check_grad("grad_gamma", grad_gamma);
  check_grad("grad_beta", grad_beta);
}

std::tuple<at::Tensor, at::Tensor> bn_unitwise_solve(const at::Tensor& fisher, const at::Tensor& grad_gamma,
                                                     const at::Tensor& grad_beta, double damping) {
  check_cuda("bn_unitwise_solve", "fisher", fisher);
  check_cuda("bn_unitwise_solve", "grad_gamma", grad_gamma);
  check_cuda("bn_unitwise_solve", "grad_beta", grad_beta);
  check_bn_unitwise_solve(fisher, grad_gamma, grad_beta, damping);
  return ops::bn_unitwise_solve(fisher, grad_gamma, grad_beta, damping);
}

}  // namespace
}  // namespace spngd

TORCH_LIBRARY(spngd_ext, m) {
  m.def("pack_upper(Tensor[] mats, ScalarType? dtype) -> Tensor");
  m.def("unpack_upper(Tensor buffer, int[] sizes, Tensor scale, int offset, ScalarType dtype) -> Tensor[]");
  m.def("accumulate_factor(Tensor(a!) state, Tensor x, float scale, float decay) -> ()");
  m.def(
      "conv_a_factor(Tensor(a!) state, Tensor x, int[] kernel_size, int[] stride, int[] padding, int[] dilation, "
      "bool has_bias, float scale, float decay) -> ()");
  m.def("cholesky_inverse_damped(Tensor mats, Tensor damping) -> (Tensor, Tensor)");
  m.def("bn_unitwise_fisher(Tensor(a!) state, Tensor grad_out, Tensor xhat, float scale, float decay) -> ()");
  m.def("bn_unitwise_solve(Tensor fisher, Tensor grad_gamma, Tensor grad_beta, float damping) -> (Tensor, Tensor)");
  // Tuning knob (no tensors, so one implementation for every backend): the largest n that
  // cholesky_inverse_damped sends to its shared-memory kernel. n >= 0 sets it; returns the old value.
  m.def("cholesky_kernel_max_n(int n=-1) -> int", &spngd::cuda_ops::cholesky_kernel_max_n);

  // The argument checks alone (no computation, tensors on any device): one implementation for
  // every backend. The CPU kernels registered in spngd_ext/ops/extension.py call these first.
  m.def("_check_pack_upper(Tensor[] mats, ScalarType? dtype) -> ()", &spngd::check_pack_upper);
  m.def("_check_unpack_upper(Tensor buffer, int[] sizes, Tensor scale, int offset, ScalarType dtype) -> ()",
        &spngd::check_unpack_upper);
  m.def("_check_accumulate_factor(Tensor state, Tensor x, float scale, float decay) -> ()",
        &spngd::check_accumulate_factor);
  m.def(
      "_check_conv_a_factor(Tensor state, Tensor x, int[] kernel_size, int[] stride, int[] padding, int[] dilation, "
      "bool has_bias, float scale, float decay) -> ()",
      &spngd::check_conv_a_factor);
  m.def("_check_cholesky_inverse_damped(Tensor mats, Tensor damping) -> ()", &spngd::check_cholesky_inverse_damped);
  m.def("_check_bn_unitwise_fisher(Tensor state, Tensor grad_out, Tensor xhat, float scale, float decay) -> ()",
        &spngd::check_bn_unitwise_fisher);
  m.def("_check_bn_unitwise_solve(Tensor fisher, Tensor grad_gamma, Tensor grad_beta, float damping) -> ()",
        &spngd::check_bn_unitwise_solve);
}

TORCH_LIBRARY_IMPL(spngd_ext, CUDA, m) {
  m.impl("pack_upper", &spngd::pack_upper);
  m.impl("unpack_upper", &spngd::unpack_upper);
  m.impl("accumulate_factor", &spngd::accumulate_factor);
  m.impl("conv_a_factor", &spngd::conv_a_factor);
  m.impl("cholesky_inverse_damped", &spngd::cholesky_inverse_damped);
  m.impl("bn_unitwise_fisher", &spngd::bn_unitwise_fisher);
  m.impl("bn_unitwise_solve", &spngd::bn_unitwise_solve);
}
