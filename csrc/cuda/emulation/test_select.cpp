// Runs the CUDA kernels of class_thresholds.cu / class_buckets.cuh under cuda_emu.h (no GPU
// needed) and compares with a direct implementation of SPEC 1.1 / 1.2 and the CPU kernels'
// conventions. class_thresholds and topk_per_class go through the ops' own host side (the
// workspace layout and launch sequence of class_buckets.cuh: BucketWorkspace, fill_buckets,
// select_thresholds, select_topk); the histogram and pseudo-label kernels are launched directly,
// on small grids so that their grid-stride loops take several turns. Not part of the package
// build (setup.py globs csrc/cuda/*.cu only). Slow: every CUDA thread is an OS thread; "thr"
// ~6 min, "topk" ~8 min, "wide"/"big" ~1-2 min, "misc" seconds on 2 cores.
//   cd csrc/cuda/emulation && g++ -std=c++20 -O1 -pthread -DUDAFAST_CUDA_EMULATION -I. -I.. \
//       test_select.cpp -o /tmp/test_select && /tmp/test_select [all|thr|topk|wide|big|misc]
#include "cuda_emu.h"
// clang-format off
#include "class_thresholds.cu"
// clang-format on

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <optional>
#include <random>
#include <string>

using namespace udafast_cuda;

static int failures = 0;
#define CHECK(cond, ...)                         \
  do {                                           \
    if (!(cond)) {                               \
      ++failures;                                \
      std::printf("FAIL %s:%d: ", __FILE__, __LINE__); \
      std::printf(__VA_ARGS__);                  \
      std::printf("\n");                         \
    }                                            \
  } while (0)

template <typename S>
using KeyOf = std::conditional_t<sizeof(S) == 4, uint32_t, uint64_t>;

template <typename S>
KeyOf<S> host_key(S x) {
  using U = KeyOf<S>;
  constexpr U sign = U(1) << (8 * sizeof(U) - 1);
  U u;
  std::memcpy(&u, &x, sizeof(U));
  if (u == sign) u = 0;
  return (u & sign) ? U(~u) : U(u | sign);
}

template <typename S>
S host_value(KeyOf<S> key) {
  using U = KeyOf<S>;
  constexpr U sign = U(1) << (8 * sizeof(U) - 1);
  U u = (key & sign) ? U(key & ~sign) : U(~key);
  S x;
  std::memcpy(&x, &u, sizeof(U));
  return x;
}

template <typename S>
bool same_bits(S a, S b) {
  return std::memcmp(&a, &b, sizeof(S)) == 0;
}

// The workspace bytes the ops allocate with at::empty.
struct Bytes {
  uint8_t* p = nullptr;
  explicit Bytes(int64_t bytes) {
    const size_t rounded = (size_t(bytes) + 64) / 64 * 64;
    p = static_cast<uint8_t*>(std::aligned_alloc(64, rounded));
    std::memset(p, 0xCD, rounded);  // garbage: nothing may rely on zeroed memory
  }
  ~Bytes() { std::free(p); }
  Bytes(const Bytes&) = delete;
  Bytes& operator=(const Bytes&) = delete;
};

// The classes launch 3 runs for: all, or `only`.
std::vector<int64_t> selected_classes(int64_t C, const std::vector<unsigned>& only) {
  std::vector<int64_t> classes;
  if (only.empty())
    for (int64_t c = 0; c < C; ++c) classes.push_back(c);
  else
    for (unsigned c : only) classes.push_back(c);
  return classes;
}

template <typename S, typename L>
int64_t class_of_host(S x, L l, int64_t C, int64_t ignore) {
  const int64_t c = int64_t(l);
  return (c != ignore && c >= 0 && c < C && x == x) ? c : -1;
}

// ------------------------------------------------------------------------------------------
// thresholds

template <typename S, typename L>
void test_thresholds(const char* name, const std::vector<S>& conf, const std::vector<L>& pred, int64_t C,
                     int64_t ignore, const std::vector<double>& portions, std::vector<unsigned> only = {}) {
  const auto t0 = std::chrono::steady_clock::now();
  const int64_t n = conf.size();
  using Workspace = BucketWorkspace<S, false>;
  Bytes bytes(Workspace::bytes(n, C));
  const Workspace ws(bytes.p, n, C);
  const BucketPlan& plan = ws.plan;
  const int64_t *start = ws.class_start, *count = ws.class_count;
  fill_buckets(conf.data(), pred.data(), ignore, ws, nullptr);

  // reference per class
  std::vector<std::vector<KeyOf<S>>> keys(C);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t c = class_of_host(conf[i], pred[i], C, ignore);
    if (c >= 0) keys[c].push_back(host_key(conf[i]));
  }
  int64_t running = 0;
  for (int64_t c = 0; c < C; ++c) {
    CHECK(count[c] == int64_t(keys[c].size()), "%s: class_count[%ld] = %ld, want %zu", name, c, count[c],
          keys[c].size());
    CHECK(start[c] == running, "%s: class_start[%ld] = %ld, want %ld", name, c, start[c], running);
    // bucket content is the class's multiset of keys
    std::vector<KeyOf<S>> got(ws.buckets + start[c], ws.buckets + start[c] + keys[c].size());
    std::vector<KeyOf<S>> want = keys[c];
    std::sort(got.begin(), got.end());
    std::sort(want.begin(), want.end());
    CHECK(got == want, "%s: bucket of class %ld differs", name, c);
    running += keys[c].size();
  }
  for (auto& k : keys) std::sort(k.begin(), k.end(), std::greater<>());

  for (double portion : portions) {
    std::vector<S> out(C, S(-7));
    // launch 3 clobbers the buckets (in-place compaction): refill them for every portion
    fill_buckets(conf.data(), pred.data(), ignore, ws, nullptr);
    {
      std::optional<EmuOnlyBlocks> selected;
      if (!only.empty()) selected.emplace(threshold_select_kernel<S>, only);
      select_thresholds(ws, portion, out.data(), nullptr);
    }
    const std::vector<int64_t> classes = selected_classes(C, only);
    for (int64_t c : classes) {
      const double floored = std::floor(double(keys[c].size()) * portion);
      S want = S(1);
      if (floored >= 1) {
        const size_t rank = floored >= double(keys[c].size()) ? keys[c].size() : size_t(floored);
        want = host_value<S>(keys[c][rank - 1]);
      }
      CHECK(same_bits(out[c], want), "%s: portion %g class %ld: got %.9g want %.9g (N_c=%zu)", name, portion, c,
            double(out[c]), double(want), keys[c].size());
    }
  }
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("thresholds %-40s N=%ld C=%ld blocks=%ld  %.1fs\n", name, n, C, plan.blocks, secs);
}

// ------------------------------------------------------------------------------------------
// top-K

template <typename S, typename L>
void test_topk(const char* name, const std::vector<S>& scores, const std::vector<L>& labels, int64_t C, int64_t ignore,
               const std::vector<int64_t>& ks, std::vector<unsigned> only = {}) {
  const auto t0 = std::chrono::steady_clock::now();
  const int64_t n = scores.size();
  const BucketPlan plan = plan_buckets(n, C);
  using E = typename Entries<S, true>::E;
  // reference: per class, positions by score descending (-0 == +0), then position ascending
  std::vector<std::vector<int64_t>> pos(C);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t c = class_of_host(scores[i], labels[i], C, ignore);
    if (c >= 0) pos[c].push_back(i);
  }
  for (auto& p : pos)
    std::stable_sort(p.begin(), p.end(), [&](int64_t a, int64_t b) { return host_key(scores[a]) > host_key(scores[b]); });

  for (int64_t k : ks) {
    using Workspace = BucketWorkspace<S, true>;
    Bytes bytes(Workspace::bytes(n, C, k));
    const Workspace ws(bytes.p, n, C, k);
    std::vector<int64_t> index(C * k, -99), count(C, -99);
    fill_buckets(scores.data(), labels.data(), ignore, ws, nullptr);
    int64_t acc_running = 0;
    for (int64_t c = 0; c < C; ++c) {
      CHECK(ws.acc_start[c] == acc_running, "%s k=%ld: acc_start[%ld] = %ld want %ld", name, k, c, ws.acc_start[c],
            acc_running);
      acc_running += std::min<int64_t>(pos[c].size(), k);
    }
    const auto* acc_begin = reinterpret_cast<const uint8_t*>(ws.acc);
    CHECK(acc_running * int64_t(sizeof(E)) <= bytes.p + ws.end - acc_begin, "%s: acc room", name);
    {
      std::optional<EmuOnlyBlocks> selected;
      if (!only.empty()) selected.emplace(topk_select_kernel<S>, only);
      select_topk(ws, index.data(), count.data(), nullptr);
    }
    const std::vector<int64_t> classes = selected_classes(C, only);
    for (int64_t c : classes) {
      const int64_t m = std::min<int64_t>(pos[c].size(), k);
      CHECK(count[c] == m, "%s k=%ld: count[%ld] = %ld want %ld", name, k, c, count[c], m);
      int bad = 0;
      for (int64_t j = 0; j < k; ++j) {
        const int64_t want = j < m ? pos[c][j] : -1;
        if (index[c * k + j] != want && bad++ < 3)
          CHECK(false, "%s k=%ld: index[%ld][%ld] = %ld want %ld", name, k, c, j, index[c * k + j], want);
      }
      if (bad > 3) CHECK(false, "%s k=%ld class %ld: %d wrong entries in all", name, k, c, bad);
    }
  }
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("topk       %-40s N=%ld C=%ld blocks=%ld  %.1fs\n", name, n, C, plan.blocks, secs);
}

// ------------------------------------------------------------------------------------------
// histogram and pseudo-labels (copies of the CPU kernels' per-element arithmetic as reference)

template <typename S, typename L>
void test_histogram(const char* name, const std::vector<S>& conf, const std::vector<L>& pred, int64_t C, int64_t bins,
                    int64_t ignore) {
  const int64_t n = conf.size();
  // counts as a transposed (non-contiguous) [C, bins] view: stride_c = 1, stride_b = C
  std::vector<int64_t> counts(C * bins, 3), want(C * bins, 3);
  const S scale = S(bins), last_bin = S(bins - 1);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t c = int64_t(pred[i]);
    const S bin = std::min(std::floor(conf[i] * scale), last_bin);
    if (c != ignore && c >= 0 && c < C && bin >= 0) ++want[c * 1 + int64_t(bin) * C];
  }
  emu_launch(histogram_add_kernel<S, L>, 3, 64, conf.data(), pred.data(), n, C, bins, ignore, counts.data(),
             int64_t(1), C);
  CHECK(counts == want, "%s: histogram differs", name);
  std::printf("histogram  %-40s N=%ld C=%ld bins=%ld\n", name, n, C, bins);
}

template <typename S>
void test_pseudo(const char* name, const std::vector<S>& probs, const std::vector<S>& th, int64_t B, int64_t C,
                 int64_t P, int64_t ignore) {
  std::vector<int64_t> out(B * P, -5), want(B * P);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t j = 0; j < P; ++j) {
      const S* p = probs.data() + b * C * P + j;
      S best = p[0] / th[0];
      int64_t label = 0;
      for (int64_t c = 1; c < C; ++c) {
        const S r = p[c * P] / th[c];
        const bool take = (r > best) | ((r != r) & (best == best));
        best = take ? r : best;
        label = take ? c : label;
      }
      want[b * P + j] = best < S(1) ? ignore : label;
    }
  emu_launch(pseudo_labels_kernel<S>, 2, 64, probs.data(), th.data(), B, C, P, ignore, out.data());
  CHECK(out == want, "%s: pseudo-labels differ", name);
  std::printf("pseudo     %-40s B=%ld C=%ld P=%ld\n", name, B, C, P);
}

// ------------------------------------------------------------------------------------------
// data

template <typename S>
std::vector<S> make_values(int64_t n, uint64_t seed, int kind) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<double> u(0.0, 1.0);
  std::vector<S> v(n);
  for (int64_t i = 0; i < n; ++i) {
    const double r = u(rng);
    S x;
    switch (kind) {
      case 0:  // confidences: mostly in [0.5, 1), quantised (ties), some uniform, a few specials
        x = r < 0.6 ? S(std::floor((0.5 + 0.5 * u(rng)) * 256) / 256) : S(u(rng));
        if (r > 0.995) x = S(1);
        if (r < 0.003) x = S(0);
        if (r >= 0.003 && r < 0.005) x = S(-0.0);
        if (r >= 0.005 && r < 0.006) x = std::numeric_limits<S>::quiet_NaN();
        break;
      case 1:  // scores of both signs with ties, +-0, +-inf, NaN
        x = S(std::floor((u(rng) - 0.5) * 64) / 16);
        if (r < 0.05) x = S(0);
        if (r >= 0.05 && r < 0.1) x = S(-0.0);
        if (r >= 0.1 && r < 0.102) x = std::numeric_limits<S>::infinity();
        if (r >= 0.102 && r < 0.104) x = -std::numeric_limits<S>::infinity();
        if (r >= 0.104 && r < 0.106) x = std::numeric_limits<S>::quiet_NaN();
        if (r > 0.5) x = S(u(rng) * 2 - 1);
        break;
      case 2:  // all equal
        x = S(0.5);
        break;
      default:  // out of [0, 1] too (unvalidated confidences)
        x = S(u(rng) * 3 - 1);
    }
    v[i] = x;
  }
  return v;
}

template <typename L>
std::vector<L> make_labels(int64_t n, int64_t C, uint64_t seed, bool strays, int64_t ignore) {
  std::mt19937_64 rng(seed);
  std::vector<L> v(n);
  // runs of equal labels, as segmentation maps have, with a skewed class distribution
  int64_t c = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (rng() % 16 == 0) {
      const uint64_t r = rng() % 100;
      c = r < 50 ? 0 : int64_t(rng() % C);
      if (r >= 95) c = ignore;
      if (strays && r == 94) c = (rng() % 2) ? -1 : C;
    }
    v[i] = L(c);
  }
  return v;
}

int main(int argc, char** argv) {
  const std::string what = argc > 1 ? argv[1] : "all";
  const std::vector<double> portions = {0.0, 1e-4, 0.2, 0.5, 0.9999, 1.0, 1.7};
  if (what == "all" || what == "thr") {
    test_thresholds<float, uint8_t>("f32 u8 labels, 4 blocks", make_values<float>(30000, 1, 0),
                                    make_labels<uint8_t>(30000, 3, 2, false, 255), 3, 255, portions);
    test_thresholds<double, int64_t>("f64 i64 labels with strays", make_values<double>(20000, 3, 0),
                                     make_labels<int64_t>(20000, 4, 4, true, 255), 4, 255, portions);
    test_thresholds<float, int32_t>("f32 out of [0,1], ignore=-1 in range", make_values<float>(9000, 5, 3),
                                    make_labels<int32_t>(9000, 3, 6, true, 2), 3, 2, {0.3, 1.0});
    test_thresholds<float, int16_t>("f32 all equal", make_values<float>(5000, 7, 2),
                                    make_labels<int16_t>(5000, 2, 8, false, 255), 2, 255, {0.5, 1.0});
    test_thresholds<double, int8_t>("f64 all equal", make_values<double>(5000, 7, 2),
                                    make_labels<int8_t>(5000, 2, 8, false, 100), 2, 100, {0.5});
    test_thresholds<float, uint8_t>("empty", {}, {}, 2, 255, {0.5});
  }
  if (what == "all" || what == "topk") {
    test_topk<float, int64_t>("f32 mixed scores", make_values<float>(30000, 11, 1),
                              make_labels<int64_t>(30000, 3, 12, true, 255), 3, 255, {1, 7, 3000, 9000, 40000});
    test_topk<double, uint8_t>("f64 mixed scores", make_values<double>(20000, 13, 1),
                               make_labels<uint8_t>(20000, 3, 14, false, 255), 3, 255, {5, 2100, 30000});
    test_topk<float, int32_t>("f32 all equal (position bits)", make_values<float>(12000, 15, 2),
                              make_labels<int32_t>(12000, 2, 16, false, 255), 2, 255, {1, 100, 2500});
    test_topk<double, int32_t>("f64 all equal (position bits)", make_values<double>(6000, 15, 2),
                               make_labels<int32_t>(6000, 2, 16, false, 255), 2, 255, {3, 3000});
    test_topk<float, int32_t>("empty", {}, {}, 2, 255, {4});
  }
  if (what == "all" || what == "wide") {
    // more classes than a window: two windows in launches 1 and 2; launch 3 for a few classes
    const int64_t C = 1100;
    test_thresholds<float, int32_t>("f32 C=1100", make_values<float>(12000, 21, 0),
                                    make_labels<int32_t>(12000, C, 22, true, 255), C, 255, {0.5},
                                    {0, 1, 255, 1023, 1024, 1099});
    test_topk<float, int32_t>("f32 C=1100", make_values<float>(12000, 23, 1),
                              make_labels<int32_t>(12000, C, 24, true, 255), C, 255, {2}, {0, 3, 1023, 1024, 1099});
  }
  if (what == "all" || what == "misc") {
    test_histogram<float, uint8_t>("f32", make_values<float>(5000, 31, 0), make_labels<uint8_t>(5000, 3, 32, false, 255),
                                   3, 64, 255);
    test_histogram<double, int64_t>("f64 out of range", make_values<double>(5000, 33, 3),
                                    make_labels<int64_t>(5000, 3, 34, true, 255), 3, 16, 255);
    {
      const int64_t B = 2, C = 4, P = 300;
      std::vector<float> probs = make_values<float>(B * C * P, 35, 0);
      test_pseudo<float>("f32", probs, {0.5f, 0.9f, 0.3f, 1.0f}, B, C, P, 255);
      std::vector<double> probs64 = make_values<double>(B * C * P, 36, 0);
      test_pseudo<double>("f64", probs64, {0.5, 0.9, 0.3, 1.0}, B, C, P, -1);
    }
  }
  if (what == "big") {  // more blocks in launches 1-2 (13), several compaction rounds in launch 3
    test_thresholds<float, uint8_t>("f32 N=100000", make_values<float>(100000, 41, 0),
                                    make_labels<uint8_t>(100000, 2, 42, false, 255), 2, 255, {0.37});
    test_topk<float, int64_t>("f32 N=100000", make_values<float>(100000, 43, 1),
                              make_labels<int64_t>(100000, 2, 44, true, 255), 2, 255, {1000});
  }
  std::printf(failures ? "FAILURES: %d\n" : "all passed\n", failures);
  return failures ? 1 : 0;
}
