// Runs the Cholesky kernel's block-level code (csrc/cuda/cholesky_blocked.cuh, unchanged) on the
// CPU through block_emulator.h, for tests/test_emulated_cholesky.py.
//
//   cholesky_block cholesky f32|f64 N THREADS IN OUT   one matrix: IN holds A (N x N, row major)
//                                                      then the damping, in the given dtype; OUT
//                                                      gets the inverse. THREADS 0: the kernel's own
//                                                      choice (threads_for).
//   cholesky_block selftest race|oob|barrier           a deliberately broken block, to show that
//                                                      the emulator's checks fire.
// Prints one line: info=.. threads=.. races=.. out_of_bounds=.. barrier_mismatch=..
#include "block_emulator.h"

#include "cuda/cholesky_blocked.cuh"

#include <cstdlib>
#include <cstring>
#include <fstream>
#include <limits>
#include <string>

using namespace spngd::cuda_ops;

template <typename T>
int run_cholesky(int n, int threads, const char* in_path, const char* out_path) {
  std::vector<T> a(static_cast<size_t>(n) * n + 1);
  std::ifstream in(in_path, std::ios::binary);
  in.read(reinterpret_cast<char*>(a.data()), static_cast<std::streamsize>(a.size() * sizeof(T)));
  if (!in) { std::fprintf(stderr, "short input %s\n", in_path); return 2; }
  const T damp = a.back();
  if (threads == 0) threads = threads_for(n);

  // Shared memory as the kernel carves it, poisoned so that reads of unwritten elements show.
  std::vector<T> smem(static_cast<size_t>(col_offset(n)) + n, std::numeric_limits<T>::quiet_NaN());
  std::vector<T> out(static_cast<size_t>(n) * n, std::numeric_limits<T>::quiet_NaN());
  const int64_t size = static_cast<int64_t>(smem.size());
  const smem_ptr<T> S{smem.data(), 0, size};
  int s_info = -7, s_bad = -7, info = -7;  // the kernel's two shared ints, and its info[b]

  // What cholesky_inverse_kernel's block does (the kernel only adds its block's offsets).
  const emu::Report r = emu::run_block(threads, smem, [&] {
    cholesky_inverse_block(a.data(), damp, S, out.data(), n, &s_info, &s_bad, &info);
  });
  std::ofstream(out_path, std::ios::binary)
      .write(reinterpret_cast<const char*>(out.data()), static_cast<std::streamsize>(out.size() * sizeof(T)));
  std::printf("info=%d threads=%d races=%ld out_of_bounds=%ld barrier_mismatch=%ld\n", info, threads, r.races,
              r.out_of_bounds, r.barrier_mismatch);
  return 0;
}

int run_selftest(const std::string& what) {
  std::vector<float> smem(64, 0.f);
  smem_ptr<float> S{smem.data(), 0, 64};
  const emu::Report r = emu::run_block(64, smem, [&] {
    const int t = static_cast<int>(threadIdx.x);
    if (what == "race") S[0] = S[0] + 1.f;          // every thread, no barrier
    if (what == "oob") S[t + 1] = 1.f;              // thread 63 writes index 64
    if (what == "barrier" && t != 0) __syncthreads();  // thread 0 skips the barrier
    S[t] = static_cast<float>(t);                   // the correct part: each thread its own element
  });
  std::printf("info=0 threads=64 races=%ld out_of_bounds=%ld barrier_mismatch=%ld\n", r.races, r.out_of_bounds,
              r.barrier_mismatch);
  return 0;
}

int main(int argc, char** argv) {
  if (argc == 3 && std::strcmp(argv[1], "selftest") == 0) return run_selftest(argv[2]);
  if (argc != 7 || std::strcmp(argv[1], "cholesky") != 0) {
    std::fprintf(stderr, "usage: %s cholesky f32|f64 N THREADS IN OUT | selftest race|oob|barrier\n", argv[0]);
    return 2;
  }
  const int n = std::atoi(argv[3]), threads = std::atoi(argv[4]);
  if (std::strcmp(argv[2], "f64") == 0) return run_cholesky<double>(n, threads, argv[5], argv[6]);
  return run_cholesky<float>(n, threads, argv[5], argv[6]);
}
