// Kronecker-factor accumulation: state (packed upper, fp32) = decay * state + scale * XᵀX.
#pragma once

#include <ATen/core/Tensor.h>

namespace spngd::cuda_ops {

// X = x, a (rows, d) matrix of any strides; x is fp32, bf16 or fp16.
void accumulate_factor(const at::Tensor& state, const at::Tensor& x, double scale, double decay);

// X = the implicit im2col matrix of a 4-D input (any memory layout), plus a column of ones when
// has_bias. The patches are gathered straight into shared memory, never materialised.
void conv_a_factor(const at::Tensor& state, const at::Tensor& x, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                   at::IntArrayRef padding, at::IntArrayRef dilation, bool has_bias, double scale, double decay);

}  // namespace spngd::cuda_ops
