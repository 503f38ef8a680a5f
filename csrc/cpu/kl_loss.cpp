// SPEC 1.4, KL(target || softmax(logits)) over valid pixels on the CPU.
//
// Same layout as sce_loss.cpp: tiles of kTile pixels of an image plane, the C class rows of a
// tile cache-resident, loops over classes vectorised over the tile's pixels. The forward returns the
// per-pixel log-sum-exp, so the backward recomputes q = exp(z - lse) in one pass.
//
// Loss sum: per-pixel KL in the logits' dtype, summed in double per fixed chunk of kChunk pixels,
// the chunk partials added in chunk order (bitwise the same for any thread count).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <vector>

#include "vec_math.h"

namespace {

using udafast::tiles::for_each_tile;
using udafast::tiles::Geometry;
using udafast::tiles::kTile;
using udafast::vec::select;


// valid[i] of a tile: the mask's value, or true without a mask
void load_mask(const bool* mask, int64_t offset, int64_t n, bool* valid) {
  for (int64_t i = 0; i < n; ++i) valid[i] = mask == nullptr || mask[offset + i];
}

struct ForwardSums {
  double kl = 0;
  int64_t valid = 0;
};

template <typename scalar_t>
void kl_forward_kernel(const scalar_t* logits, const scalar_t* target, const bool* mask, const Geometry& g,
                       scalar_t* lse, std::vector<ForwardSums>& partial) {
  const int64_t C = g.C, S = g.S;
  udafast::tiles::parallel_chunks<scalar_t>(g, [&](int64_t chunk, scalar_t*) {
    alignas(64) scalar_t mx[kTile], sum[kTile], ls[kTile], kl[kTile];
    alignas(64) bool valid[kTile];
    ForwardSums acc;
    for_each_tile(g, chunk, [&](int64_t b, int64_t s0, int64_t n) {
      const scalar_t* z = logits + b * C * S + s0;
      const scalar_t* t = target + b * C * S + s0;
      load_mask(mask, b * S + s0, n, valid);
      udafast::vec::tile_max(z, C, S, n, mx);
      for (int64_t i = 0; i < n; ++i) sum[i] = kl[i] = 0;
      for (int64_t c = 0; c < C; ++c) {
        const scalar_t* row = z + c * S;
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) sum[i] += udafast::vec::exp(row[i] - mx[i]);
      }
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) ls[i] = udafast::vec::log(sum[i]);
      // t (log t - log q), log q = (z - max) - log(sum); t log t = 0 where t == 0
      for (int64_t c = 0; c < C; ++c) {
        const scalar_t* row = z + c * S;
        const scalar_t* tc = t + c * S;
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) {
          const scalar_t log_q = (row[i] - mx[i]) - ls[i];
          const scalar_t term = tc[i] * (udafast::vec::log(tc[i]) - log_q);
          kl[i] += select(tc[i] == scalar_t(0), scalar_t(0), term);
        }
      }
      double kl_sum = 0;
      int32_t count = 0;
#pragma omp simd reduction(+ : kl_sum, count)
      for (int64_t i = 0; i < n; ++i) {
        lse[b * S + s0 + i] = mx[i] + ls[i];
        kl_sum += static_cast<double>(select(valid[i], kl[i], scalar_t(0)));
        count += valid[i] ? 1 : 0;
      }
      acc.kl += kl_sum;
      acc.valid += count;
    });
    partial[chunk] = acc;
  });
}

// q = exp(z - lse) divided by its sum over the classes: the division removes the rounding of the
// stored lse (a relative error of up to |lse| * 2^-24 in float32, common to the pixel's classes).
template <typename scalar_t>
void kl_backward_kernel(const scalar_t* logits, const scalar_t* target, const bool* mask, const scalar_t* lse,
                        const Geometry& g, double scale, scalar_t* grad) {
  const int64_t C = g.C, S = g.S;
  const scalar_t s = static_cast<scalar_t>(scale);
  // prob: exp(z - lse) of the tile's C rows
  udafast::tiles::parallel_chunks<scalar_t>(g, [&](int64_t chunk, scalar_t* prob) {
    alignas(64) scalar_t lse_t[kTile], sum[kTile], total[kTile];
    alignas(64) bool valid[kTile];
    for_each_tile(g, chunk, [&](int64_t b, int64_t s0, int64_t n) {
      const scalar_t* z = logits + b * C * S + s0;
      const scalar_t* t = target + b * C * S + s0;
      scalar_t* out = grad + b * C * S + s0;
      load_mask(mask, b * S + s0, n, valid);
      for (int64_t i = 0; i < n; ++i) {
        lse_t[i] = lse[b * S + s0 + i];
        sum[i] = total[i] = 0;
      }
      // total = sum_c t_c: the targets need not sum to 1
      for (int64_t c = 0; c < C; ++c) {
        const scalar_t* row = z + c * S;
        const scalar_t* tc = t + c * S;
        scalar_t* qc = prob + c * kTile;
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) {
          qc[i] = udafast::vec::exp(row[i] - lse_t[i]);
          sum[i] += qc[i];
          total[i] += tc[i];
        }
      }
      // q_j * total = exp(z_j - lse) * (total / sum): the normalisation folded into one factor
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) total[i] = total[i] / sum[i];
      for (int64_t c = 0; c < C; ++c) {
        const scalar_t* qc = prob + c * kTile;
        const scalar_t* tc = t + c * S;
        scalar_t* oc = out + c * S;
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) oc[i] = select(valid[i], s * (qc[i] * total[i] - tc[i]), scalar_t(0));
      }
    });
  });
}

// The mask as a contiguous bool tensor; none when every pixel is valid.
std::optional<at::Tensor> contiguous_mask(const std::optional<at::Tensor>& mask) {
  if (!mask.has_value()) return std::nullopt;
  TORCH_CHECK(mask->scalar_type() == at::kBool, "kl_loss: valid_mask must be bool");
  return mask->contiguous();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> kl_loss_cpu(const at::Tensor& logits_in, const at::Tensor& target_in,
                                                          const std::optional<at::Tensor>& mask_in) {
  TORCH_CHECK(logits_in.dim() == 4 && target_in.sizes() == logits_in.sizes(),
              "kl_loss: logits and target_probs [B, C, H, W]");
  const at::Tensor logits = logits_in.contiguous();
  const at::Tensor target = target_in.to(logits.scalar_type()).contiguous();
  const std::optional<at::Tensor> mask = contiguous_mask(mask_in);
  const Geometry g{logits.size(0), logits.size(1), logits.size(2) * logits.size(3)};
  at::Tensor lse = at::empty({logits.size(0), logits.size(2), logits.size(3)}, logits.options());
  std::vector<ForwardSums> partial(g.chunks());
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "kl_loss", [&] {
    kl_forward_kernel<scalar_t>(logits.data_ptr<scalar_t>(), target.data_ptr<scalar_t>(),
                                mask ? mask->data_ptr<bool>() : nullptr, g, lse.data_ptr<scalar_t>(), partial);
  });
  ForwardSums total;
  for (const ForwardSums& p : partial) {
    total.kl += p.kl;
    total.valid += p.valid;
  }
  const double denominator = static_cast<double>(total.valid) * static_cast<double>(g.C);
  const double loss = denominator > 0 ? total.kl / denominator : 0.0;
  return {at::scalar_tensor(loss, logits.options()), lse,
          at::scalar_tensor(total.valid, logits.options().dtype(at::kLong))};
}

at::Tensor kl_loss_backward_cpu(const at::Tensor& grad_loss, const at::Tensor& logits_in, const at::Tensor& target_in,
                                const std::optional<at::Tensor>& mask_in, const at::Tensor& lse_in,
                                const at::Tensor& num_valid) {
  TORCH_CHECK(logits_in.dim() == 4 && target_in.sizes() == logits_in.sizes() && lse_in.dim() == 3,
              "kl_loss_backward: logits and target_probs [B, C, H, W], lse [B, H, W]");
  const at::Tensor logits = logits_in.contiguous();
  const at::Tensor target = target_in.to(logits.scalar_type()).contiguous();
  const std::optional<at::Tensor> mask = contiguous_mask(mask_in);
  const at::Tensor lse = lse_in.to(logits.scalar_type()).contiguous();
  const Geometry g{logits.size(0), logits.size(1), logits.size(2) * logits.size(3)};
  const double denominator = static_cast<double>(num_valid.item<int64_t>()) * static_cast<double>(g.C);
  const double scale = denominator > 0 ? grad_loss.item<double>() / denominator : 0.0;
  // the gradient takes the logits' layout (as the fake kernel's empty_like); the kernel writes NCHW
  at::Tensor grad = at::empty_like(logits_in);
  at::Tensor out = grad.is_contiguous() ? grad : at::empty_like(logits);
  udafast::tiles::advise_huge_pages(out);
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "kl_loss_backward", [&] {
    kl_backward_kernel<scalar_t>(logits.data_ptr<scalar_t>(), target.data_ptr<scalar_t>(),
                                 mask ? mask->data_ptr<bool>() : nullptr, lse.data_ptr<scalar_t>(), g, scale,
                                 out.data_ptr<scalar_t>());
  });
  if (!out.is_same(grad)) grad.copy_(out);
  return grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(udafast, CPU, m) {
  m.impl("kl_loss", &kl_loss_cpu);
  m.impl("kl_loss_backward", &kl_loss_backward_cpu);
}
