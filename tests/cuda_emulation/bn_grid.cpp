// Runs bn_unitwise_fisher's and bn_unitwise_solve's kernels (csrc/cuda/batchnorm_kernels.cuh,
// unchanged) on the CPU through block_emulator.h, for tests/test_emulated_batchnorm.py, with the launch
// plan, workspace and ticket counters that batchnorm.cu gives them.
//
//   bn_grid fisher DTYPE N C HW SCALE DECAY SMS G_FILE XHAT_FILE STATE_FILE OUT_FILE
//       g and x̂ are (N, C, HW) float32 files, stored as DTYPE (f32 f16 bf16) for the kernel; state (C, 3) float32 is read, updated and written to OUT.
//   bn_grid solve C DAMPING F_FILE GG_FILE GB_FILE OUT_FILE
//       F (C, 3), grad_gamma (C), grad_beta (C); OUT gets the two solved vectors, gamma first.
// Prints: sub=.. blocks_per_channel=.. barrier_mismatch=..
#include "block_emulator.h"
#include "dtypes.h"
#include "harness_io.h"

#include "cuda/batchnorm_kernels.cuh"

#include <string>

using namespace spngd::cuda_ops;

int main(int argc, char** argv) {
  const std::string mode = argc > 1 ? argv[1] : "";
  if (mode == "fisher" && argc == 13) {
    const int64_t N = std::stoll(argv[3]), C = std::stoll(argv[4]), HW = std::stoll(argv[5]);
    const float scale = std::stof(argv[6]), decay = std::stof(argv[7]);
    const std::vector<float> g32 = emu::read_floats(argv[9]), xh32 = emu::read_floats(argv[10]);
    std::vector<float> state = emu::read_floats(argv[11]);
    // bn_unitwise_fisher's host side handles N == 0, HW == 0 and C == 0 without a launch.
    const BnFisherPlan plan = plan_bn_fisher(N, C, HW, std::stoi(argv[8]));
    const int64_t G = plan.blocks_per_channel;
    std::vector<float> ws(G > 1 ? static_cast<size_t>(C * G * 3) : 0, NAN);  // poisoned
    std::vector<int> counters(G > 1 ? static_cast<size_t>(C) : 0, 0);
    emu::Report r;
    emu::with_dtype(argv[2], [&](auto tag) {
      using T = decltype(tag);
      const std::vector<T> g(g32.begin(), g32.end()), xh(xh32.begin(), xh32.end());  // storage dtype
      r = emu::run_grid(EmuDim3{static_cast<unsigned>(C), static_cast<unsigned>(G), 1}, kBnThreads, [&] {
        bn_fisher_kernel<T>(g.data(), xh.data(), N, C, HW, plan.n_per_block, plan.sub, state.data(),
                            G > 1 ? ws.data() : nullptr, G > 1 ? counters.data() : nullptr, scale, decay);
      });
    });
    emu::write_floats(argv[12], state);
    std::printf("sub=%d blocks_per_channel=%lld barrier_mismatch=%ld\n", plan.sub, (long long)G, r.barrier_mismatch);
    return 0;
  }
  if (mode == "solve" && argc == 8) {
    const int64_t C = std::stoll(argv[2]);
    const float damping = std::stof(argv[3]);
    const std::vector<float> F = emu::read_floats(argv[4]), gg = emu::read_floats(argv[5]), gb = emu::read_floats(argv[6]);
    std::vector<float> out(static_cast<size_t>(2 * C), NAN);
    const unsigned blocks = static_cast<unsigned>(std::min<int64_t>((C + 255) / 256, 1024));
    const emu::Report r = emu::run_grid(EmuDim3{blocks, 1, 1}, 256, [&] {
      bn_solve_kernel(F.data(), gg.data(), gb.data(), out.data(), out.data() + C, C, damping);
    });
    emu::write_floats(argv[7], out);
    std::printf("sub=0 blocks_per_channel=0 barrier_mismatch=%ld\n", r.barrier_mismatch);
    return 0;
  }
  if (mode == "selftest-shuffle") {  // lane 0 of each warp skips one shuffle
    const emu::Report r = emu::run_grid(EmuDim3{1, 1, 1}, 64, [&] {
      float v = 1.f;
      if ((threadIdx.x & 31) != 0) v = __shfl_xor_sync(0xffffffffu, v, 1);
      (void)v;
    });
    std::printf("sub=0 blocks_per_channel=0 barrier_mismatch=%ld\n", r.barrier_mismatch);
    return 0;
  }
  std::fprintf(stderr, "usage: %s fisher DTYPE N C HW SCALE DECAY SMS G XHAT STATE OUT | solve C DAMPING F GG GB OUT | selftest-shuffle\n", argv[0]);
  return 2;
}
