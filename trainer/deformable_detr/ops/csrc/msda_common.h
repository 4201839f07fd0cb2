// Bilinear sampling shared by the CPU and CUDA kernels of multi-scale deformable attention.
//
// Convention (the original Deformable-DETR kernel, and grid_sample with align_corners=False and
// zero padding): a normalised location (x, y) in [0, 1] maps to pixel coordinates
// (x * W - 0.5, y * H - 0.5); corners outside the map contribute zero.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define MSDA_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define MSDA_HOST_DEVICE inline
#endif

namespace msda {

// The four corners around one sampling point: their pixel index inside the level
// (-1 when outside the map), their bilinear weights, and the fractional offsets the
// location gradient needs.
template <typename acc_t>
struct Bilinear {
  int64_t pixel[4];  // (low, low), (low, high), (high, low), (high, high) as (row, col)
  acc_t weight[4];
  acc_t frac_h, frac_w;
  bool inside;  // false: every corner is outside, the sample is zero
};

template <typename acc_t>
MSDA_HOST_DEVICE Bilinear<acc_t> bilinear_corners(acc_t x, acc_t y, int64_t height, int64_t width) {
  Bilinear<acc_t> b;
  const acc_t h_im = y * static_cast<acc_t>(height) - acc_t(0.5);
  const acc_t w_im = x * static_cast<acc_t>(width) - acc_t(0.5);
  b.inside = h_im > acc_t(-1) && w_im > acc_t(-1) && h_im < static_cast<acc_t>(height) &&
             w_im < static_cast<acc_t>(width);
  if (!b.inside) {
    return b;
  }
  const int64_t h_low = static_cast<int64_t>(floor(h_im));
  const int64_t w_low = static_cast<int64_t>(floor(w_im));
  const int64_t h_high = h_low + 1;
  const int64_t w_high = w_low + 1;
  b.frac_h = h_im - static_cast<acc_t>(h_low);
  b.frac_w = w_im - static_cast<acc_t>(w_low);
  const acc_t rest_h = acc_t(1) - b.frac_h;
  const acc_t rest_w = acc_t(1) - b.frac_w;
  b.weight[0] = rest_h * rest_w;
  b.weight[1] = rest_h * b.frac_w;
  b.weight[2] = b.frac_h * rest_w;
  b.weight[3] = b.frac_h * b.frac_w;
  const bool low_row = h_low >= 0, high_row = h_high < height;
  const bool low_col = w_low >= 0, high_col = w_high < width;
  b.pixel[0] = (low_row && low_col) ? h_low * width + w_low : -1;
  b.pixel[1] = (low_row && high_col) ? h_low * width + w_high : -1;
  b.pixel[2] = (high_row && low_col) ? h_high * width + w_low : -1;
  b.pixel[3] = (high_row && high_col) ? h_high * width + w_high : -1;
  return b;
}

// How much one corner's value moves the sample when the fractional offsets move:
// sample = sum_c weight[c] * v[c], so d(sample)/d(frac_w) = sum_c dfrac_w[c] * v[c], likewise for h.
template <typename acc_t>
struct CornerSlopes {
  acc_t dfrac_w[4];
  acc_t dfrac_h[4];
};

template <typename acc_t>
MSDA_HOST_DEVICE CornerSlopes<acc_t> corner_slopes(const Bilinear<acc_t>& b) {
  const acc_t rest_h = acc_t(1) - b.frac_h, rest_w = acc_t(1) - b.frac_w;
  return {{-rest_h, rest_h, -b.frac_h, b.frac_h}, {-rest_w, -b.frac_w, rest_w, b.frac_w}};
}

}  // namespace msda
