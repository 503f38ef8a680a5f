// SPEC 1.4, symmetric cross-entropy (alpha CE + beta RCE + reg_weight REG) on the CPU.
//
// Forward and backward each read the logits once. The pixels of an image plane (contiguous in
// NCHW) are cut into tiles of kTile pixels; for a tile the C class rows (kTile values each) stay
// in cache while the loops over classes compute the max, the sum of exp and the per-class terms,
// vectorised over the pixels of the tile. The forward returns the per-pixel log-sum-exp so that
// the backward recomputes p = exp(z - lse) without a stored softmax.
//
// Loss sums: per-pixel terms in the logits' dtype, summed in double per fixed chunk of kChunk
// pixels, and the chunk partials added in chunk order, so the result is bitwise the same for any
// thread count.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "vec_math.h"

namespace {

using udafast::tiles::for_each_tile;
using udafast::tiles::Geometry;
using udafast::tiles::kTile;
using udafast::vec::select;

// -log(1e-4): the RCE weight of every non-target class, log(clamp(onehot, 1e-4, 1)) = log(1e-4)
const double kRceWeight = -std::log(1e-4);

// Class indices of n consecutive labels as int32: -1 for ignore_index and for labels outside
// [0, C), which with validation off must be skipped rather than used as an index.
template <typename label_t>
void load_labels_typed(const void* labels, int64_t offset, int64_t n, int64_t C, int64_t ignore_index,
                       int32_t* out) {
  const label_t* y = static_cast<const label_t*>(labels) + offset;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t v = static_cast<int64_t>(y[i]);
    out[i] = (v != ignore_index && v >= 0 && v < C) ? static_cast<int32_t>(v) : -1;
  }
}

using LabelLoader = void (*)(const void*, int64_t, int64_t, int64_t, int64_t, int32_t*);

LabelLoader label_loader(at::ScalarType type) {
  LabelLoader loader = nullptr;
  AT_DISPATCH_INTEGRAL_TYPES(type, "sce_loss_labels", [&] { loader = &load_labels_typed<scalar_t>; });
  return loader;
}

struct ForwardSums {
  double ce = 0, rce = 0, log_p = 0;  // sums of -log p_y, of clamped p_k (k != y), of log p
  int64_t valid = 0;
};

template <typename scalar_t>
void sce_forward_kernel(const scalar_t* logits, const void* target, LabelLoader load, int64_t ignore_index,
                        const Geometry& g, scalar_t* lse, std::vector<ForwardSums>& partial) {
  const int64_t C = g.C, S = g.S;
  const scalar_t lo = static_cast<scalar_t>(1e-7);
  // e: exp(z - max) of the tile's C rows, reused for the RCE term
  udafast::tiles::parallel_chunks<scalar_t>(g, [&](int64_t chunk, scalar_t* e) {
    alignas(64) scalar_t mx[kTile], sum[kTile], zs[kTile], zy[kTile], ey[kTile], others[kTile], ls[kTile], inv[kTile],
        rce[kTile];
    alignas(64) int32_t y[kTile];
    ForwardSums acc;
    for_each_tile(g, chunk, [&](int64_t b, int64_t s0, int64_t n) {
      const scalar_t* z = logits + b * C * S + s0;
      load(target, b * S + s0, n, C, ignore_index, y);
      udafast::vec::tile_max(z, C, S, n, mx);
      for (int64_t i = 0; i < n; ++i) sum[i] = zs[i] = zy[i] = ey[i] = others[i] = rce[i] = 0;
      for (int32_t c = 0; c < C; ++c) {
        const scalar_t* row = z + c * S;
        scalar_t* ec = e + c * kTile;
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) {
          const scalar_t d = row[i] - mx[i];
          ec[i] = udafast::vec::exp(d);
          sum[i] += ec[i];
          zs[i] += d;
          zy[i] += select(c == y[i], d, scalar_t(0));
          ey[i] += select(c == y[i], ec[i], scalar_t(0));
          others[i] += select(c != y[i], ec[i], scalar_t(0));
        }
      }
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) {
        ls[i] = udafast::vec::log(sum[i]);
        inv[i] = scalar_t(1) / sum[i];
      }
      for (int32_t c = 0; c < C; ++c) {
        const scalar_t* ec = e + c * kTile;
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) {
          const scalar_t p = ec[i] * inv[i];
          const scalar_t clamped = select(p < lo, lo, select(p > scalar_t(1), scalar_t(1), p));
          rce[i] += select(c != y[i], clamped, scalar_t(0));
        }
      }
      double ce_sum = 0, rce_sum = 0, log_p_sum = 0;
      int32_t valid = 0;
#pragma omp simd reduction(+ : ce_sum, rce_sum, log_p_sum, valid)
      for (int64_t i = 0; i < n; ++i) {
        const bool v = y[i] >= 0;
        lse[b * S + s0 + i] = mx[i] + ls[i];
        // -log p_y = log1p(x), x = sum_{k != y} p_k / p_y: a series where x is small, since
        // log(sum) - z_y rounds to 0 once p_y rounds to 1
        const scalar_t x = others[i] / ey[i];
        const scalar_t series = x * (scalar_t(1) - x * (scalar_t(0.5) - x * (scalar_t(1) / 3 - x * scalar_t(0.25))));
        const scalar_t ce = select(x < scalar_t(1e-2), series, ls[i] - zy[i]);
        ce_sum += static_cast<double>(select(v, ce, scalar_t(0)));
        rce_sum += static_cast<double>(select(v, rce[i], scalar_t(0)));
        log_p_sum += static_cast<double>(zs[i] - static_cast<scalar_t>(C) * ls[i]);
        valid += v ? 1 : 0;
      }
      acc.ce += ce_sum;
      acc.rce += rce_sum;
      acc.log_p += log_p_sum;
      acc.valid += valid;
    });
    partial[chunk] = acc;
  });
}

// Precision (float32): exp(z - lse) carries the rounding of the stored lse, a relative error of
// up to |lse| * 2^-24 common to the pixel's classes; dividing by the sum of these values removes
// it. The differences 1 - p_y and 1 - sum(kept p) are not formed by subtraction (they cancel when
// a pixel is confident) but summed from the other classes' p:
//   dCE/dz_j  = p_j for j != y, and -(sum_{k != y} p_k) for j = y
//   dRCE/dz_j = A p_j (m_j - sum_k m_k p_k) = A p_j * (m_j ? sum_k (1 - m_k) p_k : -sum_k m_k p_k)
// with m_k = (k != y and 1e-7 <= p_k <= 1), the classes where torch.clamp passes the gradient.
template <typename scalar_t>
void sce_backward_kernel(const scalar_t* logits, const void* target, LabelLoader load, int64_t ignore_index,
                         const scalar_t* lse, const Geometry& g, double ce_scale, double rce_scale,
                         double reg_scale, scalar_t* grad) {
  const int64_t C = g.C, S = g.S;
  const scalar_t lo = static_cast<scalar_t>(1e-7);
  const scalar_t reg_s = static_cast<scalar_t>(reg_scale), Cs = static_cast<scalar_t>(C);
  // prob: p of the tile's C rows
  udafast::tiles::parallel_chunks<scalar_t>(g, [&](int64_t chunk, scalar_t* prob) {
    alignas(64) scalar_t lse_t[kTile], sum[kTile], inv[kTile], other[kTile], kept[kTile], dropped[kTile];
    alignas(64) scalar_t ce_s[kTile], rce_s[kTile];
    alignas(64) int32_t y[kTile];
    for_each_tile(g, chunk, [&](int64_t b, int64_t s0, int64_t n) {
      const scalar_t* z = logits + b * C * S + s0;
      scalar_t* out = grad + b * C * S + s0;
      load(target, b * S + s0, n, C, ignore_index, y);
      for (int64_t i = 0; i < n; ++i) {
        lse_t[i] = lse[b * S + s0 + i];
        sum[i] = other[i] = kept[i] = dropped[i] = 0;
        ce_s[i] = y[i] >= 0 ? static_cast<scalar_t>(ce_scale) : scalar_t(0);
        rce_s[i] = y[i] >= 0 ? static_cast<scalar_t>(rce_scale) : scalar_t(0);
      }
      for (int64_t c = 0; c < C; ++c) {
        const scalar_t* row = z + c * S;
        scalar_t* pc = prob + c * kTile;
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) {
          pc[i] = udafast::vec::exp(row[i] - lse_t[i]);
          sum[i] += pc[i];
        }
      }
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) inv[i] = scalar_t(1) / sum[i];
      for (int32_t c = 0; c < C; ++c) {
        scalar_t* pc = prob + c * kTile;
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) {
          const scalar_t p = pc[i] * inv[i];
          pc[i] = p;
          const bool keep = (c != y[i]) & (p >= lo) & (p <= scalar_t(1));
          other[i] += select(c != y[i], p, scalar_t(0));
          kept[i] += select(keep, p, scalar_t(0));
          dropped[i] += select(keep, scalar_t(0), p);
        }
      }
      for (int32_t c = 0; c < C; ++c) {
        const scalar_t* pc = prob + c * kTile;
        scalar_t* oc = out + c * S;
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) {
          const scalar_t p = pc[i];
          const bool keep = (c != y[i]) & (p >= lo) & (p <= scalar_t(1));
          const scalar_t ce = select(c == y[i], -other[i], p);
          const scalar_t rce = p * select(keep, dropped[i], -kept[i]);
          oc[i] = ce_s[i] * ce + rce_s[i] * rce + reg_s * (scalar_t(1) - Cs * p);
        }
      }
    });
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sce_loss_cpu(const at::Tensor& logits_in, const at::Tensor& target_in,
                                                           double alpha, double beta, double reg_weight,
                                                           int64_t ignore_index) {
  TORCH_CHECK(logits_in.dim() == 4 && target_in.dim() == 3, "sce_loss: logits [B, C, H, W], target [B, H, W]");
  const at::Tensor logits = logits_in.contiguous();
  const at::Tensor target = target_in.contiguous();
  const Geometry g{logits.size(0), logits.size(1), logits.size(2) * logits.size(3)};
  at::Tensor lse = at::empty({logits.size(0), logits.size(2), logits.size(3)}, logits.options());
  std::vector<ForwardSums> partial(g.chunks());
  const LabelLoader load = label_loader(target.scalar_type());
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "sce_loss", [&] {
    sce_forward_kernel<scalar_t>(logits.data_ptr<scalar_t>(), target.data_ptr(), load, ignore_index, g,
                                 lse.data_ptr<scalar_t>(), partial);
  });
  ForwardSums total;
  for (const ForwardSums& p : partial) {
    total.ce += p.ce;
    total.rce += p.rce;
    total.log_p += p.log_p;
    total.valid += p.valid;
  }
  double loss = 0;
  if (total.valid > 0) {
    const double n = static_cast<double>(total.valid);
    loss += alpha * (total.ce / n) + beta * (kRceWeight * total.rce / n);
  }
  // REG is a mean over every element; with no element it is left out (0) rather than NaN
  const int64_t elements = logits.numel();
  if (elements > 0) loss += reg_weight * (-total.log_p / static_cast<double>(elements));
  return {at::scalar_tensor(loss, logits.options()), lse,
          at::scalar_tensor(total.valid, logits.options().dtype(at::kLong))};
}

at::Tensor sce_loss_backward_cpu(const at::Tensor& grad_loss, const at::Tensor& logits_in, const at::Tensor& target_in,
                                 const at::Tensor& lse_in, const at::Tensor& num_valid, double alpha, double beta,
                                 double reg_weight, int64_t ignore_index) {
  TORCH_CHECK(logits_in.dim() == 4 && target_in.dim() == 3 && lse_in.dim() == 3,
              "sce_loss_backward: logits [B, C, H, W], target and lse [B, H, W]");
  const at::Tensor logits = logits_in.contiguous();
  const at::Tensor target = target_in.contiguous();
  const at::Tensor lse = lse_in.to(logits.scalar_type()).contiguous();
  const Geometry g{logits.size(0), logits.size(1), logits.size(2) * logits.size(3)};
  const double go = grad_loss.item<double>();
  const int64_t n = num_valid.item<int64_t>();
  // CE and RCE are means over the n valid pixels (no gradient when n == 0), REG over all elements
  const double ce_scale = n > 0 ? go * alpha / static_cast<double>(n) : 0.0;
  const double rce_scale = n > 0 ? go * beta * kRceWeight / static_cast<double>(n) : 0.0;
  const double reg_scale = logits.numel() > 0 ? -go * reg_weight / static_cast<double>(logits.numel()) : 0.0;
  // the gradient takes the logits' layout (as the fake kernel's empty_like); the kernel writes NCHW
  at::Tensor grad = at::empty_like(logits_in);
  at::Tensor out = grad.is_contiguous() ? grad : at::empty_like(logits);
  udafast::tiles::advise_huge_pages(out);
  const LabelLoader load = label_loader(target.scalar_type());
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "sce_loss_backward", [&] {
    sce_backward_kernel<scalar_t>(logits.data_ptr<scalar_t>(), target.data_ptr(), load, ignore_index,
                                  lse.data_ptr<scalar_t>(), g, ce_scale, rce_scale, reg_scale,
                                  out.data_ptr<scalar_t>());
  });
  if (!out.is_same(grad)) grad.copy_(out);
  return grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(udafast, CPU, m) {
  m.impl("sce_loss", &sce_loss_cpu);
  m.impl("sce_loss_backward", &sce_loss_backward_cpu);
}
