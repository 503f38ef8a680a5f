// SPEC 1.2, per-class top-K on the CPU.
//
// One counting sort of the valid positions by class (fixed chunks of N: per-chunk class counts,
// then a scatter in which every chunk owns its slice of every class bucket), then per class a
// partial selection on a single unsigned key that orders by score descending, position ascending.
// Every key is distinct, so the selection is exact and cannot depend on the thread count.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <numeric>
#include <vector>

namespace {

// Positions per chunk of the counting sort: large enough that the per-chunk class counts stay
// small beside N, small enough that a 2-core machine splits a 64K-pixel image. With very many
// classes the chunks grow so that the chunks x classes counters stay bounded. Both depend on N and
// C only, never on the thread count.
constexpr int64_t kChunk = 8192;
constexpr int64_t kMaxCounters = int64_t(1) << 22;

using uint128 = unsigned __int128;

// Monotone unsigned image of a float: a larger score gives a larger key. Negative floats have all
// bits flipped, positive ones the sign bit set; -0.0 is made +0.0 first so that the two tie.
inline uint32_t score_key(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  if (x == 0.0f) u = 0;
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

inline uint64_t score_key(double x) {
  uint64_t u;
  std::memcpy(&u, &x, sizeof(u));
  if (x == 0.0) u = 0;
  return (u & 0x8000000000000000ull) ? ~u : (u | 0x8000000000000000ull);
}

// An entry holds the score key in its high bits and (max position - position) in the low bits,
// so one unsigned comparison orders by score descending and then by the lower position first.
template <typename scalar_t, typename Entry>
struct Packing {
  static constexpr int kPosBits = 8 * int(sizeof(Entry)) - 8 * int(sizeof(scalar_t));
  static constexpr Entry kPosMask = (Entry(1) << kPosBits) - 1;

  static Entry pack(scalar_t x, int64_t pos) {
    return (Entry(score_key(x)) << kPosBits) | (kPosMask - Entry(pos));
  }
  static int64_t position(Entry e) { return int64_t(kPosMask - (e & kPosMask)); }
};

// Writes the min(k, last - first) largest entries of [first, last) to `out` in descending order
// and returns how many. A most-significant-digit radix select narrows the candidates first: each
// pass histograms one byte, accepts the entries whose byte is above the k-th largest's, drops
// those below and goes on with those that share it. A pass is a streaming count and a branch-free
// filter, far cheaper per entry than the comparisons of nth_element, which only finishes the last
// few hundred candidates. [first, last) is clobbered; `spare` holds last - first entries, `out`
// min(k, last - first).
template <typename Entry>
int64_t largest_sorted(Entry* first, Entry* last, int64_t k, Entry* out, Entry* spare) {
  constexpr int64_t kFinish = 512;
  Entry* src = first;
  int64_t n = last - first;
  int64_t accepted = 0;
  for (int shift = 8 * int(sizeof(Entry)) - 8; shift >= 0 && n - (k - accepted) > kFinish; shift -= 8) {
    const int64_t need = k - accepted;
    int64_t histogram[256] = {0};
    for (int64_t i = 0; i < n; ++i) ++histogram[int((src[i] >> shift) & 0xff)];
    int digit = 255;
    int64_t above = 0;
    while (above + histogram[digit] < need) above += histogram[digit--];
    if (histogram[digit] == n) continue;  // one byte value for all: look at the next byte
    // Both stores always happen and only the counts move, so random bytes cost no mispredictions;
    // neither store runs past its buffer (accepted stays below k, m at or below i).
    int64_t m = 0;
    for (int64_t i = 0; i < n; ++i) {
      const Entry e = src[i];
      const int d = int((e >> shift) & 0xff);
      out[accepted] = e;
      accepted += d > digit;
      spare[m] = e;
      m += d == digit;
    }
    // The candidates now live in `spare`; the old source, at least as large, becomes the spare.
    std::swap(src, spare);
    n = m;
  }
  const int64_t need = std::min(n, k - accepted);
  if (n > need) std::nth_element(src, src + need, src + n, std::greater<Entry>());
  std::copy(src, src + need, out + accepted);
  std::sort(out, out + accepted + need, std::greater<Entry>());
  return accepted + need;
}

template <typename scalar_t, typename label_t, typename Entry>
void topk_kernel(const scalar_t* scores, int64_t score_stride, const label_t* labels, int64_t label_stride,
                 int64_t n, int64_t num_classes, int64_t k, int64_t ignore_index, int64_t* index,
                 int64_t* count) {
  using P = Packing<scalar_t, Entry>;
  const int64_t C = num_classes;
  const int64_t chunks = std::min((n + kChunk - 1) / kChunk, std::max<int64_t>(1, kMaxCounters / C));
  const int64_t chunk_len = chunks > 0 ? (n + chunks - 1) / chunks : 0;

  // The class of position i, or -1 for a pixel to skip: ignored, out of [0, C) or a NaN score
  // (reachable only with validation off).
  auto class_of = [&](int64_t i) -> int64_t {
    const int64_t c = int64_t(labels[i * label_stride]);
    const bool valid = c >= 0 && c < C && c != ignore_index && !std::isnan(scores[i * score_stride]);
    return valid ? c : -1;
  };

  // cursor[chunk * C + c]: first the count of class c in the chunk, then where the chunk starts
  // writing its class-c positions in the bucket array.
  std::vector<int64_t> cursor(chunks * C, 0);
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      int64_t* counts = cursor.data() + chunk * C;
      const int64_t stop = std::min(n, (chunk + 1) * chunk_len);
      for (int64_t i = chunk * chunk_len; i < stop; ++i) {
        const int64_t c = class_of(i);
        if (c >= 0) ++counts[c];
      }
    }
  });

  // Buckets in class order, chunks in order inside a class: positions stay ascending.
  std::vector<int64_t> bucket_begin(C + 1, 0);
  int64_t total = 0;
  for (int64_t c = 0; c < C; ++c) {
    bucket_begin[c] = total;
    for (int64_t chunk = 0; chunk < chunks; ++chunk) {
      const int64_t in_chunk = cursor[chunk * C + c];
      cursor[chunk * C + c] = total;
      total += in_chunk;
    }
  }
  bucket_begin[C] = total;

  // Uninitialised on purpose: every slot is written by the scatter below.
  std::unique_ptr<Entry[]> entries(new Entry[std::max<int64_t>(total, 1)]);
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      int64_t* next = cursor.data() + chunk * C;
      const int64_t stop = std::min(n, (chunk + 1) * chunk_len);
      for (int64_t i = chunk * chunk_len; i < stop; ++i) {
        const int64_t c = class_of(i);
        if (c >= 0) entries[next[c]++] = P::pack(scores[i * score_stride], i);
      }
    }
  });

  // Largest classes first, handed out one at a time, so one big class does not leave a thread idle.
  std::vector<int64_t> order(C);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
    return bucket_begin[a + 1] - bucket_begin[a] > bucket_begin[b + 1] - bucket_begin[b];
  });
  std::atomic<int64_t> next_class{0};
  const int64_t workers = std::min<int64_t>(C, at::get_num_threads());
  const int64_t largest = bucket_begin[order[0] + 1] - bucket_begin[order[0]];
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    std::unique_ptr<Entry[]> spare(new Entry[std::max<int64_t>(largest, 1)]);
    std::unique_ptr<Entry[]> out(new Entry[std::max<int64_t>(std::min(largest, k), 1)]);
    for (int64_t j; (j = next_class.fetch_add(1)) < C;) {
      const int64_t c = order[j];
      Entry* first = entries.get() + bucket_begin[c];
      Entry* last = entries.get() + bucket_begin[c + 1];
      const int64_t taken = largest_sorted(first, last, k, out.get(), spare.get());
      int64_t* row = index + c * k;
      for (int64_t i = 0; i < taken; ++i) row[i] = P::position(out[i]);
      std::fill(row + taken, row + k, int64_t(-1));
      count[c] = taken;
    }
  });
}

std::tuple<at::Tensor, at::Tensor> topk_per_class_cpu(const at::Tensor& scores, const at::Tensor& labels,
                                                      int64_t num_classes, int64_t k, int64_t ignore_index) {
  TORCH_CHECK(scores.dim() == 1 && labels.dim() == 1 && scores.size(0) == labels.size(0),
              "topk_per_class: scores and labels must be [N] tensors of the same length");
  TORCH_CHECK(num_classes >= 1 && k >= 1, "topk_per_class: num_classes and k must be at least 1");
  TORCH_CHECK(!at::isIntegralType(scores.scalar_type(), true) && at::isIntegralType(labels.scalar_type(), false),
              "topk_per_class: scores must be floating point and labels integer");
  auto index = at::empty({num_classes, k}, scores.options().dtype(at::kLong));
  auto count = at::empty({num_classes}, scores.options().dtype(at::kLong));
  const int64_t n = scores.size(0);

  // The dispatch below covers uint8 to int64; the rarer unsigned types are widened (the labels
  // are the small input), values past int64 wrapping negative and so being skipped.
  const bool dispatched_labels = labels.scalar_type() == at::kByte || labels.scalar_type() == at::kChar ||
                                 labels.scalar_type() == at::kShort || labels.scalar_type() == at::kInt ||
                                 labels.scalar_type() == at::kLong;
  const at::Tensor label_values = dispatched_labels ? labels : labels.to(at::kLong);

  AT_DISPATCH_FLOATING_TYPES(scores.scalar_type(), "topk_per_class", [&] {
    using score_t = scalar_t;
    AT_DISPATCH_INTEGRAL_TYPES(label_values.scalar_type(), "topk_per_class_labels", [&] {
      using label_t = scalar_t;
      auto run = [&](auto entry_tag) {
        using Entry = decltype(entry_tag);
        topk_kernel<score_t, label_t, Entry>(scores.const_data_ptr<score_t>(), scores.stride(0),
                                             label_values.const_data_ptr<label_t>(), label_values.stride(0), n,
                                             num_classes, k, ignore_index, index.data_ptr<int64_t>(),
                                             count.data_ptr<int64_t>());
      };
      // A float32 key and a position below 2^32 fit in 64 bits; anything larger takes 128.
      if constexpr (sizeof(score_t) == 4) {
        if (n <= (int64_t(1) << 32)) {
          run(uint64_t{});
          return;
        }
      }
      run(uint128{});
    });
  });
  return {index, count};
}

}  // namespace

TORCH_LIBRARY_IMPL(udafast, CPU, m) { m.impl("topk_per_class", &topk_per_class_cpu); }
