// The tiled SYRK kernel behind accumulate_factor and conv_a_factor (design: see factor.cu), its
// loaders (dense X, implicit im2col of a conv input), the split-reduction kernel and the host-side
// launch plan.
//
// Free of ATen so that tests/cuda_emulation compiles this very file on the CPU and runs whole
// launches (every block, one std::thread per CUDA thread, under ThreadSanitizer) without a GPU.
#pragma once

#include <algorithm>
#include <cstdint>

#include "cuda/index_math.cuh"

namespace spngd::cuda_ops {

constexpr int kSyrkThreads = 256;  // 16 x 16 threads
constexpr int kBK = 8;         // rows of X per shared-memory stage

// Linear: X = x, (rows, cols) with arbitrary strides.
template <typename T>
struct DenseLoader {
  const T* x;
  int64_t cols, s0, s1;

  struct Row { int64_t off; bool valid; };
  struct Col { int64_t off; bool valid; };

  __device__ Row row(int64_t r, int64_t r_end) const { return {r * s0, r < r_end}; }
  __device__ Col col(int64_t c) const { return {c * s1, c < cols}; }
  __device__ float load(const Row& r, const Col& c) const {
    return (r.valid && c.valid) ? static_cast<float>(x[r.off + c.off]) : 0.f;
  }
};

// Conv2d: row r = (n, oh, ow), column c = (ci, ki, kj) in F.unfold order, plus the bias column.
// Rows and columns are decoded separately, so a value costs two adds and a bounds test.
template <typename T>
struct ConvLoader {
  const T* x;
  int64_t sN, sC, sH, sW;  // element strides: NCHW and channels-last alike
  int H, W, KW, KHW, patch;
  int stride_h, stride_w, pad_h, pad_w, dil_h, dil_w;
  bool bias;
  FastDivmod per_image;  // divides by OH * OW
  FastDivmod per_row;    // divides by OW

  struct Row { int64_t base; int ih0, iw0; bool valid; };
  struct Col { int64_t off; int dh, dw, kind; };  // kind: 0 patch entry, 1 bias (constant 1), 2 padding

  __device__ Row row(int64_t r, int64_t r_end) const {
    Row o;
    o.valid = r < r_end;
    const uint32_t ur = o.valid ? static_cast<uint32_t>(r) : 0u;
    const uint32_t n = per_image.div(ur);
    const uint32_t t = ur - n * per_image.d;
    const uint32_t oh = per_row.div(t);
    const uint32_t ow = t - oh * per_row.d;
    o.base = static_cast<int64_t>(n) * sN;
    o.ih0 = static_cast<int>(oh) * stride_h - pad_h;
    o.iw0 = static_cast<int>(ow) * stride_w - pad_w;
    return o;
  }
  __device__ Col col(int64_t c) const {
    Col o{0, 0, 0, 2};
    if (c < patch) {
      const int ci = static_cast<int>(c) / KHW;
      const int rem = static_cast<int>(c) - ci * KHW;
      const int ki = rem / KW;
      o.off = ci * sC;
      o.dh = ki * dil_h;
      o.dw = (rem - ki * KW) * dil_w;
      o.kind = 0;
    } else if (bias && c == patch) {
      o.kind = 1;
    }
    return o;
  }
  __device__ float load(const Row& r, const Col& c) const {
    if (!r.valid || c.kind == 2) return 0.f;
    if (c.kind == 1) return 1.f;
    const int ih = r.ih0 + c.dh, iw = r.iw0 + c.dw;
    if (static_cast<unsigned>(ih) >= static_cast<unsigned>(H) || static_cast<unsigned>(iw) >= static_cast<unsigned>(W))
      return 0.f;
    return static_cast<float>(x[r.base + c.off + ih * sH + iw * sW]);
  }
};

// Two blocks per SM: caps the TM = 8 variant at 128 registers, enough to hide global-load latency.
template <int TM, typename Loader>
__global__ void __launch_bounds__(kSyrkThreads, 2)
    syrk_upper_kernel(const Loader ld, int64_t d, int64_t rows, int64_t rows_per_split, float* __restrict__ out,
                      int64_t split_stride, float scale, float decay, bool raw) {
  constexpr int BM = 16 * TM;                 // tile edge
  constexpr int LPT = kBK * BM / kSyrkThreads;    // values each thread stages per side and stage
  constexpr int RSTEP = kSyrkThreads / BM;        // row distance between a thread's staged values
  // [operand][buffer]: one array, so choosing B's operand is an index (the compiler keeps plain
  // shared-memory loads) rather than a select between two shared pointers.
  __shared__ __align__(16) float tiles[2][2][kBK][BM];

  int64_t tj, ti;  // upper tile (ti <= tj)
  lower_tri_decode(blockIdx.x, tj, ti);
  const bool diag = ti == tj;  // then both operands are the same columns: stage them once
  const int b_side = diag ? 0 : 1;
  const int64_t i0 = ti * BM, j0 = tj * BM;
  const int64_t r_begin = static_cast<int64_t>(blockIdx.y) * rows_per_split;
  const int64_t r_end = std::min(rows, r_begin + rows_per_split);

  const int tid = threadIdx.x;
  const int lc = tid % BM, lr = tid / BM;  // staging: one column, LPT rows
  const typename Loader::Col ca = ld.col(i0 + lc);
  const typename Loader::Col cb = ld.col(j0 + lc);
  float va[LPT], vb[LPT];

  auto fetch = [&](int64_t k0) {
#pragma unroll
    for (int q = 0; q < LPT; ++q) {
      const typename Loader::Row rw = ld.row(k0 + lr + q * RSTEP, r_end);
      va[q] = ld.load(rw, ca);
      vb[q] = diag ? 0.f : ld.load(rw, cb);
    }
  };
  auto stash = [&](int buf) {
#pragma unroll
    for (int q = 0; q < LPT; ++q) {
      tiles[0][buf][lr + q * RSTEP][lc] = va[q];
      if (!diag) tiles[1][buf][lr + q * RSTEP][lc] = vb[q];
    }
  };

  float acc[TM][TM];
#pragma unroll
  for (int x = 0; x < TM; ++x)
#pragma unroll
    for (int y = 0; y < TM; ++y) acc[x][y] = 0.f;

  // Micro-tile rows ty*4 + h*64 + {0..3}: float4 reads that two threads of a warp share.
  const int ty = tid / 16, tx = tid % 16;
  if (r_begin < r_end) {  // block-uniform
    fetch(r_begin);
    stash(0);
    __syncthreads();
    int buf = 0;
    for (int64_t k0 = r_begin; k0 < r_end; k0 += kBK) {
      const bool has_next = k0 + kBK < r_end;
      if (has_next) fetch(k0 + kBK);  // global loads overlap the FMAs below
#pragma unroll
      for (int k = 0; k < kBK; ++k) {
        float a[TM], b[TM];
#pragma unroll
        for (int h = 0; h < TM / 4; ++h) {
          const float4 a4 = *reinterpret_cast<const float4*>(&tiles[0][buf][k][h * 64 + ty * 4]);
          const float4 b4 = *reinterpret_cast<const float4*>(&tiles[b_side][buf][k][h * 64 + tx * 4]);
          a[h * 4 + 0] = a4.x; a[h * 4 + 1] = a4.y; a[h * 4 + 2] = a4.z; a[h * 4 + 3] = a4.w;
          b[h * 4 + 0] = b4.x; b[h * 4 + 1] = b4.y; b[h * 4 + 2] = b4.z; b[h * 4 + 3] = b4.w;
        }
#pragma unroll
        for (int x = 0; x < TM; ++x)
#pragma unroll
          for (int y = 0; y < TM; ++y) acc[x][y] = fmaf(a[x], b[y], acc[x][y]);
      }
      // The other buffer was last read before the previous barrier, so it is free to refill.
      if (has_next) stash(buf ^ 1);
      __syncthreads();
      buf ^= 1;
    }
  }

  // Epilogue: entries (i, j) with i <= j < d go to packed index row0(i) + j.
  float* dst = out + (raw ? static_cast<int64_t>(blockIdx.y) * split_stride : 0);
#pragma unroll
  for (int x = 0; x < TM; ++x) {
    const int64_t i = i0 + (x / 4) * 64 + ty * 4 + (x % 4);
    if (i >= d) continue;
    const int64_t row0 = packed_row_start(i, d) - i;
#pragma unroll
    for (int y = 0; y < TM; ++y) {
      const int64_t j = j0 + (y / 4) * 64 + tx * 4 + (y % 4);
      if (j < i || j >= d) continue;
      const float v = acc[x][y];
      float* p = dst + row0 + j;
      if (raw) *p = v;
      else *p = decay == 0.f ? scale * v : fmaf(decay, *p, scale * v);
    }
  }
}

// state = decay * state + scale * (sum over splits), in a fixed order.
__global__ void reduce_splits_kernel(const float* __restrict__ ws, int64_t splits, int64_t np,
                                     float* __restrict__ state, float scale, float decay) {
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; p < np; p += step) {
    float s = 0.f;
    for (int64_t k = 0; k < splits; ++k) s += ws[k * np + p];
    state[p] = decay == 0.f ? scale * s : fmaf(decay, state[p], scale * s);
  }
}

// How launch_syrk covers the work: tile size, tiles (grid.x) and row splits (grid.y).
struct SyrkPlan {
  bool large;  // 128 x 128 tiles (TM = 8) rather than 64 x 64
  int64_t tiles, splits, rows_per_split;
};

// max_ws: the most workspace (floats) the row splits may use together.
inline SyrkPlan plan_syrk(int64_t d, int64_t rows, int sm_count, int64_t max_ws) {
  const int64_t np = d * (d + 1) / 2;
  const bool large = d >= 512;
  const int64_t bm = large ? 128 : 64;
  const int64_t nt = (d + bm - 1) / bm;
  const int64_t tiles = nt * (nt + 1) / 2;
  // One wave: the 128-wide variant fits 2 blocks per SM, the 64-wide one 4.
  const int64_t target = (large ? 2 : 4) * static_cast<int64_t>(sm_count);
  auto cdiv = [](int64_t a, int64_t b) { return (a + b - 1) / b; };

  int64_t splits = 1;
  if (tiles < target && rows > 0) {
    splits = cdiv(target, tiles);
    splits = std::min(splits, cdiv(rows, 16 * kBK));  // >= 128 rows each
    splits = std::min(splits, np > 0 ? max_ws / np : 1);
    splits = std::max<int64_t>(splits, 1);
  }
  int64_t rows_per_split = rows;
  if (splits > 1) {
    rows_per_split = cdiv(cdiv(rows, splits), kBK) * kBK;
    splits = cdiv(rows, rows_per_split);  // no empty split
  }
  return {large, tiles, splits, rows_per_split};
}

}  // namespace spngd::cuda_ops
