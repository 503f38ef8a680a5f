// SPEC 1.4, KL(target || softmax(logits)) over valid pixels on CUDA.
//
// The numerics follow csrc/cpu/kl_loss.cpp term by term; the layout is sce_loss.cu's: NCHW logits
// and targets (made contiguous), one thread per pixel walking its C classes with a stride of
// H * W elements, so a warp reads 32 consecutive values of each class row.
//
// Saturated pixels, as the CPU kernel and kernels/kl_loss.py: others = the sum of exp(z - max) over
// the classes below the max (the first max left out once, further ties counted) is summed
// directly and log(sum exp(z - max)) taken as log1p(others); log(sum) itself rounds to 0 in float
// once the top probability rounds to 1, while the KL of a target on the top class is about others.
//
// Forward (per pixel): pass 1 the max, pass 2 others, pass 3 (valid pixels only)
// sum_c t_c (log t_c - log q_c), log q = (z - max) - log1p(others), t log t = 0 where t == 0. It
// writes the per-pixel log-sum-exp max + log1p(others).
// Loss sum without float atomics and without a host sync: per-thread sums in double, a fixed
// shuffle tree per block into one partial per block (KL in double, valid count in int64), and a
// one-block finalize kernel that adds the partials in a fixed order and writes the loss and
// num_valid to device memory (bitwise reproducible for a given shape).
//
// Backward, one thread per pixel (the forward's lse is not read): pass 1 the max, pass 2 others and
// the target sums t_rest (classes below the max) and t_top (classes at the max), pass 3
// grad = s (q_j T - t_j), T = t_rest + t_top, with s = grad_loss / (n C) read from device memory:
// e_j T / (1 + others) - t_j below the max, ((T - t_j) - t_j others) / (1 + others) at the max
// (T - t_j = t_rest + (t_top - t_j), no cancelling q_j T - t_j once q_j rounds to 1). Invalid
// pixels write 0 without reading their logits.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "fused_loss.cuh"

#include <cmath>
#include <cstdint>
#include <optional>

namespace {

// others = sum of exp(z - mx) over the C classes of a pixel (class c at z[c * S]) without the first
// class at the max; with an all-NaN or +inf pixel (d = NaN) it is NaN, as the plain sum was.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t sum_of_others(const scalar_t* z, int64_t C, int64_t S, acc_t mx) {
  acc_t others = 0;
  bool found = false;
  for (int64_t c = 0; c < C; ++c) {
    const acc_t d = static_cast<acc_t>(z[c * S]) - mx;
    const bool top = d == acc_t(0);
    if (!(top && !found)) others += exp_acc(d);
    found = found || top;
  }
  return others;
}

// Per block b: partial[b] = sum over its valid pixels of sum_c t_c (log t_c - log q_c), counts[b] =
// its valid pixels (mask == nullptr: every pixel). lse[pixel] = max + log1p(others).
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    kl_forward_kernel(const scalar_t* __restrict__ logits, const scalar_t* __restrict__ target,
                      const bool* __restrict__ mask, int64_t C, int64_t S, int64_t P, acc_t* __restrict__ lse,
                      double* __restrict__ partial, int64_t* __restrict__ counts) {
  double kl_sum = 0.0;
  long long valid = 0;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kPixPerBlock + threadIdx.x;
  for (int k = 0; k < kPixPerThread; ++k) {
    const int64_t pixel = first + static_cast<int64_t>(k) * kThreads;
    if (pixel >= P) break;
    const int64_t b = pixel / S;
    const int64_t s = pixel - b * S;
    const scalar_t* z = logits + b * C * S + s;  // class c at z[c * S]
    const scalar_t* t = target + b * C * S + s;
    // pass 1: max (NaN never selected, as the CPU's tile_max)
    acc_t mx = -static_cast<acc_t>(INFINITY);
    for (int64_t c = 0; c < C; ++c) {
      const acc_t v = static_cast<acc_t>(z[c * S]);
      mx = v > mx ? v : mx;
    }
    // pass 2: others; ls = log(sum exp(z - max)) = log1p(others)
    const acc_t ls = log1p_acc(sum_of_others<scalar_t, acc_t>(z, C, S, mx));
    lse[pixel] = mx + ls;
    if (mask == nullptr || mask[pixel]) {
      // pass 3: t (log t - log q), log q = (z - max) - log1p(others); t log t = 0 where t == 0
      acc_t kl = 0;
      for (int64_t c = 0; c < C; ++c) {
        const acc_t tc = static_cast<acc_t>(t[c * S]);
        const acc_t log_q = (static_cast<acc_t>(z[c * S]) - mx) - ls;
        if (tc != acc_t(0)) kl += tc * (log_acc(tc) - log_q);
      }
      kl_sum += static_cast<double>(kl);
      ++valid;
    }
  }
  block_sum(kl_sum, valid);
  if (threadIdx.x == 0) {
    partial[blockIdx.x] = kl_sum;
    counts[blockIdx.x] = static_cast<int64_t>(valid);
  }
}

// One block: adds the nb partials in a fixed order and writes loss = KL / (n C) (0 when n == 0)
// and num_valid = n.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    kl_finalize_kernel(const double* __restrict__ partial, const int64_t* __restrict__ counts, int64_t nb, int64_t C,
                       acc_t* __restrict__ loss, int64_t* __restrict__ num_valid) {
  double kl = 0.0;
  long long valid = 0;
  for (int64_t i = threadIdx.x; i < nb; i += kThreads) {
    kl += partial[i];
    valid += static_cast<long long>(counts[i]);
  }
  block_sum(kl, valid);
  if (threadIdx.x == 0) {
    const double denominator = static_cast<double>(valid) * static_cast<double>(C);
    *loss = static_cast<acc_t>(denominator > 0 ? kl / denominator : 0.0);
    *num_valid = static_cast<int64_t>(valid);
  }
}

// grad = s (q_j T - t_j), s = grad_loss / (n C) (0 when n C == 0), 0 on invalid pixels; see the top
// of the file for the form of q_j T - t_j at the max.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    kl_backward_kernel(const scalar_t* __restrict__ logits, const scalar_t* __restrict__ target,
                       const bool* __restrict__ mask, const void* __restrict__ grad_loss, bool grad_loss_double,
                       const int64_t* __restrict__ num_valid, int64_t C, int64_t S, int64_t P,
                       scalar_t* __restrict__ grad) {
  const int64_t pixel = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (pixel >= P) return;
  const int64_t b = pixel / S;
  const int64_t s = pixel - b * S;
  scalar_t* out = grad + b * C * S + s;
  if (mask != nullptr && !mask[pixel]) {
    for (int64_t c = 0; c < C; ++c) out[c * S] = static_cast<scalar_t>(acc_t(0));
    return;
  }
  const double go = grad_loss_double ? *static_cast<const double*>(grad_loss)
                                     : static_cast<double>(*static_cast<const float*>(grad_loss));
  const double denominator = static_cast<double>(*num_valid) * static_cast<double>(C);
  const acc_t scale = static_cast<acc_t>(denominator > 0 ? go / denominator : 0.0);

  const scalar_t* z = logits + b * C * S + s;
  const scalar_t* t = target + b * C * S + s;
  // pass 1: max (NaN never selected, as the forward)
  acc_t mx = -static_cast<acc_t>(INFINITY);
  for (int64_t c = 0; c < C; ++c) {
    const acc_t v = static_cast<acc_t>(z[c * S]);
    mx = v > mx ? v : mx;
  }
  // pass 2: others (as sum_of_others, the first max left out once), t_rest and t_top (the targets
  // below and at the max; T = t_rest + t_top, the targets need not sum to 1)
  acc_t others = 0, t_rest = 0, t_top = 0;
  bool found = false;
  for (int64_t c = 0; c < C; ++c) {
    const acc_t d = static_cast<acc_t>(z[c * S]) - mx;
    const acc_t tc = static_cast<acc_t>(t[c * S]);
    const bool top = d == acc_t(0);
    if (!(top && !found)) others += exp_acc(d);
    found = found || top;
    if (top) {
      t_top += tc;
    } else {
      t_rest += tc;
    }
  }
  const acc_t inv = acc_t(1) / (acc_t(1) + others);
  const acc_t ratio = (t_rest + t_top) * inv;  // T / sum(e)
  // pass 3: the gradient
  for (int64_t c = 0; c < C; ++c) {
    const acc_t d = static_cast<acc_t>(z[c * S]) - mx;
    const acc_t tc = static_cast<acc_t>(t[c * S]);
    const acc_t g = d == acc_t(0) ? ((t_rest + (t_top - tc)) - tc * others) * inv : exp_acc(d) * ratio - tc;
    out[c * S] = static_cast<scalar_t>(scale * g);
  }
}

void check_shapes(const char* op, const at::Tensor& logits, const at::Tensor& target,
                  const std::optional<at::Tensor>& mask) {
  TORCH_CHECK(logits.dim() == 4 && target.sizes() == logits.sizes(), op,
              ": logits and target_probs [B, C, H, W]");
  TORCH_CHECK(logits.is_cuda() && target.device() == logits.device(), op,
              ": logits and target_probs must be on the same CUDA device");
  if (mask.has_value()) {
    TORCH_CHECK(mask->scalar_type() == at::kBool, op, ": valid_mask must be bool");
    TORCH_CHECK(mask->dim() == 3 && mask->size(0) == logits.size(0) && mask->size(1) == logits.size(2) &&
                    mask->size(2) == logits.size(3),
                op, ": valid_mask must be [B, H, W]");
    TORCH_CHECK(mask->device() == logits.device(), op, ": valid_mask must be on the logits' device");
  }
}

// The mask as a contiguous bool tensor; none when every pixel is valid.
std::optional<at::Tensor> contiguous_mask(const std::optional<at::Tensor>& mask) {
  if (!mask.has_value()) return std::nullopt;
  return mask->contiguous();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> kl_loss_cuda(const at::Tensor& logits_in, const at::Tensor& target_in,
                                                           const std::optional<at::Tensor>& mask_in) {
  check_shapes("kl_loss", logits_in, target_in, mask_in);
  const c10::cuda::CUDAGuard guard(logits_in.device());
  const at::Tensor logits = logits_in.contiguous();
  const at::Tensor target = target_in.to(logits.scalar_type()).contiguous();
  const std::optional<at::Tensor> mask = contiguous_mask(mask_in);
  const int64_t B = logits.size(0), C = logits.size(1), S = logits.size(2) * logits.size(3), P = B * S;
  const ForwardBuffers out = forward_buffers(logits, /*partials_per_block=*/1);
  const int64_t nb = out.blocks;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "kl_loss_cuda", [&] {
    using acc_t = typename AccOf<scalar_t>::type;
    if (nb > 0) {
      kl_forward_kernel<scalar_t, acc_t><<<grid_size(nb, "kl_loss"), kThreads, 0, stream>>>(
          logits.data_ptr<scalar_t>(), target.data_ptr<scalar_t>(), mask ? mask->data_ptr<bool>() : nullptr, C, S,
          P, out.lse.data_ptr<acc_t>(), out.partial.data_ptr<double>(), out.counts.data_ptr<int64_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    kl_finalize_kernel<acc_t><<<1, kThreads, 0, stream>>>(out.partial.data_ptr<double>(),
                                                         out.counts.data_ptr<int64_t>(), nb, C,
                                                         out.loss.data_ptr<acc_t>(),
                                                         out.num_valid.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out.loss, out.lse, out.num_valid};
}

at::Tensor kl_loss_backward_cuda(const at::Tensor& grad_loss_in, const at::Tensor& logits_in,
                                 const at::Tensor& target_in, const std::optional<at::Tensor>& mask_in,
                                 const at::Tensor& lse_in, const at::Tensor& num_valid_in) {
  check_shapes("kl_loss_backward", logits_in, target_in, mask_in);
  TORCH_CHECK(lse_in.dim() == 3 && lse_in.size(0) == logits_in.size(0) && lse_in.size(1) == logits_in.size(2) &&
                  lse_in.size(2) == logits_in.size(3),
              "kl_loss_backward: lse [B, H, W]");
  const c10::cuda::CUDAGuard guard(logits_in.device());
  const at::Tensor logits = logits_in.contiguous();
  const at::Tensor target = target_in.to(logits.scalar_type()).contiguous();
  const std::optional<at::Tensor> mask = contiguous_mask(mask_in);
  // lse_in is not read: the kernel recomputes the max and the sum of the others from the logits
  const BackwardScalars in = backward_scalars(grad_loss_in, num_valid_in, logits, "kl_loss_backward");
  const int64_t B = logits.size(0), C = logits.size(1), S = logits.size(2) * logits.size(3), P = B * S;
  const Gradient grad = gradient_buffer(logits_in);
  if (P > 0 && C > 0) {
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "kl_loss_backward_cuda", [&] {
      using acc_t = typename AccOf<scalar_t>::type;
      kl_backward_kernel<scalar_t, acc_t>
          <<<grid_size((P + kThreads - 1) / kThreads, "kl_loss_backward"), kThreads, 0, stream>>>(
              logits.data_ptr<scalar_t>(), target.data_ptr<scalar_t>(), mask ? mask->data_ptr<bool>() : nullptr,
              in.grad_loss.data_ptr(), in.grad_double, in.num_valid.data_ptr<int64_t>(), C, S, P,
              grad.out.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return grad.finish();
}

}  // namespace

TORCH_LIBRARY_IMPL(udafast, CUDA, m) {
  m.impl("kl_loss", &kl_loss_cuda);
  m.impl("kl_loss_backward", &kl_loss_backward_cuda);
}
