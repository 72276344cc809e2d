// Small helpers shared by the CUDA translation units (device code only; include from .cu files).
#pragma once

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <cstdint>
#include <type_traits>

#include "cuda/index_math.cuh"

// Kernels that accumulate in fp32 take fp32 or half-precision inputs (float64 goes to the reference).
#define SPNGD_DISPATCH_FLOAT_AND_HALF(TYPE, NAME, ...)            \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                  \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)    \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)     \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

namespace spngd::cuda_ops {

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Conversions between storage dtypes; go through double only when one side is double, so fp32 and
// half-precision paths never touch FP64 units.
template <typename D, typename S>
__device__ __forceinline__ D cast_to(S v) {
  if constexpr (std::is_same_v<S, double> || std::is_same_v<D, double>) {
    return static_cast<D>(static_cast<double>(v));
  } else {
    return static_cast<D>(static_cast<float>(v));
  }
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
  __device__ __forceinline__ uint32_t div(uint32_t n) const { return (__umulhi(n, mul) + n) >> shift; }
};

}  // namespace spngd::cuda_ops
