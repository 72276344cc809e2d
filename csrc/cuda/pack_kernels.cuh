// The kernels of pack_upper / unpack_upper (design: see pack.cu) and their per-launch tables.
//
// Free of ATen (c10's dtype definitions only) so that tests/cuda_emulation compiles this very file
// on the CPU and runs whole launches, dtype casts included, without a GPU.
#pragma once

#include <c10/core/ScalarType.h>

#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "cuda/cast.cuh"
#include "cuda/index_math.cuh"

namespace spngd::cuda_ops {

// Matrices per launch: keeps the tables near 12 KB, inside the 32 KB kernel-argument limit of sm_70+
// (CUDA >= 12.1). More matrices simply take more launches.
constexpr int kMaxMats = 256;
constexpr int kPackWarps = 8;  // rows per block in pack
constexpr int kTile = 32;      // unpack tile edge
constexpr int kTileRows = 8;   // unpack block is kTile x kTileRows threads

struct PackTable {
  int count;
  int64_t row_start[kMaxMats + 1];  // prefix sums of n: first global row of each matrix
  const void* src[kMaxMats];
  int64_t stride0[kMaxMats];
  int64_t stride1[kMaxMats];
  int64_t dst_offset[kMaxMats];
  int32_t n[kMaxMats];
  int8_t dtype[kMaxMats];  // c10::ScalarType of the source; mixed dtypes share one launch
};

struct UnpackTable {
  int count;
  int64_t tile_start[kMaxMats + 1];  // prefix sums of the number of upper tiles
  int64_t src_offset[kMaxMats];      // where the matrix starts in the buffer
  void* dst[kMaxMats];
  int32_t n[kMaxMats];
  int32_t scale_index[kMaxMats];
};

// A __grid_constant__ argument list may hold 32,764 bytes from CUDA 12.1 on sm_70+ (4 KB before);
// the table plus the other kernel arguments must fit, or nvcc fails with "formal parameter space
// overflowed".
static_assert(sizeof(PackTable) + sizeof(void*) <= 32764, "PackTable exceeds the kernel-argument limit");
static_assert(sizeof(UnpackTable) + 2 * sizeof(void*) <= 32764, "UnpackTable exceeds the kernel-argument limit");

// Largest index k < count with starts[k] <= x (starts is non-decreasing, starts[0] = 0).
__device__ __forceinline__ int find_segment(const int64_t* starts, int count, int64_t x) {
  int lo = 0, hi = count - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (starts[mid] <= x) lo = mid; else hi = mid - 1;
  }
  return lo;
}

template <typename S, typename D>
__device__ __forceinline__ void copy_row(const S* __restrict__ src, int64_t s1, D* __restrict__ dst,
                                         int64_t len, int lane) {
  int64_t j = lane;
  // Four independent loads in flight per lane before any store: a row copy is latency bound otherwise.
  for (; j + 96 < len; j += 128) {
    const S a = src[j * s1], b = src[(j + 32) * s1], c = src[(j + 64) * s1], d = src[(j + 96) * s1];
    dst[j] = cast_to<D>(a);
    dst[j + 32] = cast_to<D>(b);
    dst[j + 64] = cast_to<D>(c);
    dst[j + 96] = cast_to<D>(d);
  }
  for (; j < len; j += 32) dst[j] = cast_to<D>(src[j * s1]);
}

template <typename D>
__global__ void __launch_bounds__(kPackWarps * 32)
    pack_upper_kernel(const __grid_constant__ PackTable t, D* __restrict__ out) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kPackWarps + threadIdx.x / 32;
  if (row >= t.row_start[t.count]) return;  // whole warps leave; no block-wide sync follows
  const int lane = threadIdx.x & 31;
  const int m = find_segment(t.row_start, t.count, row);
  const int64_t n = t.n[m];
  const int64_t i = row - t.row_start[m];
  const int64_t src_off = i * t.stride0[m] + i * t.stride1[m];  // element (i, i)
  const int64_t s1 = t.stride1[m];
  D* dst = out + t.dst_offset[m] + packed_row_start(i, n);
  switch (static_cast<c10::ScalarType>(t.dtype[m])) {
    case c10::ScalarType::Float:
      copy_row(static_cast<const float*>(t.src[m]) + src_off, s1, dst, n - i, lane);
      break;
    case c10::ScalarType::Double:
      copy_row(static_cast<const double*>(t.src[m]) + src_off, s1, dst, n - i, lane);
      break;
    case c10::ScalarType::Half:
      copy_row(static_cast<const c10::Half*>(t.src[m]) + src_off, s1, dst, n - i, lane);
      break;
    case c10::ScalarType::BFloat16:
      copy_row(static_cast<const c10::BFloat16*>(t.src[m]) + src_off, s1, dst, n - i, lane);
      break;
    default:
      break;  // rejected on the host
  }
}

template <typename S, typename D>
__global__ void __launch_bounds__(kTile * kTileRows)
    unpack_upper_kernel(const __grid_constant__ UnpackTable t, const S* __restrict__ buf,
                        const float* __restrict__ scale) {
  using acc_t = std::conditional_t<std::is_same_v<S, double> || std::is_same_v<D, double>, double, float>;
  __shared__ acc_t tile[kTile][kTile + 1];  // +1: the transposed read is free of bank conflicts

  const int64_t blk = blockIdx.x;
  const int m = find_segment(t.tile_start, t.count, blk);
  int64_t tj, ti;  // upper tile (ti, tj), ti <= tj
  lower_tri_decode(blk - t.tile_start[m], tj, ti);
  const int64_t n = t.n[m];
  const int64_t i0 = ti * kTile, j0 = tj * kTile;
  const acc_t s = static_cast<acc_t>(scale[t.scale_index[m]]);
  const S* src = buf + t.src_offset[m];
  D* dst = static_cast<D*>(t.dst[m]);
  const int tx = threadIdx.x, ty = threadIdx.y;

  // Fixed trip counts (r = ty + k * kTileRows) so the loops unroll with few live 64-bit indices.
#pragma unroll
  for (int k = 0; k < kTile / kTileRows; ++k) {
    const int r = ty + k * kTileRows;
    const int64_t i = i0 + r, j = j0 + tx;
    if (i < n && j < n && j >= i) tile[r][tx] = s * cast_to<acc_t>(src[packed_row_start(i, n) + (j - i)]);
  }
  __syncthreads();
  // The tile in place; on a diagonal tile its lower half comes from the transposed entry.
#pragma unroll
  for (int k = 0; k < kTile / kTileRows; ++k) {
    const int r = ty + k * kTileRows;
    const int64_t i = i0 + r, j = j0 + tx;
    if (i < n && j < n) dst[i * n + j] = cast_to<D>(j >= i ? tile[r][tx] : tile[tx][r]);
  }
  if (ti != tj) {
    // Mirror tile: output (j0 + r, i0 + tx) is packed (i0 + tx, j0 + r).
#pragma unroll
    for (int k = 0; k < kTile / kTileRows; ++k) {
      const int r = ty + k * kTileRows;
      const int64_t i = j0 + r, j = i0 + tx;
      if (i < n && j < n) dst[i * n + j] = cast_to<D>(tile[tx][r]);
    }
  }
}

// The launches of one pack_upper call: matrices in order, at most kMaxMats per launch (n = 0 ones
// skipped); launch(table, rows) is called for each with its table and its total number of rows.
struct PackSource {
  const void* data;
  int64_t n, stride0, stride1;
  int8_t dtype;  // c10::ScalarType
};

template <typename Launch>
void for_each_pack_launch(const PackSource* mats, size_t count, Launch&& launch) {
  int64_t dst_offset = 0;
  size_t k = 0;
  while (k < count) {
    PackTable t{};
    int64_t rows = 0;
    for (; k < count && t.count < kMaxMats; ++k) {
      const PackSource& m = mats[k];
      if (m.n == 0) continue;
      const int e = t.count++;
      t.row_start[e] = rows;
      t.src[e] = m.data;
      t.stride0[e] = m.stride0;
      t.stride1[e] = m.stride1;
      t.dst_offset[e] = dst_offset;
      t.n[e] = static_cast<int32_t>(m.n);
      t.dtype[e] = m.dtype;
      rows += m.n;
      dst_offset += m.n * (m.n + 1) / 2;
    }
    if (t.count == 0) continue;
    t.row_start[t.count] = rows;
    launch(t, rows);
  }
}

// The launches of one unpack_upper call: matrix k (size sizes[k], written to dsts[k], scaled by
// scale[k]) starts in the buffer where matrix k - 1 ends, matrix 0 at `offset`.
template <typename Launch>
void for_each_unpack_launch(const int64_t* sizes, void* const* dsts, size_t count, int64_t offset, Launch&& launch) {
  int64_t src_offset = offset;
  size_t k = 0;
  while (k < count) {
    UnpackTable t{};
    int64_t tiles = 0;
    for (; k < count && t.count < kMaxMats; ++k) {
      const int64_t n = sizes[k];
      if (n == 0) continue;
      const int64_t nt = (n + kTile - 1) / kTile;
      const int e = t.count++;
      t.tile_start[e] = tiles;
      t.src_offset[e] = src_offset;
      t.dst[e] = dsts[k];
      t.n[e] = static_cast<int32_t>(n);
      t.scale_index[e] = static_cast<int32_t>(k);
      tiles += nt * (nt + 1) / 2;
      src_offset += n * (n + 1) / 2;
    }
    if (t.count == 0) continue;
    t.tile_start[t.count] = tiles;
    launch(t, tiles);
  }
}

}  // namespace spngd::cuda_ops
