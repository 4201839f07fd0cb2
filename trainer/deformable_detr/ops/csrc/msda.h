// Entry points of the multi-scale deformable attention kernels.
//
// Shapes (all tensors contiguous):
//   value               [N, S, M, D]        S = sum over levels of H_l * W_l
//   spatial_shapes      [L, 2] int64        (H_l, W_l)
//   level_start_index   [L] int64
//   sampling_locations  [N, Lq, M, L, P, 2] normalised (x, y); float64 for float64 values, else float32
//   attention_weights   [N, Lq, M, L, P]    same dtype as sampling_locations
//   output              [N, Lq, M * D]      dtype of value
// backward returns {grad_value, grad_sampling_locations, grad_attention_weights}, all in the dtype of
// sampling_locations (grad_value is accumulated in float for half/bfloat16 values; the caller casts it).
#pragma once

#include <ATen/core/Tensor.h>

#include <vector>

at::Tensor msda_cpu_forward(const at::Tensor& value, const at::Tensor& spatial_shapes,
                            const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                            const at::Tensor& attention_weights);

std::vector<at::Tensor> msda_cpu_backward(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                          const at::Tensor& level_start_index,
                                          const at::Tensor& sampling_locations,
                                          const at::Tensor& attention_weights, const at::Tensor& grad_output);

at::Tensor msda_cuda_forward(const at::Tensor& value, const at::Tensor& spatial_shapes,
                             const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                             const at::Tensor& attention_weights);

std::vector<at::Tensor> msda_cuda_backward(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                           const at::Tensor& level_start_index,
                                           const at::Tensor& sampling_locations,
                                           const at::Tensor& attention_weights, const at::Tensor& grad_output);

// Shape and dtype checks shared by both devices; throws c10::Error with a readable message.
void msda_check_inputs(const at::Tensor& value, const at::Tensor& spatial_shapes,
                       const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                       const at::Tensor& attention_weights);

// spatial_shapes positive, level_start_index their running sum and S their total; read on the host.
void msda_check_levels(const at::Tensor& value, const at::Tensor& spatial_shapes,
                       const at::Tensor& level_start_index);
