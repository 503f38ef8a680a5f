// SPEC 1.2 on CUDA: per-class top-K, bit for bit the CPU kernel's result.
//
// 3 launches (plus one int64 cast of the labels for uint16/uint32/uint64 labels only):
//   1. count the valid pixels per block and class,
//   2. scatter each pixel's entry (score key << 32 | 2^32 - 1 - position) into its class bucket,
//   3. one block per class: if N_c > k, a radix select collects the k largest entries; then the
//      min(N_c, k) entries are sorted descending (shared-memory bitonic tiles of 2048, merged in
//      global memory for larger k) and their positions written, the row padded with -1.
// (class_buckets.cuh.) Entries are distinct (the position is part of the key), so the selection
// and the order are exact and do not depend on the order atomics fill the buckets in. No host
// synchronisation, no zero-filled workspace; outputs [C, k] and [C].
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <tuple>

#include "class_buckets.cuh"

namespace udafast_cuda {
namespace {

std::tuple<at::Tensor, at::Tensor> topk_per_class_cuda(const at::Tensor& scores, const at::Tensor& labels,
                                                       int64_t num_classes, int64_t k, int64_t ignore_index) {
  TORCH_CHECK(scores.dim() == 1 && labels.dim() == 1 && scores.size(0) == labels.size(0),
              "topk_per_class: scores and labels must be [N] tensors of the same length");
  TORCH_CHECK(num_classes >= 1 && k >= 1, "topk_per_class: num_classes and k must be at least 1");
  TORCH_CHECK(num_classes <= std::numeric_limits<int32_t>::max(), "topk_per_class: num_classes must be below 2^31");
  TORCH_CHECK(!at::isIntegralType(scores.scalar_type(), true) && at::isIntegralType(labels.scalar_type(), false),
              "topk_per_class: scores must be floating point and labels integer");
  TORCH_CHECK(scores.is_cuda() && labels.device() == scores.device(),
              "topk_per_class: scores and labels must be on the same CUDA device");
  const int64_t n = scores.size(0);
  // Positions take the low 32 bits of an entry, and pixel counts are uint32 inside.
  TORCH_CHECK(n < (int64_t(1) << 32), "topk_per_class: the CUDA kernel takes fewer than 2^32 scores");
  const c10::cuda::CUDAGuard guard(scores.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  auto index = at::empty({num_classes, k}, scores.options().dtype(at::kLong));
  auto count = at::empty({num_classes}, scores.options().dtype(at::kLong));
  const at::Tensor values = scores.contiguous();
  const at::Tensor label_values = dispatchable_labels(labels);
  AT_DISPATCH_FLOATING_TYPES(values.scalar_type(), "topk_per_class_cuda", [&] {
    using score_t = scalar_t;
    using Workspace = BucketWorkspace<score_t, true>;
    const at::Tensor bytes = at::empty({Workspace::bytes(n, num_classes, k)}, values.options().dtype(at::kByte));
    const Workspace ws(bytes.mutable_data_ptr<uint8_t>(), n, num_classes, k);
    AT_DISPATCH_INTEGRAL_TYPES(label_values.scalar_type(), "topk_per_class_cuda", [&] {
      fill_buckets(values.const_data_ptr<score_t>(), label_values.const_data_ptr<scalar_t>(), ignore_index, ws,
                   stream);
    });
    select_topk(ws, index.mutable_data_ptr<int64_t>(), count.mutable_data_ptr<int64_t>(), stream);
  });
  return {index, count};
}

}  // namespace
}  // namespace udafast_cuda

TORCH_LIBRARY_IMPL(udafast, CUDA, m) { m.impl("topk_per_class", &udafast_cuda::topk_per_class_cuda); }
