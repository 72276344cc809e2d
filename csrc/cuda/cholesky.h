// Batched damped SPD inverse through Cholesky: (M_b + damping_b I)^-1 with a failure flag per matrix.
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

namespace spngd::cuda_ops {

// mats (B, n, n) contiguous fp32/fp64, damping (B,) of the same dtype. Returns (inverses, info int32):
// info 0 = ok, j > 0 = pivot j (1-based) not positive or not finite, -1 = non-finite factor or
// inverse. Only the lower triangle of mats is read.
// Never raises on a bad matrix and never synchronises with the host.
std::tuple<at::Tensor, at::Tensor> cholesky_inverse_damped(const at::Tensor& mats, const at::Tensor& damping);

// Largest n routed to the shared-memory kernel (bigger n, or n whose matrix does not fit in shared
// memory, go through ATen's cuSOLVER/cuBLAS). n >= 0 sets it; any n returns the previous value.
int64_t cholesky_kernel_max_n(int64_t n);

}  // namespace spngd::cuda_ops
