// SPEC 1.3 on the CPU: ProDA's prototype distance softmax (forward and backward) and rectified
// pseudo-labels (the per-class feature sums are in class_feature_sums.cpp).
//
// The features are NCHW, so for one image and channel the pixels are contiguous. The ops walk
// strips of pixels: each channel row of a strip is read as one contiguous run (rows lie H*W apart,
// often a multiple of 4 KiB, so short runs from many rows would fight over a few cache sets). A
// strip is cut into tiles of kTile pixels whose C distances come from the difference f - p (the
// expanded ||f||^2 - 2 f.p + ||p||^2 cancels), with the partial sums held in registers; the
// softmax, its backward or the argmax follow per pixel. Nothing of size C x D per pixel is formed,
// and each strip is computed alone, so the results cannot depend on the thread count.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#ifdef __FMA__
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

// One 32-byte (AVX) register of float or double through the GCC/Clang vector extensions, so that
// the register blocking below is explicit and the same for both dtypes.
typedef float V8f __attribute__((vector_size(32)));
typedef double V4d __attribute__((vector_size(32)));
typedef float V4f __attribute__((vector_size(16)));

template <typename T>
struct Reg;
template <>
struct Reg<float> {
  using type = V8f;
};
template <>
struct Reg<double> {
  using type = V4d;
};

template <typename T>
constexpr int kLanes = 32 / int(sizeof(T));
// Pixels per tile: two registers (one 64-byte cache line of floats).
template <typename T>
constexpr int kTile = 2 * kLanes<T>;
// Pixels per strip: 1 KiB of each channel row.
template <typename T>
constexpr int kStrip = 1024 / int(sizeof(T));
// Classes whose partial sums stay in registers together (8 accumulators of 16).
constexpr int64_t kClassBlock = 4;
// Channels summed in the input dtype before the partial is added into double: short enough that
// float32 distances meet SPEC 1.5 at D = 256, long enough that the widening costs little.
constexpr int64_t kDepthBlock = 32;

template <typename V, typename T>
inline V load(const T* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}

template <typename T, typename V>
inline void store(T* p, V v) {
  std::memcpy(p, &v, sizeof(V));
}

// a * b + c with one rounding; -std=c++17 turns GCC's automatic contraction off.
inline V8f fmadd(V8f a, V8f b, V8f c) {
#ifdef __FMA__
  return (V8f)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c);
#else
  return a * b + c;
#endif
}

inline V4d fmadd(V4d a, V4d b, V4d c) {
#ifdef __FMA__
  return (V4d)_mm256_fmadd_pd((__m256d)a, (__m256d)b, (__m256d)c);
#else
  return a * b + c;
#endif
}

// total[0..] += x, widened to double.
inline void add_wide(V4d* total, V8f x) {
  V4f lo, hi;
  std::memcpy(&lo, &x, sizeof(lo));
  std::memcpy(&hi, reinterpret_cast<const char*>(&x) + sizeof(lo), sizeof(hi));
  total[0] += __builtin_convertvector(lo, V4d);
  total[1] += __builtin_convertvector(hi, V4d);
}

inline void add_wide(V4d* total, V4d x) { total[0] += x; }

typedef int64_t V4l __attribute__((vector_size(32)));

inline V4d sqrt4(V4d x) {
#ifdef __AVX__
  return (V4d)_mm256_sqrt_pd((__m256d)x);
#else
  for (int i = 0; i < 4; ++i) x[i] = std::sqrt(x[i]);
  return x;
#endif
}

// exp on four doubles, to about 1e-15 relative (libm's exp does not vectorise): x = k ln2 + r with
// |r| <= ln2 / 2, a degree-12 Taylor polynomial for e^r, and 2^k built in the exponent bits.
// Arguments below -708 give about 1e-308 instead of 0; NaN stays NaN.
inline V4d exp4(V4d x) {
  const V4d lo = V4d{} - 708.0, hi = V4d{} + 709.0;
  x = x < lo ? lo : x;
  x = x > hi ? hi : x;
  // adding 1.5 * 2^52 rounds to an integer k held in the low mantissa bits
  const double shifter = 6755399441055744.0;
  const V4d t = x * 1.4426950408889634 + shifter;
  const V4d k = t - shifter;
  const V4d r = (x - k * 0.6931471803691238) - k * 1.9082149292705877e-10;
  V4d poly = V4d{} + 1.0 / 479001600.0;
  const double inverse_factorials[] = {1.0 / 39916800.0, 1.0 / 3628800.0, 1.0 / 362880.0, 1.0 / 40320.0,
                                       1.0 / 5040.0,     1.0 / 720.0,     1.0 / 120.0,    1.0 / 24.0,
                                       1.0 / 6.0,        0.5,             1.0,            1.0};
  for (double coefficient : inverse_factorials) poly = fmadd(poly, r, V4d{} + coefficient);
  V4l bits;
  std::memcpy(&bits, &t, sizeof(bits));
  const V4l scale_bits = (bits + 1023) << 52;
  V4d scale;
  std::memcpy(&scale, &scale_bits, sizeof(scale));
  return poly * scale;
}

// Four doubles from / to a T array (T = float narrows them).
template <typename T>
inline V4d load4(const T* p) {
  if constexpr (sizeof(T) == sizeof(double)) {
    return load<V4d>(p);
  } else {
    return __builtin_convertvector(load<V4f>(p), V4d);
  }
}

template <typename T>
inline void store4(T* p, V4d v) {
  if constexpr (sizeof(T) == sizeof(double)) {
    store(p, v);
  } else {
    store(p, __builtin_convertvector(v, V4f));
  }
}

// The prototypes as [D][cpad] in the features' dtype, classes padded with zeros to a multiple of
// kClassBlock, so that one channel's values for a block of classes are adjacent.
template <typename T>
std::vector<T> transposed_prototypes(const at::Tensor& prototypes, int64_t cpad) {
  const at::Tensor p = prototypes.contiguous();
  const int64_t C = p.size(0), D = p.size(1);
  const T* src = p.data_ptr<T>();
  std::vector<T> pt(D * cpad, T(0));
  for (int64_t c = 0; c < C; ++c)
    for (int64_t d = 0; d < D; ++d) pt[d * cpad + c] = src[c * D + d];
  return pt;
}

// Rows read this many rows ahead are prefetched: the hardware prefetcher does not start on runs as
// short as a strip's.
constexpr int64_t kRowsAhead = 4;

// Copies the n <= kStrip pixels at f (rows of D channels that lie `stride` apart) into tiles
// [ceil(n / P)][D][P], the last one padded with zeros.
template <typename T>
void pack_strip(const T* f, int64_t stride, int64_t D, int64_t n, T* tiles) {
  constexpr int P = kTile<T>;
  const int64_t full = n / P, rest = n % P;
  for (int64_t d = 0; d < D; ++d) {
    const T* row = f + d * stride;
    if (d + kRowsAhead < D)
      for (int64_t k = 0; k < n; k += P) __builtin_prefetch(row + kRowsAhead * stride + k);
    for (int64_t k = 0; k < full; ++k) std::memcpy(tiles + (k * D + d) * P, row + k * P, P * sizeof(T));
    if (rest > 0) {
      T* last = tiles + (full * D + d) * P;
      std::memcpy(last, row + full * P, rest * sizeof(T));
      std::fill(last + rest, last + P, T(0));
    }
  }
}

// dist[c * P + p] = sum_d (tile[d * P + p] - pt[d * cpad + c])^2 for every padded class. Each
// kDepthBlock channels are summed in registers in T, then added into double.
template <typename T>
void tile_sq_distances(const T* tile, const T* pt, int64_t D, int64_t cpad, double* dist) {
  using V = typename Reg<T>::type;
  constexpr int L = kLanes<T>, P = kTile<T>, W = P / 4;  // W: double registers per class
  for (int64_t c0 = 0; c0 < cpad; c0 += kClassBlock) {
    V4d total[kClassBlock][W] = {};
    for (int64_t d0 = 0; d0 < D; d0 += kDepthBlock) {
      const int64_t d1 = std::min(D, d0 + kDepthBlock);
      V acc[kClassBlock][2] = {};
      for (int64_t d = d0; d < d1; ++d) {
        const V f0 = load<V>(tile + d * P), f1 = load<V>(tile + d * P + L);
        const T* p = pt + d * cpad + c0;
        for (int j = 0; j < kClassBlock; ++j) {
          const V t0 = f0 - p[j], t1 = f1 - p[j];
          acc[j][0] = fmadd(t0, t0, acc[j][0]);
          acc[j][1] = fmadd(t1, t1, acc[j][1]);
        }
      }
      for (int j = 0; j < kClassBlock; ++j) {
        add_wide(total[j], acc[j][0]);
        add_wide(total[j] + W / 2, acc[j][1]);
      }
    }
    for (int j = 0; j < kClassBlock; ++j)
      for (int w = 0; w < W; ++w) store(dist + (c0 + j) * P + 4 * w, total[j][w]);
  }
}

// Per-thread scratch of the tile loops, and the tile's softmax pieces in double.
template <typename T>
struct TileSoftmax {
  static constexpr int P = kTile<T>, W = P / 4;
  int64_t D, C, cpad;
  double tau;
  std::vector<double> dist;  // [cpad][P] squared distances, then distances
  std::vector<double> expz;  // [C][P] exp(z_c - max_c z), z_c = -d_c / tau
  alignas(32) double zmax[P];
  alignas(32) double zsum[P];

  TileSoftmax(int64_t D_, int64_t C_, int64_t cpad_, double tau_)
      : D(D_), C(C_), cpad(cpad_), tau(tau_), dist(cpad_ * P), expz(C_ * P) {}

  // One packed tile [D][P].
  void run(const T* tile, const T* pt) {
    tile_sq_distances(tile, pt, D, cpad, dist.data());
    const double scale = -1.0 / tau;
    V4d top[W], total[W] = {};
    for (int w = 0; w < W; ++w) top[w] = V4d{} - std::numeric_limits<double>::infinity();
    for (int64_t c = 0; c < C; ++c)
      for (int w = 0; w < W; ++w) {
        double* dc = dist.data() + c * P + 4 * w;
        const V4d d = sqrt4(load<V4d>(dc));
        store(dc, d);
        const V4d z = d * scale;
        top[w] = z > top[w] ? z : top[w];
      }
    for (int64_t c = 0; c < C; ++c)
      for (int w = 0; w < W; ++w) {
        const V4d e = exp4(load<V4d>(dist.data() + c * P + 4 * w) * scale - top[w]);
        store(expz.data() + c * P + 4 * w, e);
        total[w] += e;
      }
    for (int w = 0; w < W; ++w) {
      store(zmax + 4 * w, top[w]);
      store(zsum + 4 * w, total[w]);
    }
  }
};

int64_t padded_classes(int64_t C) { return (C + kClassBlock - 1) / kClassBlock * kClassBlock; }

void check_features_prototypes(const at::Tensor& features, const at::Tensor& prototypes, double tau) {
  TORCH_CHECK(features.dim() == 4, "features must be [B, D, H, W]; got ", features.sizes());
  TORCH_CHECK(prototypes.dim() == 2 && prototypes.size(1) == features.size(1),
              "prototypes must be [C, D] with the features' D; got ", prototypes.sizes());
  TORCH_CHECK(tau > 0, "tau must be > 0; got ", tau);
}

// Copies C rows of n <= kStrip pixels that lie `stride` apart into [C][kStrip], zeros past n.
template <typename T>
void gather_rows(const T* src, int64_t stride, int64_t C, int64_t n, T* dst) {
  constexpr int S = kStrip<T>;
  for (int64_t c = 0; c < C; ++c) {
    std::memcpy(dst + c * S, src + c * stride, n * sizeof(T));
    std::fill(dst + c * S + n, dst + (c + 1) * S, T(0));
  }
}

// The first n pixels of C rows [C][kStrip] back to rows that lie `stride` apart.
template <typename T>
void scatter_rows(const T* src, int64_t C, int64_t n, T* dst, int64_t stride) {
  constexpr int S = kStrip<T>;
  for (int64_t c = 0; c < C; ++c) std::memcpy(dst + c * stride, src + c * S, n * sizeof(T));
}

// Runs body(ts, tiles, b, n0, n) on every strip of n <= kStrip pixels from n0 in image b, with the
// strip packed into `tiles` ([tile][D][P]); one task per strip, each thread with its own scratch.
template <typename T, typename Body>
void for_each_strip(const T* f, int64_t B, int64_t N, int64_t D, int64_t C, double tau, const Body& body) {
  constexpr int S = kStrip<T>;
  const int64_t strips = (N + S - 1) / S;
  at::parallel_for(0, B * strips, 1, [&](int64_t begin, int64_t end) {
    TileSoftmax<T> ts(D, C, padded_classes(C), tau);
    std::vector<T> tiles(S * D);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / strips, n0 = (t % strips) * S, n = std::min<int64_t>(S, N - n0);
      pack_strip(f + b * D * N + n0, N, D, n, tiles.data());
      body(ts, tiles.data(), b, n0, n);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> prototype_softmax_cpu(const at::Tensor& features, const at::Tensor& prototypes,
                                                         double tau, bool log) {
  check_features_prototypes(features, prototypes, tau);
  const at::Tensor f = features.contiguous();
  const int64_t B = f.size(0), D = f.size(1), N = f.size(2) * f.size(3), C = prototypes.size(0);
  at::Tensor out = at::empty({B, C, f.size(2), f.size(3)}, f.options());
  at::Tensor distances = at::empty_like(out);
  if (out.numel() == 0) return {out, distances};
  AT_DISPATCH_FLOATING_TYPES(f.scalar_type(), "prototype_softmax", [&] {
    using T = scalar_t;
    constexpr int P = kTile<T>, S = kStrip<T>;
    const std::vector<T> pt = transposed_prototypes<T>(prototypes.to(f.scalar_type()), padded_classes(C));
    const T* fp = f.data_ptr<T>();
    T* op = out.data_ptr<T>();
    T* dp = distances.data_ptr<T>();
    for_each_strip<T>(fp, B, N, D, C, tau, [&](TileSoftmax<T>& ts, const T* tiles, int64_t b, int64_t n0, int64_t n) {
      // the strip's outputs [C][S], written out row by row at the end
      std::vector<T> ostrip(C * S), dstrip(C * S);
      for (int64_t k = 0; k * P < n; ++k) {
        ts.run(tiles + k * D * P, pt.data());
        double logsum[P];
        for (int p = 0; p < P; ++p) logsum[p] = std::log(ts.zsum[p]);
        for (int64_t c = 0; c < C; ++c) {
          const double* dc = ts.dist.data() + c * P;
          const double* ec = ts.expz.data() + c * P;
          T* oc = ostrip.data() + c * S + k * P;
          T* distc = dstrip.data() + c * S + k * P;
          for (int p = 0; p < P; ++p) {
            distc[p] = T(dc[p]);
            oc[p] = log ? T(-dc[p] / tau - ts.zmax[p] - logsum[p]) : T(ec[p] / ts.zsum[p]);
          }
        }
      }
      scatter_rows(ostrip.data(), C, n, op + b * C * N + n0, N);
      scatter_rows(dstrip.data(), C, n, dp + b * C * N + n0, N);
    });
  });
  return {out, distances};
}

// grad[r][p] = sum_c a[c][p] (f[r][p] - p_c[r]) for R channel rows and a tile's kTile pixels;
// f and grad rows lie `stride` apart. The difference form stays accurate where a feature is close
// to a prototype (where a_c is large), and costs no more than f S - sum_c a_c p_c on a core with
// separate add and FMA pipes.
template <typename T, int R>
inline void grad_rows(const T* f, T* grad, int64_t stride, const T* pt, int64_t cpad, const T* a, int64_t C) {
  using V = typename Reg<T>::type;
  constexpr int L = kLanes<T>, P = kTile<T>;
  V fv[R][2], acc[R][2] = {};
  for (int r = 0; r < R; ++r) {
    fv[r][0] = load<V>(f + r * stride);
    fv[r][1] = load<V>(f + r * stride + L);
  }
  for (int64_t c = 0; c < C; ++c) {
    const V a0 = load<V>(a + c * P), a1 = load<V>(a + c * P + L);
    for (int r = 0; r < R; ++r) {
      const T pc = pt[r * cpad + c];
      acc[r][0] = fmadd(a0, fv[r][0] - pc, acc[r][0]);
      acc[r][1] = fmadd(a1, fv[r][1] - pc, acc[r][1]);
    }
  }
  for (int r = 0; r < R; ++r) {
    store(grad + r * stride, acc[r][0]);
    store(grad + r * stride + L, acc[r][1]);
  }
}

// All D rows of the `tiles` tiles of a strip, a[k] holding tile k's coefficients [C][P]; rows of f
// and grad lie `stride` apart. Row pairs outside (two rows of features and accumulators fill the
// registers), tiles inside, so each row is read and written as one contiguous run.
template <typename T>
void strip_grad(const T* f, T* grad, int64_t stride, int64_t D, int64_t tiles, const T* pt, int64_t cpad,
                const T* a, int64_t C) {
  constexpr int P = kTile<T>;
  int64_t d = 0;
  for (; d + 2 <= D; d += 2)
    for (int64_t k = 0; k < tiles; ++k) {
      if (d + kRowsAhead + 2 <= D)
        for (int64_t r = d + kRowsAhead; r < d + kRowsAhead + 2; ++r) {
          __builtin_prefetch(f + r * stride + k * P);
          __builtin_prefetch(grad + r * stride + k * P, 1);
        }
      grad_rows<T, 2>(f + d * stride + k * P, grad + d * stride + k * P, stride, pt + d * cpad, cpad,
                      a + k * C * P, C);
    }
  if (d < D)
    for (int64_t k = 0; k < tiles; ++k)
      grad_rows<T, 1>(f + d * stride + k * P, grad + d * stride + k * P, stride, pt + d * cpad, cpad,
                      a + k * C * P, C);
}

at::Tensor prototype_softmax_backward_cpu(const at::Tensor& grad_out, const at::Tensor& out,
                                          const at::Tensor& distances, const at::Tensor& features,
                                          const at::Tensor& prototypes, double tau, bool log) {
  check_features_prototypes(features, prototypes, tau);
  const at::Tensor f = features.contiguous();
  const int64_t B = f.size(0), D = f.size(1), N = f.size(2) * f.size(3), C = prototypes.size(0);
  for (const at::Tensor* x : {&grad_out, &out, &distances})
    TORCH_CHECK(x->dim() == 4 && x->size(0) == B && x->size(1) == C && x->size(2) * x->size(3) == N,
                "grad_out, out and distances must be [B, C, H, W]; got ", x->sizes());
  at::Tensor grad = at::empty_like(f);
  if (grad.numel() == 0) return grad;
  if (C == 0) return grad.zero_();
  const at::Tensor g = grad_out.to(f.scalar_type()).contiguous();
  const at::Tensor o = out.to(f.scalar_type()).contiguous();
  const at::Tensor dist = distances.to(f.scalar_type()).contiguous();
  AT_DISPATCH_FLOATING_TYPES(f.scalar_type(), "prototype_softmax_backward", [&] {
    using T = scalar_t;
    constexpr int P = kTile<T>, W = P / 4, S = kStrip<T>;
    const int64_t cpad = padded_classes(C);
    const std::vector<T> pt = transposed_prototypes<T>(prototypes.to(f.scalar_type()), cpad);
    const T *fp = f.data_ptr<T>(), *gp = g.data_ptr<T>(), *op = o.data_ptr<T>(), *dp = dist.data_ptr<T>();
    T* gradp = grad.data_ptr<T>();
    const int64_t strips = (N + S - 1) / S;
    at::parallel_for(0, B * strips, 1, [&](int64_t begin, int64_t end) {
      std::vector<T> gs(C * S), os(C * S), ds(C * S);  // the strip's rows of g, out, d
      std::vector<T> a(S * C);                         // [tile][C][P]
      std::vector<T> fpart, gpart;                     // a partial strip, [D][S]
      for (int64_t t = begin; t < end; ++t) {
        const int64_t b = t / strips, n0 = (t % strips) * S, n = std::min<int64_t>(S, N - n0);
        const int64_t tiles = (n + P - 1) / P;
        gather_rows(gp + b * C * N + n0, N, C, n, gs.data());
        gather_rows(op + b * C * N + n0, N, C, n, os.data());
        gather_rows(dp + b * C * N + n0, N, C, n, ds.data());
        for (int64_t k = 0; k < tiles; ++k) {
          // s = sum_k g_k (log) or sum_k g_k w_k (softmax), per pixel
          V4d s[W] = {};
          for (int64_t c = 0; c < C; ++c)
            for (int w = 0; w < W; ++w) {
              const int64_t i = c * S + k * P + 4 * w;
              const V4d g = load4(gs.data() + i), o = load4(os.data() + i);
              s[w] += log ? g : g * o;
            }
          // a_c = -dz_c / (tau d_c), 0 where d_c == 0 (the zero gradient of the norm at 0) and on
          // the zero padding of a partial strip
          T* ak = a.data() + k * C * P;
          for (int64_t c = 0; c < C; ++c)
            for (int w = 0; w < W; ++w) {
              const int64_t i = c * S + k * P + 4 * w;
              const V4d g = load4(gs.data() + i), o = load4(os.data() + i), d = load4(ds.data() + i);
              const V4d dz = log ? g - exp4(o) * s[w] : o * (g - s[w]);
              store4(ak + c * P + 4 * w, d > 0 ? -dz / (d * tau) : V4d{});
            }
        }
        const T* fb = fp + b * D * N + n0;
        T* gb = gradp + b * D * N + n0;
        if (n == S) {
          strip_grad(fb, gb, N, D, tiles, pt.data(), cpad, a.data(), C);
        } else {
          fpart.assign(D * S, T(0));
          gpart.resize(D * S);
          for (int64_t d = 0; d < D; ++d) std::memcpy(fpart.data() + d * S, fb + d * N, n * sizeof(T));
          strip_grad(fpart.data(), gpart.data(), S, D, tiles, pt.data(), cpad, a.data(), C);
          for (int64_t d = 0; d < D; ++d) std::memcpy(gb + d * N, gpart.data() + d * S, n * sizeof(T));
        }
      }
    });
  });
  return grad;
}

at::Tensor prototype_rectify_cpu(const at::Tensor& features, const at::Tensor& prototypes,
                                 const at::Tensor& soft_labels, double tau) {
  check_features_prototypes(features, prototypes, tau);
  const at::Tensor f = features.contiguous();
  const int64_t B = f.size(0), D = f.size(1), N = f.size(2) * f.size(3), C = prototypes.size(0);
  TORCH_CHECK(soft_labels.dim() == 4 && soft_labels.size(0) == B && soft_labels.size(1) == C &&
                  soft_labels.size(2) == f.size(2) && soft_labels.size(3) == f.size(3),
              "soft_labels must be [B, C, H, W]; got ", soft_labels.sizes());
  at::Tensor labels = at::zeros({B, f.size(2), f.size(3)}, f.options().dtype(at::kLong));
  if (labels.numel() == 0 || C == 0) return labels;
  const at::Tensor soft = soft_labels.to(f.scalar_type()).contiguous();
  AT_DISPATCH_FLOATING_TYPES(f.scalar_type(), "prototype_rectify", [&] {
    using T = scalar_t;
    constexpr int P = kTile<T>, S = kStrip<T>;
    const std::vector<T> pt = transposed_prototypes<T>(prototypes.to(f.scalar_type()), padded_classes(C));
    const T *fp = f.data_ptr<T>(), *sp = soft.data_ptr<T>();
    int64_t* lp = labels.data_ptr<int64_t>();
    for_each_strip<T>(fp, B, N, D, C, tau, [&](TileSoftmax<T>& ts, const T* tiles, int64_t b, int64_t n0, int64_t n) {
      std::vector<T> soft_strip(C * S);
      gather_rows(sp + b * C * N + n0, N, C, n, soft_strip.data());
      for (int64_t k = 0; k * P < n; ++k) {
        ts.run(tiles + k * D * P, pt.data());
        double best[P];
        int64_t* label = lp + b * N + n0 + k * P;
        std::fill(best, best + P, -std::numeric_limits<double>::infinity());
        const int64_t m = std::min<int64_t>(P, n - k * P);
        for (int64_t c = 0; c < C; ++c) {
          const double* ec = ts.expz.data() + c * P;
          const T* sc = soft_strip.data() + c * S + k * P;
          // strictly greater: the first maximum wins; NaN scores never win
          for (int64_t p = 0; p < m; ++p) {
            const double score = ec[p] / ts.zsum[p] * double(sc[p]);
            if (score > best[p]) {
              best[p] = score;
              label[p] = c;
            }
          }
        }
      }
    });
  });
  return labels;
}

}  // namespace

TORCH_LIBRARY_IMPL(udafast, CPU, m) {
  m.impl("prototype_softmax", &prototype_softmax_cpu);
  m.impl("prototype_softmax_backward", &prototype_softmax_backward_cpu);
  m.impl("prototype_rectify", &prototype_rectify_cpu);
}
