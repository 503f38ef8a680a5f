// SPEC 1.3 on the CPU: per image and class, the sum of its pixels' features (in the features'
// dtype, accumulated in double) and their count; ignored and out-of-range labels are skipped.
// One task per (image, channel) row, each sum made by one thread in a fixed order, so the results
// cannot depend on the thread count.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <vector>

namespace {

// Feature rows summed per class: four interleaved accumulator sets break the add-latency chain of
// runs of one label, and are combined in a fixed order.
template <typename T>
void sum_row(const T* row, const int32_t* slot, int64_t N, int64_t slots, double* acc) {
  std::fill(acc, acc + 4 * slots, 0.0);
  double *a0 = acc, *a1 = acc + slots, *a2 = acc + 2 * slots, *a3 = acc + 3 * slots;
  int64_t p = 0;
  for (; p + 4 <= N; p += 4) {
    a0[slot[p]] += row[p];
    a1[slot[p + 1]] += row[p + 1];
    a2[slot[p + 2]] += row[p + 2];
    a3[slot[p + 3]] += row[p + 3];
  }
  for (; p < N; ++p) a0[slot[p]] += row[p];
  for (int64_t c = 0; c < slots; ++c) a0[c] = (a0[c] + a1[c]) + (a2[c] + a3[c]);
}

std::tuple<at::Tensor, at::Tensor> class_feature_sums_cpu(const at::Tensor& features, const at::Tensor& labels,
                                                          int64_t num_classes, int64_t ignore_index) {
  TORCH_CHECK(features.dim() == 4, "features must be [B, D, H, W]; got ", features.sizes());
  TORCH_CHECK(labels.dim() == 3 && labels.size(0) == features.size(0) && labels.size(1) == features.size(2) &&
                  labels.size(2) == features.size(3),
              "labels must be [B, H, W] matching the features; got ", labels.sizes());
  TORCH_CHECK(!at::isFloatingType(labels.scalar_type()) && labels.scalar_type() != at::kBool,
              "labels must be of an integer dtype; got ", labels.scalar_type());
  TORCH_CHECK(num_classes >= 0, "num_classes must be >= 0; got ", num_classes);
  const at::Tensor f = features.contiguous();
  const int64_t B = f.size(0), D = f.size(1), N = f.size(2) * f.size(3), C = num_classes;
  at::Tensor sums = at::zeros({B, C, D}, f.options());
  at::Tensor counts = at::zeros({B, C}, f.options().dtype(at::kLong));
  if (B * N == 0 || C == 0) return {sums, counts};
  // Each pixel's slot: its class, or C for labels that are ignored or out of range (a bin that is
  // summed and dropped, so the inner loop has no branch).
  const at::Tensor lab = labels.to(at::kLong).contiguous();
  std::vector<int32_t> slot(B * N);
  const int64_t* lp = lab.data_ptr<int64_t>();
  int64_t* cp = counts.data_ptr<int64_t>();
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b)
      for (int64_t i = b * N; i < (b + 1) * N; ++i) {
        const int64_t l = lp[i];
        const bool valid = l != ignore_index && l >= 0 && l < C;
        slot[i] = valid ? int32_t(l) : int32_t(C);
        if (valid) ++cp[b * C + l];
      }
  });
  if (D == 0) return {sums, counts};
  AT_DISPATCH_FLOATING_TYPES(f.scalar_type(), "class_feature_sums", [&] {
    using T = scalar_t;
    const T* fp = f.data_ptr<T>();
    T* sp = sums.data_ptr<T>();
    // one task per (image, channel) row: each sum is made by one thread in a fixed order
    at::parallel_for(0, B * D, 1, [&](int64_t begin, int64_t end) {
      std::vector<double> acc(4 * (C + 1));
      for (int64_t r = begin; r < end; ++r) {
        const int64_t b = r / D, d = r % D;
        sum_row(fp + r * N, slot.data() + b * N, N, C + 1, acc.data());
        for (int64_t c = 0; c < C; ++c) sp[(b * C + c) * D + d] = T(acc[c]);
      }
    });
  });
  return {sums, counts};
}

}  // namespace

TORCH_LIBRARY_IMPL(udafast, CPU, m) { m.impl("class_feature_sums", &class_feature_sums_cpu); }
