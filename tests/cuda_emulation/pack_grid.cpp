// Runs pack_upper's and unpack_upper's kernels and launch tables (csrc/cuda/pack_kernels.cuh,
// unchanged) on the CPU through block_emulator.h, for tests/test_emulated_pack.py. Values travel
// as float64 files; the harness converts them to and from the storage dtypes (f64 f32 f16 bf16).
//
//   pack_grid pack OUT_DTYPE IN OUT n:dtype:layout...
//       IN holds each matrix's n*n values (row major); layout r = row major, c = column major,
//       s = every other row and column of a 2n x 2n array. OUT gets the packed buffer.
//   pack_grid unpack SRC_DTYPE OUT_DTYPE OFFSET IN SCALES OUT n...
//       IN holds the packed buffer (OFFSET values first), SCALES one float per matrix; OUT gets the
//       n x n outputs one after another.
// Prints: launches=.. barrier_mismatch=..
#include "block_emulator.h"
#include "dtypes.h"
#include "harness_io.h"

#include "cuda/pack_kernels.cuh"

#include <memory>
#include <string>

using namespace spngd::cuda_ops;

namespace {

// Storage of any dtype, filled from / read back to doubles.
struct Buffer {
  std::shared_ptr<void> data;
  template <typename T>
  static Buffer of(size_t count, double fill) {
    std::shared_ptr<T> p(new T[count], std::default_delete<T[]>());
    for (size_t i = 0; i < count; ++i) p.get()[i] = static_cast<T>(fill);
    return {std::static_pointer_cast<void>(p)};
  }
};

int pack(int argc, char** argv) {
  const std::string out_dtype = argv[2];
  const std::vector<double> in = emu::read_array<double>(argv[3]);
  std::vector<Buffer> storage;
  std::vector<PackSource> sources;
  size_t pos = 0;
  int64_t total = 0;
  for (int a = 5; a < argc; ++a) {
    const std::string spec = argv[a];
    const auto c1 = spec.find(':'), c2 = spec.rfind(':');
    const int64_t n = std::stoll(spec.substr(0, c1));
    const std::string dt = spec.substr(c1 + 1, c2 - c1 - 1);
    const char layout = spec[c2 + 1];
    const int64_t span = layout == 's' ? 2 * n : n;  // the allocation's edge
    int64_t s0 = span, s1 = 1;
    if (layout == 'c') { s0 = 1; s1 = n; }
    if (layout == 's') { s0 = 2 * span; s1 = 2; }
    emu::with_dtype(dt, [&](auto tag) {
      using T = decltype(tag);
      Buffer b = Buffer::of<T>(static_cast<size_t>(span * span), NAN);  // the unused part stays NaN
      T* p = static_cast<T*>(b.data.get());
      for (int64_t i = 0; i < n; ++i)
        for (int64_t j = 0; j < n; ++j) p[i * s0 + j * s1] = static_cast<T>(in[pos + i * n + j]);
      sources.push_back({p, n, s0, s1, static_cast<int8_t>(emu::scalar_type(dt))});
      storage.push_back(b);
    });
    pos += static_cast<size_t>(n * n);
    total += n * (n + 1) / 2;
  }
  std::vector<double> result(static_cast<size_t>(total));
  long launches = 0, mismatch = 0;
  emu::with_dtype(out_dtype, [&](auto tag) {
    using D = decltype(tag);
    std::vector<D> out(static_cast<size_t>(total), static_cast<D>(NAN));  // poisoned
    for_each_pack_launch(sources.data(), sources.size(), [&](const PackTable& t, int64_t rows) {
      ++launches;
      const unsigned blocks = static_cast<unsigned>((rows + kPackWarps - 1) / kPackWarps);
      mismatch += emu::run_grid(EmuDim3{blocks, 1, 1}, kPackWarps * 32, [&] { pack_upper_kernel<D>(t, out.data()); })
                      .barrier_mismatch;
    });
    for (size_t i = 0; i < out.size(); ++i) result[i] = static_cast<double>(out[i]);
  });
  emu::write_array(argv[4], result);
  std::printf("launches=%ld barrier_mismatch=%ld\n", launches, mismatch);
  return 0;
}

int unpack(int argc, char** argv) {
  const std::string src_dtype = argv[2], out_dtype = argv[3];
  const int64_t offset = std::stoll(argv[4]);
  const std::vector<double> in = emu::read_array<double>(argv[5]);
  const std::vector<float> scale = emu::read_floats(argv[6]);
  std::vector<int64_t> sizes;
  for (int a = 8; a < argc; ++a) sizes.push_back(std::stoll(argv[a]));
  std::vector<double> result;
  long launches = 0, mismatch = 0;
  emu::with_dtype(src_dtype, [&](auto src_tag) {
    using S = decltype(src_tag);
    std::vector<S> buf(in.size());
    for (size_t i = 0; i < in.size(); ++i) buf[i] = static_cast<S>(in[i]);
    emu::with_dtype(out_dtype, [&](auto out_tag) {
      using D = decltype(out_tag);
      std::vector<std::vector<D>> outs;
      std::vector<void*> dsts;
      for (const int64_t n : sizes) outs.emplace_back(static_cast<size_t>(n * n), static_cast<D>(NAN));  // poisoned
      for (auto& o : outs) dsts.push_back(o.data());
      for_each_unpack_launch(sizes.data(), dsts.data(), sizes.size(), offset, [&](const UnpackTable& t, int64_t tiles) {
        ++launches;
        mismatch += emu::run_grid(EmuDim3{static_cast<unsigned>(tiles), 1, 1}, EmuDim3{kTile, kTileRows, 1}, [&] {
                      unpack_upper_kernel<S, D>(t, buf.data(), scale.data());
                    }).barrier_mismatch;
      });
      for (const auto& o : outs)
        for (const D v : o) result.push_back(static_cast<double>(v));
    });
  });
  emu::write_array(argv[7], result);
  std::printf("launches=%ld barrier_mismatch=%ld\n", launches, mismatch);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  const std::string mode = argc > 1 ? argv[1] : "";
  if (mode == "pack" && argc >= 5) return pack(argc, argv);
  if (mode == "unpack" && argc >= 8) return unpack(argc, argv);
  std::fprintf(stderr, "usage: %s pack OUT_DTYPE IN OUT n:dtype:layout... | unpack SRC OUT_DTYPE OFFSET IN SCALES OUT n...\n", argv[0]);
  return 2;
}
