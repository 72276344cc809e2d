// pack_upper / unpack_upper: moving symmetric matrices in and out of the packed upper layout.
//
// pack: one warp per (matrix, row). Packed row i is the contiguous source segment A[i, i:n], so the
// warp reads and writes it coalesced; the dtype cast is fused into the copy.
// unpack: the lower half of each output is the transpose of the packed upper half, so the work is cut
// into 32x32 upper tiles staged through shared memory: a block reads its tile coalesced, writes it in
// place and (off the diagonal) writes its transpose, coalesced too. The per-matrix scale is fused.
//
// Both launches cover many matrices at once. Their per-matrix table travels as a __grid_constant__
// kernel argument rather than a device buffer: no host-to-device copy per call, nothing that could
// race with the host, and it is safe under CUDA-graph capture. A warp/block finds its matrix by binary
// search over the table's prefix sums.

#include "cuda/common.cuh"
#include "cuda/pack.h"
#include "cuda/pack_kernels.cuh"

namespace spngd::cuda_ops {

static_assert(CUDART_VERSION >= 12010, "spngd_ext: pack.cu needs CUDA >= 12.1 (kernel arguments over 4 KB)");

at::Tensor pack_upper(at::TensorList mats, at::ScalarType out_dtype) {
  const c10::cuda::CUDAGuard guard(mats[0].device());
  int64_t total = 0;
  for (const auto& m : mats) total += m.size(0) * (m.size(0) + 1) / 2;
  at::Tensor out = at::empty({total}, mats[0].options().dtype(out_dtype));
  if (total == 0) return out;
  const auto stream = at::cuda::getCurrentCUDAStream();

  std::vector<PackSource> sources;
  sources.reserve(mats.size());
  for (const auto& m : mats)
    sources.push_back({m.data_ptr(), m.size(0), m.stride(0), m.stride(1), static_cast<int8_t>(m.scalar_type())});
  for_each_pack_launch(sources.data(), sources.size(), [&](const PackTable& t, int64_t rows) {
    const auto blocks = static_cast<unsigned>(ceil_div(rows, kPackWarps));
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out_dtype, "pack_upper", [&] {
      pack_upper_kernel<scalar_t><<<blocks, kPackWarps * 32, 0, stream>>>(t, out.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

std::vector<at::Tensor> unpack_upper(const at::Tensor& buffer, at::IntArrayRef sizes, const at::Tensor& scale,
                                     int64_t offset, at::ScalarType out_dtype) {
  const c10::cuda::CUDAGuard guard(buffer.device());
  std::vector<at::Tensor> outs;
  outs.reserve(sizes.size());
  for (const int64_t n : sizes) outs.push_back(at::empty({n, n}, buffer.options().dtype(out_dtype)));
  const auto stream = at::cuda::getCurrentCUDAStream();

  std::vector<void*> dsts;
  dsts.reserve(outs.size());
  for (auto& o : outs) dsts.push_back(o.data_ptr());
  for_each_unpack_launch(sizes.data(), dsts.data(), sizes.size(), offset, [&](const UnpackTable& t, int64_t tiles) {
    const dim3 block(kTile, kTileRows);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, buffer.scalar_type(), "unpack_upper", [&] {
      using src_t = scalar_t;
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out_dtype, "unpack_upper", [&] {
        unpack_upper_kernel<src_t, scalar_t><<<static_cast<unsigned>(tiles), block, 0, stream>>>(
            t, buffer.data_ptr<src_t>(), scale.data_ptr<float>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
  return outs;
}

}  // namespace spngd::cuda_ops
