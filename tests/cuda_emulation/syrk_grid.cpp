// Runs accumulate_factor's and conv_a_factor's kernels (csrc/cuda/syrk_tiles.cuh, unchanged) on the
// CPU through block_emulator.h, for tests/test_emulated_syrk.py: the launch plan, every block of
// the SYRK kernel and, with row splits, the reduction kernel, as launch_syrk in factor.cu runs them.
//
//   syrk_grid dense key=value...   X is (rows, cols) with element strides s0, s1
//   syrk_grid conv key=value...    X is the implicit im2col of x (n, c, h, w; strides sn sc sh sw)
// Common keys: scale, decay, sms (SM count for the plan), max_ws, x (file of float32 storage),
// state (file: packed float32 state, read then updated), out (file written with the new state).
// Prints: large=.. tiles=.. splits=.. rows_per_split=.. barrier_mismatch=..
#include "block_emulator.h"
#include "dtypes.h"
#include "harness_io.h"

#include "cuda/syrk_tiles.cuh"

#include <map>
#include <string>

using namespace spngd::cuda_ops;

namespace {

template <typename Loader>
int run(const Loader& ld, int64_t d, int64_t rows, std::map<std::string, std::string>& kv) {
  const float scale = std::stof(kv.at("scale")), decay = std::stof(kv.at("decay"));
  std::vector<float> state = emu::read_floats(kv.at("state"));
  const int64_t np = d * (d + 1) / 2;
  if (static_cast<int64_t>(state.size()) != np) { std::fprintf(stderr, "state has %zu floats, expected %lld\n", state.size(), (long long)np); return 2; }
  const SyrkPlan plan = plan_syrk(d, rows, std::stoi(kv.at("sms")), std::stoll(kv.at("max_ws")));
  std::vector<float> ws(plan.splits > 1 ? static_cast<size_t>(plan.splits * np) : 0, NAN);  // poisoned
  float* out = plan.splits > 1 ? ws.data() : state.data();
  const bool raw = plan.splits > 1;

  emu::Report r = emu::run_grid(EmuDim3{static_cast<unsigned>(plan.tiles), static_cast<unsigned>(plan.splits), 1}, kSyrkThreads, [&] {
    if (plan.large) syrk_upper_kernel<8, Loader>(ld, d, rows, plan.rows_per_split, out, np, scale, decay, raw);
    else syrk_upper_kernel<4, Loader>(ld, d, rows, plan.rows_per_split, out, np, scale, decay, raw);
  });
  if (raw) {
    const auto blocks = static_cast<unsigned>(std::min<int64_t>((np + 255) / 256, 4096));
    const emu::Report r2 = emu::run_grid(EmuDim3{blocks, 1, 1}, 256, [&] {
      reduce_splits_kernel(ws.data(), plan.splits, np, state.data(), scale, decay);
    });
    r.barrier_mismatch += r2.barrier_mismatch;
  }
  emu::write_floats(kv.at("out"), state);
  std::printf("large=%d tiles=%lld splits=%lld rows_per_split=%lld barrier_mismatch=%ld\n", plan.large ? 1 : 0,
              (long long)plan.tiles, (long long)plan.splits, (long long)plan.rows_per_split, r.barrier_mismatch);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) { std::fprintf(stderr, "usage: %s dense|conv key=value...\n", argv[0]); return 2; }
  std::map<std::string, std::string> kv;
  for (int i = 2; i < argc; ++i) {
    const std::string a = argv[i];
    const auto eq = a.find('=');
    if (eq == std::string::npos) { std::fprintf(stderr, "bad argument %s\n", argv[i]); return 2; }
    kv[a.substr(0, eq)] = a.substr(eq + 1);
  }
  const std::string mode = argv[1];
  const std::vector<float> values = emu::read_floats(kv.at("x"));
  int rc = -1;
  emu::with_dtype(kv.count("dtype") ? kv.at("dtype") : "f32", [&](auto tag) {
    using T = decltype(tag);
    const std::vector<T> x(values.begin(), values.end());  // the input in its storage dtype
    auto I = [&](const char* k) { return std::stoll(kv.at(k)); };
    if (mode == "dense") {
      const DenseLoader<T> ld{x.data(), I("cols"), I("s0"), I("s1")};
      rc = run(ld, I("cols"), I("rows"), kv);
    }
    if (mode == "conv") {
      const int64_t H = I("h"), W = I("w"), kh = I("kh"), kw = I("kw");
      const int64_t oh = (H + 2 * I("ph") - I("dh") * (kh - 1) - 1) / I("sth") + 1;
      const int64_t ow = (W + 2 * I("pw") - I("dw") * (kw - 1) - 1) / I("stw") + 1;
      ConvLoader<T> ld;
      ld.x = x.data();
      ld.sN = I("sn"); ld.sC = I("sc"); ld.sH = I("sh"); ld.sW = I("sw");
      ld.H = static_cast<int>(H); ld.W = static_cast<int>(W);
      ld.KW = static_cast<int>(kw); ld.KHW = static_cast<int>(kh * kw); ld.patch = static_cast<int>(I("c") * kh * kw);
      ld.stride_h = static_cast<int>(I("sth")); ld.stride_w = static_cast<int>(I("stw"));
      ld.pad_h = static_cast<int>(I("ph")); ld.pad_w = static_cast<int>(I("pw"));
      ld.dil_h = static_cast<int>(I("dh")); ld.dil_w = static_cast<int>(I("dw"));
      ld.bias = I("bias") != 0;
      ld.per_image = FastDivmod(static_cast<uint32_t>(oh * ow));
      ld.per_row = FastDivmod(static_cast<uint32_t>(ow));
      rc = run(ld, I("c") * kh * kw + (ld.bias ? 1 : 0), I("n") * oh * ow, kv);
    }
  });
  if (rc >= 0) return rc;
  std::fprintf(stderr, "unknown mode %s\n", mode.c_str());
  return 2;
}
