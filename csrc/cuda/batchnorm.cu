// bn_unitwise_fisher / bn_unitwise_solve: the 2x2 per-channel Fisher blocks of BatchNorm.
//
// Fisher: one pass over grad_out and x̂. Every (n, c) plane is contiguous (HW elements), so a
// sub-warp of `sub` lanes (32 for large planes, fewer for small ones) reduces one plane to
// u = [Σ g·x̂, Σ g] with shuffles and its leader accumulates u uᵀ in registers. A block owns one channel
// and a slice of the batch; the block's three sums are reduced through shared memory. When channels
// alone cannot fill the GPU the batch is split across blockIdx.y: each block writes its partial sums
// and the last block of a channel to finish (ticket counter) adds them in a fixed order and updates
// state, so the whole op stays one kernel and the result is deterministic.
// Solve: an elementwise closed-form 2x2 solve per channel.

#include "cuda/batchnorm.h"
#include "cuda/batchnorm_kernels.cuh"
#include "cuda/common.cuh"

#include <algorithm>

namespace spngd::cuda_ops {

void bn_unitwise_fisher(const at::Tensor& state, const at::Tensor& grad_out, const at::Tensor& xhat, double scale,
                        double decay) {
  const c10::cuda::CUDAGuard guard(grad_out.device());
  const int64_t N = grad_out.size(0), C = grad_out.size(1);
  if (C == 0) return;
  const int64_t HW = N == 0 ? 0 : grad_out.numel() / (N * C);
  if (N == 0 || HW == 0) {  // no examples: the contribution is zero
    if (decay == 0.0) state.zero_(); else state.mul_(decay);
    return;
  }
  const BnFisherPlan plan = plan_bn_fisher(N, C, HW, at::cuda::getCurrentDeviceProperties()->multiProcessorCount);
  const int sub = plan.sub;
  const int64_t G = plan.blocks_per_channel, n_per_block = plan.n_per_block;

  at::Tensor ws, counters;
  if (G > 1) {
    ws = at::empty({C, G, 3}, state.options());
    counters = at::zeros({C}, state.options().dtype(at::kInt));
  }
  const auto stream = at::cuda::getCurrentCUDAStream();
  const dim3 grid(static_cast<unsigned>(C), static_cast<unsigned>(G));
  SPNGD_DISPATCH_FLOAT_AND_HALF(grad_out.scalar_type(), "bn_unitwise_fisher", [&] {
    bn_fisher_kernel<scalar_t><<<grid, kBnThreads, 0, stream>>>(
        grad_out.data_ptr<scalar_t>(), xhat.data_ptr<scalar_t>(), N, C, HW, n_per_block, sub,
        state.data_ptr<float>(), G > 1 ? ws.data_ptr<float>() : nullptr,
        G > 1 ? counters.data_ptr<int>() : nullptr, static_cast<float>(scale), fp32_decay(decay));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

std::tuple<at::Tensor, at::Tensor> bn_unitwise_solve(const at::Tensor& fisher, const at::Tensor& grad_gamma,
                                                     const at::Tensor& grad_beta, double damping) {
  const c10::cuda::CUDAGuard guard(fisher.device());
  const int64_t C = fisher.size(0);
  at::Tensor out_gamma = at::empty_like(grad_gamma);
  at::Tensor out_beta = at::empty_like(grad_beta);
  if (C == 0) return {out_gamma, out_beta};
  const auto blocks = static_cast<unsigned>(std::min<int64_t>(ceil_div(C, 256), 1024));
  bn_solve_kernel<<<blocks, 256, 0, at::cuda::getCurrentCUDAStream()>>>(
      fisher.data_ptr<float>(), grad_gamma.data_ptr<float>(), grad_beta.data_ptr<float>(),
      out_gamma.data_ptr<float>(), out_beta.data_ptr<float>(), C, static_cast<float>(damping));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out_gamma, out_beta};
}

}  // namespace spngd::cuda_ops
