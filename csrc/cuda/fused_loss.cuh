// What the fused losses' CUDA kernels (sce_loss.cu, kl_loss.cu) share: the launch shape of their
// one-thread-per-pixel kernels, the accumulation type, exp/log in it, and the fixed-order block
// reduction of their per-block partials (no float atomics, so results are bitwise reproducible).
#pragma once

#include <cmath>
#include <cstdint>

namespace {

constexpr int kThreads = 256;  // threads per block (the block reduction assumes exactly this)
constexpr int kWarps = kThreads / 32;
constexpr int kPixPerThread = 4;  // forward: pixels per thread, so fewer partials to finalize
constexpr int64_t kPixPerBlock = static_cast<int64_t>(kThreads) * kPixPerThread;

// float for float / float16 / bfloat16, double for double
template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};

__device__ __forceinline__ float exp_acc(float x) { return expf(x); }
__device__ __forceinline__ double exp_acc(double x) { return exp(x); }
__device__ __forceinline__ float log_acc(float x) { return logf(x); }
__device__ __forceinline__ double log_acc(double x) { return log(x); }
__device__ __forceinline__ float log1p_acc(float x) { return log1pf(x); }
__device__ __forceinline__ double log1p_acc(double x) { return log1p(x); }

// Sums v[0..N) and count over the block (blockDim.x == kThreads) with a fixed tree: warp shuffles,
// then the kWarps warp totals by the first warp. The totals are valid in thread 0.
template <int N>
__device__ __forceinline__ void block_sum(double (&v)[N], long long& count) {
  __shared__ double shared_v[N][kWarps];
  __shared__ long long shared_count[kWarps];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
#pragma unroll
    for (int i = 0; i < N; ++i) v[i] += __shfl_down_sync(0xffffffffu, v[i], offset);
    count += __shfl_down_sync(0xffffffffu, count, offset);
  }
  if (lane == 0) {
#pragma unroll
    for (int i = 0; i < N; ++i) shared_v[i][warp] = v[i];
    shared_count[warp] = count;
  }
  __syncthreads();
  if (warp == 0) {
#pragma unroll
    for (int i = 0; i < N; ++i) v[i] = lane < kWarps ? shared_v[i][lane] : 0.0;
    count = lane < kWarps ? shared_count[lane] : 0LL;
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
#pragma unroll
      for (int i = 0; i < N; ++i) v[i] += __shfl_down_sync(0xffffffffu, v[i], offset);
      count += __shfl_down_sync(0xffffffffu, count, offset);
    }
  }
}

__device__ __forceinline__ void block_sum(double& v, long long& count) {
  double one[1] = {v};
  block_sum<1>(one, count);
  v = one[0];
}

}  // namespace
