// A CPU stand-in for one CUDA thread block, enough to run block-level device code from csrc/cuda
// unchanged: one std::thread per CUDA thread, a real barrier for __syncthreads, and `smem_ptr<T>`, a
// shared-memory pointer that checks every access.
//
// What the checks catch (each counted in Report):
// - out of bounds: an index outside the shared allocation;
// - races: two different threads touching one element between two barriers where at least one
//   writes (read-after-write, write-after-read, write-after-write);
// - barrier divergence: threads that passed a different number of __syncthreads;
// - deadlock: divergence that leaves threads waiting for good (a shuffle only some lanes of a warp
//   make, for instance) ends the process with status 3 (see Barrier).
// Warp shuffles (__shfl_xor_sync, __shfl_down_sync, full mask) are exchanges through a per-warp
// buffer between two warp barriers. Implicit warp lockstep (code that relies on lanes running in step
// without a shuffle or barrier) is NOT modelled.
//
// Whole kernels run through run_grid: blocks one after another on one pool of threads, in a
// shuffled order (SPNGD_EMU_BLOCK_ORDER=forward|reverse|shuffle, SPNGD_EMU_SEED), so a kernel that
// assumes which block finishes last is caught. A kernel's static `__shared__` arrays become
// function-local statics, which is right while one block runs at a time; they are neither poisoned
// (they start zeroed, then hold the previous block's data) nor checked here, so such kernels are
// built with -fsanitize=thread, whose happens-before model understands the barrier's mutex and
// condition variable.
#pragma once

#define SPNGD_CUDA_EMULATION 1
#define __host__
#define __device__
#define __global__
#define __forceinline__ inline
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))
#define __launch_bounds__(...)
#define __grid_constant__

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <random>
#include <string>
#include <utility>
#include <thread>
#include <vector>

using std::fma;
using std::fmaf;
using std::isfinite;
using std::max;
using std::min;
using std::sqrt;

inline void __syncthreads();

struct EmuDim3 {
  unsigned x = 0, y = 1, z = 1;
};
inline thread_local EmuDim3 threadIdx, blockDim;
inline thread_local EmuDim3 blockIdx;
inline EmuDim3 gridDim;

struct float4 {
  float x, y, z, w;
};

namespace emu {

// A barrier like std::barrier, but one that gives up: divergent control flow (a thread that skips a
// __syncthreads or a shuffle its partners make) would otherwise hang the emulation forever. After
// SPNGD_EMU_DEADLOCK_SECONDS (default 60) of waiting the process exits with status 3 and says so.
class Barrier {
 public:
  explicit Barrier(int count) : count_(count) {}
  void arrive_and_wait() {
    std::unique_lock<std::mutex> lock(mu_);
    const long gen = generation_;
    if (++arrived_ >= count_) { next_phase(); return; }
    if (!cv_.wait_for(lock, timeout(), [&] { return generation_ != gen; })) {
      std::fprintf(stderr, "emu: deadlock: threads waited %lld s at a barrier or shuffle that others never reached "
                   "(divergent control flow)\n", static_cast<long long>(timeout().count()));
      std::fflush(stderr);
      std::_Exit(3);
    }
  }
  void arrive_and_drop() {
    std::lock_guard<std::mutex> lock(mu_);
    --count_;
    if (arrived_ >= count_ && arrived_ > 0) next_phase();
  }

 private:
  static std::chrono::seconds timeout() {
    const char* env = std::getenv("SPNGD_EMU_DEADLOCK_SECONDS");
    return std::chrono::seconds(env ? std::atol(env) : 60);
  }
  void next_phase() {
    arrived_ = 0;
    ++generation_;
    cv_.notify_all();
  }
  std::mutex mu_;
  std::condition_variable cv_;
  int count_, arrived_ = 0;
  long generation_ = 0;
};

struct Report {
  long races = 0, out_of_bounds = 0, barrier_mismatch = 0;
};

inline thread_local long t_epoch = 0;
inline thread_local int t_linear = 0;  // the thread's index in its block (x fastest): warps and lanes

struct Shadow {  // last writer / reader of an element within the current barrier interval
  long write_epoch = -1, read_epoch = -1;
  int writer = -1, reader = -1;  // reader -2: several readers
};

struct Block {
  Barrier* barrier = nullptr;
  std::vector<std::unique_ptr<Barrier>> warp_barriers;  // one per warp, for shuffles
  std::vector<uint64_t> lanes;                                 // shuffle exchange: 32 slots per warp
  std::mutex mu;
  std::vector<Shadow> shadow;
  Report report;
  void note(long& counter, const char* what, int64_t idx) {
    if (counter++ < 5) std::fprintf(stderr, "emu: %s at shared index %lld (thread %d)\n", what, (long long)idx, t_linear);
  }
};
inline Block* g_block = nullptr;

// Every lane publishes v, then reads lane src's value (its own when src is outside the warp).
template <typename T>
T warp_exchange(T v, int src) {
  static_assert(sizeof(T) <= sizeof(uint64_t));
  const int lane = t_linear & 31, warp = t_linear >> 5;
  uint64_t* slots = g_block->lanes.data() + 32 * warp;
  Barrier& wb = *g_block->warp_barriers[warp];
  std::memcpy(&slots[lane], &v, sizeof(T));
  wb.arrive_and_wait();
  T out = v;
  if (src >= 0 && src < 32) std::memcpy(&out, &slots[src], sizeof(T));
  wb.arrive_and_wait();  // nobody overwrites a slot before every lane has read
  return out;
}

template <typename T>
struct Ref {
  T* base;
  int64_t idx, size;
  bool ok() const {
    if (idx >= 0 && idx < size) return true;
    std::lock_guard<std::mutex> lock(g_block->mu);
    g_block->note(g_block->report.out_of_bounds, "out-of-bounds access", idx);
    return false;
  }
  T get() const {
    if (!ok()) return T(NAN);
    std::lock_guard<std::mutex> lock(g_block->mu);
    Shadow& s = g_block->shadow[idx];
    const int me = t_linear;
    if (s.write_epoch == t_epoch && s.writer != me) g_block->note(g_block->report.races, "read after another thread's write", idx);
    if (s.read_epoch != t_epoch) { s.read_epoch = t_epoch; s.reader = me; }
    else if (s.reader != me) s.reader = -2;
    return base[idx];
  }
  void put(T v) const {
    if (!ok()) return;
    std::lock_guard<std::mutex> lock(g_block->mu);
    Shadow& s = g_block->shadow[idx];
    const int me = t_linear;
    if (s.write_epoch == t_epoch && s.writer != me) g_block->note(g_block->report.races, "write after another thread's write", idx);
    if (s.read_epoch == t_epoch && s.reader != me) g_block->note(g_block->report.races, "write after another thread's read", idx);
    s.write_epoch = t_epoch;
    s.writer = me;
    base[idx] = v;
  }
  operator T() const { return get(); }
  const Ref& operator=(T v) const { put(v); return *this; }
  const Ref& operator=(const Ref& o) const { put(o.get()); return *this; }
  const Ref& operator-=(T v) const { put(get() - v); return *this; }
  const Ref& operator+=(T v) const { put(get() + v); return *this; }
};

template <typename T>
struct SharedPtr {
  T* base;
  int64_t offset, size;
  SharedPtr operator+(int64_t d) const { return {base, offset + d, size}; }
  Ref<T> operator[](int64_t i) const { return {base, offset + i, size}; }
};

// The order blocks run in: see the file comment.
inline std::vector<std::pair<unsigned, unsigned>> block_order(EmuDim3 grid) {
  std::vector<std::pair<unsigned, unsigned>> order;
  for (unsigned y = 0; y < grid.y; ++y)
    for (unsigned x = 0; x < grid.x; ++x) order.emplace_back(x, y);
  const char* how = std::getenv("SPNGD_EMU_BLOCK_ORDER");
  const std::string mode = how ? how : "shuffle";
  if (mode == "reverse") {
    std::reverse(order.begin(), order.end());
  } else if (mode == "shuffle") {
    const char* seed = std::getenv("SPNGD_EMU_SEED");
    std::mt19937 rng(seed ? static_cast<unsigned>(std::atol(seed)) : 0u);
    std::shuffle(order.begin(), order.end(), rng);
  } else if (mode != "forward") {
    std::fprintf(stderr, "emu: SPNGD_EMU_BLOCK_ORDER must be forward, reverse or shuffle, got %s\n", mode.c_str());
    std::exit(2);
  }
  return order;
}

// Runs body() as a grid on one pool of `threads` threads: every block in turn (in block_order), with a
// barrier between blocks, so shared memory is handed from block to block as to a new block on the
// GPU. (One pool rather than new threads per block: thread start-up dominates under
// ThreadSanitizer.) `shadowed` elements of shared memory get the access checks of Ref.
inline Report launch(EmuDim3 grid, EmuDim3 block_dim, size_t shadowed, const std::function<void()>& body) {
  const int threads = static_cast<int>(block_dim.x * block_dim.y);  // thread t: x = t % bx, y = t / bx
  Block block;
  Barrier bar(threads);
  block.barrier = &bar;
  block.shadow.assign(shadowed, Shadow{});
  for (int w = 0; w < (threads + 31) / 32; ++w)
    block.warp_barriers.push_back(std::make_unique<Barrier>(std::min(32, threads - 32 * w)));
  block.lanes.assign(static_cast<size_t>(32 * block.warp_barriers.size()), 0);
  g_block = &block;
  gridDim = grid;
  std::vector<long> epochs(threads, 0);
  const std::vector<std::pair<unsigned, unsigned>> order = block_order(grid);
  std::vector<std::thread> pool;
  pool.reserve(threads);
  for (int t = 0; t < threads; ++t) {
    pool.emplace_back([&, t] {
      threadIdx = EmuDim3{t % block_dim.x, t / block_dim.x, 0};
      t_linear = t;
      blockDim = EmuDim3{block_dim.x, block_dim.y, 1};
      t_epoch = 0;
      for (const auto& [x, y] : order) {
        blockIdx = EmuDim3{x, y, 0};
        body();
        __syncthreads();
      }
      epochs[t] = t_epoch;
      bar.arrive_and_drop();  // a thread that skipped a barrier must not leave the others waiting
      block.warp_barriers[t / 32]->arrive_and_drop();  // nor one that skipped a shuffle, its warp
    });
  }
  for (auto& th : pool) th.join();
  for (int t = 1; t < threads; ++t)
    if (epochs[t] != epochs[0]) { ++block.report.barrier_mismatch; break; }
  g_block = nullptr;
  return block.report;
}

// One block over `smem`, its shared memory as seen through smem_ptr. The caller should pre-fill
// it (e.g. with NaN) so that reads of unwritten elements show.
template <typename T>
Report run_block(int threads, std::vector<T>& smem, const std::function<void()>& body) {
  return launch(EmuDim3{1, 1, 1}, EmuDim3{static_cast<unsigned>(threads), 1, 1}, smem.size(), body);
}

// A whole grid of a kernel whose shared memory is static `__shared__` arrays (unchecked here: build
// with -fsanitize=thread).
inline Report run_grid(EmuDim3 grid, EmuDim3 block, const std::function<void()>& body) {
  return launch(grid, block, 0, body);
}

inline Report run_grid(EmuDim3 grid, int threads, const std::function<void()>& body) {
  return run_grid(grid, EmuDim3{static_cast<unsigned>(threads), 1, 1}, body);
}

}  // namespace emu

template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask) {
  if (mask != 0xffffffffu) std::abort();  // only full-warp shuffles are modelled
  return emu::warp_exchange(v, (emu::t_linear & 31) ^ lane_mask);
}

template <typename T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta) {
  if (mask != 0xffffffffu) std::abort();
  return emu::warp_exchange(v, (emu::t_linear & 31) + static_cast<int>(delta));
}

// Blocks run one after another with a barrier in between, so whatever one block wrote is visible to
// the next without a fence (and ThreadSanitizer does not model bare fences).
inline void __threadfence() {}

inline int atomicAdd(int* address, int v) { return std::atomic_ref<int>(*address).fetch_add(v); }

template <typename T>
T __ldcg(const T* p) { return *p; }

inline void __syncthreads() {
  emu::g_block->barrier->arrive_and_wait();
  ++emu::t_epoch;
}

namespace spngd::cuda_ops {
template <typename T>
using smem_ptr = emu::SharedPtr<T>;
}
