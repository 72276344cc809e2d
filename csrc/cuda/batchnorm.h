// Unit-wise BatchNorm Fisher: per channel a 2x2 block over (gamma, beta), stored packed as (C, 3).
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

namespace spngd::cuda_ops {

// state (C, 3) fp32 = decay * state + scale * Σ_n u uᵀ, u_{n,c} = [Σ_hw g·x̂, Σ_hw g];
// grad_out and xhat are contiguous (N, C, *) of one shape, fp32/bf16/fp16. One fused kernel.
void bn_unitwise_fisher(const at::Tensor& state, const at::Tensor& grad_out, const at::Tensor& xhat, double scale,
                        double decay);

// Per channel (F_c + damping I)^-1 [grad_gamma_c, grad_beta_c]; a singular or non-finite block keeps
// the plain gradient. All fp32.
std::tuple<at::Tensor, at::Tensor> bn_unitwise_solve(const at::Tensor& fisher, const at::Tensor& grad_gamma,
                                                     const at::Tensor& grad_beta, double damping);

}  // namespace spngd::cuda_ops
