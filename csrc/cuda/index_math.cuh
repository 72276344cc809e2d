// Index arithmetic (packed and tiled triangles, fixed-divisor division), for device and host code alike (no ATen here,
// so the CPU emulation in tests/cuda_emulation can include it).
#pragma once

#include <cmath>
#include <cstdint>

namespace spngd::cuda_ops {

// Packed upper layout (docs/design.md): row i starts at i*n - i*(i-1)/2; element (i, j), j >= i, sits
// (j - i) further on.
__host__ __device__ __forceinline__ int64_t packed_row_start(int64_t i, int64_t n) {
  return i * n - i * (i - 1) / 2;
}

// Inverse of t = a*(a+1)/2 + b with 0 <= b <= a: enumerates a lower triangle of tiles row by row.
// The approximate hardware square root (no IEEE slow-path call, so no stack spills) only gives a
// guess; exact integer steps correct it (so the host version, for the CPU emulation, agrees).
__host__ __device__ __forceinline__ void lower_tri_decode(int64_t t, int64_t& a, int64_t& b) {
  float root;
#ifdef __CUDA_ARCH__
  asm("sqrt.approx.f32 %0, %1;" : "=f"(root) : "f"(8.f * static_cast<float>(t) + 1.f));
#else
  root = std::sqrt(8.f * static_cast<float>(t) + 1.f);
#endif
  int64_t r = static_cast<int64_t>((root - 1.f) * 0.5f);
  while (r > 0 && r * (r + 1) / 2 > t) --r;
  while ((r + 1) * (r + 2) / 2 <= t) ++r;
  a = r;
  b = t - r * (r + 1) / 2;
}

// Unsigned division by a fixed runtime divisor via multiply-high (Granlund–Montgomery); exact for
// numerators below 2^31. Used where an index decode sits in a kernel's inner loop.
struct FastDivmod {
  uint32_t d = 1, mul = 0, shift = 0;
  FastDivmod() = default;
  explicit FastDivmod(uint32_t divisor) : d(divisor) {
    while ((uint64_t{1} << shift) < d) ++shift;
    mul = static_cast<uint32_t>(((uint64_t{1} << 32) * ((uint64_t{1} << shift) - d)) / d + 1);
  }
  __host__ __device__ __forceinline__ uint32_t div(uint32_t n) const {
#ifdef __CUDA_ARCH__
    return (__umulhi(n, mul) + n) >> shift;
#else
    return static_cast<uint32_t>(((static_cast<uint64_t>(n) * mul >> 32) + n) >> shift);
#endif
  }
};

}  // namespace spngd::cuda_ops
