// Fused CPU kernel of multi-scale deformable attention (forward and backward).
//
// Each sample is read straight from `value` and accumulated into the output row, so no
// per-level sampled tensor is ever materialised. Work is split with at::parallel_for
// (OpenMP in PyTorch builds): the forward over (batch, query, head) rows, the backward over
// (batch, head) pairs, whose slices of grad_value are disjoint, so the scatter needs no atomics;
// with more threads than pairs, also over slices of the queries, each slice scattering into its
// own grad_value buffer (summed at the end).
// The channel loops are vectorised; on x86-64 an AVX2+FMA copy is picked at run time.
#include "msda.h"
#include "msda_common.h"

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

namespace {

struct Dims {
  int64_t batch, spatial, heads, channels, queries, levels, points;
};

Dims dims_of(const at::Tensor& value, const at::Tensor& sampling_locations) {
  return {value.size(0), value.size(1), value.size(2), value.size(3),
          sampling_locations.size(1), sampling_locations.size(3), sampling_locations.size(4)};
}

// Pointers and sizes of one call; the forward uses `output`, the backward the gradients.
template <typename scalar_t>
struct Args {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* value;
  const int64_t* shapes;
  const int64_t* starts;
  const acc_t* locations;
  const acc_t* weights;
  scalar_t* output;
  const scalar_t* grad_output;
  acc_t* grad_value;  // accumulated in acc_t (float for half/bfloat16); the caller casts it back
  acc_t* grad_locations;
  acc_t* grad_weights;
  Dims d;
};

#define MSDA_ALWAYS_INLINE inline __attribute__((always_inline))

// Forward of rows [begin, end), a row being one (batch, query, head).
template <typename scalar_t>
MSDA_ALWAYS_INLINE void forward_rows(const Args<scalar_t>& args, int64_t begin, int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  const Dims& d = args.d;
  const scalar_t* value = args.value;
  const int64_t *shapes = args.shapes, *starts = args.starts;
  const int64_t pixel_stride = d.heads * d.channels;  // distance between two pixels of one head
  std::vector<acc_t> acc(d.channels);
  for (int64_t row = begin; row < end; ++row) {
    const int64_t n = row / (d.queries * d.heads);
    const int64_t m = row % d.heads;
    std::fill(acc.begin(), acc.end(), acc_t(0));
    const acc_t* loc = args.locations + row * d.levels * d.points * 2;
    const acc_t* attn = args.weights + row * d.levels * d.points;
    for (int64_t l = 0; l < d.levels; ++l) {
      const int64_t height = shapes[2 * l], width = shapes[2 * l + 1];
      const scalar_t* level_value = value + ((n * d.spatial + starts[l]) * d.heads + m) * d.channels;
      for (int64_t p = 0; p < d.points; ++p, loc += 2, ++attn) {
        const auto b = msda::bilinear_corners<acc_t>(loc[0], loc[1], height, width);
        if (!b.inside) continue;
        for (int corner = 0; corner < 4; ++corner) {
          if (b.pixel[corner] < 0) continue;
          const acc_t w = *attn * b.weight[corner];
          const scalar_t* v = level_value + b.pixel[corner] * pixel_stride;
#pragma omp simd
          for (int64_t c = 0; c < d.channels; ++c) acc[c] += w * static_cast<acc_t>(v[c]);
        }
      }
    }
    scalar_t* out = args.output + row * d.channels;
    for (int64_t c = 0; c < d.channels; ++c) out[c] = static_cast<scalar_t>(acc[c]);
  }
}

// Backward of tasks [begin, end). A task is one (batch, head) pair and one of `chunks` slices of
// its queries; different pairs write disjoint slices of grad_value, and the query slices of one
// pair write their own copy of it (chunk 0: grad_value itself, chunk c: extra_grad_value[c - 1]),
// summed afterwards, so the scatter needs no atomics.
template <typename scalar_t>
MSDA_ALWAYS_INLINE void backward_tasks(const Args<scalar_t>& args, int64_t chunks,
                                       at::opmath_type<scalar_t>* extra_grad_value, int64_t begin, int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  const Dims& d = args.d;
  const scalar_t* value = args.value;
  const int64_t *shapes = args.shapes, *starts = args.starts;
  const int64_t pixel_stride = d.heads * d.channels;
  const int64_t value_numel = d.batch * d.spatial * d.heads * d.channels;
  const int64_t per_chunk = (d.queries + chunks - 1) / chunks;
  for (int64_t task = begin; task < end; ++task) {
    const int64_t pair = task / chunks, chunk = task % chunks;
    const int64_t n = pair / d.heads, m = pair % d.heads;
    acc_t* grad_value = chunk == 0 ? args.grad_value : extra_grad_value + (chunk - 1) * value_numel;
    const int64_t q_end = std::min(d.queries, (chunk + 1) * per_chunk);
    for (int64_t q = chunk * per_chunk; q < q_end; ++q) {
      const int64_t row = (n * d.queries + q) * d.heads + m;
      const scalar_t* grad_out = args.grad_output + row * d.channels;
      const acc_t* loc = args.locations + row * d.levels * d.points * 2;
      const acc_t* attn = args.weights + row * d.levels * d.points;
      acc_t* grad_loc = args.grad_locations + row * d.levels * d.points * 2;
      acc_t* grad_attn = args.grad_weights + row * d.levels * d.points;
      for (int64_t l = 0; l < d.levels; ++l) {
        const int64_t height = shapes[2 * l], width = shapes[2 * l + 1];
        const int64_t level_offset = ((n * d.spatial + starts[l]) * d.heads + m) * d.channels;
        for (int64_t p = 0; p < d.points; ++p, loc += 2, ++attn, grad_loc += 2, ++grad_attn) {
          const auto b = msda::bilinear_corners<acc_t>(loc[0], loc[1], height, width);
          if (!b.inside) continue;
          const auto slopes = msda::corner_slopes(b);
          const acc_t a = *attn;
          acc_t g_attn = 0, g_frac_w = 0, g_frac_h = 0;
          for (int corner = 0; corner < 4; ++corner) {
            if (b.pixel[corner] < 0) continue;
            const int64_t offset = level_offset + b.pixel[corner] * pixel_stride;
            const scalar_t* v = value + offset;
            acc_t* gv = grad_value + offset;
            const acc_t scale = a * b.weight[corner];
            acc_t g_dot_v = 0;  // sum over channels of grad_output * corner value
#pragma omp simd reduction(+ : g_dot_v)
            for (int64_t c = 0; c < d.channels; ++c) {
              const acc_t g = static_cast<acc_t>(grad_out[c]);
              g_dot_v += g * static_cast<acc_t>(v[c]);
              gv[c] += scale * g;
            }
            g_attn += b.weight[corner] * g_dot_v;
            g_frac_w += slopes.dfrac_w[corner] * g_dot_v;
            g_frac_h += slopes.dfrac_h[corner] * g_dot_v;
          }
          *grad_attn = g_attn;
          grad_loc[0] = a * g_frac_w * static_cast<acc_t>(width);
          grad_loc[1] = a * g_frac_h * static_cast<acc_t>(height);
        }
      }
    }
  }
}

// The same loops compiled for AVX2+FMA (8 floats per instruction instead of SSE's 4), chosen
// at run time, so one build serves every x86-64 machine.
#if defined(__x86_64__) && defined(__GNUC__)
#define MSDA_HAVE_AVX2_PATH 1
template <typename scalar_t>
__attribute__((target("avx2,fma"))) void forward_rows_avx2(const Args<scalar_t>& args, int64_t begin, int64_t end) {
  forward_rows<scalar_t>(args, begin, end);
}

template <typename scalar_t>
__attribute__((target("avx2,fma"))) void backward_tasks_avx2(const Args<scalar_t>& args, int64_t chunks,
                                                              at::opmath_type<scalar_t>* extra, int64_t begin,
                                                              int64_t end) {
  backward_tasks<scalar_t>(args, chunks, extra, begin, end);
}

bool cpu_has_avx2() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
}
#endif

template <typename scalar_t>
void forward_kernel(const Args<scalar_t>& args) {
  at::parallel_for(0, args.d.batch * args.d.queries * args.d.heads, 16, [&](int64_t begin, int64_t end) {
#ifdef MSDA_HAVE_AVX2_PATH
    if (cpu_has_avx2()) return forward_rows_avx2<scalar_t>(args, begin, end);
#endif
    forward_rows<scalar_t>(args, begin, end);
  });
}

// Query slices per (batch, head) pair: enough tasks for every thread when there are fewer pairs
// than threads (batch 2 x 8 heads = 16 pairs), each extra slice costing one more grad_value buffer.
int64_t backward_chunks(const Dims& d) {
  const int64_t pairs = d.batch * d.heads, threads = at::get_num_threads();
  if (threads <= pairs || d.queries < 2) return 1;
  const int64_t wanted = (threads + pairs - 1) / pairs;
  return std::min<int64_t>({wanted, d.queries, 8});  // 8: bounds the extra memory
}

template <typename scalar_t>
void backward_kernel(const Args<scalar_t>& args, int64_t chunks, at::opmath_type<scalar_t>* extra) {
  at::parallel_for(0, args.d.batch * args.d.heads * chunks, 1, [&](int64_t begin, int64_t end) {
#ifdef MSDA_HAVE_AVX2_PATH
    if (cpu_has_avx2()) return backward_tasks_avx2<scalar_t>(args, chunks, extra, begin, end);
#endif
    backward_tasks<scalar_t>(args, chunks, extra, begin, end);
  });
}

}  // namespace

at::Tensor msda_cpu_forward(const at::Tensor& value, const at::Tensor& spatial_shapes,
                            const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                            const at::Tensor& attention_weights) {
  msda_check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  const Dims d = dims_of(value, sampling_locations);
  auto output = at::empty({d.batch, d.queries, d.heads * d.channels}, value.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "msda_cpu_forward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    Args<scalar_t> args{value.data_ptr<scalar_t>(), spatial_shapes.data_ptr<int64_t>(),
                        level_start_index.data_ptr<int64_t>(), sampling_locations.data_ptr<acc_t>(),
                        attention_weights.data_ptr<acc_t>(), output.data_ptr<scalar_t>(), nullptr, nullptr,
                        nullptr, nullptr, d};
    forward_kernel<scalar_t>(args);
  });
  return output;
}

std::vector<at::Tensor> msda_cpu_backward(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                          const at::Tensor& level_start_index,
                                          const at::Tensor& sampling_locations,
                                          const at::Tensor& attention_weights, const at::Tensor& grad_output) {
  msda_check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  TORCH_CHECK(grad_output.is_contiguous() && grad_output.scalar_type() == value.scalar_type(),
              "grad_output must be contiguous with the dtype of value");
  const Dims d = dims_of(value, sampling_locations);
  auto grad_value = at::zeros(value.sizes(), value.options().dtype(sampling_locations.scalar_type()));
  auto grad_locations = at::zeros_like(sampling_locations);
  auto grad_weights = at::zeros_like(attention_weights);
  const int64_t chunks = backward_chunks(d);
  std::vector<int64_t> extra_sizes{chunks - 1};
  extra_sizes.insert(extra_sizes.end(), value.sizes().begin(), value.sizes().end());
  auto extra = chunks > 1 ? at::zeros(extra_sizes, grad_value.options()) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "msda_cpu_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    Args<scalar_t> args{value.data_ptr<scalar_t>(), spatial_shapes.data_ptr<int64_t>(),
                        level_start_index.data_ptr<int64_t>(), sampling_locations.data_ptr<acc_t>(),
                        attention_weights.data_ptr<acc_t>(), nullptr, grad_output.data_ptr<scalar_t>(),
                        grad_value.data_ptr<acc_t>(), grad_locations.data_ptr<acc_t>(),
                        grad_weights.data_ptr<acc_t>(), d};
    backward_kernel<scalar_t>(args, chunks, chunks > 1 ? extra.data_ptr<acc_t>() : nullptr);
  });
  if (chunks > 1) grad_value.add_(extra.sum(0));
  return {grad_value, grad_locations, grad_weights};
}
