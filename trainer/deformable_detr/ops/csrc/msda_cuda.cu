// CUDA kernels of multi-scale deformable attention (forward and backward).
//
// Layout of the work: a "row" is one (batch, query, head); its D channels are split into
// chunks of VEC contiguous elements (16-byte loads), and a group of GROUP lanes of one warp
// (GROUP a power of two <= 32) shares the row, lane i taking chunks i, i + GROUP, ... So the
// lanes of a group read one corner pixel's channels in a single coalesced transaction, and
// the location/weight gradients are summed over channels with warp shuffles inside the
// group. Only grad_value, which many rows hit, is scattered with atomics (into a float
// buffer for half/bfloat16, and with 128-bit vector atomics on sm_90+).
#include "msda.h"
#include "msda_common.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <c10/cuda/CUDAGuard.h>

#include <type_traits>
#include <vector>

namespace {

constexpr int kThreads = 256;
// At least two blocks per SM for the backward caps it at 128 registers; left alone, the
// half/bfloat16 kernels take ~240 on sm_80 and run one block per SM.
constexpr int kMinBackwardBlocks = 2;

struct Dims {
  int64_t batch, spatial, heads, channels, queries, levels, points;
  __host__ __device__ int64_t rows() const { return batch * queries * heads; }
};

Dims dims_of(const at::Tensor& value, const at::Tensor& sampling_locations) {
  return {value.size(0), value.size(1), value.size(2), value.size(3),
          sampling_locations.size(1), sampling_locations.size(3), sampling_locations.size(4)};
}

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

template <typename scalar_t, int VEC>
__device__ __forceinline__ Pack<scalar_t, VEC> load_pack(const scalar_t* ptr) {
  return *reinterpret_cast<const Pack<scalar_t, VEC>*>(ptr);
}

// Adds `vals` to dst[0..VEC): 128/64-bit float atomics where the hardware has them (sm_90+).
template <typename acc_t, int VEC>
__device__ __forceinline__ void atomic_add_pack(acc_t* dst, const acc_t (&vals)[VEC]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if constexpr (std::is_same_v<acc_t, float> && VEC % 4 == 0) {
#pragma unroll
    for (int k = 0; k < VEC; k += 4) {
      atomicAdd(reinterpret_cast<float4*>(dst + k), make_float4(vals[k], vals[k + 1], vals[k + 2], vals[k + 3]));
    }
  } else if constexpr (std::is_same_v<acc_t, float> && VEC % 2 == 0) {
#pragma unroll
    for (int k = 0; k < VEC; k += 2) {
      atomicAdd(reinterpret_cast<float2*>(dst + k), make_float2(vals[k], vals[k + 1]));
    }
  } else {
#pragma unroll
    for (int k = 0; k < VEC; ++k) atomicAdd(dst + k, vals[k]);
  }
#else
#pragma unroll
  for (int k = 0; k < VEC; ++k) atomicAdd(dst + k, vals[k]);
#endif
}

template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kThreads) forward_kernel(
    const scalar_t* __restrict__ value, const int64_t* __restrict__ shapes, const int64_t* __restrict__ starts,
    const at::opmath_type<scalar_t>* __restrict__ locations,
    const at::opmath_type<scalar_t>* __restrict__ weights, scalar_t* __restrict__ output, Dims d, int group) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t thread = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t row = thread / group;
  const int lane = static_cast<int>(thread % group);
  if (row >= d.rows()) return;
  const int64_t n = row / (d.queries * d.heads), m = row % d.heads;
  const int64_t chunks = d.channels / VEC;
  const int64_t pixel_stride = d.heads * d.channels;
  for (int64_t chunk = lane; chunk < chunks; chunk += group) {
    acc_t acc[VEC];
#pragma unroll
    for (int k = 0; k < VEC; ++k) acc[k] = acc_t(0);
    const acc_t* loc = locations + row * d.levels * d.points * 2;
    const acc_t* attn = weights + row * d.levels * d.points;
    for (int64_t l = 0; l < d.levels; ++l) {
      const int64_t height = shapes[2 * l], width = shapes[2 * l + 1];
      const scalar_t* level_value = value + ((n * d.spatial + starts[l]) * d.heads + m) * d.channels + chunk * VEC;
      for (int64_t p = 0; p < d.points; ++p, loc += 2, ++attn) {
        const auto b = msda::bilinear_corners<acc_t>(loc[0], loc[1], height, width);
        if (!b.inside) continue;
        const acc_t a = *attn;
#pragma unroll
        for (int corner = 0; corner < 4; ++corner) {
          if (b.pixel[corner] < 0) continue;
          const auto v = load_pack<scalar_t, VEC>(level_value + b.pixel[corner] * pixel_stride);
          const acc_t w = a * b.weight[corner];
#pragma unroll
          for (int k = 0; k < VEC; ++k) acc[k] += w * static_cast<acc_t>(v.v[k]);
        }
      }
    }
    Pack<scalar_t, VEC> out;
#pragma unroll
    for (int k = 0; k < VEC; ++k) out.v[k] = static_cast<scalar_t>(acc[k]);
    *reinterpret_cast<Pack<scalar_t, VEC>*>(output + row * d.channels + chunk * VEC) = out;
  }
}

template <typename acc_t>
__device__ __forceinline__ acc_t group_sum(acc_t x, int group) {
  for (int offset = group / 2; offset > 0; offset /= 2) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kThreads, kMinBackwardBlocks) backward_kernel(
    const scalar_t* __restrict__ value, const int64_t* __restrict__ shapes, const int64_t* __restrict__ starts,
    const at::opmath_type<scalar_t>* __restrict__ locations,
    const at::opmath_type<scalar_t>* __restrict__ weights, const scalar_t* __restrict__ grad_output,
    at::opmath_type<scalar_t>* grad_value, at::opmath_type<scalar_t>* __restrict__ grad_locations,
    at::opmath_type<scalar_t>* __restrict__ grad_weights, Dims d, int group) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t thread = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  // Lanes past the last row still take part in the shuffles (which need the whole warp)
  // but read row 0 and write nothing.
  const bool active = thread / group < d.rows();
  const int64_t row = active ? thread / group : 0;
  const int lane = static_cast<int>(thread % group);
  const int64_t n = row / (d.queries * d.heads), m = row % d.heads;
  const int64_t chunks = d.channels / VEC;
  const int64_t pixel_stride = d.heads * d.channels;
  const scalar_t* grad_out = grad_output + row * d.channels;
  const int64_t first = row * d.levels * d.points;  // index of (row, level 0, point 0)
  for (int64_t l = 0; l < d.levels; ++l) {
    const int64_t height = shapes[2 * l], width = shapes[2 * l + 1];
    const int64_t level_offset = ((n * d.spatial + starts[l]) * d.heads + m) * d.channels;
    for (int64_t p = 0; p < d.points; ++p) {
      const int64_t sample = first + l * d.points + p;
      const acc_t a = weights[sample];
      const auto b = msda::bilinear_corners<acc_t>(locations[2 * sample], locations[2 * sample + 1], height, width);
      acc_t g_attn = 0, g_frac_w = 0, g_frac_h = 0;
      if (b.inside) {
        const auto slopes = msda::corner_slopes(b);
        for (int64_t chunk = lane; chunk < chunks; chunk += group) {
          const auto g = load_pack<scalar_t, VEC>(grad_out + chunk * VEC);
          acc_t scaled[VEC];  // attention weight * grad_output
#pragma unroll
          for (int k = 0; k < VEC; ++k) scaled[k] = a * static_cast<acc_t>(g.v[k]);
          // One corner at a time keeps a single pack of values live (fewer registers).
#pragma unroll
          for (int corner = 0; corner < 4; ++corner) {
            if (b.pixel[corner] < 0) continue;
            const int64_t offset = level_offset + b.pixel[corner] * pixel_stride + chunk * VEC;
            const auto v = load_pack<scalar_t, VEC>(value + offset);
            acc_t g_dot_v = 0;
            acc_t contribution[VEC];
#pragma unroll
            for (int k = 0; k < VEC; ++k) {
              g_dot_v += static_cast<acc_t>(g.v[k]) * static_cast<acc_t>(v.v[k]);
              contribution[k] = b.weight[corner] * scaled[k];
            }
            g_attn += b.weight[corner] * g_dot_v;
            g_frac_w += slopes.dfrac_w[corner] * g_dot_v;
            g_frac_h += slopes.dfrac_h[corner] * g_dot_v;
            if (active) atomic_add_pack<acc_t, VEC>(grad_value + offset, contribution);
          }
        }
      }
      g_attn = group_sum(g_attn, group);
      g_frac_w = group_sum(g_frac_w, group);
      g_frac_h = group_sum(g_frac_h, group);
      if (active && lane == 0) {
        grad_weights[sample] = g_attn;
        grad_locations[2 * sample] = a * g_frac_w * static_cast<acc_t>(width);
        grad_locations[2 * sample + 1] = a * g_frac_h * static_cast<acc_t>(height);
      }
    }
  }
}

// The widest 16-byte vector that divides D and fits the tensors' alignment, else 1.
template <typename scalar_t>
int vector_width(const Dims& d, std::initializer_list<const void*> pointers) {
  constexpr int widest = 16 / sizeof(scalar_t);
  if (d.channels % widest != 0) return 1;
  for (const void* ptr : pointers) {
    if (reinterpret_cast<uintptr_t>(ptr) % 16 != 0) return 1;
  }
  return widest;
}

// Lanes per row: enough for every chunk to get its own lane, up to a warp.
int lanes_per_row(const Dims& d, int vec) {
  const int64_t chunks = d.channels / vec;
  int group = 1;
  while (group < chunks && group < 32) group *= 2;
  return group;
}

unsigned int blocks_for(const Dims& d, int group) {
  return static_cast<unsigned int>((d.rows() * group + kThreads - 1) / kThreads);
}

}  // namespace

at::Tensor msda_cuda_forward(const at::Tensor& value, const at::Tensor& spatial_shapes,
                             const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                             const at::Tensor& attention_weights) {
  msda_check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  TORCH_CHECK(value.is_cuda(), "msda_cuda_forward needs CUDA tensors");
  const c10::cuda::CUDAGuard guard(value.device());
  const Dims d = dims_of(value, sampling_locations);
  auto output = at::empty({d.batch, d.queries, d.heads * d.channels}, value.options());
  if (d.rows() == 0 || d.channels == 0) return output;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "msda_cuda_forward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    constexpr int widest = 16 / sizeof(scalar_t);
    const int vec = vector_width<scalar_t>(d, {value.data_ptr(), output.data_ptr()});
    const int group = lanes_per_row(d, vec);
    auto launch = [&](auto kernel) {
      kernel<<<blocks_for(d, group), kThreads, 0, stream>>>(
          value.data_ptr<scalar_t>(), spatial_shapes.data_ptr<int64_t>(), level_start_index.data_ptr<int64_t>(),
          sampling_locations.data_ptr<acc_t>(), attention_weights.data_ptr<acc_t>(), output.data_ptr<scalar_t>(),
          d, group);
    };
    if (vec == widest) {
      launch(forward_kernel<scalar_t, widest>);
    } else {
      launch(forward_kernel<scalar_t, 1>);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return output;
}

std::vector<at::Tensor> msda_cuda_backward(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                           const at::Tensor& level_start_index,
                                           const at::Tensor& sampling_locations,
                                           const at::Tensor& attention_weights, const at::Tensor& grad_output) {
  msda_check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  TORCH_CHECK(value.is_cuda(), "msda_cuda_backward needs CUDA tensors");
  TORCH_CHECK(grad_output.is_contiguous() && grad_output.scalar_type() == value.scalar_type(),
              "grad_output must be contiguous with the dtype of value");
  const c10::cuda::CUDAGuard guard(value.device());
  const Dims d = dims_of(value, sampling_locations);
  // grad_value is accumulated in float (float64 for float64) and cast back by the caller.
  auto grad_value = at::zeros(value.sizes(), value.options().dtype(sampling_locations.scalar_type()));
  auto grad_locations = at::zeros_like(sampling_locations);
  auto grad_weights = at::zeros_like(attention_weights);
  if (d.rows() == 0 || d.channels == 0) return {grad_value, grad_locations, grad_weights};
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "msda_cuda_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    constexpr int widest = 16 / sizeof(scalar_t);
    const int vec = vector_width<scalar_t>(d, {value.data_ptr(), grad_output.data_ptr()});
    const int group = lanes_per_row(d, vec);
    auto launch = [&](auto kernel) {
      kernel<<<blocks_for(d, group), kThreads, 0, stream>>>(
          value.data_ptr<scalar_t>(), spatial_shapes.data_ptr<int64_t>(), level_start_index.data_ptr<int64_t>(),
          sampling_locations.data_ptr<acc_t>(), attention_weights.data_ptr<acc_t>(),
          grad_output.data_ptr<scalar_t>(), grad_value.data_ptr<acc_t>(), grad_locations.data_ptr<acc_t>(),
          grad_weights.data_ptr<acc_t>(), d, group);
    };
    if (vec == widest) {
      launch(backward_kernel<scalar_t, widest>);
    } else {
      launch(backward_kernel<scalar_t, 1>);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {grad_value, grad_locations, grad_weights};
}
