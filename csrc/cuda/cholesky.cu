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
#include "cuda/common.cuh"

#include <atomic>

namespace spngd::cuda_ops {
namespace {

constexpr int kNB = 32;                   // panel width
constexpr int kMaxThreads = 512;
constexpr int64_t kDefaultKernelMaxN = 256;  // see bench/kernels.py for the measured crossover
std::atomic<int64_t> g_kernel_max_n{kDefaultKernelMaxN};

// Packed lower triangle: element (i, k), k <= i.
__device__ __forceinline__ int lidx(int i, int k) { return i * (i + 1) / 2 + k; }

// Panel stride: odd, so the column-strided panel reads of phase B hit distinct banks.
__host__ __device__ __forceinline__ int panel_ld(int n) { return n | 1; }

template <typename T>
size_t smem_bytes(int64_t n) {
  // S (packed lower) + panel P (kNB x ld, plus slack for the padded 4-wide tile reads) + column cache.
  return (static_cast<size_t>(n) * (n + 1) / 2 + static_cast<size_t>(kNB) * panel_ld(static_cast<int>(n)) + 8 +
          static_cast<size_t>(n)) * sizeof(T);
}

int threads_for(int64_t n) { return n <= 32 ? 64 : n <= 64 ? 128 : n <= 128 ? 256 : kMaxThreads; }

// Phase A: S ← L with L Lᵀ = S (lower triangle, in place). *s_info gets the first failed pivot.
template <typename T>
__device__ void factor_lower(T* S, T* P, T* col, int n, int* s_info) {
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
          const T* Pp = P + p * ldp;  // entries past m are junk and only reach masked outputs
          T u[4], v[4];
#pragma unroll
          for (int e = 0; e < 4; ++e) { u[e] = Pp[r0 + e]; v[e] = Pp[c0 + e]; }
#pragma unroll
          for (int x = 0; x < 4; ++x)
#pragma unroll
            for (int y = 0; y < 4; ++y) acc[x][y] = fma(u[x], v[y], acc[x][y]);
        }
#pragma unroll
        for (int x = 0; x < 4; ++x) {
#pragma unroll
          for (int y = 0; y < 4; ++y) {
            const int r = r0 + x, cc = c0 + y;
            if (r < m && cc <= r) S[lidx(jend + r, jend + cc)] -= acc[x][y];
          }
        }
      }
      __syncthreads();
    }
  }
}

// Phase B: S ← L⁻¹ in place. Block column [j0, jend) from the right: with W22 = L22⁻¹ already in
// place, L21 ← -(W22 L21) L11⁻¹ (TRMM then TRSM), then L11 ← L11⁻¹.
template <typename T>
__device__ void invert_lower(T* S, T* P, int n) {
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
#pragma unroll
          for (int x = 0; x < 4; ++x)
#pragma unroll
            for (int y = 0; y < 4; ++y) acc[x][y] = fma(u[x], v[y], acc[x][y]);
        }
#pragma unroll
        for (int x = 0; x < 4; ++x) {
#pragma unroll
          for (int y = 0; y < 4; ++y) {
            const int r = r0 + x, c = c0 + y;
            if (r < m && c < jb) S[lidx(jend + r, j0 + c)] = acc[x][y];
          }
        }
      }
      __syncthreads();
      for (int r = tid; r < m; r += nt) {  // x L11 = -b for each row, right to left
        T* row = S + lidx(jend + r, j0);
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
__device__ void write_product(const T* S, T* out, int n, int* s_bad) {
  const int n4 = (n + 3) / 4;
  for (int t = threadIdx.x; t < n4 * (n4 + 1) / 2; t += blockDim.x) {
    int64_t a, c;
    lower_tri_decode(t, a, c);  // consecutive threads: neighbouring column tiles, coalesced rows
    const int i0 = 4 * static_cast<int>(a), j0 = 4 * static_cast<int>(c);
    T acc[4][4] = {};
    for (int k = i0; k < n; ++k) {
      const T* Sk = S + lidx(k, 0);
      T u[4], v[4];
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        u[e] = (i0 + e <= k) ? Sk[i0 + e] : T(0);
        v[e] = (j0 + e <= k) ? Sk[j0 + e] : T(0);
      }
#pragma unroll
      for (int x = 0; x < 4; ++x)
#pragma unroll
        for (int y = 0; y < 4; ++y) acc[x][y] = fma(u[x], v[y], acc[x][y]);
    }
#pragma unroll
    for (int x = 0; x < 4; ++x) {
#pragma unroll
      for (int y = 0; y < 4; ++y) {
        const int i = i0 + x, j = j0 + y;
        if (i < n && j < n) {
          const T val = acc[x][y];
          out[static_cast<int64_t>(i) * n + j] = val;
          out[static_cast<int64_t>(j) * n + i] = val;
          if (!isfinite(val)) *s_bad = 1;
        }
      }
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kMaxThreads)
    cholesky_inverse_kernel(const T* __restrict__ mats, const T* __restrict__ damping, T* __restrict__ out,
                            int* __restrict__ info, int n) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __shared__ int s_info, s_bad;
  T* S = reinterpret_cast<T*>(smem_raw);
  T* P = S + n * (n + 1) / 2;
  T* col = P + kNB * panel_ld(n) + 8;

  const int64_t b = blockIdx.x;
  const T* A = mats + b * n * n;
  if (threadIdx.x == 0) { s_info = 0; s_bad = 0; }
  const T damp = damping[b];
  // Lower triangle, one warp per row: coalesced reads.
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  for (int i = warp; i < n; i += nwarps)
    for (int k = lane; k <= i; k += 32) S[lidx(i, k)] = A[static_cast<int64_t>(i) * n + k] + (k == i ? damp : T(0));
  __syncthreads();

  factor_lower(S, P, col, n, &s_info);
  invert_lower(S, P, n);
  write_product(S, out + b * n * n, n, &s_bad);
  __syncthreads();
  if (threadIdx.x == 0) info[b] = s_info != 0 ? s_info : (s_bad ? -1 : 0);
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
