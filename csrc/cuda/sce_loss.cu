// SPEC 1.4, symmetric cross-entropy (alpha CE + beta RCE + reg_weight REG) on CUDA.
//
// The numerics follow csrc/cpu/sce_loss.cpp term by term; only the parallel layout differs.
// Logits are NCHW (made contiguous), so the pixels of an image plane are contiguous for each class:
// one thread owns one pixel and walks its C classes with a stride of H * W elements, and the 32
// threads of a warp, owning 32 consecutive pixels, read 32 consecutive values of each class row.
//
// Forward (per pixel, as the CPU kernel): pass 1 the max over the classes, pass 2 exp(z - max),
// its sum, sum of (z - max), z_y - max, e_y and the sum of e over k != y; pass 3 (RCE, valid pixels
// only, skipped when beta == 0) the clamped p_k = e_k / sum over k != y, e_k recomputed (the same
// expression, so the same bits). Passes 2 and 3 re-read the pixel's logits from L1/L2.
// The forward writes the per-pixel log-sum-exp for the backward.
//
// Loss sums without float atomics and without a host sync: every block of kThreads threads owns
// kPixPerBlock consecutive pixels; a thread adds its pixels' terms in double, the block reduces
// them with a fixed shuffle tree into one partial per block (ce, rce, log p in double, the valid
// count in int64), and a one-block finalize kernel adds the partials in a fixed order and writes
// the loss and num_valid to device memory. The result is bitwise reproducible for a given shape.
//
// Backward, one thread per pixel, two passes over its logits: pass 1 e = exp(z - lse), their sum
// (which removes the rounding of the stored lse, as on the CPU), and the sums over the classes
// split by the clamp rule; pass 2 writes the gradient. grad_loss and num_valid are read from
// device memory by every thread (no .item()).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "fused_loss.cuh"

#include <cmath>
#include <cstdint>

namespace {

// Label dtypes, read through one kernel instantiation (a uniform branch per load).
enum LabelKind : int { kLabelU8 = 0, kLabelI8 = 1, kLabelI16 = 2, kLabelI32 = 3, kLabelI64 = 4 };

int label_kind(at::ScalarType type) {
  switch (type) {
    case at::kByte:
      return kLabelU8;
    case at::kChar:
      return kLabelI8;
    case at::kShort:
      return kLabelI16;
    case at::kInt:
      return kLabelI32;
    case at::kLong:
      return kLabelI64;
    default:
      TORCH_CHECK(false, "sce_loss: target must be of an integer dtype (uint8, int8, int16, int32, int64), got ",
                  type);
  }
  return kLabelI64;
}

// The class of pixel i: -1 for ignore_index and for labels outside [0, C), which with validation
// off must be skipped rather than used as an index.
__device__ __forceinline__ int64_t label_class(const void* __restrict__ target, int64_t i, int kind, int64_t C,
                                               int64_t ignore_index) {
  int64_t v;
  switch (kind) {
    case kLabelU8:
      v = static_cast<int64_t>(static_cast<const uint8_t*>(target)[i]);
      break;
    case kLabelI8:
      v = static_cast<int64_t>(static_cast<const int8_t*>(target)[i]);
      break;
    case kLabelI16:
      v = static_cast<int64_t>(static_cast<const int16_t*>(target)[i]);
      break;
    case kLabelI32:
      v = static_cast<int64_t>(static_cast<const int32_t*>(target)[i]);
      break;
    default:
      v = static_cast<const int64_t*>(target)[i];
      break;
  }
  return (v != ignore_index && v >= 0 && v < C) ? v : -1;
}

// Per block b: partial[b] = sum of -log p_y (valid pixels), partial[nb + b] = sum over valid pixels
// of sum_{k != y} clamp(p_k, 1e-7, 1), partial[2 nb + b] = sum of log p over all the pixels' classes;
// counts[b] = valid pixels. lse[pixel] = max + log(sum exp(z - max)).
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    sce_forward_kernel(const scalar_t* __restrict__ logits, const void* __restrict__ target, int kind,
                       int64_t ignore_index, int64_t C, int64_t S, int64_t P, int64_t nb, bool with_rce,
                       acc_t* __restrict__ lse, double* __restrict__ partial, int64_t* __restrict__ counts) {
  const acc_t lo = static_cast<acc_t>(1e-7);
  double sums[3] = {0.0, 0.0, 0.0};  // ce, rce, log p
  long long valid = 0;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kPixPerBlock + threadIdx.x;
  for (int k = 0; k < kPixPerThread; ++k) {
    const int64_t pixel = first + static_cast<int64_t>(k) * kThreads;
    if (pixel >= P) break;
    const int64_t b = pixel / S;
    const int64_t s = pixel - b * S;
    const scalar_t* z = logits + b * C * S + s;  // class c at z[c * S]
    const int64_t y = label_class(target, pixel, kind, C, ignore_index);

    // pass 1: max (NaN never selected, as the CPU's tile_max)
    acc_t mx = -static_cast<acc_t>(INFINITY);
    for (int64_t c = 0; c < C; ++c) {
      const acc_t v = static_cast<acc_t>(z[c * S]);
      mx = v > mx ? v : mx;
    }
    // pass 2: e = exp(z - max) and the sums of the CPU kernel
    acc_t sum = 0, zs = 0, zy = 0, ey = 0, others = 0;
    for (int64_t c = 0; c < C; ++c) {
      const acc_t d = static_cast<acc_t>(z[c * S]) - mx;
      const acc_t e = exp_acc(d);
      sum += e;
      zs += d;
      if (c == y) {
        zy = d;
        ey = e;
      } else {
        others += e;
      }
    }
    const acc_t ls = log_acc(sum);
    const acc_t inv = acc_t(1) / sum;
    lse[pixel] = mx + ls;
    if (y >= 0) {
      // -log p_y = log1p(x), x = sum_{k != y} p_k / p_y: a series where x is small, since
      // log(sum) - z_y rounds to 0 once p_y rounds to 1
      const acc_t x = others / ey;
      const acc_t series =
          x * (acc_t(1) - x * (acc_t(0.5) - x * (acc_t(1) / acc_t(3) - x * acc_t(0.25))));
      const acc_t ce = x < acc_t(1e-2) ? series : ls - zy;
      sums[0] += static_cast<double>(ce);
      // pass 3: RCE, sum_{k != y} clamp(p_k, 1e-7, 1)
      if (with_rce) {
        acc_t rce = 0;
        for (int64_t c = 0; c < C; ++c) {
          if (c == y) continue;
          const acc_t p = exp_acc(static_cast<acc_t>(z[c * S]) - mx) * inv;
          rce += p < lo ? lo : (p > acc_t(1) ? acc_t(1) : p);
        }
        sums[1] += static_cast<double>(rce);
      }
      ++valid;
    }
    // sum_c log p_c = sum_c (z_c - max) - C log(sum), over every pixel (REG)
    sums[2] += static_cast<double>(zs - static_cast<acc_t>(C) * ls);
  }
  block_sum<3>(sums, valid);
  if (threadIdx.x == 0) {
    partial[blockIdx.x] = sums[0];
    partial[nb + blockIdx.x] = sums[1];
    partial[2 * nb + blockIdx.x] = sums[2];
    counts[blockIdx.x] = static_cast<int64_t>(valid);
  }
}

// One block: adds the nb partials in a fixed order and writes the loss and num_valid, with the
// CPU kernel's formula (CE and RCE over n valid pixels, 0 when n == 0; REG over all elements).
template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    sce_finalize_kernel(const double* __restrict__ partial, const int64_t* __restrict__ counts, int64_t nb,
                        double alpha, double beta, double reg_weight, double rce_weight, int64_t elements,
                        acc_t* __restrict__ loss, int64_t* __restrict__ num_valid) {
  double sums[3] = {0.0, 0.0, 0.0};
  long long valid = 0;
  for (int64_t i = threadIdx.x; i < nb; i += kThreads) {
    sums[0] += partial[i];
    sums[1] += partial[nb + i];
    sums[2] += partial[2 * nb + i];
    valid += static_cast<long long>(counts[i]);
  }
  block_sum<3>(sums, valid);
  if (threadIdx.x == 0) {
    double out = 0.0;
    if (valid > 0) {
      const double n = static_cast<double>(valid);
      out += alpha * (sums[0] / n) + beta * (rce_weight * sums[1] / n);
    }
    // REG is a mean over every element; with no element it is left out (0) rather than NaN
    if (elements > 0) out += reg_weight * (-sums[2] / static_cast<double>(elements));
    *loss = static_cast<acc_t>(out);
    *num_valid = static_cast<int64_t>(valid);
  }
}

// Precision: as on the CPU, e = exp(z - lse) is divided by its sum over the classes (removing the
// rounding of the stored lse), and 1 - p_y, 1 - sum(kept p) are summed from the other classes' p
// instead of formed by subtraction:
//   dCE/dz_j  = p_j for j != y, and -(sum_{k != y} p_k) for j = y
//   dRCE/dz_j = A p_j (m_j - sum_k m_k p_k) = A p_j * (m_j ? sum_k (1 - m_k) p_k : -sum_k m_k p_k)
// with m_k = (k != y and 1e-7 <= p_k <= 1), the classes where torch.clamp passes the gradient.
// The mask is decided on e_k = exp(z_k - lse) >= 1e-7 (p_k <= 1 always holds), i.e. before the
// normalisation by the sum, which differs from 1 by the rounding of lse only (relative 1e-6 in
// float32): this lets the class sums be formed in the same pass as the normaliser. Both passes
// evaluate the same expression, so the mask is the same in both.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    sce_backward_kernel(const scalar_t* __restrict__ logits, const void* __restrict__ target, int kind,
                        int64_t ignore_index, const acc_t* __restrict__ lse, const void* __restrict__ grad_loss,
                        bool grad_loss_double, const int64_t* __restrict__ num_valid, double alpha, double beta,
                        double rce_weight, double reg_weight, int64_t elements, int64_t C, int64_t S, int64_t P,
                        scalar_t* __restrict__ grad) {
  const int64_t pixel = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (pixel >= P) return;
  const double go = grad_loss_double ? *static_cast<const double*>(grad_loss)
                                     : static_cast<double>(*static_cast<const float*>(grad_loss));
  const int64_t n = *num_valid;
  // CE and RCE are means over the n valid pixels (no gradient when n == 0), REG over all elements
  const double ce_scale = n > 0 ? go * alpha / static_cast<double>(n) : 0.0;
  const double rce_scale = n > 0 ? go * beta * rce_weight / static_cast<double>(n) : 0.0;
  const double reg_scale = elements > 0 ? -go * reg_weight / static_cast<double>(elements) : 0.0;

  const int64_t b = pixel / S;
  const int64_t s = pixel - b * S;
  const scalar_t* z = logits + b * C * S + s;
  scalar_t* out = grad + b * C * S + s;
  const int64_t y = label_class(target, pixel, kind, C, ignore_index);
  const acc_t lse_p = lse[pixel];
  const acc_t lo = static_cast<acc_t>(1e-7);

  // pass 1: e = exp(z - lse), the normaliser, and the sums over k != y, over kept and dropped k
  acc_t sum = 0, other = 0, kept = 0, dropped = 0;
  for (int64_t c = 0; c < C; ++c) {
    const acc_t e = exp_acc(static_cast<acc_t>(z[c * S]) - lse_p);
    sum += e;
    const bool keep = (c != y) && (e >= lo);
    if (c != y) other += e;
    if (keep) {
      kept += e;
    } else {
      dropped += e;
    }
  }
  const acc_t inv = acc_t(1) / sum;
  other *= inv;
  kept *= inv;
  dropped *= inv;

  const acc_t ce_s = y >= 0 ? static_cast<acc_t>(ce_scale) : acc_t(0);
  const acc_t rce_s = y >= 0 ? static_cast<acc_t>(rce_scale) : acc_t(0);
  const acc_t reg_s = static_cast<acc_t>(reg_scale);
  const acc_t Cs = static_cast<acc_t>(C);
  // pass 2: the gradient
  for (int64_t c = 0; c < C; ++c) {
    const acc_t e = exp_acc(static_cast<acc_t>(z[c * S]) - lse_p);
    const acc_t p = e * inv;
    const bool keep = (c != y) && (e >= lo);
    const acc_t ce = c == y ? -other : p;
    const acc_t rce = p * (keep ? dropped : -kept);
    out[c * S] = static_cast<scalar_t>(ce_s * ce + rce_s * rce + reg_s * (acc_t(1) - Cs * p));
  }
}

// -log(1e-4): the RCE weight of every non-target class, log(clamp(onehot, 1e-4, 1)) = log(1e-4)
double rce_weight() { return -std::log(1e-4); }

void check_shapes(const char* op, const at::Tensor& logits, const at::Tensor& target) {
  TORCH_CHECK(logits.dim() == 4 && target.dim() == 3, op, ": logits [B, C, H, W], target [B, H, W]");
  TORCH_CHECK(target.size(0) == logits.size(0) && target.size(1) == logits.size(2) &&
                  target.size(2) == logits.size(3),
              op, ": target must be [B, H, W] of logits [B, C, H, W]");
  TORCH_CHECK(logits.is_cuda() && target.device() == logits.device(), op,
              ": logits and target must be on the same CUDA device");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sce_loss_cuda(const at::Tensor& logits_in, const at::Tensor& target_in,
                                                            double alpha, double beta, double reg_weight,
                                                            int64_t ignore_index) {
  check_shapes("sce_loss", logits_in, target_in);
  const c10::cuda::CUDAGuard guard(logits_in.device());
  const at::Tensor logits = logits_in.contiguous();
  const at::Tensor target = target_in.contiguous();
  const int kind = label_kind(target.scalar_type());
  const int64_t B = logits.size(0), C = logits.size(1), S = logits.size(2) * logits.size(3), P = B * S;
  const ForwardBuffers out = forward_buffers(logits, /*partials_per_block=*/3);
  const int64_t nb = out.blocks;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "sce_loss_cuda", [&] {
    using acc_t = typename AccOf<scalar_t>::type;
    if (nb > 0) {
      sce_forward_kernel<scalar_t, acc_t><<<grid_size(nb, "sce_loss"), kThreads, 0, stream>>>(
          logits.data_ptr<scalar_t>(), target.data_ptr(), kind, ignore_index, C, S, P, nb, beta != 0.0,
          out.lse.data_ptr<acc_t>(), out.partial.data_ptr<double>(), out.counts.data_ptr<int64_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    sce_finalize_kernel<acc_t><<<1, kThreads, 0, stream>>>(out.partial.data_ptr<double>(),
                                                          out.counts.data_ptr<int64_t>(), nb, alpha, beta,
                                                          reg_weight, rce_weight(), logits.numel(),
                                                          out.loss.data_ptr<acc_t>(),
                                                          out.num_valid.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out.loss, out.lse, out.num_valid};
}

at::Tensor sce_loss_backward_cuda(const at::Tensor& grad_loss_in, const at::Tensor& logits_in,
                                  const at::Tensor& target_in, const at::Tensor& lse_in,
                                  const at::Tensor& num_valid_in, double alpha, double beta, double reg_weight,
                                  int64_t ignore_index) {
  check_shapes("sce_loss_backward", logits_in, target_in);
  TORCH_CHECK(lse_in.dim() == 3 && lse_in.sizes() == target_in.sizes(), "sce_loss_backward: lse [B, H, W]");
  const c10::cuda::CUDAGuard guard(logits_in.device());
  const at::Tensor logits = logits_in.contiguous();
  const at::Tensor target = target_in.contiguous();
  const int kind = label_kind(target.scalar_type());
  const at::Tensor lse = lse_in.to(logits.device(), acc_dtype(logits.scalar_type())).contiguous();
  const BackwardScalars in = backward_scalars(grad_loss_in, num_valid_in, logits, "sce_loss_backward");
  const int64_t B = logits.size(0), C = logits.size(1), S = logits.size(2) * logits.size(3), P = B * S;
  const Gradient grad = gradient_buffer(logits_in);
  if (P > 0 && C > 0) {
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "sce_loss_backward_cuda", [&] {
      using acc_t = typename AccOf<scalar_t>::type;
      sce_backward_kernel<scalar_t, acc_t>
          <<<grid_size((P + kThreads - 1) / kThreads, "sce_loss_backward"), kThreads, 0, stream>>>(
              logits.data_ptr<scalar_t>(), target.data_ptr(), kind, ignore_index, lse.data_ptr<acc_t>(),
              in.grad_loss.data_ptr(), in.grad_double, in.num_valid.data_ptr<int64_t>(), alpha, beta, rce_weight(),
              reg_weight, logits.numel(), C, S, P, grad.out.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return grad.finish();
}

}  // namespace

TORCH_LIBRARY_IMPL(udafast, CUDA, m) {
  m.impl("sce_loss", &sce_loss_cuda);
  m.impl("sce_loss_backward", &sce_loss_backward_cuda);
}
