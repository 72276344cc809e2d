// The block-level algorithm of cholesky_inverse_damped: one thread block inverts one damped SPD
// matrix held in shared memory (phases A, B, C; see cholesky.cu for the design and the launch).
//
// Kept apart from the launch code, and free of ATen, so that tests/cuda_emulation can compile this
// very file on the CPU (one std::thread per CUDA thread, a real barrier for __syncthreads, and a
// shared-memory pointer type that checks bounds and races) and check it without a GPU. That is
// what `smem_ptr` is for: a plain pointer here, the checking type in the emulation.
#pragma once

#include <cstddef>
#include <cstdint>

#include "cuda/index_math.cuh"

namespace spngd::cuda_ops {

#ifndef SPNGD_CUDA_EMULATION
template <typename T>
using smem_ptr = T*;
#endif

constexpr int kNB = 32;  // panel width
constexpr int kMaxThreads = 512;

inline int threads_for(int64_t n) { return n <= 32 ? 64 : n <= 64 ? 128 : n <= 128 ? 256 : kMaxThreads; }

// Packed lower triangle: element (i, k), k <= i.
__device__ __forceinline__ int lidx(int i, int k) { return i * (i + 1) / 2 + k; }

// Panel stride: odd, so the column-strided panel reads of phase B hit distinct banks.
__host__ __device__ __forceinline__ int panel_ld(int n) { return n | 1; }

// Shared memory of one matrix: S (packed lower triangle), then the panel P (kNB x panel_ld, plus
// slack for the padded 4-wide tile reads), then a column cache of n.
__host__ __device__ __forceinline__ int panel_offset(int n) { return n * (n + 1) / 2; }
__host__ __device__ __forceinline__ int col_offset(int n) { return panel_offset(n) + kNB * panel_ld(n) + 8; }

template <typename T>
size_t smem_bytes(int64_t n) {  // the same in size_t: also asked for n far beyond what fits
  return (static_cast<size_t>(n) * (n + 1) / 2 + static_cast<size_t>(kNB) * panel_ld(static_cast<int>(n)) + 8 +
          static_cast<size_t>(n)) * sizeof(T);
}

// f(x, y) for every entry of a 4 x 4 register tile, unrolled.
template <typename F>
__device__ __forceinline__ void for_each_tile_entry(F&& f) {
#pragma unroll
  for (int x = 0; x < 4; ++x)
#pragma unroll
    for (int y = 0; y < 4; ++y) f(x, y);
}

// acc += u vᵀ: the register-tiled 4 x 4 update all three phases are built from.
template <typename T>
__device__ __forceinline__ void outer_product_add(T (&acc)[4][4], const T (&u)[4], const T (&v)[4]) {
  for_each_tile_entry([&](int x, int y) { acc[x][y] = fma(u[x], v[y], acc[x][y]); });
}

// Phase A: S ← L with L Lᵀ = S (lower triangle, in place). *s_info gets the first failed pivot.
template <typename T>
__device__ void factor_lower(smem_ptr<T> S, smem_ptr<T> P, smem_ptr<T> col, int n, int* s_info) {
  static_assert(kNB == 32, "the panel update maps one lane to one panel column");
  const int tid = threadIdx.x, nt = blockDim.x, ldp = panel_ld(n);
  const int lane = tid & 31, warp = tid >> 5, nwarps = nt >> 5;
  for (int j0 = 0; j0 < n; j0 += kNB) {
    const int jend = min(j0 + kNB, n), jb = jend - j0;
    // Unblocked factorisation of the panel (columns j0..jend-1, all rows below).
    for (int j = j0; j < jend; ++j) {
      const T djj = S[lidx(j, j)];
      const T piv = sqrt(djj);
      const T rinv = T(1) / piv;
      for (int i = j + 1 + tid; i < n; i += nt) {
        const T v = S[lidx(i, j)] * rinv;
        S[lidx(i, j)] = v;
        col[i] = v;  // contiguous copy: the update below reads it with stride 1
      }
      __syncthreads();
      if (tid == 0) {  // nobody reads (j, j) until the next barrier
        S[lidx(j, j)] = piv;
        if ((!(djj > T(0)) || !isfinite(djj)) && *s_info == 0) *s_info = j + 1;
      }
      // Rest of the panel: one warp per row, one lane per panel column (kNB == 32), so a warp
      // touches consecutive words and this loop, which runs n times, needs no index division.
      const int k = j + 1 + lane;
      const bool in_panel = k < jend;
      const T ck = in_panel ? col[k] : T(0);
      for (int i = j + 1 + warp; i < n; i += nwarps)
        if (in_panel && k <= i) S[lidx(i, k)] -= col[i] * ck;
      __syncthreads();
    }
    // Trailing update S22 -= L21 L21ᵀ (lower part), from a transposed copy of the panel.
    const int m = n - jend;
    if (m > 0) {
      for (int p = warp; p < jb; p += nwarps)
        for (int r = lane; r < m; r += 32) P[p * ldp + r] = S[lidx(jend + r, j0 + p)];
      __syncthreads();
      const int mt = (m + 3) / 4;
      for (int t = tid; t < mt * (mt + 1) / 2; t += nt) {
        int64_t a, c;
        lower_tri_decode(t, a, c);
        const int r0 = 4 * static_cast<int>(a), c0 = 4 * static_cast<int>(c);
        T acc[4][4] = {};
        for (int p = 0; p < jb; ++p) {
          const smem_ptr<T> Pp = P + p * ldp;  // entries past m are junk and only reach masked outputs
          T u[4], v[4];
#pragma unroll
          for (int e = 0; e < 4; ++e) { u[e] = Pp[r0 + e]; v[e] = Pp[c0 + e]; }
          outer_product_add(acc, u, v);
        }
        for_each_tile_entry([&](int x, int y) {
          const int r = r0 + x, cc = c0 + y;
          if (r < m && cc <= r) S[lidx(jend + r, jend + cc)] -= acc[x][y];
        });
      }
      __syncthreads();
    }
  }
}

// Phase B: S ← L⁻¹ in place. Block column [j0, jend) from the right: with W22 = L22⁻¹ already in
// place, L21 ← -(W22 L21) L11⁻¹ (TRMM then TRSM), then L11 ← L11⁻¹.
template <typename T>
__device__ void invert_lower(smem_ptr<T> S, smem_ptr<T> P, int n) {
  const int tid = threadIdx.x, nt = blockDim.x, ldp = panel_ld(n);
  const int lane = tid & 31, warp = tid >> 5, nwarps = nt >> 5;
  for (int j0 = ((n - 1) / kNB) * kNB; j0 >= 0; j0 -= kNB) {
    const int jend = min(j0 + kNB, n), jb = jend - j0, m = n - jend;
    if (m > 0) {
      for (int c = warp; c < jb; c += nwarps)  // P[c][r] = L21(r, c): TRMM reads its input from here
        for (int r = lane; r < m; r += 32) P[c * ldp + r] = S[lidx(jend + r, j0 + c)];
      __syncthreads();
      const int mt = (m + 3) / 4, ct = (jb + 3) / 4;
      for (int t = tid; t < mt * ct; t += nt) {  // L21 ← W22 L21, 4 x 4 tiles of the block column
        const int r0 = (t / ct) * 4, c0 = (t % ct) * 4;
        T acc[4][4] = {};
        const int qend = min(r0 + 4, m);
        for (int q = 0; q < qend; ++q) {
          T u[4], v[4];
#pragma unroll
          for (int x = 0; x < 4; ++x) {
            const int r = r0 + x;
            u[x] = (r < m && q <= r) ? S[lidx(jend + r, jend + q)] : T(0);
          }
#pragma unroll
          for (int y = 0; y < 4; ++y) v[y] = P[(c0 + y) * ldp + q];  // rows >= jb: junk, masked below
          outer_product_add(acc, u, v);
        }
        for_each_tile_entry([&](int x, int y) {
          const int r = r0 + x, c = c0 + y;
          if (r < m && c < jb) S[lidx(jend + r, j0 + c)] = acc[x][y];
        });
      }
      __syncthreads();
      for (int r = tid; r < m; r += nt) {  // x L11 = -b for each row, right to left
        const smem_ptr<T> row = S + lidx(jend + r, j0);
        for (int c = jb - 1; c >= 0; --c) {
          T s = -row[c];
          for (int q = c + 1; q < jb; ++q) s -= row[q] * S[lidx(j0 + q, j0 + c)];
          row[c] = s / S[lidx(j0 + c, j0 + c)];
        }
      }
      __syncthreads();
    }
    // L11 ← L11⁻¹: a dense copy in P lets one thread per column write its column in place.
    for (int i = warp; i < jb; i += nwarps)
      for (int k = lane; k < jb; k += 32) P[i * kNB + k] = k <= i ? S[lidx(j0 + i, j0 + k)] : T(0);
    __syncthreads();
    if (tid < jb) {
      const int c = tid;
      S[lidx(j0 + c, j0 + c)] = T(1) / P[c * kNB + c];
      for (int i = c + 1; i < jb; ++i) {
        T s = T(0);
        for (int k = c; k < i; ++k) s += P[i * kNB + k] * S[lidx(j0 + k, j0 + c)];
        S[lidx(j0 + i, j0 + c)] = -s / P[i * kNB + i];
      }
    }
    __syncthreads();
  }
}

// Phase C: out = Wᵀ W with W = L⁻¹ (lower): out(i, j) = Σ_{k >= max(i, j)} W(k, i) W(k, j).
template <typename T>
__device__ void write_product(smem_ptr<T> S, T* out, int n, int* s_bad) {
  const int n4 = (n + 3) / 4;
  for (int t = threadIdx.x; t < n4 * (n4 + 1) / 2; t += blockDim.x) {
    int64_t a, c;
    lower_tri_decode(t, a, c);  // consecutive threads: neighbouring column tiles, coalesced rows
    const int i0 = 4 * static_cast<int>(a), j0 = 4 * static_cast<int>(c);
    T acc[4][4] = {};
    for (int k = i0; k < n; ++k) {
      const smem_ptr<T> Sk = S + lidx(k, 0);
      T u[4], v[4];
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        u[e] = (i0 + e <= k) ? Sk[i0 + e] : T(0);
        v[e] = (j0 + e <= k) ? Sk[j0 + e] : T(0);
      }
      outer_product_add(acc, u, v);
    }
    for_each_tile_entry([&](int x, int y) {
      const int i = i0 + x, j = j0 + y;
      if (i < n && j < n) {
        const T val = acc[x][y];
        out[static_cast<int64_t>(i) * n + j] = val;
        out[static_cast<int64_t>(j) * n + i] = val;
        if (!isfinite(val)) *s_bad = 1;
      }
    });
  }
}

// Lower triangle of A + damp·I into S, one warp per row (coalesced reads); ends with a barrier.
template <typename T>
__device__ void load_damped_lower(const T* A, T damp, smem_ptr<T> S, int n) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  for (int i = warp; i < n; i += nwarps)
    for (int k = lane; k <= i; k += 32) S[lidx(i, k)] = A[static_cast<int64_t>(i) * n + k] + (k == i ? damp : T(0));
  __syncthreads();
}

// The whole of one block's work: (A + damp·I)⁻¹ into out, the failure flag into *info (0 ok, j > 0
// pivot j failed, -1 non-finite result). S is the block's shared memory laid out as panel_offset /
// col_offset say; s_info and s_bad are two shared ints.
template <typename T>
__device__ __forceinline__ void cholesky_inverse_block(const T* A, T damp, smem_ptr<T> S, T* out, int n, int* s_info,
                                                       int* s_bad, int* info) {
  const smem_ptr<T> P = S + panel_offset(n), col = S + col_offset(n);
  if (threadIdx.x == 0) { *s_info = 0; *s_bad = 0; }
  load_damped_lower(A, damp, S, n);
  factor_lower(S, P, col, n, s_info);
  invert_lower(S, P, n);
  write_product(S, out, n, s_bad);
  __syncthreads();
  if (threadIdx.x == 0) *info = *s_info != 0 ? *s_info : (*s_bad ? -1 : 0);
}

}  // namespace spngd::cuda_ops
