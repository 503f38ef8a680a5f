// Branch-free exp and log for float and double that GCC vectorises inside `#pragma omp simd`
// loops (libm calls do not vectorise without -ffast-math). Accurate to about 1 ulp over the
// whole range, with IEEE results for 0, +-inf and NaN.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#ifdef __linux__
#include <sys/mman.h>
#endif

namespace udafast {
namespace vec {

#define UDAFAST_VEC_INLINE inline __attribute__((always_inline))

template <typename To, typename From>
UDAFAST_VEC_INLINE To bits(From x) {
  static_assert(sizeof(To) == sizeof(From), "bit cast of unequal sizes");
  To out;
  std::memcpy(&out, &x, sizeof(To));
  return out;
}

// cond ? a : b as a bitwise blend. GCC (without -fno-trapping-math) tends to move arithmetic
// that follows a `?:` on floats into the two branches, and then refuses to if-convert them
// (the moved operation might trap), which stops vectorisation. A blend has no branch to move
// code into. Use it for every float select in vectorised loops.
template <typename T>
UDAFAST_VEC_INLINE T select(bool cond, T a, T b) {
  using U = typename std::conditional<sizeof(T) == 4, uint32_t, uint64_t>::type;
  const U mask = U(0) - static_cast<U>(cond);
  return bits<T>((bits<U>(a) & mask) | (bits<U>(b) & ~mask));
}

// exp(x) = 2^n * exp(r), n = round(x / ln2), |r| <= ln2 / 2 (Cody-Waite reduction). Adding
// 1.5 * 2^23 rounds x / ln2 to an integer and leaves it in the low mantissa bits, so no
// float-to-int conversion (undefined for NaN) is needed. 2^n is applied as two factors so that
// results in the subnormal range round once, as libm's do.
UDAFAST_VEC_INLINE float exp(float x) {
  const float shifter = 12582912.0f;  // 1.5 * 2^23
  const float hi = 88.72283935546875f, lo = -104.0f;
  float xc = select(x > hi, hi, x);
  xc = select(xc < lo, lo, xc);  // NaN passes both clamps
  const float t = xc * 1.44269504088896341f + shifter;
  const int32_t n = static_cast<int32_t>(bits<uint32_t>(t) - bits<uint32_t>(shifter));
  const float nf = t - shifter;
  float r = xc - nf * 0.693359375f;
  r = r - nf * -2.12194440e-4f;
  // Cephes expf minimax polynomial
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t n1 = n >> 1, n2 = n - n1;
  const float s1 = bits<float>(static_cast<uint32_t>(n1 + 127) << 23);
  const float s2 = bits<float>(static_cast<uint32_t>(n2 + 127) << 23);
  float y = p * s1 * s2;
  y = select(x > hi, std::numeric_limits<float>::infinity(), y);
  y = select(x < lo, 0.0f, y);
  return y;
}

UDAFAST_VEC_INLINE double exp(double x) {
  const double shifter = 6755399441055744.0;  // 1.5 * 2^52
  const double hi = 709.782712893384, lo = -746.0;
  double xc = select(x > hi, hi, x);
  xc = select(xc < lo, lo, xc);
  const double t = xc * 1.4426950408889634074 + shifter;
  const int64_t n = static_cast<int64_t>(bits<uint64_t>(t) - bits<uint64_t>(shifter));
  const double nf = t - shifter;
  double r = xc - nf * 6.93145751953125e-1;
  r = r - nf * 1.42860682030941723212e-6;
  // Taylor series to r^13: the remainder is below 1e-17 relative for |r| <= ln2 / 2
  double p = 1.0 / 6227020800.0;
  p = p * r + 1.0 / 479001600.0;
  p = p * r + 1.0 / 39916800.0;
  p = p * r + 1.0 / 3628800.0;
  p = p * r + 1.0 / 362880.0;
  p = p * r + 1.0 / 40320.0;
  p = p * r + 1.0 / 5040.0;
  p = p * r + 1.0 / 720.0;
  p = p * r + 1.0 / 120.0;
  p = p * r + 1.0 / 24.0;
  p = p * r + 1.0 / 6.0;
  p = p * r + 0.5;
  p = p * r * r + r + 1.0;
  const int64_t n1 = n >> 1, n2 = n - n1;
  const double s1 = bits<double>(static_cast<uint64_t>(n1 + 1023) << 52);
  const double s2 = bits<double>(static_cast<uint64_t>(n2 + 1023) << 52);
  double y = p * s1 * s2;
  y = select(x > hi, std::numeric_limits<double>::infinity(), y);
  y = select(x < lo, 0.0, y);
  return y;
}

// log(x) = k ln2 + log(1 + f), 1 + f in [sqrt(1/2), sqrt(2)).
UDAFAST_VEC_INLINE float log(float x) {
  const bool subnormal = x < 1.17549435e-38f;
  const float scaled = x * 8388608.0f;  // 2^23 brings subnormals into the normal range
  const float xs = select(subnormal, scaled, x);
  const uint32_t u = bits<uint32_t>(xs);
  int32_t k = static_cast<int32_t>((u >> 23) & 0xffu) - 127 - (subnormal ? 23 : 0);
  float m = bits<float>((u & 0x007fffffu) | 0x3f800000u);  // in [1, 2)
  const bool big = m > 1.41421356f;
  const float half = m * 0.5f;
  m = select(big, half, m);
  k += big ? 1 : 0;
  const float f = m - 1.0f;
  const float z = f * f;
  // Cephes logf: log(1 + f) = f - f^2/2 + f^3 P(f), P a minimax polynomial (no division)
  float p = 7.0376836292e-2f;
  p = p * f - 1.1514610310e-1f;
  p = p * f + 1.1676998740e-1f;
  p = p * f - 1.2420140846e-1f;
  p = p * f + 1.4249322787e-1f;
  p = p * f - 1.6668057665e-1f;
  p = p * f + 2.0000714765e-1f;
  p = p * f - 2.4999993993e-1f;
  p = p * f + 3.3333331174e-1f;
  const float kf = static_cast<float>(k);
  float y = p * f * z + kf * -2.12194440e-4f;
  y = y - 0.5f * z;
  y = (f + y) + kf * 0.693359375f;
  y = select(x == std::numeric_limits<float>::infinity(), x, y);
  y = select(x == 0.0f, -std::numeric_limits<float>::infinity(), y);
  y = select(x < 0.0f, std::numeric_limits<float>::quiet_NaN(), y);
  y = select(x != x, x, y);
  return y;
}

// The double version evaluates log(1 + f) as fdlibm does: s = f / (2 + f),
// log(1 + f) = f - (f^2/2 - s (f^2/2 + R(s^2))), R the atanh series 2/3 s^2 + 2/5 s^4 + ...
UDAFAST_VEC_INLINE double log(double x) {
  const bool subnormal = x < 2.2250738585072014e-308;
  const double scaled = x * 18014398509481984.0;  // 2^54
  const double xs = select(subnormal, scaled, x);
  const uint64_t u = bits<uint64_t>(xs);
  // the exponent field as a double without an int64 -> double conversion (none in AVX2)
  const double field = bits<double>(0x4330000000000000ull | ((u >> 52) & 0x7ffu)) - 4503599627370496.0;
  double m = bits<double>((u & 0x000fffffffffffffull) | 0x3ff0000000000000ull);
  const bool big = m > 1.4142135623730951;
  const double half = m * 0.5;
  m = select(big, half, m);
  const double kd = field - select(subnormal, 1077.0, 1023.0) + select(big, 1.0, 0.0);
  const double f = m - 1.0;
  const double s = f / (2.0 + f);
  const double z = s * s;
  double R = 2.0 / 25.0;  // eleven terms of the atanh series reach double precision
  R = R * z + 2.0 / 23.0;
  R = R * z + 2.0 / 21.0;
  R = R * z + 2.0 / 19.0;
  R = R * z + 2.0 / 17.0;
  R = R * z + 2.0 / 15.0;
  R = R * z + 2.0 / 13.0;
  R = R * z + 2.0 / 11.0;
  R = R * z + 2.0 / 9.0;
  R = R * z + 2.0 / 7.0;
  R = R * z + 2.0 / 5.0;
  R = R * z + 2.0 / 3.0;
  R = R * z;
  const double hfsq = 0.5 * f * f;
  double y = kd * 6.93147180369123816490e-01 -
             ((hfsq - (s * (hfsq + R) + kd * 1.90821492927058770002e-10)) - f);
  y = select(x == std::numeric_limits<double>::infinity(), x, y);
  y = select(x == 0.0, -std::numeric_limits<double>::infinity(), y);
  y = select(x < 0.0, std::numeric_limits<double>::quiet_NaN(), y);
  y = select(x != x, x, y);
  return y;
}

// Per-pixel maximum over the C class rows (`stride` apart) of a tile of n pixels. NaN never wins
// a comparison, so a pixel that is all NaN keeps -inf and its NaNs surface in exp(z - max).
template <typename T>
UDAFAST_VEC_INLINE void tile_max(const T* z, int64_t C, int64_t stride, int64_t n, T* mx) {
  for (int64_t i = 0; i < n; ++i) mx[i] = -std::numeric_limits<T>::infinity();
  for (int64_t c = 0; c < C; ++c) {
    const T* row = z + c * stride;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) mx[i] = select(row[i] > mx[i], row[i], mx[i]);
  }
}

#undef UDAFAST_VEC_INLINE

}  // namespace vec

// The tiling of the fused loss kernels (NCHW logits made contiguous, so each class's H * W plane
// is contiguous): an image plane is cut into chunks of kChunk pixels, the unit of parallel work
// and of the fixed-order loss reduction, and each chunk into tiles of kTile pixels, whose C class
// rows stay in cache while the kernels loop over the classes. 256-pixel tiles (1 KB rows in
// float32) were faster than 64 or 512: longer runs per row for the prefetcher, still in L1/L2.
namespace tiles {

constexpr int64_t kTile = 256;
constexpr int64_t kChunk = 2048;  // a multiple of kTile, so tiles never straddle chunks

struct Geometry {
  int64_t B, C, S;  // S = H * W, the contiguous plane of one class
  int64_t chunks_per_image() const { return (S + kChunk - 1) / kChunk; }
  int64_t chunks() const { return B * chunks_per_image(); }
};

// Calls f(b, s0, n) for every tile of chunk `chunk`.
template <typename F>
inline void for_each_tile(const Geometry& g, int64_t chunk, F&& f) {
  const int64_t b = chunk / g.chunks_per_image();
  const int64_t begin = (chunk % g.chunks_per_image()) * kChunk;
  const int64_t end = std::min(g.S, begin + kChunk);
  for (int64_t s0 = begin; s0 < end; s0 += kTile) f(b, s0, std::min(kTile, end - s0));
}

// Runs f(chunk, scratch) for every chunk on torch's number of OpenMP threads. Chunks are handed
// out one at a time, so a thread slowed by other load does not hold up the rest. scratch: C *
// kTile values per thread, allocated before the parallel region so nothing inside it throws.
template <typename T, typename F>
void parallel_chunks(const Geometry& g, F&& f) {
  const int threads = at::in_parallel_region() ? 1 : at::get_num_threads();
  std::vector<T> scratch(static_cast<size_t>(threads) * g.C * kTile);
  const int64_t chunks = g.chunks();
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads) if (chunks > 1)
  for (int64_t chunk = 0; chunk < chunks; ++chunk) f(chunk, scratch.data() + omp_get_thread_num() * g.C * kTile);
}

// The kernels write a fresh gradient right after allocating it. On Linux, transparent huge pages
// for it (what PyTorch's THP_MEM_ALLOC_ENABLE=1 does for every allocation) replace 512 page faults
// by one: about 20 ms less per 40 MB gradient on a 2-core machine. Only advice: if the kernel
// refuses, nothing changes.
inline void advise_huge_pages(const at::Tensor& t) {
#ifdef __linux__
  constexpr uintptr_t kHuge = uintptr_t(1) << 21;
  const uintptr_t start = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t begin = (start + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (start + t.nbytes()) & ~(kHuge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#endif
}

}  // namespace tiles
}  // namespace udafast
