// The kernels of bn_unitwise_fisher / bn_unitwise_solve (design: see batchnorm.cu) and the
// host-side launch plan of the Fisher kernel.
//
// Free of ATen so that tests/cuda_emulation compiles this very file on the CPU and runs whole
// launches (warp shuffles, the cross-block ticket, ThreadSanitizer) without a GPU.
#pragma once

#include <algorithm>
#include <cstdint>

#include "cuda/index_math.cuh"

namespace spngd::cuda_ops {

constexpr int kBnThreads = 256;
constexpr int kBnWarps = kBnThreads / 32;

__device__ __forceinline__ float blend(float old, float v, float scale, float decay) {
  return decay == 0.f ? scale * v : fmaf(decay, old, scale * v);  // decay 0 never reads old (NaN-safe)
}

template <typename T>
__global__ void __launch_bounds__(kBnThreads)
    bn_fisher_kernel(const T* __restrict__ g, const T* __restrict__ xh, int64_t N, int64_t C, int64_t HW,
                     int64_t n_per_block, int sub, float* __restrict__ state, float* __restrict__ ws,
                     int* __restrict__ counters, float scale, float decay) {
  __shared__ float red[3][kBnWarps];
  const int64_t c = blockIdx.x;
  const int G = gridDim.y, gb = blockIdx.y;
  const int64_t n_begin = static_cast<int64_t>(gb) * n_per_block;
  const int64_t n_end = std::min(N, n_begin + n_per_block);
  const int tid = threadIdx.x, groups = kBnThreads / sub, grp = tid / sub, sl = tid % sub;

  float agg = 0.f, agb = 0.f, abb = 0.f;  // Σ_n ug², ug·ub, ub² (sub-group leaders only)
  // Same trip count for every thread, so the shuffles below always see full warps.
  for (int64_t nb = n_begin; nb < n_end; nb += groups) {
    const int64_t n = nb + grp;
    float sgx = 0.f, sg = 0.f;
    if (n < n_end) {
      const T* gp = g + (n * C + c) * HW;
      const T* xp = xh + (n * C + c) * HW;
      int k = sl;
      // Eight independent loads in flight per lane: a plane is a short stream, so memory latency,
      // not bandwidth, limits a lane that waits for each load in turn.
      float sgx1 = 0.f, sg1 = 0.f;
      for (; k + 3 * sub < HW; k += 4 * sub) {
        const float g0 = static_cast<float>(gp[k]), g1 = static_cast<float>(gp[k + sub]);
        const float g2 = static_cast<float>(gp[k + 2 * sub]), g3 = static_cast<float>(gp[k + 3 * sub]);
        const float x0 = static_cast<float>(xp[k]), x1 = static_cast<float>(xp[k + sub]);
        const float x2 = static_cast<float>(xp[k + 2 * sub]), x3 = static_cast<float>(xp[k + 3 * sub]);
        sgx = fmaf(g0, x0, fmaf(g2, x2, sgx));
        sgx1 = fmaf(g1, x1, fmaf(g3, x3, sgx1));
        sg += g0 + g2;
        sg1 += g1 + g3;
      }
      for (; k < HW; k += sub) {
        const float gv = static_cast<float>(gp[k]);
        sgx = fmaf(gv, static_cast<float>(xp[k]), sgx);
        sg += gv;
      }
      sgx += sgx1;
      sg += sg1;
    }
    for (int off = sub / 2; off > 0; off >>= 1) {  // stays inside the aligned sub-group
      sgx += __shfl_xor_sync(0xffffffffu, sgx, off);
      sg += __shfl_xor_sync(0xffffffffu, sg, off);
    }
    if (sl == 0 && n < n_end) {
      agg = fmaf(sgx, sgx, agg);
      agb = fmaf(sgx, sg, agb);
      abb = fmaf(sg, sg, abb);
    }
  }
  for (int off = 16; off > 0; off >>= 1) {
    agg += __shfl_down_sync(0xffffffffu, agg, off);
    agb += __shfl_down_sync(0xffffffffu, agb, off);
    abb += __shfl_down_sync(0xffffffffu, abb, off);
  }
  const int lane = tid & 31, warp = tid >> 5;
  if (lane == 0) { red[0][warp] = agg; red[1][warp] = agb; red[2][warp] = abb; }
  __syncthreads();
  if (tid != 0) return;

  float v[3] = {0.f, 0.f, 0.f};
  for (int w = 0; w < kBnWarps; ++w)
    for (int e = 0; e < 3; ++e) v[e] += red[e][w];
  if (G > 1) {
    float* slot = ws + (c * G + gb) * 3;
    for (int e = 0; e < 3; ++e) slot[e] = v[e];
    __threadfence();  // partial sums visible before the ticket is taken
    if (atomicAdd(&counters[c], 1) != G - 1) return;
    __threadfence();
    for (int e = 0; e < 3; ++e) v[e] = 0.f;
    for (int k = 0; k < G; ++k)  // fixed order: deterministic; __ldcg skips the (incoherent) L1
      for (int e = 0; e < 3; ++e) v[e] += __ldcg(ws + (c * G + k) * 3 + e);
  }
  for (int e = 0; e < 3; ++e) state[c * 3 + e] = blend(state[c * 3 + e], v[e], scale, decay);
}

__global__ void bn_solve_kernel(const float* __restrict__ F, const float* __restrict__ grad_gamma,
                                const float* __restrict__ grad_beta, float* __restrict__ out_gamma,
                                float* __restrict__ out_beta, int64_t C, float damping) {
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; c < C; c += step) {
    const float a = F[3 * c] + damping, b = F[3 * c + 1], d = F[3 * c + 2] + damping;
    const float det = a * d - b * b;
    const float gg = grad_gamma[c], gb = grad_beta[c];
    const bool ok = isfinite(det) && det > 0.f;
    out_gamma[c] = ok ? (d * gg - b * gb) / det : gg;
    out_beta[c] = ok ? (a * gb - b * gg) / det : gb;
  }
}

// How bn_unitwise_fisher covers the work: lanes per plane, and the batch split across blockIdx.y.
struct BnFisherPlan {
  int sub;                     // lanes per (n, c) plane: the largest power of two <= HW, at most 32
  int64_t blocks_per_channel;  // G (grid.y); > 1 uses the workspace and the ticket counters
  int64_t n_per_block;
};

inline BnFisherPlan plan_bn_fisher(int64_t N, int64_t C, int64_t HW, int sm_count) {
  auto cdiv = [](int64_t a, int64_t b) { return (a + b - 1) / b; };
  int sub = 32;
  while (sub > HW) sub >>= 1;
  const int64_t groups = kBnThreads / sub;
  int64_t G = std::min(cdiv(N, groups), std::max<int64_t>(1, cdiv(4 * static_cast<int64_t>(sm_count), C)));
  const int64_t n_per_block = cdiv(N, G);
  G = cdiv(N, n_per_block);
  return {sub, G, n_per_block};
}

}  // namespace spngd::cuda_ops
