// Python bindings of the multi-scale deformable attention kernels. Compiled into the CPU
// extension, and with MSDA_WITH_CUDA into the CUDA extension.
#include <torch/extension.h>

#include "msda.h"

void msda_check_inputs(const at::Tensor& value, const at::Tensor& spatial_shapes,
                       const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                       const at::Tensor& attention_weights) {
  TORCH_CHECK(value.dim() == 4, "value must be [N, S, M, D], got ", value.sizes());
  TORCH_CHECK(sampling_locations.dim() == 6 && sampling_locations.size(5) == 2,
              "sampling_locations must be [N, Lq, M, L, P, 2], got ", sampling_locations.sizes());
  const int64_t levels = sampling_locations.size(3);
  TORCH_CHECK(spatial_shapes.dim() == 2 && spatial_shapes.size(0) == levels && spatial_shapes.size(1) == 2,
              "spatial_shapes must be [L, 2] with L = ", levels, ", got ", spatial_shapes.sizes());
  TORCH_CHECK(level_start_index.dim() == 1 && level_start_index.size(0) == levels,
              "level_start_index must be [L] with L = ", levels);
  TORCH_CHECK(spatial_shapes.scalar_type() == at::kLong && level_start_index.scalar_type() == at::kLong,
              "spatial_shapes and level_start_index must be int64");
  TORCH_CHECK(sampling_locations.size(0) == value.size(0) && sampling_locations.size(2) == value.size(2),
              "sampling_locations batch/heads ", sampling_locations.sizes(), " do not match value ", value.sizes());
  TORCH_CHECK(attention_weights.sizes() == sampling_locations.sizes().slice(0, 5),
              "attention_weights must be [N, Lq, M, L, P], got ", attention_weights.sizes());
  const auto coord_type = value.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(sampling_locations.scalar_type() == coord_type && attention_weights.scalar_type() == coord_type,
              "sampling_locations and attention_weights must be ", coord_type, " for ", value.scalar_type(),
              " values");
  for (const at::Tensor* t : {&value, &spatial_shapes, &level_start_index, &sampling_locations, &attention_weights}) {
    TORCH_CHECK(t->is_contiguous(), "multi-scale deformable attention inputs must be contiguous");
    TORCH_CHECK(t->device() == value.device(), "all inputs must be on the device of value (", value.device(), ")");
  }
  msda_check_levels(value, spatial_shapes, level_start_index);
}

// The kernels index `value` through spatial_shapes and level_start_index without bounds checks,
// so these are checked on the host: shapes that do not add up to S would read (and, in the
// backward, write) outside the tensors. For CUDA inputs this copies 2 x L int64 to the host.
void msda_check_levels(const at::Tensor& value, const at::Tensor& spatial_shapes,
                       const at::Tensor& level_start_index) {
  const at::Tensor shapes = spatial_shapes.to(at::kCPU);
  const at::Tensor starts = level_start_index.to(at::kCPU);
  const int64_t* shape = shapes.data_ptr<int64_t>();
  const int64_t* start = starts.data_ptr<int64_t>();
  const int64_t levels = shapes.size(0);
  int64_t total = 0;
  for (int64_t l = 0; l < levels; ++l) {
    const int64_t height = shape[2 * l], width = shape[2 * l + 1];
    TORCH_CHECK(height > 0 && width > 0, "spatial_shapes[", l, "] = (", height, ", ", width,
                ") must be positive (H, W)");
    TORCH_CHECK(start[l] == total, "level_start_index[", l, "] = ", start[l], " but the levels before it hold ",
                total, " positions (level_start_index must be 0 followed by the running sum of H * W ",
                "of spatial_shapes)");
    total += height * width;
  }
  TORCH_CHECK(total == value.size(1), "spatial_shapes add up to ", total,
              " positions (sum of H * W over levels) but value has S = ", value.size(1),
              " (value is [N, S, M, D] = ", value.sizes(), ")");
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
#ifdef MSDA_WITH_CUDA
  m.def("forward", &msda_cuda_forward, "multi-scale deformable attention forward (CUDA)");
  m.def("backward", &msda_cuda_backward, "multi-scale deformable attention backward (CUDA)");
#else
  m.def("forward", &msda_cpu_forward, "multi-scale deformable attention forward (CPU)");
  m.def("backward", &msda_cpu_backward, "multi-scale deformable attention backward (CPU)");
#endif
}
