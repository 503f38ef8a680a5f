// What the fused losses' CUDA kernels (sce_loss.cu, kl_loss.cu) share: the launch shape of their
// one-thread-per-pixel kernels, the accumulation type, exp/log in it, the fixed-order block
// reduction of their per-block partials (no float atomics, so results are bitwise reproducible),
// and the host wrappers' preamble: the outputs of the forward, the device scalars and the
// gradient buffer of the backward.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>
#include <limits>

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

// ---- host side ----

at::ScalarType acc_dtype(at::ScalarType type) { return type == at::kDouble ? at::kDouble : at::kFloat; }

unsigned int grid_size(int64_t blocks, const char* op) {
  TORCH_CHECK(blocks <= static_cast<int64_t>(std::numeric_limits<int>::max()), op, ": too many pixels");
  return static_cast<unsigned int>(blocks);
}

// The forward's outputs, (loss 0-d, lse [B, H, W]) in the accumulation dtype and num_valid int64
// 0-d, and its workspace: `partials_per_block` double partials and one count per block of
// kPixPerBlock pixels.
struct ForwardBuffers {
  at::Tensor loss, lse, num_valid, partial, counts;
  int64_t blocks;
};

ForwardBuffers forward_buffers(const at::Tensor& logits, int64_t partials_per_block) {
  const int64_t B = logits.size(0), H = logits.size(2), W = logits.size(3);
  const auto acc_options = logits.options().dtype(acc_dtype(logits.scalar_type()));
  const int64_t blocks = (B * H * W + kPixPerBlock - 1) / kPixPerBlock;
  return {at::empty({}, acc_options), at::empty({B, H, W}, acc_options),
          at::empty({}, logits.options().dtype(at::kLong)),
          at::empty({partials_per_block * blocks}, logits.options().dtype(at::kDouble)),
          at::empty({blocks}, logits.options().dtype(at::kLong)), blocks};
}

// The backward's inputs that stay on the device, read there by the kernel: grad_loss (float or
// double) and num_valid (int64), moved or cast only where they are not already so.
struct BackwardScalars {
  at::Tensor grad_loss, num_valid;
  bool grad_double;
};

BackwardScalars backward_scalars(const at::Tensor& grad_loss_in, const at::Tensor& num_valid_in,
                                 const at::Tensor& logits, const char* op) {
  TORCH_CHECK(grad_loss_in.numel() == 1 && num_valid_in.numel() == 1, op,
              ": grad_loss and num_valid must hold one element");
  const at::Device device = logits.device();
  at::Tensor grad_loss = grad_loss_in;
  if (grad_loss.device() != device ||
      (grad_loss.scalar_type() != at::kFloat && grad_loss.scalar_type() != at::kDouble)) {
    grad_loss = grad_loss.to(device, acc_dtype(logits.scalar_type()));
  }
  at::Tensor num_valid = num_valid_in;
  if (num_valid.device() != device || num_valid.scalar_type() != at::kLong) num_valid = num_valid.to(device, at::kLong);
  return {grad_loss, num_valid, grad_loss.scalar_type() == at::kDouble};
}

// The gradient takes the logits' layout (as the fake kernel's empty_like); the kernel writes NCHW
// into `out`, which `finish` copies into `grad` where they differ.
struct Gradient {
  at::Tensor grad, out;
  at::Tensor finish() const {
    if (!out.is_same(grad)) grad.copy_(out);
    return grad;
  }
};

Gradient gradient_buffer(const at::Tensor& logits_in) {
  at::Tensor grad = at::empty_like(logits_in);
  return {grad, grad.is_contiguous() ? grad : at::empty_like(logits_in, at::MemoryFormat::Contiguous)};
}

}  // namespace
