// accumulate_factor / conv_a_factor: state (packed upper, fp32) = decay * state + scale * XᵀX.
//
// One tiled SYRK kernel serves both ops; a "loader" turns (row r, column c) of the implicit X into a
// value, so the Linear case reads x directly and the Conv2d case gathers im2col patches straight
// from the input into shared memory (implicit GEMM: the unfolded matrix never exists).
//
// Design:
//  * Only output tiles on or above the diagonal are launched (half the FLOPs of a GEMM), and each
//    writes its part of the packed upper triangle directly: no d x d temporary, no extraction pass.
//  * 256 threads per block as a 16 x 16 grid; each thread owns a TM x TM micro-tile in registers
//    (TM = 8: 128 x 128 tiles for large d; TM = 4: 64 x 64 tiles so small d wastes less padding).
//    The reduction runs over rows of X in stages of kBK rows, double-buffered in shared memory with
//    the next stage prefetched into registers while the current one is multiplied.
//  * Inputs may be fp32/bf16/fp16; they are widened on load and all arithmetic is fp32 FMA.
//  * When there are too few tiles to fill the GPU (small d, many rows), the rows are split across
//    blockIdx.y; each split writes raw partial sums to a small workspace and a second kernel reduces
//    them in a fixed order (deterministic, no atomics) and applies decay/scale. The workspace is
//    capped: at most x's size for a dense x, and for conv 1/(2 kh kw) of the implicit X (half the
//    1/(kh kw) of an unfold).
//  * decay == 0 never reads state, so NaN in it is ignored (BLAS beta = 0 semantics).

#include "cuda/common.cuh"
#include "cuda/factor.h"
#include "cuda/syrk_tiles.cuh"

namespace spngd::cuda_ops {
namespace {

// max_ws: the most workspace (floats) a row split may use.
template <typename Loader>
void launch_syrk(const Loader& ld, int64_t d, int64_t rows, const at::Tensor& state, double scale, double decay,
                 int64_t max_ws) {
  const int64_t np = d * (d + 1) / 2;
  if (np == 0) return;
  const SyrkPlan plan = plan_syrk(d, rows, at::cuda::getCurrentDeviceProperties()->multiProcessorCount, max_ws);
  const bool large = plan.large;
  const int64_t tiles = plan.tiles, splits = plan.splits, rows_per_split = plan.rows_per_split;

  at::Tensor ws;
  float* out = state.data_ptr<float>();
  if (splits > 1) {
    ws = at::empty({splits, np}, state.options());
    out = ws.data_ptr<float>();
  }
  const auto stream = at::cuda::getCurrentCUDAStream();
  const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(splits));
  const float fs = static_cast<float>(scale), fd = fp32_decay(decay);
  if (large) {
    syrk_upper_kernel<8, Loader><<<grid, kSyrkThreads, 0, stream>>>(ld, d, rows, rows_per_split, out, np, fs, fd, splits > 1);
  } else {
    syrk_upper_kernel<4, Loader><<<grid, kSyrkThreads, 0, stream>>>(ld, d, rows, rows_per_split, out, np, fs, fd, splits > 1);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (splits > 1) {
    const auto blocks = static_cast<unsigned>(std::min<int64_t>(ceil_div(np, 256), 4096));
    reduce_splits_kernel<<<blocks, 256, 0, stream>>>(out, splits, np, state.data_ptr<float>(), fs, fd);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace

void accumulate_factor(const at::Tensor& state, const at::Tensor& x, double scale, double decay) {
  const c10::cuda::CUDAGuard guard(x.device());
  SPNGD_DISPATCH_FLOAT_AND_HALF(x.scalar_type(), "accumulate_factor", [&] {
    const DenseLoader<scalar_t> ld{x.data_ptr<scalar_t>(), x.size(1), x.stride(0), x.stride(1)};
    launch_syrk(ld, x.size(1), x.size(0), state, scale, decay, x.size(0) * x.size(1));  // <= x's size
  });
}

void conv_a_factor(const at::Tensor& state, const at::Tensor& x, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                   at::IntArrayRef padding, at::IntArrayRef dilation, bool has_bias, double scale, double decay) {
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t kh = kernel_size[0], kw = kernel_size[1];
  const int64_t oh = (H + 2 * padding[0] - dilation[0] * (kh - 1) - 1) / stride[0] + 1;
  const int64_t ow = (W + 2 * padding[1] - dilation[1] * (kw - 1) - 1) / stride[1] + 1;
  const int64_t rows = x.size(0) * oh * ow;
  const int64_t d = C * kh * kw + (has_bias ? 1 : 0);
  SPNGD_DISPATCH_FLOAT_AND_HALF(x.scalar_type(), "conv_a_factor", [&] {
    ConvLoader<scalar_t> ld;
    ld.x = x.data_ptr<scalar_t>();
    ld.sN = x.stride(0); ld.sC = x.stride(1); ld.sH = x.stride(2); ld.sW = x.stride(3);
    ld.H = static_cast<int>(H); ld.W = static_cast<int>(W);
    ld.KW = static_cast<int>(kw); ld.KHW = static_cast<int>(kh * kw); ld.patch = static_cast<int>(C * kh * kw);
    ld.stride_h = static_cast<int>(stride[0]); ld.stride_w = static_cast<int>(stride[1]);
    ld.pad_h = static_cast<int>(padding[0]); ld.pad_w = static_cast<int>(padding[1]);
    ld.dil_h = static_cast<int>(dilation[0]); ld.dil_w = static_cast<int>(dilation[1]);
    ld.bias = has_bias;
    ld.per_image = FastDivmod(static_cast<uint32_t>(oh * ow));
    ld.per_row = FastDivmod(static_cast<uint32_t>(ow));
    // Workspace at most half the im2col rows' channel data (rows * C / 2 = X / (2 kh kw)): always
    // below 1/(kh kw) of what an unfold would allocate.
    launch_syrk(ld, d, rows, state, scale, decay, rows * C / 2);
  });
}

}  // namespace spngd::cuda_ops
