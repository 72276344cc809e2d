// cholesky_inverse_damped: (M_b + damping_b I)^-1 for a batch of SPD matrices, with a failure flag.
//
// Small n: one thread block per matrix, the whole computation in shared memory (one global read of
// the lower triangle, one global write of the inverse, one launch for the batch). The matrix is held
// as a packed lower triangle so n = 256 fits in fp32 (~162 KB). Three phases, each blocked with a
// panel of kNB columns so that most of the arithmetic runs as register-tiled 4 x 4 updates instead of
// rank-1 updates that would re-read every element from shared memory at each step:
//   A  L Lᵀ = M + λI      right-looking: unblocked panel, then a SYRK update of the trailing matrix
//   B  L ← L⁻¹ in place   LAPACK trtri order (block columns right to left: TRMM, TRSM, small trti2)
//   C  M⁻¹ = L⁻ᵀ L⁻¹       each 4 x 4 output tile reduced over k, written to both triangles
// A failed pivot (not > 0, or not finite) is recorded and the arithmetic carries on with NaNs, so no
// thread ever takes a data-dependent branch around a barrier. Arithmetic is IEEE (no fast-math).
//
// Large n (or a matrix that does not fit in shared memory): ATen's linalg_cholesky_ex, then
// solve_triangular and one GEMM. at::cholesky_inverse is avoided on purpose: it copies its LAPACK info
// to the host to check it, which would synchronise.

#include "cuda/cholesky.h"
#include "cuda/cholesky_blocked.cuh"
#include "cuda/common.cuh"

#include <atomic>

namespace spngd::cuda_ops {
namespace {

constexpr int64_t kDefaultKernelMaxN = 256;  // see bench/kernels.py for the measured crossover
std::atomic<int64_t> g_kernel_max_n{kDefaultKernelMaxN};

template <typename T>
__global__ void __launch_bounds__(kMaxThreads)
    cholesky_inverse_kernel(const T* __restrict__ mats, const T* __restrict__ damping, T* __restrict__ out,
                            int* __restrict__ info, int n) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __shared__ int s_info, s_bad;
  const int64_t b = blockIdx.x;
  cholesky_inverse_block(mats + b * n * n, damping[b], reinterpret_cast<T*>(smem_raw), out + b * n * n, n, &s_info,
                         &s_bad, info + b);
}

std::tuple<at::Tensor, at::Tensor> cholesky_inverse_aten(const at::Tensor& mats, const at::Tensor& damping) {
  const int64_t B = mats.size(0), n = mats.size(1);
  at::Tensor damped = mats.clone(at::MemoryFormat::Contiguous);
  damped.diagonal(0, -2, -1).add_(damping.unsqueeze(-1));
  auto [L, info] = at::linalg_cholesky_ex(damped, /*upper=*/false, /*check_errors=*/false);
  const at::Tensor eye = at::eye(n, mats.options()).expand({B, n, n});
  const at::Tensor W = at::linalg_solve_triangular(L, eye, /*upper=*/false);
  at::Tensor inv = at::matmul(W.mT(), W);
  // Like the kernel, also flag a non-finite factor: an infinite pivot still gives a finite inverse.
  const at::Tensor finite = at::isfinite(L).flatten(1).all(1).logical_and(at::isfinite(inv).flatten(1).all(1));
  info = at::where(finite.logical_or(info.ne(0)), info, at::full_like(info, -1)).to(at::kInt);
  return {inv.contiguous(), info};
}

}  // namespace

int64_t cholesky_kernel_max_n(int64_t n) {
  return n >= 0 ? g_kernel_max_n.exchange(n) : g_kernel_max_n.load();
}

std::tuple<at::Tensor, at::Tensor> cholesky_inverse_damped(const at::Tensor& mats, const at::Tensor& damping) {
  const c10::cuda::CUDAGuard guard(mats.device());
  const int64_t B = mats.size(0), n = mats.size(1);
  if (B == 0 || n == 0) return {at::empty_like(mats), at::zeros({B}, mats.options().dtype(at::kInt))};

  const size_t bytes = mats.scalar_type() == at::kDouble ? smem_bytes<double>(n) : smem_bytes<float>(n);
  const size_t optin = at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin;
  if (n > g_kernel_max_n.load() || bytes + 64 > optin) return cholesky_inverse_aten(mats, damping);

  at::Tensor inv = at::empty_like(mats, at::MemoryFormat::Contiguous);
  at::Tensor info = at::empty({B}, mats.options().dtype(at::kInt));
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(mats.scalar_type(), "cholesky_inverse_damped", [&] {
    auto* kernel = &cholesky_inverse_kernel<scalar_t>;
    if (bytes + 64 > 48 * 1024) {  // the default limit also holds the static s_info/s_bad: keep a margin
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
    }
    kernel<<<static_cast<unsigned>(B), threads_for(n), bytes, stream>>>(
        mats.data_ptr<scalar_t>(), damping.data_ptr<scalar_t>(), inv.data_ptr<scalar_t>(), info.data_ptr<int>(),
        static_cast<int>(n));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {inv, info};
}

}  // namespace spngd::cuda_ops
