// SPEC 1.4, KL(target || softmax(logits)) over valid pixels on the CPU.
//
// Same layout as sce_loss.cpp: tiles of kTile pixels of an image plane, the C class rows of a
// tile cache-resident, loops over classes vectorised over the tile's pixels.
//
// Saturated pixels (as kernels/kl_loss.py): with m the pixel's max and e_c = exp(z_c - m),
// others = sum of e_c over the classes below the max (ties beyond the first max included: the
// first max is left out once) is summed directly, never formed as sum(e) - 1, and
// log(sum(e)) = log1p(others) is evaluated accurately for small others. log(sum(e)) itself rounds
// to 0 in float32 once the top probability rounds to 1 (a gap of about 17 between the top logit and
// the rest; the relative error passes 1e-5 from a gap of about 6), and the KL of a target on the
// top class is about `others`. The backward recomputes m and e from the logits (it does not read
// the forward's lse) and forms q_j T - t_j at the max without the cancelling difference.
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

// log1p(x) for x >= 0 (or NaN) as log(u) * x / (u - 1), u = 1 + x (Goldberg's formula: u - 1 is
// exact, and the rounding of u cancels in log(u) / (u - 1)); x where u rounds to 1. Within 1.5 ulp
// in float and double (measured against long double log1p over [1e-20, 100]), vectorised with the
// log of vec_math.h.
template <typename T>
inline __attribute__((always_inline)) T log1p_nonneg(T x) {
  const T u = T(1) + x;
  const T ratio = x / (u - T(1));  // 0 / 0 where u == 1: not selected
  return select(u == T(1), x, udafast::vec::log(u) * ratio);
}

template <typename scalar_t>
void kl_forward_kernel(const scalar_t* logits, const scalar_t* target, const bool* mask, const Geometry& g,
                       scalar_t* lse, std::vector<ForwardSums>& partial) {
  const int64_t C = g.C, S = g.S;
  udafast::tiles::parallel_chunks<scalar_t>(g, [&](int64_t chunk, scalar_t*) {
    alignas(64) scalar_t mx[kTile], others[kTile], found[kTile], ls[kTile], kl[kTile];
    alignas(64) bool valid[kTile];
    ForwardSums acc;
    for_each_tile(g, chunk, [&](int64_t b, int64_t s0, int64_t n) {
      const scalar_t* z = logits + b * C * S + s0;
      const scalar_t* t = target + b * C * S + s0;
      load_mask(mask, b * S + s0, n, valid);
      udafast::vec::tile_max(z, C, S, n, mx);
      for (int64_t i = 0; i < n; ++i) others[i] = found[i] = kl[i] = 0;
      // others = sum of exp(z - max) without the first max (found: 1 once it has been met). An
      // all-NaN or +inf pixel has d = NaN, so others and the KL are NaN, as with the plain sum.
      for (int64_t c = 0; c < C; ++c) {
        const scalar_t* row = z + c * S;
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) {
          const scalar_t d = row[i] - mx[i];
          const bool first = (d == scalar_t(0)) & (found[i] == scalar_t(0));
          others[i] += select(first, scalar_t(0), udafast::vec::exp(d));
          found[i] = select(d == scalar_t(0), scalar_t(1), found[i]);
        }
      }
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) ls[i] = log1p_nonneg(others[i]);  // log(sum exp(z - max))
      // t (log t - log q), log q = (z - max) - log1p(others); t log t = 0 where t == 0
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

// dKL/dz_j = s (q_j T - t_j), T = sum_c t_c (the targets need not sum to 1), from max and e =
// exp(z - max) recomputed from the logits as in the forward (the forward's lse is not read; its
// rounding would enter q). sum(e) = 1 + others. Below the max, q_j T - t_j = e_j (T / sum) - t_j.
// At the max (e_j = 1) the difference would cancel once q_j rounds to 1; it is formed as
// ((T - t_j) - t_j others) / sum, T - t_j summed from the other classes: t_rest (the classes below
// the max) + (t_top - t_j) (t_top: the classes at the max, ties included), as kernels/kl_loss.py.
template <typename scalar_t>
void kl_backward_kernel(const scalar_t* logits, const scalar_t* target, const bool* mask, const Geometry& g,
                        double scale, scalar_t* grad) {
  const int64_t C = g.C, S = g.S;
  const scalar_t s = static_cast<scalar_t>(scale);
  // e: exp(z - max) of the tile's C rows
  udafast::tiles::parallel_chunks<scalar_t>(g, [&](int64_t chunk, scalar_t* e) {
    alignas(64) scalar_t mx[kTile], others[kTile], found[kTile], t_rest[kTile], t_top[kTile], inv[kTile],
        ratio[kTile], keep[kTile];
    alignas(64) bool valid[kTile];
    for_each_tile(g, chunk, [&](int64_t b, int64_t s0, int64_t n) {
      const scalar_t* z = logits + b * C * S + s0;
      const scalar_t* t = target + b * C * S + s0;
      scalar_t* out = grad + b * C * S + s0;
      load_mask(mask, b * S + s0, n, valid);
      udafast::vec::tile_max(z, C, S, n, mx);
      for (int64_t i = 0; i < n; ++i) {
        others[i] = found[i] = t_rest[i] = t_top[i] = 0;
        keep[i] = valid[i] ? scalar_t(1) : scalar_t(0);  // the mask in the gradient's width: the loop vectorises
      }
      for (int64_t c = 0; c < C; ++c) {
        const scalar_t* row = z + c * S;
        const scalar_t* tc = t + c * S;
        scalar_t* ec = e + c * kTile;
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) {
          const scalar_t d = row[i] - mx[i];
          const bool top = d == scalar_t(0);
          const bool first = top & (found[i] == scalar_t(0));
          ec[i] = udafast::vec::exp(d);
          others[i] += select(first, scalar_t(0), ec[i]);
          found[i] = select(top, scalar_t(1), found[i]);
          t_rest[i] += select(top, scalar_t(0), tc[i]);
          t_top[i] += select(top, tc[i], scalar_t(0));
        }
      }
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) {
        inv[i] = scalar_t(1) / (scalar_t(1) + others[i]);
        ratio[i] = (t_rest[i] + t_top[i]) * inv[i];  // T / sum
      }
      for (int64_t c = 0; c < C; ++c) {
        const scalar_t* row = z + c * S;
        const scalar_t* ec = e + c * kTile;
        const scalar_t* tc = t + c * S;
        scalar_t* oc = out + c * S;
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) {
          const bool top = (row[i] - mx[i]) == scalar_t(0);
          const scalar_t below = ec[i] * ratio[i] - tc[i];
          const scalar_t at_max = ((t_rest[i] + (t_top[i] - tc[i])) - tc[i] * others[i]) * inv[i];
          oc[i] = select(keep[i] != scalar_t(0), s * select(top, at_max, below), scalar_t(0));
        }
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
  const Geometry g{logits.size(0), logits.size(1), logits.size(2) * logits.size(3)};
  const double denominator = static_cast<double>(num_valid.item<int64_t>()) * static_cast<double>(g.C);
  const double scale = denominator > 0 ? grad_loss.item<double>() / denominator : 0.0;
  // the gradient takes the logits' layout (as the fake kernel's empty_like); the kernel writes NCHW
  at::Tensor grad = at::empty_like(logits_in);
  at::Tensor out = grad.is_contiguous() ? grad : at::empty_like(logits);
  udafast::tiles::advise_huge_pages(out);
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "kl_loss_backward", [&] {
    kl_backward_kernel<scalar_t>(logits.data_ptr<scalar_t>(), target.data_ptr<scalar_t>(),
                                 mask ? mask->data_ptr<bool>() : nullptr, g, scale, out.data_ptr<scalar_t>());
  });
  if (!out.is_same(grad)) grad.copy_(out);
  return grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(udafast, CPU, m) {
  m.impl("kl_loss", &kl_loss_cpu);
  m.impl("kl_loss_backward", &kl_loss_backward_cpu);
}
