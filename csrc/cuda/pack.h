// Packed symmetric buffers: upper triangles (row by row) of many matrices in one flat tensor.
#pragma once

#include <ATen/core/Tensor.h>

#include <vector>

namespace spngd::cuda_ops {

// Concatenated packed upper triangles of square CUDA matrices, cast to out_dtype (one launch for up
// to kMaxMatsPerLaunch matrices of any mix of dtypes and strides).
at::Tensor pack_upper(at::TensorList mats, at::ScalarType out_dtype);

// Full symmetric matrices from buffer[offset:], matrix k multiplied by scale[k] (fp32, on device).
std::vector<at::Tensor> unpack_upper(const at::Tensor& buffer, at::IntArrayRef sizes, const at::Tensor& scale,
                                     int64_t offset, at::ScalarType out_dtype);

}  // namespace spngd::cuda_ops
