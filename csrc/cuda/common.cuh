// Small helpers shared by the CUDA translation units (device code only; include from .cu files).
#pragma once

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "cuda/cast.cuh"
#include "cuda/index_math.cuh"

// Kernels that accumulate in fp32 take fp32 or half-precision inputs (float64 goes to the reference).
#define SPNGD_DISPATCH_FLOAT_AND_HALF(TYPE, NAME, ...)            \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                  \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)    \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)     \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

namespace spngd::cuda_ops {

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// An EMA decay for the fp32 kernels. A nonzero decay must stay nonzero: the kernels take
// decay == 0 to mean "overwrite, never read the state" (BLAS beta = 0), which would silently drop a
// NaN/Inf that the reference propagates.
inline float fp32_decay(double decay) {
  return decay == 0.0 ? 0.f : std::max(static_cast<float>(decay), std::numeric_limits<float>::denorm_min());
}

}  // namespace spngd::cuda_ops
