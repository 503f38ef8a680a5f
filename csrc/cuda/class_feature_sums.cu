// SPEC 1.3 on CUDA: per image and class, the sum of its pixels' features and their count, as
// csrc/cpu/class_feature_sums.cpp (float32 and float64 features).
//
// Deterministic without float atomics. A first kernel turns the labels into int32 slots
// (-1 for ignored or out-of-range labels) and counts them (integer atomics). A second
// one gives each block (image, segment of kSegment pixels, block of classes, kSumDepth channels);
// each thread adds its pixels into its own double accumulators in shared memory ([class][channel]
// [thread]), which are then summed in a fixed order into a double partial per segment; a third
// kernel sums the segments in order and writes the features' dtype.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <tuple>

namespace {

constexpr int kSlotThreads = 256;
constexpr int64_t kSlotPixels = 4096;    // pixels per block of the label kernel
constexpr int64_t kHistClasses = 8192;   // classes counted in shared memory before global atomics
constexpr int kSumThreads = 128;         // threads of the partial-sum kernel (a power of two)
constexpr int kSumDepth = 2;             // channels per block of the partial-sum kernel
constexpr int64_t kSumClasses = 24;      // classes per block: 24 * 2 * 128 doubles = 48 KiB
constexpr int64_t kSegment = 32768;      // pixels per block of the partial-sum kernel
constexpr int kFinalThreads = 256;

// slots[b, p] = labels[b, p] if it is a class (in [0, C), not ignore_index), else -1;
// counts[b, c] += the pixels of class c. Grid: B * blocks_per_image.
template <typename L>
__global__ void __launch_bounds__(kSlotThreads)
    label_slots_kernel(const L* __restrict__ labels, int32_t* __restrict__ slots,
                       unsigned long long* __restrict__ counts, int64_t N, int64_t C, int64_t ignore_index,
                       int64_t blocks_per_image, bool shared_histogram) {
  extern __shared__ unsigned int hist[];  // [C] when shared_histogram
  const int64_t block = blockIdx.x;
  const int64_t b = block / blocks_per_image;
  const int64_t begin = (block - b * blocks_per_image) * kSlotPixels;
  const int64_t end = begin + kSlotPixels < N ? begin + kSlotPixels : N;
  if (shared_histogram) {
    for (int64_t c = threadIdx.x; c < C; c += kSlotThreads) hist[c] = 0u;
    __syncthreads();
  }
  for (int64_t p = begin + threadIdx.x; p < end; p += kSlotThreads) {
    const int64_t l = static_cast<int64_t>(labels[b * N + p]);
    const bool is_class = l != ignore_index && l >= 0 && l < C;
    slots[b * N + p] = is_class ? static_cast<int32_t>(l) : int32_t(-1);
    if (is_class) {
      if (shared_histogram)
        atomicAdd(&hist[l], 1u);
      else
        atomicAdd(&counts[b * C + l], 1ull);
    }
  }
  if (shared_histogram) {
    __syncthreads();
    for (int64_t c = threadIdx.x; c < C; c += kSlotThreads)
      if (hist[c] != 0u) atomicAdd(&counts[b * C + c], static_cast<unsigned long long>(hist[c]));
  }
}

// partial[b, s, c, d] = sum of features[b, d, p] over the pixels p of segment s with slot c, in
// double, for the block's classes [c0, c0 + cc) and channels [d0, d0 + kSumDepth).
// Grid: B * segments * cchunks * dchunks blocks, the channel block fastest.
template <typename T>
__global__ void __launch_bounds__(kSumThreads)
    class_sums_partial_kernel(const T* __restrict__ features, const int32_t* __restrict__ slots,
                              double* __restrict__ partial, int64_t N, int64_t D, int64_t C, int64_t segments,
                              int64_t cchunks, int64_t dchunks, int64_t cc) {
  extern __shared__ double acc_s[];  // [cc][kSumDepth][kSumThreads], one column per thread
  int64_t r = blockIdx.x;
  const int64_t dchunk = r % dchunks;
  r /= dchunks;
  const int64_t cchunk = r % cchunks;
  r /= cchunks;
  const int64_t s = r % segments;
  const int64_t b = r / segments;
  const int64_t c0 = cchunk * cc, d0 = dchunk * kSumDepth;
  const int64_t cn = C - c0 < cc ? C - c0 : cc;
  const int t = threadIdx.x;
  for (int64_t i = t; i < cn * kSumDepth * kSumThreads; i += kSumThreads) acc_s[i] = 0.0;
  __syncthreads();

  const int64_t begin = s * kSegment;
  const int64_t end = begin + kSegment < N ? begin + kSegment : N;
  const T* fb = features + (b * D + d0) * N;  // features[b, d0, 0]
  const int32_t* sb = slots + b * N;
  bool channel_in[kSumDepth];
#pragma unroll
  for (int q = 0; q < kSumDepth; ++q) channel_in[q] = d0 + q < D;
  // four pixels per step (their loads in flight together); each thread adds into its own column,
  // in pixel order
  constexpr int kUnroll = 4;
  for (int64_t p0 = begin + t; p0 < end; p0 += kUnroll * kSumThreads) {
    int64_t slot[kUnroll];
    T v[kUnroll][kSumDepth];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t p = p0 + u * kSumThreads;
      slot[u] = p < end ? static_cast<int64_t>(sb[p]) - c0 : int64_t(-1);
#pragma unroll
      for (int q = 0; q < kSumDepth; ++q) v[u][q] = (p < end && channel_in[q]) ? fb[q * N + p] : T(0);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
      if (slot[u] >= 0 && slot[u] < cn) {
#pragma unroll
        for (int q = 0; q < kSumDepth; ++q) acc_s[(slot[u] * kSumDepth + q) * kSumThreads + t] += static_cast<double>(v[u][q]);
      }
  }
  __syncthreads();

  // each (class, channel) column summed by one thread in a fixed order (rotated by the column
  // index so that a warp's reads fall in different banks)
  for (int64_t o = t; o < cn * kSumDepth; o += kSumThreads) {
    const double* column = acc_s + o * kSumThreads;
    double sum = 0.0;
    for (int i = 0; i < kSumThreads; ++i) sum += column[(i + o) & (kSumThreads - 1)];
    const int64_t c = c0 + o / kSumDepth, d = d0 + o % kSumDepth;
    if (d < D) partial[((b * segments + s) * C + c) * D + d] = sum;
  }
}

// sums[b, c, d] = sum over segments s in order of partial[b, s, c, d]. total = B * C * D.
template <typename T>
__global__ void __launch_bounds__(kFinalThreads)
    class_sums_final_kernel(const double* __restrict__ partial, T* __restrict__ sums, int64_t total,
                            int64_t segments, int64_t CD) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kFinalThreads + threadIdx.x;
  if (i >= total) return;
  const int64_t b = i / CD, r = i - b * CD;  // r = c * D + d
  const double* src = partial + b * segments * CD + r;
  double sum = 0.0;
  for (int64_t s = 0; s < segments; ++s) sum += src[s * CD];
  sums[i] = static_cast<T>(sum);
}

std::tuple<at::Tensor, at::Tensor> class_feature_sums_cuda(const at::Tensor& features, const at::Tensor& labels,
                                                           int64_t num_classes, int64_t ignore_index) {
  TORCH_CHECK(features.dim() == 4, "features must be [B, D, H, W]; got ", features.sizes());
  TORCH_CHECK(labels.dim() == 3 && labels.size(0) == features.size(0) && labels.size(1) == features.size(2) &&
                  labels.size(2) == features.size(3),
              "labels must be [B, H, W] matching the features; got ", labels.sizes());
  TORCH_CHECK(!at::isFloatingType(labels.scalar_type()) && !at::isComplexType(labels.scalar_type()) &&
                  labels.scalar_type() != at::kBool,
              "labels must be of an integer dtype; got ", labels.scalar_type());
  TORCH_CHECK(num_classes >= 0, "num_classes must be >= 0; got ", num_classes);
  TORCH_CHECK(features.is_cuda() && labels.device() == features.device(),
              "features and labels must be on the same CUDA device");
  TORCH_CHECK(features.scalar_type() == at::kFloat || features.scalar_type() == at::kDouble,
              "features must be float32 or float64; got ", features.scalar_type());
  const c10::cuda::CUDAGuard guard(features.device());
  const at::Tensor f = features.contiguous();
  const int64_t B = f.size(0), D = f.size(1), N = f.size(2) * f.size(3), C = num_classes;
  at::Tensor sums = at::empty({B, C, D}, f.options());
  at::Tensor counts = at::zeros({B, C}, f.options().dtype(at::kLong));
  if (B * N == 0 || C == 0) return {sums.zero_(), counts};
  TORCH_CHECK(C <= std::numeric_limits<int32_t>::max(), "num_classes too large");
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  // 1. slots and counts
  const auto lt = labels.scalar_type();
  const bool direct = lt == at::kByte || lt == at::kChar || lt == at::kShort || lt == at::kInt || lt == at::kLong;
  const at::Tensor lab = direct ? labels.contiguous() : labels.to(at::kLong).contiguous();
  at::Tensor slots = at::empty({B, N}, f.options().dtype(at::kInt));
  const int64_t slot_blocks = (N + kSlotPixels - 1) / kSlotPixels;
  TORCH_CHECK(B * slot_blocks <= std::numeric_limits<int32_t>::max(), "too many pixels for one launch");
  const bool shared_histogram = C <= kHistClasses;
  const size_t hist_bytes = shared_histogram ? static_cast<size_t>(C) * sizeof(unsigned int) : 0;
  AT_DISPATCH_INTEGRAL_TYPES(lab.scalar_type(), "class_feature_sums_cuda_labels", [&] {
    label_slots_kernel<scalar_t><<<static_cast<unsigned>(B * slot_blocks), kSlotThreads, hist_bytes, stream>>>(
        lab.data_ptr<scalar_t>(), slots.data_ptr<int32_t>(),
        reinterpret_cast<unsigned long long*>(counts.data_ptr<int64_t>()), N, C, ignore_index, slot_blocks,
        shared_histogram);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  if (D == 0) return {sums, counts};

  // 2. per-segment partial sums in double, 3. their sum in segment order
  const int64_t segments = (N + kSegment - 1) / kSegment;
  const int64_t cc = std::min(C, kSumClasses);
  const int64_t cchunks = (C + cc - 1) / cc, dchunks = (D + kSumDepth - 1) / kSumDepth;
  const int64_t sum_blocks = B * segments * cchunks * dchunks;
  TORCH_CHECK(sum_blocks <= std::numeric_limits<int32_t>::max(), "too many blocks for one launch");
  const size_t acc_bytes = static_cast<size_t>(cc) * kSumDepth * kSumThreads * sizeof(double);
  at::Tensor partial = at::empty({B, segments, C, D}, f.options().dtype(at::kDouble));
  const int64_t total = B * C * D;
  const int64_t final_blocks = (total + kFinalThreads - 1) / kFinalThreads;
  TORCH_CHECK(final_blocks <= std::numeric_limits<int32_t>::max(), "too many outputs for one launch");
  AT_DISPATCH_FLOATING_TYPES(f.scalar_type(), "class_feature_sums_cuda", [&] {
    class_sums_partial_kernel<scalar_t><<<static_cast<unsigned>(sum_blocks), kSumThreads, acc_bytes, stream>>>(
        f.data_ptr<scalar_t>(), slots.data_ptr<int32_t>(), partial.data_ptr<double>(), N, D, C, segments, cchunks,
        dchunks, cc);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    class_sums_final_kernel<scalar_t><<<static_cast<unsigned>(final_blocks), kFinalThreads, 0, stream>>>(
        partial.data_ptr<double>(), sums.data_ptr<scalar_t>(), total, segments, C * D);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {sums, counts};
}

}  // namespace

TORCH_LIBRARY_IMPL(udafast, CUDA, m) { m.impl("class_feature_sums", &class_feature_sums_cuda); }
