// SPEC 1.3 on CUDA: ProDA's prototype distance softmax (forward and backward) and rectified
// pseudo-labels (the per-class feature sums are in class_feature_sums.cu). The numerics follow
// csrc/cpu/prototype_softmax.cpp.
//
// prototype_softmax / prototype_rectify: a block of kThreads threads takes kThreads consecutive
// pixels of one image, one thread per pixel, so every read of a channel row features[b, d, :] is
// coalesced. The prototypes are staged in shared memory in slabs of CB classes x kDepth channels
// (read by all threads as broadcasts), and each thread holds its CB distance accumulators in
// registers: (f - p)^2 summed by FMA in float32 over a slab's kDepth channels (double for double
// features), then widened into a double total (float for float16/bfloat16), as the CPU kernel
// does. CB is a compile-time class block (8, 16, 24, 32); with more than 32 classes the classes are
// walked in blocks of 32, the distances of each block going to global memory (the distances
// output, or a scratch tensor for rectify) and read back by the same thread for the softmax.
// The softmax, its log and the rectified argmax are computed per pixel in double (float for
// float16/bfloat16 features) from exp(z_c - max z), z_c = -d_c / tau.
//
// prototype_softmax_backward: grad_f[d] = sum_c a_c (f_d - p_cd), a_c = dL/dd_c / d_c (0 where
// d_c == 0) computed once per pixel from grad_out, out and the saved distances; the sum over
// classes runs in class order by FMA in the features' precision (float32 for float16/bfloat16), as
// the CPU kernel's. With more than 32 classes the running sum is kept in the gradient tensor
// (float32 scratch for float16/bfloat16) between class blocks.
//
// Nothing here synchronises with the host; the output shapes depend on the input shapes only.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>

namespace {

// Pixels per block (one per thread) of the distance kernels.
constexpr int kThreads = 128;
// Channels per staged prototype slab; the float32 partial sums are widened after each slab (the
// CPU kernel's kDepthBlock).
constexpr int kDepth = 32;

// sum_t: the distances' partial sums, the stored distances and the backward's sums;
// acc_t: the widened totals and the softmax.
template <typename T>
struct Types {
  using sum_t = float;
  using acc_t = double;
};
template <>
struct Types<double> {
  using sum_t = double;
  using acc_t = double;
};
template <>
struct Types<c10::Half> {
  using sum_t = float;
  using acc_t = float;
};
template <>
struct Types<c10::BFloat16> {
  using sum_t = float;
  using acc_t = float;
};

template <typename T>
constexpr bool kReduced = std::is_same_v<T, c10::Half> || std::is_same_v<T, c10::BFloat16>;

// IEEE math (no fast-math) per precision.
__device__ __forceinline__ float dexp(float x) { return expf(x); }
__device__ __forceinline__ double dexp(double x) { return exp(x); }
__device__ __forceinline__ float dlog(float x) { return logf(x); }
__device__ __forceinline__ double dlog(double x) { return log(x); }
__device__ __forceinline__ float dsqrt(float x) { return sqrtf(x); }
__device__ __forceinline__ double dsqrt(double x) { return sqrt(x); }
__device__ __forceinline__ float dfma(float a, float b, float c) { return fmaf(a, b, c); }
__device__ __forceinline__ double dfma(double a, double b, double c) { return fma(a, b, c); }

// A value of a tensor element type as float / double (c10::Half and c10::BFloat16 go via float).
template <typename A, typename T>
__device__ __forceinline__ A as(T x) {
  if constexpr (kReduced<T>) {
    return static_cast<A>(static_cast<float>(x));
  } else {
    return static_cast<A>(x);
  }
}

// A float / double rounded to a tensor element type.
template <typename T, typename A>
__device__ __forceinline__ T to(A x) {
  if constexpr (kReduced<T>) {
    return T(static_cast<float>(x));
  } else {
    return static_cast<T>(x);
  }
}

// Four consecutive values from 16-byte aligned shared memory.
__device__ __forceinline__ void load4(const float* p, float (&v)[4]) {
  const float4 x = *reinterpret_cast<const float4*>(p);
  v[0] = x.x;
  v[1] = x.y;
  v[2] = x.z;
  v[3] = x.w;
}
__device__ __forceinline__ void load4(const double* p, double (&v)[4]) {
  const double2 x = *reinterpret_cast<const double2*>(p);
  const double2 y = *reinterpret_cast<const double2*>(p + 2);
  v[0] = x.x;
  v[1] = x.y;
  v[2] = y.x;
  v[3] = y.y;
}

// The compile-time class block for C classes (also the block size of the walk when C > 32).
constexpr int class_block(int64_t C) { return C <= 8 ? 8 : C <= 16 ? 16 : C <= 24 ? 24 : 32; }

template <typename F>
void with_class_block(int64_t C, const F& f) {
  switch (class_block(C)) {
    case 8:
      f(std::integral_constant<int, 8>{});
      break;
    case 16:
      f(std::integral_constant<int, 16>{});
      break;
    case 24:
      f(std::integral_constant<int, 24>{});
      break;
    default:
      f(std::integral_constant<int, 32>{});
      break;
  }
}

// dist[j] = ||f - p_{c0 + j}||_2 for j < CB (classes past C see zero prototypes; their values are
// not used). fpix points at features[b, 0, pixel]; channel rows lie N apart. Every thread of the
// block must call this (it synchronises); `valid` is false for the padding pixels of the last tile,
// which read nothing.
template <typename T, int CB>
__device__ __forceinline__ void chunk_distances(const T* __restrict__ fpix, int64_t N, bool valid,
                                                const typename Types<T>::sum_t* __restrict__ protos, int64_t C,
                                                int64_t D, int64_t c0, typename Types<T>::sum_t* p_s,
                                                typename Types<T>::acc_t (&dist)[CB]) {
  using sum_t = typename Types<T>::sum_t;
  using acc_t = typename Types<T>::acc_t;
  acc_t total[CB];
#pragma unroll
  for (int j = 0; j < CB; ++j) total[j] = acc_t(0);
  for (int64_t d0 = 0; d0 < D; d0 += kDepth) {
    __syncthreads();  // every thread is done with the previous slab
    // p_s[j][k] = prototypes[c0 + j, d0 + k], zeros past C or D
    for (int i = threadIdx.x; i < CB * kDepth; i += kThreads) {
      const int j = i / kDepth, k = i % kDepth;
      const int64_t c = c0 + j, d = d0 + k;
      p_s[i] = (c < C && d < D) ? protos[c * D + d] : sum_t(0);
    }
    __syncthreads();
    sum_t part[CB];
#pragma unroll
    for (int j = 0; j < CB; ++j) part[j] = sum_t(0);
#pragma unroll
    for (int k = 0; k < kDepth; k += 4) {
      // channels past D read as 0 against prototypes padded with 0: they add nothing
      sum_t fv[4];
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const int64_t d = d0 + k + q;
        fv[q] = (valid && d < D) ? as<sum_t>(fpix[d * N]) : sum_t(0);
      }
#pragma unroll
      for (int j = 0; j < CB; ++j) {
        sum_t p[4];
        load4(p_s + j * kDepth + k, p);
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          const sum_t t = fv[q] - p[q];
          part[j] = dfma(t, t, part[j]);
        }
      }
    }
#pragma unroll
    for (int j = 0; j < CB; ++j) total[j] += static_cast<acc_t>(part[j]);
  }
#pragma unroll
  for (int j = 0; j < CB; ++j) dist[j] = dsqrt(total[j]);
}

enum Mode : int { kSoftmax = 0, kLogSoftmax = 1, kRectify = 2 };

// Forward (kSoftmax, kLogSoftmax: out and dist written) or rectify (labels written; soft read;
// dist is scratch, used only when C > CB). Grid: B * tiles blocks, tiles = ceil(N / kThreads).
template <typename T, int CB>
__global__ void __launch_bounds__(kThreads)
    prototype_softmax_kernel(const T* __restrict__ features, const typename Types<T>::sum_t* __restrict__ protos,
                             const T* __restrict__ soft, T* __restrict__ out, typename Types<T>::sum_t* dist,
                             int64_t* __restrict__ labels, int64_t N, int64_t tiles, int64_t D, int64_t C,
                             double scale, int mode) {
  using sum_t = typename Types<T>::sum_t;
  using acc_t = typename Types<T>::acc_t;
  __shared__ __align__(16) sum_t p_s[CB * kDepth];
  const int64_t block = blockIdx.x;
  const int64_t b = block / tiles;
  const int64_t pix = (block - b * tiles) * kThreads + threadIdx.x;
  const bool valid = pix < N;
  const T* fpix = features + b * D * N + pix;  // features[b, 0, pix]
  const int64_t pc = b * C * N + pix;          // [b, 0, pix] of the [B, C, N] tensors; class c at pc + c N
  const acc_t sc = static_cast<acc_t>(scale);  // -1 / tau
  const acc_t minus_inf = -std::numeric_limits<acc_t>::infinity();
  acc_t dist_r[CB];

  if (C <= CB) {
    // one class block: everything stays in registers
    chunk_distances<T, CB>(fpix, N, valid, protos, C, D, 0, p_s, dist_r);
    if (!valid) return;
    acc_t zmax = minus_inf;
#pragma unroll
    for (int j = 0; j < CB; ++j)
      if (j < C) {
        const acc_t z = dist_r[j] * sc;
        zmax = z > zmax ? z : zmax;
      }
    acc_t e[CB];
    acc_t zsum = acc_t(0);
#pragma unroll
    for (int j = 0; j < CB; ++j) {
      e[j] = acc_t(0);
      if (j < C) {
        e[j] = dexp(dist_r[j] * sc - zmax);
        zsum += e[j];
      }
    }
    if (mode == kRectify) {
      // strictly greater: the first maximum wins; NaN scores never win
      acc_t best = minus_inf;
      int64_t label = 0;
#pragma unroll
      for (int j = 0; j < CB; ++j)
        if (j < C) {
          const acc_t score = e[j] / zsum * as<acc_t>(soft[pc + j * N]);
          if (score > best) {
            best = score;
            label = j;
          }
        }
      labels[b * N + pix] = label;
    } else {
      const acc_t logsum = dlog(zsum);
#pragma unroll
      for (int j = 0; j < CB; ++j)
        if (j < C) {
          const int64_t o = pc + j * N;
          dist[o] = static_cast<sum_t>(dist_r[j]);
          out[o] = to<T>(mode == kLogSoftmax ? dist_r[j] * sc - zmax - logsum : e[j] / zsum);
        }
    }
    return;
  }

  // C > CB: class blocks one after the other; the distances go through `dist` (rounded to sum_t,
  // and the softmax is taken of the rounded values so that it is consistent)
  acc_t zmax = minus_inf;
  for (int64_t c0 = 0; c0 < C; c0 += CB) {
    chunk_distances<T, CB>(fpix, N, valid, protos, C, D, c0, p_s, dist_r);
    if (valid) {
#pragma unroll
      for (int j = 0; j < CB; ++j)
        if (c0 + j < C) {
          const sum_t d = static_cast<sum_t>(dist_r[j]);
          dist[pc + (c0 + j) * N] = d;
          const acc_t z = static_cast<acc_t>(d) * sc;
          zmax = z > zmax ? z : zmax;
        }
    }
  }
  if (!valid) return;
  // read back what this thread wrote (plain loads: dist is written in this kernel)
  const sum_t* drow = dist + pc;
  acc_t zsum = acc_t(0);
  for (int64_t c = 0; c < C; ++c) zsum += dexp(static_cast<acc_t>(drow[c * N]) * sc - zmax);
  if (mode == kRectify) {
    acc_t best = minus_inf;
    int64_t label = 0;
    for (int64_t c = 0; c < C; ++c) {
      const acc_t e = dexp(static_cast<acc_t>(drow[c * N]) * sc - zmax);
      const acc_t score = e / zsum * as<acc_t>(soft[pc + c * N]);
      if (score > best) {
        best = score;
        label = c;
      }
    }
    labels[b * N + pix] = label;
  } else {
    const acc_t logsum = dlog(zsum);
    for (int64_t c = 0; c < C; ++c) {
      const acc_t z = static_cast<acc_t>(drow[c * N]) * sc;
      out[pc + c * N] = to<T>(mode == kLogSoftmax ? z - zmax - logsum : dexp(z - zmax) / zsum);
    }
  }
}

// grad[b, d, pix] = sum_c a_c (f_d - p_cd). With more than CB classes, class blocks add into
// `partial` (the gradient itself for float32/float64, a float32 scratch for float16/bfloat16),
// the last block writing `grad`; grad and partial may alias. Grid as the forward's.
template <typename T, int CB>
__global__ void __launch_bounds__(kThreads)
    prototype_softmax_backward_kernel(const T* __restrict__ grad_out, const T* __restrict__ out,
                                      const typename Types<T>::sum_t* __restrict__ dist,
                                      const T* __restrict__ features,
                                      const typename Types<T>::sum_t* __restrict__ protos, T* grad,
                                      typename Types<T>::sum_t* partial, int64_t N, int64_t tiles, int64_t D,
                                      int64_t C, double tau, bool log) {
  using sum_t = typename Types<T>::sum_t;
  using acc_t = typename Types<T>::acc_t;
  __shared__ __align__(16) sum_t p_s[kDepth * CB];  // [channel][class]
  const int64_t block = blockIdx.x;
  const int64_t b = block / tiles;
  const int64_t pix = (block - b * tiles) * kThreads + threadIdx.x;
  const bool valid = pix < N;
  const int64_t pc = b * C * N + pix;  // [b, 0, pix] of the [B, C, N] tensors
  const int64_t pf = b * D * N + pix;  // [b, 0, pix] of the [B, D, N] tensors
  const acc_t tau_a = static_cast<acc_t>(tau);

  // s = sum_k g_k (log-softmax) or sum_k g_k w_k (softmax)
  acc_t s = acc_t(0);
  if (valid)
    for (int64_t c = 0; c < C; ++c) {
      const acc_t g = as<acc_t>(grad_out[pc + c * N]);
      s += log ? g : g * as<acc_t>(out[pc + c * N]);
    }

  for (int64_t c0 = 0; c0 < C; c0 += CB) {
    const int64_t cn = C - c0 < CB ? C - c0 : CB;  // classes in this block
    const bool first = c0 == 0, last = c0 + CB >= C;
    // a_c = -dz_c / (tau d_c), 0 where d_c == 0 (the zero gradient of the norm at 0)
    sum_t a[CB];
#pragma unroll
    for (int j = 0; j < CB; ++j) {
      a[j] = sum_t(0);
      if (valid && j < cn) {
        const int64_t i = pc + (c0 + j) * N;
        const acc_t g = as<acc_t>(grad_out[i]), o = as<acc_t>(out[i]), d = static_cast<acc_t>(dist[i]);
        const acc_t dz = log ? g - dexp(o) * s : o * (g - s);
        a[j] = d > acc_t(0) ? static_cast<sum_t>(-dz / (d * tau_a)) : sum_t(0);
      }
    }
    for (int64_t d0 = 0; d0 < D; d0 += kDepth) {
      __syncthreads();  // every thread is done with the previous slab
      // p_s[k][j] = prototypes[c0 + j, d0 + k], zeros past C or D
      for (int i = threadIdx.x; i < kDepth * CB; i += kThreads) {
        const int k = i / CB, j = i % CB;
        const int64_t c = c0 + j, d = d0 + k;
        p_s[i] = (c < C && d < D) ? protos[c * D + d] : sum_t(0);
      }
      __syncthreads();
      if (!valid) continue;
#pragma unroll 2
      for (int k = 0; k < kDepth; k += 4) {
        sum_t fv[4], acc[4];
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          const int64_t d = d0 + k + q;
          const bool inside = d < D;
          fv[q] = inside ? as<sum_t>(features[pf + d * N]) : sum_t(0);
          acc[q] = (first || !inside) ? sum_t(0) : partial[pf + d * N];
        }
        // classes in order, one FMA each, as the CPU kernel
#pragma unroll
        for (int j = 0; j < CB; j += 4) {
          sum_t p[4][4];  // [channel q][class j + jj]
#pragma unroll
          for (int q = 0; q < 4; ++q) load4(p_s + (k + q) * CB + j, p[q]);
#pragma unroll
          for (int jj = 0; jj < 4; ++jj)
            if (j + jj < cn) {
#pragma unroll
              for (int q = 0; q < 4; ++q) acc[q] = dfma(a[j + jj], fv[q] - p[q][jj], acc[q]);
            }
        }
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          const int64_t d = d0 + k + q;
          if (d < D) {
            if (last)
              grad[pf + d * N] = to<T>(acc[q]);
            else
              partial[pf + d * N] = acc[q];
          }
        }
      }
    }
  }
}

// ---- host side ----

void check_features_prototypes(const at::Tensor& features, const at::Tensor& prototypes, double tau) {
  TORCH_CHECK(features.dim() == 4, "features must be [B, D, H, W]; got ", features.sizes());
  TORCH_CHECK(prototypes.dim() == 2 && prototypes.size(1) == features.size(1),
              "prototypes must be [C, D] with the features' D; got ", prototypes.sizes());
  TORCH_CHECK(tau > 0, "tau must be > 0; got ", tau);
  TORCH_CHECK(features.is_cuda() && prototypes.device() == features.device(),
              "features and prototypes must be on the same CUDA device");
  const auto t = features.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16,
              "features must be float32, float64, float16 or bfloat16; got ", t);
}

at::ScalarType sum_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// The prototypes as the kernels read them: rounded to the features' dtype (as the reference), then
// held in sum_t, [C, D] contiguous.
at::Tensor staged_prototypes(const at::Tensor& prototypes, at::ScalarType t) {
  return prototypes.to(t).to(sum_type(t)).contiguous();
}

int64_t distance_blocks(int64_t B, int64_t N) {
  const int64_t tiles = (N + kThreads - 1) / kThreads;
  TORCH_CHECK(B * tiles <= std::numeric_limits<int32_t>::max(), "too many pixels for one launch");
  return tiles;
}

std::tuple<at::Tensor, at::Tensor> prototype_softmax_cuda(const at::Tensor& features, const at::Tensor& prototypes,
                                                          double tau, bool log) {
  check_features_prototypes(features, prototypes, tau);
  const c10::cuda::CUDAGuard guard(features.device());
  const at::Tensor f = features.contiguous();
  const int64_t B = f.size(0), D = f.size(1), N = f.size(2) * f.size(3), C = prototypes.size(0);
  at::Tensor out = at::empty({B, C, f.size(2), f.size(3)}, f.options());
  at::Tensor distances = at::empty({B, C, f.size(2), f.size(3)}, f.options().dtype(sum_type(f.scalar_type())));
  if (out.numel() == 0) return {out, distances};
  const at::Tensor p = staged_prototypes(prototypes, f.scalar_type());
  const int64_t tiles = distance_blocks(B, N);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, f.scalar_type(), "prototype_softmax_cuda", [&] {
    using sum_t = typename Types<scalar_t>::sum_t;
    with_class_block(C, [&](auto cb) {
      constexpr int CB = decltype(cb)::value;
      prototype_softmax_kernel<scalar_t, CB><<<static_cast<unsigned>(B * tiles), kThreads, 0, stream>>>(
          f.data_ptr<scalar_t>(), p.data_ptr<sum_t>(), nullptr, out.data_ptr<scalar_t>(),
          distances.data_ptr<sum_t>(), nullptr, N, tiles, D, C, -1.0 / tau, log ? kLogSoftmax : kSoftmax);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {out, distances};
}

at::Tensor prototype_softmax_backward_cuda(const at::Tensor& grad_out, const at::Tensor& out,
                                           const at::Tensor& distances, const at::Tensor& features,
                                           const at::Tensor& prototypes, double tau, bool log) {
  check_features_prototypes(features, prototypes, tau);
  const c10::cuda::CUDAGuard guard(features.device());
  const at::Tensor f = features.contiguous();
  const int64_t B = f.size(0), D = f.size(1), N = f.size(2) * f.size(3), C = prototypes.size(0);
  for (const at::Tensor* x : {&grad_out, &out, &distances}) {
    TORCH_CHECK(x->dim() == 4 && x->size(0) == B && x->size(1) == C && x->size(2) * x->size(3) == N,
                "grad_out, out and distances must be [B, C, H, W]; got ", x->sizes());
    TORCH_CHECK(x->device() == f.device(), "grad_out, out and distances must be on the features' device");
  }
  at::Tensor grad = at::empty(f.sizes(), f.options());
  if (grad.numel() == 0) return grad;
  if (C == 0) return grad.zero_();
  const at::ScalarType t = f.scalar_type();
  const at::Tensor g = grad_out.to(t).contiguous();
  const at::Tensor o = out.to(t).contiguous();
  const at::Tensor dist = distances.to(sum_type(t)).contiguous();
  const at::Tensor p = staged_prototypes(prototypes, t);
  // the running sums between class blocks: the gradient itself, or float32 for float16/bfloat16
  at::Tensor partial;
  if (C > class_block(C)) partial = sum_type(t) == t ? grad : at::empty(f.sizes(), f.options().dtype(at::kFloat));
  const int64_t tiles = distance_blocks(B, N);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t, "prototype_softmax_backward_cuda", [&] {
    using sum_t = typename Types<scalar_t>::sum_t;
    sum_t* partial_ptr = partial.defined() ? static_cast<sum_t*>(partial.data_ptr()) : nullptr;
    with_class_block(C, [&](auto cb) {
      constexpr int CB = decltype(cb)::value;
      prototype_softmax_backward_kernel<scalar_t, CB><<<static_cast<unsigned>(B * tiles), kThreads, 0, stream>>>(
          g.data_ptr<scalar_t>(), o.data_ptr<scalar_t>(), dist.data_ptr<sum_t>(), f.data_ptr<scalar_t>(),
          p.data_ptr<sum_t>(), grad.data_ptr<scalar_t>(), partial_ptr, N, tiles, D, C, tau, log);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return grad;
}

at::Tensor prototype_rectify_cuda(const at::Tensor& features, const at::Tensor& prototypes,
                                  const at::Tensor& soft_labels, double tau) {
  check_features_prototypes(features, prototypes, tau);
  const c10::cuda::CUDAGuard guard(features.device());
  const at::Tensor f = features.contiguous();
  const int64_t B = f.size(0), D = f.size(1), N = f.size(2) * f.size(3), C = prototypes.size(0);
  TORCH_CHECK(soft_labels.dim() == 4 && soft_labels.size(0) == B && soft_labels.size(1) == C &&
                  soft_labels.size(2) == f.size(2) && soft_labels.size(3) == f.size(3),
              "soft_labels must be [B, C, H, W]; got ", soft_labels.sizes());
  TORCH_CHECK(soft_labels.device() == f.device(), "soft_labels must be on the features' device");
  at::Tensor labels = at::empty({B, f.size(2), f.size(3)}, f.options().dtype(at::kLong));
  if (labels.numel() == 0) return labels;
  if (C == 0) return labels.zero_();
  const at::ScalarType t = f.scalar_type();
  const at::Tensor soft = soft_labels.to(t).contiguous();
  const at::Tensor p = staged_prototypes(prototypes, t);
  // the distances of one pixel between class blocks, when there is more than one
  at::Tensor scratch;
  if (C > class_block(C)) scratch = at::empty({B, C, N}, f.options().dtype(sum_type(t)));
  const int64_t tiles = distance_blocks(B, N);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t, "prototype_rectify_cuda", [&] {
    using sum_t = typename Types<scalar_t>::sum_t;
    sum_t* scratch_ptr = scratch.defined() ? scratch.data_ptr<sum_t>() : nullptr;
    with_class_block(C, [&](auto cb) {
      constexpr int CB = decltype(cb)::value;
      prototype_softmax_kernel<scalar_t, CB><<<static_cast<unsigned>(B * tiles), kThreads, 0, stream>>>(
          f.data_ptr<scalar_t>(), p.data_ptr<sum_t>(), soft.data_ptr<scalar_t>(), nullptr, scratch_ptr,
          labels.data_ptr<int64_t>(), N, tiles, D, C, -1.0 / tau, kRectify);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return labels;
}

}  // namespace

TORCH_LIBRARY_IMPL(udafast, CUDA, m) {
  m.impl("prototype_softmax", &prototype_softmax_cuda);
  m.impl("prototype_softmax_backward", &prototype_softmax_backward_cuda);
  m.impl("prototype_rectify", &prototype_rectify_cuda);
}
