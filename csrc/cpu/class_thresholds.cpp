// SPEC 1.1 on the CPU: exact class thresholds by radix selection, the streaming class
// histogram, and CBST pseudo-labels.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <type_traits>
#include <vector>

namespace {

// Unsigned keys that order like the floats they come from: flip the sign bit of non-negative
// values, all bits of negative ones. -0.0 is canonicalised to +0.0 (they are equal values).
template <typename scalar_t>
using key_t = std::conditional_t<sizeof(scalar_t) == 4, uint32_t, uint64_t>;

template <typename scalar_t>
inline key_t<scalar_t> to_key(scalar_t x) {
  using U = key_t<scalar_t>;
  constexpr U sign = U(1) << (8 * sizeof(U) - 1);
  U u;
  std::memcpy(&u, &x, sizeof(U));
  if (u == sign) u = 0;
  return (u & sign) ? U(~u) : U(u | sign);
}

template <typename scalar_t>
inline scalar_t from_key(key_t<scalar_t> key) {
  using U = key_t<scalar_t>;
  constexpr U sign = U(1) << (8 * sizeof(U) - 1);
  U u = (key & sign) ? U(key & ~sign) : U(~key);
  scalar_t x;
  std::memcpy(&x, &u, sizeof(U));
  return x;
}

// Coarse bucket of a confidence: the float32 key shifted right, with everything below 0 and
// everything above the bucket of 1.0 lumped into one end bucket each, so that only [0, 1] takes
// table space. Rounding a double to float is monotone, so float64 inputs bucket the same way; a
// bucket only has to be monotone, the candidates in it are compared by their exact keys.
struct Buckets {
  int shift;
  uint32_t lo, hi;
  int log_stride;  // a class's row of buckets is padded to a power of two

  explicit Buckets(int shift_)
      : shift(shift_), lo((0x80000000u >> shift_) - 1), hi((to_key(1.0f) >> shift_) + 1), log_stride(0) {
    while ((uint32_t(1) << log_stride) < hi - lo + 1) ++log_stride;
  }

  template <typename scalar_t>
  inline uint32_t of(scalar_t x) const {
    const uint32_t v = to_key(static_cast<float>(x)) >> shift;
    return std::min(std::max(v, lo), hi) - lo;
  }
};

// Counts per chunk are uint32, so a chunk holds fewer than 2^32 pixels.
constexpr int64_t kMaxChunk = int64_t(1) << 30;
// Finer buckets leave fewer candidates for the second pass; coarser ones keep the per-chunk table
// (random increments) in cache. About this many counters per chunk measured best.
constexpr int64_t kTableBudget = int64_t(1) << 19;
// Class histograms up to this many cells are counted in a table per chunk; larger ones are
// grouped by part first so that each part's counters stay in cache.
constexpr int64_t kSmallHistogram = int64_t(1) << 15;

// Splits [0, n) into `chunks` near-equal fixed ranges; the i-th one is [start(i), start(i + 1)).
struct Chunks {
  int64_t n, chunks;
  int64_t start(int64_t i) const { return n / chunks * i + std::min(i, n % chunks); }
};

template <typename scalar_t, typename label_t>
void select_thresholds(const scalar_t* conf, const label_t* pred, int64_t n, int64_t num_classes, double portion,
                       int64_t ignore_index, scalar_t* out) {
  using U = key_t<scalar_t>;
  int shift = 14;
  while (shift < 28 && (num_classes + 1) << Buckets(shift).log_stride > kTableBudget) ++shift;
  const Buckets buckets(shift);
  const int log_stride = buckets.log_stride;
  // Row num_classes collects the pixels left out (ignored or out-of-range labels, NaN), so that
  // the histogram loop has no branch; nothing reads it.
  const int64_t cells = (num_classes + 1) << log_stride;
  TORCH_CHECK(cells < (int64_t(1) << 32), "class_thresholds: num_classes is too large");
  const uint32_t left_out = static_cast<uint32_t>(num_classes) << log_stride;

  // Integer counts add up the same in any order, so the chunk count may follow the thread count.
  const Chunks chunks{n, std::max<int64_t>({int64_t(1), (n + kMaxChunk - 1) / kMaxChunk,
                                             std::min<int64_t>(at::get_num_threads(), n / 65536)})};

  // Pass 1: each pixel's (class, bucket) cell, kept for pass 2, and per chunk a histogram of them.
  // Uninitialised (every entry is written), unlike a std::vector that would zero it first.
  const at::Tensor cell_buffer = at::empty({n}, at::kInt);
  uint32_t* cell = reinterpret_cast<uint32_t*>(cell_buffer.mutable_data_ptr<int32_t>());
  std::vector<uint32_t> tables(chunks.chunks * cells, 0);
  at::parallel_for(0, chunks.chunks, 1, [&](int64_t first, int64_t last) {
    for (int64_t k = first; k < last; ++k) {
      uint32_t* table = tables.data() + k * cells;
      const int64_t end = chunks.start(k + 1);
      for (int64_t i = chunks.start(k); i < end; ++i) {
        const int64_t c = static_cast<int64_t>(pred[i]);
        const scalar_t x = conf[i];
        const bool keep = c != ignore_index && c >= 0 && c < num_classes && x == x;
        const uint32_t f = keep ? (static_cast<uint32_t>(c) << log_stride) | buckets.of(x) : left_out;
        cell[i] = f;
        ++table[f];
      }
    }
  });

  // Per class: the cell holding the n-th highest confidence and that confidence's rank in it.
  // `wanted` never equals a cell (all cells are below 2^32 - 1) where the class selects nothing.
  constexpr uint32_t kNone = std::numeric_limits<uint32_t>::max();
  std::vector<uint32_t> wanted(num_classes + 1, kNone);
  std::vector<int64_t> rank(num_classes, 0);
  at::parallel_for(0, num_classes, 1, [&](int64_t first, int64_t last) {
    const int64_t width = int64_t(1) << log_stride;
    std::vector<uint64_t> row(width);
    for (int64_t c = first; c < last; ++c) {
      std::fill(row.begin(), row.end(), 0);
      for (int64_t k = 0; k < chunks.chunks; ++k) {
        const uint32_t* table = tables.data() + k * cells + (c << log_stride);
        for (int64_t b = 0; b < width; ++b) row[b] += table[b];
      }
      uint64_t total = 0;
      for (int64_t b = 0; b < width; ++b) total += row[b];
      // As math.floor(N_c * portion) in float64; a portion above 1 (unvalidated) is clamped.
      const double floored = std::floor(static_cast<double>(total) * portion);
      if (!(floored >= 1)) continue;
      const uint64_t rank_c = floored >= static_cast<double>(total) ? total : static_cast<uint64_t>(floored);
      uint64_t above = 0;
      for (int64_t b = width - 1; b >= 0; --b) {
        if (above + row[b] >= rank_c) {
          wanted[c] = static_cast<uint32_t>((c << log_stride) | b);
          rank[c] = static_cast<int64_t>(rank_c - above);
          break;
        }
        above += row[b];
      }
    }
  });

  // Pass 2: per chunk and class, the exact keys of the candidates in the wanted cell.
  std::vector<std::vector<U>> candidates(chunks.chunks * num_classes);
  at::parallel_for(0, chunks.chunks, 1, [&](int64_t first, int64_t last) {
    for (int64_t k = first; k < last; ++k) {
      std::vector<U>* mine = candidates.data() + k * num_classes;
      const int64_t end = chunks.start(k + 1);
      for (int64_t i = chunks.start(k); i < end; ++i) {
        const uint32_t f = cell[i];
        if (f == wanted[f >> log_stride]) mine[f >> log_stride].push_back(to_key(conf[i]));
      }
    }
  });

  at::parallel_for(0, num_classes, 1, [&](int64_t first, int64_t last) {
    std::vector<U> keys;
    for (int64_t c = first; c < last; ++c) {
      if (wanted[c] == kNone) {
        out[c] = scalar_t(1);
        continue;
      }
      keys.clear();
      for (int64_t k = 0; k < chunks.chunks; ++k) {
        const auto& part = candidates[k * num_classes + c];
        keys.insert(keys.end(), part.begin(), part.end());
      }
      std::nth_element(keys.begin(), keys.begin() + (rank[c] - 1), keys.end(), std::greater<U>());
      out[c] = from_key<scalar_t>(keys[rank[c] - 1]);
    }
  });
}

template <typename scalar_t, typename label_t>
void add_to_histogram(int64_t* counts, int64_t stride_c, int64_t stride_b, int64_t num_classes, int64_t bins,
                      const scalar_t* conf, const label_t* pred, int64_t n, int64_t ignore_index) {
  int log_bins = 0;
  while ((int64_t(1) << log_bins) < bins) ++log_bins;
  const int64_t cells = num_classes << log_bins;
  const scalar_t scale = static_cast<scalar_t>(bins);
  const scalar_t last_bin = static_cast<scalar_t>(bins - 1);
  // A pixel's cell, or -1 for pixels left out: ignored or out-of-range labels, NaN or negative
  // confidences.
  auto cell_of = [&](int64_t i) -> int32_t {
    const int64_t c = static_cast<int64_t>(pred[i]);
    const scalar_t bin = std::min(std::floor(conf[i] * scale), last_bin);
    const bool keep = c != ignore_index && c >= 0 && c < num_classes && bin >= 0;
    return keep ? static_cast<int32_t>((c << log_bins) + static_cast<int64_t>(bin)) : -1;
  };
  const Chunks chunks{n, std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n / 65536))};

  if (cells <= kSmallHistogram) {
    // Few counters: one cached table per chunk, added into the counts afterwards.
    std::vector<int64_t> tables(chunks.chunks * cells, 0);
    at::parallel_for(0, chunks.chunks, 1, [&](int64_t first, int64_t last) {
      for (int64_t k = first; k < last; ++k) {
        int64_t* table = tables.data() + k * cells;
        const int64_t end = chunks.start(k + 1);
        for (int64_t i = chunks.start(k); i < end; ++i) {
          const int32_t f = cell_of(i);
          if (f >= 0) ++table[f];
        }
      }
    });
    for (int64_t k = 0; k < chunks.chunks; ++k) {
      const int64_t* table = tables.data() + k * cells;
      for (int64_t f = 0; f < cells; ++f) counts[(f >> log_bins) * stride_c + (f & (bins - 1)) * stride_b] += table[f];
    }
    return;
  }

  // Many counters: split them into parts of 2^log_part cells, small enough (256 KiB) that the
  // random increments of one part stay in cache, and at least a few parts per thread.
  int log_part = 0;
  while (log_part < 15 && (cells >> (log_part + 1)) >= 4 * at::get_num_threads()) ++log_part;
  while ((cells >> log_part) > 4096) ++log_part;
  const int64_t parts = ((cells - 1) >> log_part) + 1;

  // Step 1, per chunk: each pixel's cell and how many of the chunk's pixels fall in each part.
  const at::Tensor cell_buffer = at::empty({n}, at::kInt);
  int32_t* cell = cell_buffer.mutable_data_ptr<int32_t>();
  std::vector<int64_t> offsets(chunks.chunks * parts, 0);
  at::parallel_for(0, chunks.chunks, 1, [&](int64_t first, int64_t last) {
    for (int64_t k = first; k < last; ++k) {
      int64_t* in_part = offsets.data() + k * parts;
      const int64_t end = chunks.start(k + 1);
      for (int64_t i = chunks.start(k); i < end; ++i) {
        const int32_t f = cell_of(i);
        cell[i] = f;
        if (f >= 0) ++in_part[f >> log_part];
      }
    }
  });
  // Where each (part, chunk) run starts once the cells are grouped by part.
  std::vector<int64_t> part_start(parts + 1, 0);
  int64_t total = 0;
  for (int64_t p = 0; p < parts; ++p) {
    part_start[p] = total;
    for (int64_t k = 0; k < chunks.chunks; ++k) {
      const int64_t here = offsets[k * parts + p];
      offsets[k * parts + p] = total;
      total += here;
    }
  }
  part_start[parts] = total;

  // Step 2, per chunk: group the cells by part (a counting sort on the part).
  const at::Tensor grouped_buffer = at::empty({total}, at::kInt);
  int32_t* grouped = grouped_buffer.mutable_data_ptr<int32_t>();
  at::parallel_for(0, chunks.chunks, 1, [&](int64_t first, int64_t last) {
    for (int64_t k = first; k < last; ++k) {
      int64_t* next = offsets.data() + k * parts;
      const int64_t end = chunks.start(k + 1);
      for (int64_t i = chunks.start(k); i < end; ++i) {
        const int32_t f = cell[i];
        if (f >= 0) grouped[next[f >> log_part]++] = f;
      }
    }
  });

  // Step 3, per part: each task owns its part's counters, so no two write the same one and
  // nothing has to be merged.
  at::parallel_for(0, parts, 1, [&](int64_t first, int64_t last) {
    for (int64_t j = part_start[first]; j < part_start[last]; ++j) {
      const int32_t f = grouped[j];
      ++counts[(f >> log_bins) * stride_c + (f & (bins - 1)) * stride_b];
    }
  });
}

template <typename scalar_t>
void pseudo_labels(const scalar_t* probs, const scalar_t* thresholds, int64_t batch, int64_t num_classes,
                   int64_t pixels, int64_t ignore_index, int64_t* out) {
  // A tile of pixels along W keeps its running best ratio and class in registers or L1 while
  // the classes stream by; the inner loop over the tile vectorises.
  constexpr int64_t kTile = 256;
  const int64_t tiles = (pixels + kTile - 1) / kTile;
  at::parallel_for(0, batch * tiles, 16, [&](int64_t first, int64_t last) {
    scalar_t best[kTile];
    int32_t label[kTile];
    for (int64_t t = first; t < last; ++t) {
      const int64_t b = t / tiles;
      const int64_t start = t % tiles * kTile;
      const int64_t len = std::min(kTile, pixels - start);
      const scalar_t* p = probs + b * num_classes * pixels + start;
      for (int64_t j = 0; j < len; ++j) {
        best[j] = p[j] / thresholds[0];
        label[j] = 0;
      }
      for (int64_t c = 1; c < num_classes; ++c) {
        const scalar_t* pc = p + c * pixels;
        const scalar_t th = thresholds[c];
        for (int64_t j = 0; j < len; ++j) {
          const scalar_t r = pc[j] / th;
          // torch.argmax: the first maximum wins, and NaN counts as the maximum.
          const bool take = (r > best[j]) | ((r != r) & (best[j] == best[j]));
          best[j] = take ? r : best[j];
          label[j] = take ? static_cast<int32_t>(c) : label[j];
        }
      }
      int64_t* o = out + b * pixels + start;
      for (int64_t j = 0; j < len; ++j) o[j] = best[j] < scalar_t(1) ? ignore_index : label[j];
    }
  });
}

void check_labels(const at::Tensor& pred, const char* op) {
  TORCH_CHECK(at::isIntegralType(pred.scalar_type(), /*includeBool=*/false), op, ": pred must be of an integer dtype");
}

at::Tensor class_thresholds_cpu(const at::Tensor& conf, const at::Tensor& pred, int64_t num_classes, double portion,
                                int64_t ignore_index) {
  TORCH_CHECK(conf.sizes() == pred.sizes(), "class_thresholds: conf and pred must have the same shape");
  TORCH_CHECK(num_classes >= 1, "class_thresholds: num_classes must be >= 1");
  check_labels(pred, "class_thresholds");
  const at::Tensor c = conf.contiguous();
  const at::Tensor p = pred.contiguous();
  at::Tensor out = at::empty({num_classes}, conf.options());
  AT_DISPATCH_FLOATING_TYPES(c.scalar_type(), "class_thresholds", [&] {
    using conf_t = scalar_t;
    AT_DISPATCH_INTEGRAL_TYPES(p.scalar_type(), "class_thresholds", [&] {
      select_thresholds<conf_t, scalar_t>(c.const_data_ptr<conf_t>(), p.const_data_ptr<scalar_t>(), c.numel(),
                                          num_classes, portion, ignore_index, out.mutable_data_ptr<conf_t>());
    });
  });
  return out;
}

void class_histogram_add_cpu(at::Tensor& counts, const at::Tensor& conf, const at::Tensor& pred,
                             int64_t ignore_index) {
  TORCH_CHECK(counts.dim() == 2 && counts.scalar_type() == at::kLong, "class_histogram_add_: counts must be int64 [C, bins]");
  TORCH_CHECK(conf.sizes() == pred.sizes(), "class_histogram_add_: conf and pred must have the same shape");
  check_labels(pred, "class_histogram_add_");
  const int64_t num_classes = counts.size(0);
  const int64_t bins = counts.size(1);
  TORCH_CHECK(bins >= 1 && (bins & (bins - 1)) == 0, "class_histogram_add_: bins must be a power of two");
  TORCH_CHECK(num_classes * bins <= std::numeric_limits<int32_t>::max(),
              "class_histogram_add_: C * bins must be below 2^31");
  const at::Tensor c = conf.contiguous();
  const at::Tensor p = pred.contiguous();
  AT_DISPATCH_FLOATING_TYPES(c.scalar_type(), "class_histogram_add_", [&] {
    using conf_t = scalar_t;
    AT_DISPATCH_INTEGRAL_TYPES(p.scalar_type(), "class_histogram_add_", [&] {
      add_to_histogram<conf_t, scalar_t>(counts.mutable_data_ptr<int64_t>(), counts.stride(0), counts.stride(1),
                                         num_classes, bins, c.const_data_ptr<conf_t>(), p.const_data_ptr<scalar_t>(),
                                         c.numel(), ignore_index);
    });
  });
}

at::Tensor cbst_pseudo_labels_cpu(const at::Tensor& probs, const at::Tensor& thresholds, int64_t ignore_index) {
  TORCH_CHECK(probs.dim() == 4, "cbst_pseudo_labels: probs must be [B, C, H, W]");
  TORCH_CHECK(thresholds.dim() == 1 && thresholds.size(0) == probs.size(1),
              "cbst_pseudo_labels: thresholds must be [C]");
  TORCH_CHECK(probs.size(1) >= 1, "cbst_pseudo_labels: probs needs at least one class");
  const int64_t batch = probs.size(0), num_classes = probs.size(1), pixels = probs.size(2) * probs.size(3);
  at::Tensor out = at::empty({batch, probs.size(2), probs.size(3)}, probs.options().dtype(at::kLong));
  if (out.numel() == 0) return out;
  const at::Tensor p = probs.contiguous();
  const at::Tensor t = thresholds.to(probs.scalar_type()).contiguous();
  AT_DISPATCH_FLOATING_TYPES(p.scalar_type(), "cbst_pseudo_labels", [&] {
    pseudo_labels<scalar_t>(p.const_data_ptr<scalar_t>(), t.const_data_ptr<scalar_t>(), batch, num_classes, pixels,
                            ignore_index, out.mutable_data_ptr<int64_t>());
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(udafast, CPU, m) {
  m.impl("class_thresholds", &class_thresholds_cpu);
  m.impl("class_histogram_add_", &class_histogram_add_cpu);
  m.impl("cbst_pseudo_labels", &cbst_pseudo_labels_cpu);
}
