// SPEC 1.1 on CUDA: exact class thresholds (a radix select per class, bit for bit the CPU
// kernel's result), the streaming class histogram, and CBST pseudo-labels.
//
// class_thresholds: 3 launches (count per block and class, scatter into class buckets, one block
// per class selecting the floor(N_c * portion)-th largest key; see class_buckets.cuh), plus one
// int64 cast of the labels for uint16/uint32/uint64 labels only. No host synchronisation, no
// zero-filled workspace, output shape [C].
// class_histogram_add_: 1 launch (int64 atomics into the counts). cbst_pseudo_labels: 1 launch.
#ifndef UDAFAST_CUDA_EMULATION  // see class_buckets.cuh
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>
#endif

#include <cmath>
#include <cstdint>
#include <limits>

#include "class_buckets.cuh"

namespace udafast_cuda {
namespace {

// ---------------------------------------------------------------------------------------------
// class_histogram_add_ (1 launch)

__device__ __forceinline__ float floor_value(float x) { return floorf(x); }
__device__ __forceinline__ double floor_value(double x) { return floor(x); }

// As the CPU kernel: bin = min(floor(x * bins), bins - 1) in the confidence's dtype, with std::min's
// (b < a ? b : a) so that NaN stays NaN; pixels with an ignored or out-of-range label, or a bin that
// is not >= 0 (negative or NaN confidence), are left out. Lanes of a warp that hit the same counter
// (neighbouring pixels of one class, confidences of exactly 1.0) add with one atomic.
template <typename scalar_t, typename label_t>
__global__ void __launch_bounds__(256)
    histogram_add_kernel(const scalar_t* __restrict__ conf, const label_t* __restrict__ pred, int64_t n,
                         int64_t num_classes, int64_t bins, int64_t ignore_index, int64_t* counts, int64_t stride_c,
                         int64_t stride_b) {
  const scalar_t scale = static_cast<scalar_t>(bins);
  const scalar_t last_bin = static_cast<scalar_t>(bins - 1);
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  // The loop bound depends on the block only, so whole warps stay in it (__match_any_sync).
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * blockDim.x; base < n; base += step) {
    const int64_t i = base + threadIdx.x;
    long long cell = -1;  // element offset of the pixel's counter, -1 for none
    if (i < n) {
      const int64_t c = static_cast<int64_t>(pred[i]);
      const scalar_t f = floor_value(conf[i] * scale);
      const scalar_t bin = last_bin < f ? last_bin : f;
      if (c != ignore_index && c >= 0 && c < num_classes && bin >= scalar_t(0)) {
        cell = c * stride_c + static_cast<int64_t>(bin) * stride_b;
      }
    }
    const unsigned peers = __match_any_sync(kFullMask, cell);
    if (cell >= 0 && static_cast<int>(threadIdx.x & 31) == __ffs(peers) - 1) {
      atomicAdd(reinterpret_cast<unsigned long long*>(counts + cell), static_cast<unsigned long long>(__popc(peers)));
    }
  }
}

// ---------------------------------------------------------------------------------------------
// cbst_pseudo_labels (1 launch)

// One thread per pixel, the CPU kernel's arithmetic: r_c = p_c / t_c (IEEE division in the
// probabilities' dtype), the first maximum wins and NaN counts as the maximum (torch.argmax),
// ignore_index where the best ratio is below 1.
template <typename scalar_t>
__global__ void __launch_bounds__(256)
    pseudo_labels_kernel(const scalar_t* __restrict__ probs, const scalar_t* __restrict__ thresholds, int64_t batch,
                         int64_t num_classes, int64_t pixels, int64_t ignore_index, int64_t* __restrict__ out) {
  const int64_t total = batch * pixels;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += step) {
    const int64_t b = i / pixels;
    const int64_t q = i - b * pixels;
    const scalar_t* p = probs + b * num_classes * pixels + q;
    scalar_t best = p[0] / thresholds[0];
    int64_t label = 0;
    for (int64_t c = 1; c < num_classes; ++c) {
      const scalar_t r = p[c * pixels] / thresholds[c];
      const bool take = (r > best) | ((r != r) & (best == best));
      best = take ? r : best;
      label = take ? c : label;
    }
    out[i] = best < scalar_t(1) ? ignore_index : label;
  }
}

// ---------------------------------------------------------------------------------------------
// Host side

#ifndef UDAFAST_CUDA_EMULATION

void check_labels(const at::Tensor& pred, const char* op) {
  TORCH_CHECK(at::isIntegralType(pred.scalar_type(), /*includeBool=*/false), op, ": pred must be of an integer dtype");
}

at::Tensor class_thresholds_cuda(const at::Tensor& conf, const at::Tensor& pred, int64_t num_classes, double portion,
                                 int64_t ignore_index) {
  TORCH_CHECK(conf.sizes() == pred.sizes(), "class_thresholds: conf and pred must have the same shape");
  TORCH_CHECK(num_classes >= 1, "class_thresholds: num_classes must be >= 1");
  TORCH_CHECK(num_classes <= std::numeric_limits<int32_t>::max(), "class_thresholds: num_classes must be below 2^31");
  TORCH_CHECK(conf.is_cuda() && pred.device() == conf.device(), "class_thresholds: conf and pred must be on the same CUDA device");
  check_labels(pred, "class_thresholds");
  const int64_t n = conf.numel();
  TORCH_CHECK(n < (int64_t(1) << 32), "class_thresholds: the CUDA kernel takes fewer than 2^32 pixels");
  const c10::cuda::CUDAGuard guard(conf.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor values = conf.contiguous();
  const at::Tensor labels = dispatchable_labels(pred);
  at::Tensor out = at::empty({num_classes}, conf.options());

  AT_DISPATCH_FLOATING_TYPES(values.scalar_type(), "class_thresholds_cuda", [&] {
    using conf_t = scalar_t;
    using Workspace = BucketWorkspace<conf_t, false>;
    const at::Tensor bytes = at::empty({Workspace::bytes(n, num_classes)}, values.options().dtype(at::kByte));
    const Workspace ws(bytes.mutable_data_ptr<uint8_t>(), n, num_classes);
    AT_DISPATCH_INTEGRAL_TYPES(labels.scalar_type(), "class_thresholds_cuda", [&] {
      fill_buckets(values.const_data_ptr<conf_t>(), labels.const_data_ptr<scalar_t>(), ignore_index, ws, stream);
    });
    select_thresholds(ws, portion, out.mutable_data_ptr<conf_t>(), stream);
  });
  return out;
}

void class_histogram_add_cuda(at::Tensor& counts, const at::Tensor& conf, const at::Tensor& pred,
                              int64_t ignore_index) {
  TORCH_CHECK(counts.dim() == 2 && counts.scalar_type() == at::kLong, "class_histogram_add_: counts must be int64 [C, bins]");
  TORCH_CHECK(conf.sizes() == pred.sizes(), "class_histogram_add_: conf and pred must have the same shape");
  TORCH_CHECK(conf.is_cuda() && pred.device() == conf.device() && counts.device() == conf.device(),
              "class_histogram_add_: counts, conf and pred must be on the same CUDA device");
  check_labels(pred, "class_histogram_add_");
  const int64_t num_classes = counts.size(0);
  const int64_t bins = counts.size(1);
  TORCH_CHECK(bins >= 1 && (bins & (bins - 1)) == 0, "class_histogram_add_: bins must be a power of two");
  TORCH_CHECK(num_classes * bins <= std::numeric_limits<int32_t>::max(),
              "class_histogram_add_: C * bins must be below 2^31");
  const int64_t n = conf.numel();
  if (n == 0) return;
  const c10::cuda::CUDAGuard guard(conf.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor values = conf.contiguous();
  const at::Tensor labels = dispatchable_labels(pred);
  constexpr int kThreads = 256;
  const int64_t blocks = std::min<int64_t>((n + kThreads - 1) / kThreads, 8192);
  AT_DISPATCH_FLOATING_TYPES(values.scalar_type(), "class_histogram_add_cuda", [&] {
    using conf_t = scalar_t;
    AT_DISPATCH_INTEGRAL_TYPES(labels.scalar_type(), "class_histogram_add_cuda", [&] {
      histogram_add_kernel<conf_t, scalar_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
          values.const_data_ptr<conf_t>(), labels.const_data_ptr<scalar_t>(), n, num_classes, bins, ignore_index,
          counts.mutable_data_ptr<int64_t>(), counts.stride(0), counts.stride(1));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

at::Tensor cbst_pseudo_labels_cuda(const at::Tensor& probs, const at::Tensor& thresholds, int64_t ignore_index) {
  TORCH_CHECK(probs.dim() == 4, "cbst_pseudo_labels: probs must be [B, C, H, W]");
  TORCH_CHECK(thresholds.dim() == 1 && thresholds.size(0) == probs.size(1),
              "cbst_pseudo_labels: thresholds must be [C]");
  TORCH_CHECK(probs.size(1) >= 1, "cbst_pseudo_labels: probs needs at least one class");
  TORCH_CHECK(probs.is_cuda() && thresholds.device() == probs.device(),
              "cbst_pseudo_labels: probs and thresholds must be on the same CUDA device");
  const int64_t batch = probs.size(0), num_classes = probs.size(1), pixels = probs.size(2) * probs.size(3);
  at::Tensor out = at::empty({batch, probs.size(2), probs.size(3)}, probs.options().dtype(at::kLong));
  if (out.numel() == 0) return out;
  const c10::cuda::CUDAGuard guard(probs.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor p = probs.contiguous();
  const at::Tensor t = thresholds.to(probs.scalar_type()).contiguous();
  constexpr int kThreads = 256;
  const int64_t blocks = std::min<int64_t>((out.numel() + kThreads - 1) / kThreads, int64_t(1) << 20);
  AT_DISPATCH_FLOATING_TYPES(p.scalar_type(), "cbst_pseudo_labels_cuda", [&] {
    pseudo_labels_kernel<scalar_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        p.const_data_ptr<scalar_t>(), t.const_data_ptr<scalar_t>(), batch, num_classes, pixels, ignore_index,
        out.mutable_data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

#endif  // UDAFAST_CUDA_EMULATION

}  // namespace
}  // namespace udafast_cuda

#ifndef UDAFAST_CUDA_EMULATION
TORCH_LIBRARY_IMPL(udafast, CUDA, m) {
  m.impl("class_thresholds", &udafast_cuda::class_thresholds_cuda);
  m.impl("class_histogram_add_", &udafast_cuda::class_histogram_add_cuda);
  m.impl("cbst_pseudo_labels", &udafast_cuda::cbst_pseudo_labels_cuda);
}
#endif
