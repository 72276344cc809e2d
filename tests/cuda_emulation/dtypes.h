// Storage dtypes of the emulation harnesses by name (f64 f32 f16 bf16), through c10's host types.
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdio>
#include <cstdlib>
#include <string>

namespace emu {

// Calls f(T{}) with T the C++ type of a dtype name.
template <typename F>
void with_dtype(const std::string& name, F&& f) {
  if (name == "f64") f(double{});
  else if (name == "f32") f(float{});
  else if (name == "f16") f(c10::Half{});
  else if (name == "bf16") f(c10::BFloat16{});
  else { std::fprintf(stderr, "unknown dtype %s\n", name.c_str()); std::exit(2); }
}

inline c10::ScalarType scalar_type(const std::string& name) {
  if (name == "f64") return c10::ScalarType::Double;
  if (name == "f32") return c10::ScalarType::Float;
  if (name == "f16") return c10::ScalarType::Half;
  return c10::ScalarType::BFloat16;
}

}  // namespace emu
