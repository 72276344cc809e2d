// Conversions between storage dtypes for device (and, in the CPU emulation, host) code.
#pragma once

#include <type_traits>

namespace spngd::cuda_ops {

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

}  // namespace spngd::cuda_ops
