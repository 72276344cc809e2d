// Raw arrays in and out of the emulation harnesses (the Python tests write and read the files).
#pragma once

#include <fstream>
#include <string>
#include <vector>

namespace emu {

template <typename T>
std::vector<T> read_array(const std::string& path) {
  std::ifstream in(path, std::ios::binary | std::ios::ate);
  const auto bytes = static_cast<size_t>(in.tellg());
  std::vector<T> v(bytes / sizeof(T));
  in.seekg(0);
  in.read(reinterpret_cast<char*>(v.data()), static_cast<std::streamsize>(bytes));
  return v;
}

template <typename T>
void write_array(const std::string& path, const std::vector<T>& v) {
  std::ofstream(path, std::ios::binary)
      .write(reinterpret_cast<const char*>(v.data()), static_cast<std::streamsize>(v.size() * sizeof(T)));
}

inline std::vector<float> read_floats(const std::string& path) { return read_array<float>(path); }
inline void write_floats(const std::string& path, const std::vector<float>& v) { write_array(path, v); }

}  // namespace emu
