// Fused CPU kernel of multi-scale deformable attention (forward and backward).
//
// Each sample is read straight from `value` and accumulated into the output row, so no
// per-level sampled tensor is ever materialised. The four corners of every sample (the value
// slot to read, clamped into the map, and attention x bilinear weight, zero for a corner outside
// it) are computed first in one branch-free loop, which compilers vectorise: in the forward over
// all heads x levels x points samples of a query at once, in the backward over one row's (batch,
// query, head). The gather then reads four `value` rows of `channels` contiguous values per
// sample and accumulates them in registers (the common channel counts are compile-time
// constants; for float they are summed as 8-float vectors with fused multiply-adds). The forward
// gathers a block of queries head by head. When there are enough queries to pay for it
// (heads_first_pays), both read a copy of `value` with its heads first, and the backward scatters
// into a heads-first `grad_value`, copied back at the end: one head's pixels are then contiguous,
// where as given they lie 1 KiB apart, all in one eighth of the cache's sets. In the backward,
// the next row's corners are computed and the value and grad_value lines they touch prefetched
// before the current row is summed, so the scattered reads' latency overlaps the work.
// Outputs come from a cache of huge-page blocks (BlockCache), not fresh mappings.
//
// Work is split into blocks that threads take from a shared counter (dynamic scheduling): on a
// machine shared with other work, a thread that loses its core for a while no longer holds up
// the call with a fixed share. The forward's blocks are queries (batch, query); the
// backward's are (batch, head) pairs, whose slices of grad_value are disjoint, so the scatter
// needs no atomics; with more threads than pairs, also slices of the queries, each slice
// scattering into its own grad_value buffer (summed at the end). Which thread runs a block
// never changes the result.
// On x86-64 an AVX2+FMA copy of the loops is picked at run time (one build for every machine).
#include "msda.h"
#include "msda_common.h"

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

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

// The levels and heads of one call expanded to one entry per sample of a query (sample i = (head *
// levels + level) * points + point), so that the corner computation is one loop over a query's
// samples without level or head loops. The first levels * points entries are one head's row.
// A corner's slot in `value` (in rows of `channels`) is pixel * pixel_stride + head_offset: as given
// ([batch, pixels, heads, channels]: heads, head) or with the heads first ([batch, heads, pixels,
// channels]: 1, head * pixels).
template <typename acc_t>
struct SampleTable {
  std::vector<acc_t> height, width;        // the sample's level size
  std::vector<int32_t> height_i, width_i;  // the same, as integers
  std::vector<int32_t> start;              // first pixel of the sample's level in value
  std::vector<int32_t> head_offset;        // the slot offset of the sample's head
  int32_t pixel_stride;
  SampleTable(const Dims& d, const int64_t* shapes, const int64_t* starts, bool heads_first = false)
      : pixel_stride(static_cast<int32_t>(heads_first ? 1 : d.heads)) {
    const int64_t count = d.heads * d.levels * d.points;
    height.resize(count), width.resize(count), height_i.resize(count), width_i.resize(count), start.resize(count);
    head_offset.resize(count);
    for (int64_t i = 0; i < count; ++i) {
      const int64_t l = (i / d.points) % d.levels;
      height_i[i] = static_cast<int32_t>(shapes[2 * l]);
      width_i[i] = static_cast<int32_t>(shapes[2 * l + 1]);
      height[i] = static_cast<acc_t>(height_i[i]);
      width[i] = static_cast<acc_t>(width_i[i]);
      start[i] = static_cast<int32_t>(starts[l]);
      const int64_t h = i / (d.levels * d.points);
      head_offset[i] = static_cast<int32_t>(heads_first ? h * d.spatial : h);
    }
  }
};

// The four corners of each sample of one query (or one row), corner k = (row, col) of (low, low),
// (low, high), (high, low), (high, high): the slot to read (pixel * pixel_stride + head_offset,
// as SampleTable lays them out), times channels the offset from the batch's first value (the pixel
// clamped into the map, so every read stays in bounds), whether the corner lies in the map, its
// bilinear weight and that times the attention weight (both zero for a corner outside the map),
// and the fractional offsets.
template <typename acc_t>
struct Corners {
  std::vector<int32_t> slot[4];
  std::vector<int32_t> valid[4];  // int32, not bool: the same width as float lanes (vectorises)
  std::vector<acc_t> bilinear[4];
  std::vector<acc_t> weight[4];
  std::vector<acc_t> frac_h, frac_w;
  std::vector<int32_t> inside;  // the sample touches the map at all (else it is zero)
  explicit Corners(int64_t count) {
    for (int k = 0; k < 4; ++k) {
      slot[k].resize(count), valid[k].resize(count), bilinear[k].resize(count), weight[k].resize(count);
    }
    frac_h.resize(count), frac_w.resize(count), inside.resize(count);
  }
};

// The convention of msda_common.h's bilinear_corners (h_im = y * H - 0.5, w_im = x * W - 0.5; a
// sample counts when -1 < h_im < H and -1 < w_im < W; corners outside the map weigh zero),
// computed without branches for `count` samples of a query (all heads) or of a row (the first
// levels * points entries of the table: head 0).
// kSlopes: also store what the backward's slopes need (valid, bilinear, the fractions); the
// forward only reads the slots, weights and `inside`.
template <bool kSlopes, typename acc_t>
MSDA_ALWAYS_INLINE void row_corners(const SampleTable<acc_t>& t, int64_t count, const acc_t* __restrict loc,
                                    const acc_t* __restrict attn, Corners<acc_t>& c) {
  const acc_t* __restrict height = t.height.data();
  const acc_t* __restrict width = t.width.data();
  const int32_t* __restrict height_i = t.height_i.data();
  const int32_t* __restrict width_i = t.width_i.data();
  const int32_t* __restrict start = t.start.data();
  const int32_t* __restrict head = t.head_offset.data();
  const int32_t pixel_stride = t.pixel_stride;
  int32_t *__restrict p0 = c.slot[0].data(), *__restrict p1 = c.slot[1].data();
  int32_t *__restrict p2 = c.slot[2].data(), *__restrict p3 = c.slot[3].data();
  int32_t *__restrict ok0 = c.valid[0].data(), *__restrict ok1 = c.valid[1].data();
  int32_t *__restrict ok2 = c.valid[2].data(), *__restrict ok3 = c.valid[3].data();
  acc_t *__restrict b0 = c.bilinear[0].data(), *__restrict b1 = c.bilinear[1].data();
  acc_t *__restrict b2 = c.bilinear[2].data(), *__restrict b3 = c.bilinear[3].data();
  acc_t *__restrict w0 = c.weight[0].data(), *__restrict w1 = c.weight[1].data();
  acc_t *__restrict w2 = c.weight[2].data(), *__restrict w3 = c.weight[3].data();
  acc_t *__restrict frac_h = c.frac_h.data(), *__restrict frac_w = c.frac_w.data();
  int32_t* __restrict inside = c.inside.data();
#pragma omp simd
  for (int64_t i = 0; i < count; ++i) {
    const acc_t h_im = loc[2 * i + 1] * height[i] - acc_t(0.5);
    const acc_t w_im = loc[2 * i] * width[i] - acc_t(0.5);
    // Bitwise & of 0/1 ints, not &&: short-circuit branches stop the vectorisation.
    const int32_t in = int32_t(h_im > acc_t(-1)) & int32_t(w_im > acc_t(-1)) & int32_t(h_im < height[i]) &
                       int32_t(w_im < width[i]);
    // Clamped into [-1, size] before the integer conversion, which far-away locations would
    // overflow (NaN goes to -1); the clamp changes nothing for a sample inside the map. Written
    // as selects, not std::fmin/fmax: those are library calls that stop the vectorisation.
    const acc_t h_above = h_im > acc_t(-1) ? h_im : acc_t(-1);
    const acc_t w_above = w_im > acc_t(-1) ? w_im : acc_t(-1);
    const acc_t h = h_above < height[i] ? h_above : height[i];
    const acc_t w = w_above < width[i] ? w_above : width[i];
    const acc_t h_floor = std::floor(h), w_floor = std::floor(w);
    const int32_t h_low = static_cast<int32_t>(h_floor), w_low = static_cast<int32_t>(w_floor);
    const acc_t fh = h - h_floor, fw = w - w_floor;
    const acc_t rh = acc_t(1) - fh, rw = acc_t(1) - fw;
    const int32_t low_row = in & int32_t(h_low >= 0), high_row = in & int32_t(h_low + 1 < height_i[i]);
    const int32_t low_col = int32_t(w_low >= 0), high_col = int32_t(w_low + 1 < width_i[i]);
    const int32_t row_low = (h_low > 0 ? h_low : 0) * width_i[i];
    const int32_t row_high = (h_low + 1 < height_i[i] ? h_low + 1 : height_i[i] - 1) * width_i[i];
    const int32_t col_low = w_low > 0 ? w_low : 0;
    const int32_t col_high = w_low + 1 < width_i[i] ? w_low + 1 : width_i[i] - 1;
    p0[i] = (start[i] + row_low + col_low) * pixel_stride + head[i];
    p1[i] = (start[i] + row_low + col_high) * pixel_stride + head[i];
    p2[i] = (start[i] + row_high + col_low) * pixel_stride + head[i];
    p3[i] = (start[i] + row_high + col_high) * pixel_stride + head[i];
    const int32_t v0 = low_row & low_col, v1 = low_row & high_col, v2 = high_row & low_col, v3 = high_row & high_col;
    const acc_t bl0 = v0 != 0 ? rh * rw : acc_t(0), bl1 = v1 != 0 ? rh * fw : acc_t(0);
    const acc_t bl2 = v2 != 0 ? fh * rw : acc_t(0), bl3 = v3 != 0 ? fh * fw : acc_t(0);
    const acc_t a = attn[i];
    w0[i] = v0 != 0 ? a * bl0 : acc_t(0);
    w1[i] = v1 != 0 ? a * bl1 : acc_t(0);
    w2[i] = v2 != 0 ? a * bl2 : acc_t(0);
    w3[i] = v3 != 0 ? a * bl3 : acc_t(0);
    inside[i] = in;
    if constexpr (kSlopes) {
      ok0[i] = v0, ok1[i] = v1, ok2[i] = v2, ok3[i] = v3;
      b0[i] = bl0, b1[i] = bl1, b2[i] = bl2, b3[i] = bl3;
      frac_h[i] = fh;
      frac_w[i] = fw;
    }
  }
}

// Channels known at compile time (kChannels > 0) keep the accumulator in registers and unroll the
// channel loops; 0 takes d.channels at run time.
template <int kChannels>
MSDA_ALWAYS_INLINE int64_t channel_count(const Dims& d) {
  return kChannels > 0 ? kChannels : d.channels;
}

// Asks for the cache lines of the `count` values at `p` (a corner's channels) ahead of their use.
template <typename T>
MSDA_ALWAYS_INLINE void prefetch_span(const T* p, int64_t count, bool for_write = false) {
  // Every line the span touches, once (its first line may start before p).
  const uintptr_t first = reinterpret_cast<uintptr_t>(p) & ~uintptr_t(63);
  const uintptr_t last = (reinterpret_cast<uintptr_t>(p + count) - 1) & ~uintptr_t(63);
  for (uintptr_t line = first; line <= last; line += 64) {
    if (for_write) __builtin_prefetch(reinterpret_cast<const void*>(line), 1);
    else __builtin_prefetch(reinterpret_cast<const void*>(line));
  }
}

// Eight floats as one value (GCC/Clang vector extension): one AVX register in the AVX2 copy of
// the loops, two SSE registers in the baseline one. The float paths for channel counts that are
// multiples of 8 keep their accumulators in such values, so they stay in registers (an array
// indexed in a loop went through memory, zeroed with a `rep stos` per head).
typedef float float8 __attribute__((vector_size(32)));

MSDA_ALWAYS_INLINE float8 load8(const float* p) {
  float8 v;
  __builtin_memcpy(&v, p, sizeof v);
  return v;
}

MSDA_ALWAYS_INLINE void store8(float* p, float8 v) { __builtin_memcpy(p, &v, sizeof v); }

MSDA_ALWAYS_INLINE float sum8(float8 v) {
  return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
}

// The float path applies: float values and a compile-time channel count that is a multiple of 8.
template <typename scalar_t, int kChannels>
constexpr bool kFloat8Path = std::is_same<scalar_t, float>::value && kChannels > 0 && kChannels % 8 == 0;

// Prefetches the corners of one row of the backward (the value and grad_value lines it reads and
// writes) while the row before it is summed, so the scattered reads' latency overlaps that work.
// When a corner's channels fill whole lines (32 floats: two) their count is a constant and the
// prefetches are unrolled, without prefetch_span's line arithmetic: with that arithmetic, the
// prefetches of an encoder row took as many instructions as its sums (`bench/msda.py`'s off-map
// phase). The span is taken to start on a line, as every tensor the kernel gets or allocates
// does; one that does not only leaves its last line unrequested (a hint, not a read).
template <int kChannels, typename T, typename acc_t>
MSDA_ALWAYS_INLINE void prefetch_corners(const Corners<acc_t>& c, int64_t samples, const T* base, int64_t channels,
                                         bool for_write = false) {
  constexpr int64_t kBytes = int64_t(kChannels) * int64_t(sizeof(T));
  if constexpr (kChannels > 0 && kBytes % 64 == 0) {
    for (int64_t i = 0; i < samples; ++i) {
#pragma GCC unroll 4
      for (int k = 0; k < 4; ++k) {
        const char* corner = reinterpret_cast<const char*>(base + int64_t(c.slot[k][i]) * kChannels);
#pragma GCC unroll 8
        for (int64_t line = 0; line < kBytes; line += 64) {
          if (for_write) __builtin_prefetch(corner + line, 1);
          else __builtin_prefetch(corner + line);
        }
      }
    }
  } else {
    for (int64_t i = 0; i < samples; ++i) {
      for (int k = 0; k < 4; ++k) prefetch_span(base + int64_t(c.slot[k][i]) * channels, channels, for_write);
    }
  }
}

// Queries per block of the forward: a few dozen queries amortise taking a block, and the encoder's
// tens of thousands of queries still make a thousand blocks to balance.
constexpr int64_t kForwardBlock = 32;

// Forward of a block of queries [begin, end) (at most kForwardBlock), a query being one (batch,
// query) with all its heads: per query one corner loop over its heads x levels x points samples,
// into c[query - begin] (this thread's scratch), then head by head the gather of every query of
// the block. With `value`'s heads first (the encoder: heads_first_pays) one head's pixels are
// contiguous, and the block's neighbouring queries read neighbouring pixels, so they share lines
// in cache; as given, a head's rows lie 1 KiB apart, all in one eighth of the cache's sets.
// (Prefetching each query's corners before the gather, as the backward does per row, cost a third
// of the encoder forward in prefetch instructions and saved no waiting: `bench/msda.py`'s kernel
// phases.)
template <typename scalar_t, int kChannels>
MSDA_ALWAYS_INLINE void forward_queries(const Args<scalar_t>& args,
                                        const SampleTable<at::opmath_type<scalar_t>>& table,
                                        Corners<at::opmath_type<scalar_t>>* c, int64_t begin, int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  const Dims& d = args.d;
  const int64_t channels = channel_count<kChannels>(d);
  const int64_t samples = d.levels * d.points;  // per head
  // Two accumulators (corners 0-1 and 2-3): each step is one fused multiply-add per channel, and
  // two independent chains hide its latency.
  acc_t fixed_acc[2 * (kChannels > 0 ? kChannels : 1)];
  std::vector<acc_t> dynamic_acc(kChannels > 0 ? 0 : 2 * channels);
  acc_t* __restrict acc = kChannels > 0 ? fixed_acc : dynamic_acc.data();
  acc_t* __restrict acc2 = acc + channels;
  for (int64_t query = begin; query < end; ++query) {
    row_corners<false>(table, d.heads * samples, args.locations + query * d.heads * samples * 2,
                       args.weights + query * d.heads * samples, c[query - begin]);
  }
  for (int64_t m = 0; m < d.heads; ++m) {
    for (int64_t query = begin; query < end; ++query) {
      const Corners<acc_t>& q = c[query - begin];
      const int32_t *__restrict s0 = q.slot[0].data(), *__restrict s1 = q.slot[1].data();
      const int32_t *__restrict s2 = q.slot[2].data(), *__restrict s3 = q.slot[3].data();
      const acc_t *__restrict w0 = q.weight[0].data(), *__restrict w1 = q.weight[1].data();
      const acc_t *__restrict w2 = q.weight[2].data(), *__restrict w3 = q.weight[3].data();
      const int32_t* __restrict inside = q.inside.data();
      const scalar_t* __restrict base = args.value + (query / d.queries) * d.spatial * d.heads * channels;
      scalar_t* __restrict out = args.output + (query * d.heads + m) * channels;
      if constexpr (kFloat8Path<scalar_t, kChannels>) {
        constexpr int kVectors = kChannels / 8;
        float8 sum[kVectors] = {}, sum2[kVectors] = {};
        for (int64_t i = m * samples; i < (m + 1) * samples; ++i) {
          if (!inside[i]) continue;
          const float* v0 = base + int64_t(s0[i]) * kChannels;
          const float* v1 = base + int64_t(s1[i]) * kChannels;
          const float* v2 = base + int64_t(s2[i]) * kChannels;
          const float* v3 = base + int64_t(s3[i]) * kChannels;
          const float a0 = w0[i], a1 = w1[i], a2 = w2[i], a3 = w3[i];
#pragma GCC unroll 8
          for (int j = 0; j < kVectors; ++j) {
            sum[j] += a0 * load8(v0 + 8 * j);
            sum2[j] += a2 * load8(v2 + 8 * j);
            sum[j] += a1 * load8(v1 + 8 * j);
            sum2[j] += a3 * load8(v3 + 8 * j);
          }
        }
#pragma GCC unroll 8
        for (int j = 0; j < kVectors; ++j) store8(out + 8 * j, sum[j] + sum2[j]);
        continue;
      }
      for (int64_t ch = 0; ch < channels; ++ch) acc[ch] = acc_t(0), acc2[ch] = acc_t(0);
      for (int64_t i = m * samples; i < (m + 1) * samples; ++i) {
        if (!inside[i]) continue;
        const scalar_t* __restrict v0 = base + int64_t(s0[i]) * channels;
        const scalar_t* __restrict v1 = base + int64_t(s1[i]) * channels;
        const scalar_t* __restrict v2 = base + int64_t(s2[i]) * channels;
        const scalar_t* __restrict v3 = base + int64_t(s3[i]) * channels;
        const acc_t a0 = w0[i], a1 = w1[i], a2 = w2[i], a3 = w3[i];
#pragma omp simd
        for (int64_t ch = 0; ch < channels; ++ch) {
          acc[ch] += a0 * static_cast<acc_t>(v0[ch]);
          acc2[ch] += a2 * static_cast<acc_t>(v2[ch]);
          acc[ch] += a1 * static_cast<acc_t>(v1[ch]);
          acc2[ch] += a3 * static_cast<acc_t>(v3[ch]);
        }
      }
      for (int64_t ch = 0; ch < channels; ++ch) out[ch] = static_cast<scalar_t>(acc[ch] + acc2[ch]);
    }
  }
}

// The backward of one row's samples on the float path. Per sample, the slopes of the sample by
// the attention weight and by the fractional offsets are each a sum over corners and channels of
// (coefficient x grad_output x value); the channel sums are kept as 8 lanes and summed across
// lanes once per sample and slope (3 lane sums, not one per corner and slope).
template <int kChannels>
MSDA_ALWAYS_INLINE void backward_row_float8(const Corners<float>& c, const SampleTable<float>& table, int64_t samples,
                                            const float* base, float* grad_base, const float* g_row,
                                            const float* attn, float* grad_loc, float* grad_attn) {
  constexpr int kVectors = kChannels / 8;
  float8 g[kVectors];
#pragma GCC unroll 8
  for (int j = 0; j < kVectors; ++j) g[j] = load8(g_row + 8 * j);
  for (int64_t i = 0; i < samples; ++i) {
    if (!c.inside[i]) {  // a sample off the map: no slope
      grad_attn[i] = grad_loc[2 * i] = grad_loc[2 * i + 1] = 0.0f;
      continue;
    }
    const float fh = c.frac_h[i], fw = c.frac_w[i], rh = 1.0f - fh, rw = 1.0f - fw;
    const float dfrac_w[4] = {-rh, rh, -fh, fh};  // d(sample)/d(frac_w) per corner value
    const float dfrac_h[4] = {-rw, -fw, rw, fw};
    float8 by_attn = {}, by_w = {}, by_h = {};
#pragma GCC unroll 4
    for (int k = 0; k < 4; ++k) {
      const int64_t offset = int64_t(c.slot[k][i]) * kChannels;
      const float* v = base + offset;
      float* gv = grad_base + offset;
      const float scale = c.weight[k][i];  // zero for a corner outside the map
      float8 dot[2] = {};
#pragma GCC unroll 8
      for (int j = 0; j < kVectors; ++j) {
        dot[j & 1] += g[j] * load8(v + 8 * j);
        store8(gv + 8 * j, load8(gv + 8 * j) + scale * g[j]);
      }
      const float8 d = dot[0] + dot[1];
      const bool valid = c.valid[k][i] != 0;  // a clamped pixel's value contributes nothing
      by_attn += c.bilinear[k][i] * d;         // zero when not valid
      by_w += (valid ? dfrac_w[k] : 0.0f) * d;
      by_h += (valid ? dfrac_h[k] : 0.0f) * d;
    }
    const float a = attn[i];
    grad_attn[i] = sum8(by_attn);
    grad_loc[2 * i] = a * sum8(by_w) * table.width[i];
    grad_loc[2 * i + 1] = a * sum8(by_h) * table.height[i];
  }
}

// How many rows ahead the backward asks for a row's locations, weights and gradients.
constexpr int64_t kRowsAhead = 4;

// Backward of tasks [begin, end). A task is one (batch, head) pair and one of `chunks` slices of
// its queries; different pairs write disjoint slices of grad_value, and the query slices of one
// pair write their own copy of it (chunk 0: grad_value itself, chunk c: extra_grad_value[c - 1]),
// summed afterwards, so the scatter needs no atomics.
template <typename scalar_t, int kChannels>
MSDA_ALWAYS_INLINE void backward_tasks(const Args<scalar_t>& args, const SampleTable<at::opmath_type<scalar_t>>& table,
                                       Corners<at::opmath_type<scalar_t>>* now, Corners<at::opmath_type<scalar_t>>* ahead,
                                       int64_t chunks, at::opmath_type<scalar_t>* extra_grad_value, int64_t begin,
                                       int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  const Dims& d = args.d;
  const int64_t channels = channel_count<kChannels>(d);
  const int64_t samples = d.levels * d.points;
  const int64_t value_numel = d.batch * d.spatial * d.heads * channels;
  const int64_t per_chunk = (d.queries + chunks - 1) / chunks;
  acc_t fixed_grad[kChannels > 0 ? kChannels : 1];
  std::vector<acc_t> dynamic_grad(kChannels > 0 ? 0 : channels);
  acc_t* __restrict g = kChannels > 0 ? fixed_grad : dynamic_grad.data();
  for (int64_t task = begin; task < end; ++task) {
    const int64_t pair = task / chunks, chunk = task % chunks;
    const int64_t n = pair / d.heads, m = pair % d.heads;
    acc_t* grad_value = chunk == 0 ? args.grad_value : extra_grad_value + (chunk - 1) * value_numel;
    // The batch's first value, plus head m's slot offset (either layout: SampleTable).
    const int64_t base_offset = (n * d.spatial * d.heads + table.head_offset[m * samples]) * channels;
    const scalar_t* __restrict base = args.value + base_offset;
    acc_t* __restrict grad_base = grad_value + base_offset;
    const int64_t q_begin = chunk * per_chunk, q_end = std::min(d.queries, (chunk + 1) * per_chunk);
    // The next row's corners are computed, and the value and grad_value lines they touch asked
    // for, before this row's are used: the scattered reads' latency overlaps this row's work.
    auto row_of = [&](int64_t q) { return (n * d.queries + q) * d.heads + m; };
    if (q_begin < q_end) {
      const int64_t first = row_of(q_begin);
      row_corners<true>(table, samples, args.locations + first * samples * 2, args.weights + first * samples, *now);
    }
    for (int64_t q = q_begin; q < q_end; ++q) {
      const int64_t row = row_of(q);
      if (q + kRowsAhead < q_end) {
        // A task's rows lie heads x samples apart in the per-row tensors, a stride the hardware
        // prefetcher does not follow: their lines are asked for a few rows ahead.
        const int64_t later = row_of(q + kRowsAhead);
        prefetch_span(args.locations + later * samples * 2, samples * 2);
        prefetch_span(args.weights + later * samples, samples);
        prefetch_span(args.grad_output + later * channels, channels);
        prefetch_span(args.grad_locations + later * samples * 2, samples * 2, /*for_write=*/true);
        prefetch_span(args.grad_weights + later * samples, samples, /*for_write=*/true);
      }
      if (q + 1 < q_end) {
        const int64_t next = row_of(q + 1);
        row_corners<true>(table, samples, args.locations + next * samples * 2, args.weights + next * samples, *ahead);
        prefetch_corners<kChannels>(*ahead, samples, base, channels);
        prefetch_corners<kChannels>(*ahead, samples, grad_base, channels, /*for_write=*/true);
      }
      const Corners<acc_t>& corners = *now;
      std::swap(now, ahead);
      const scalar_t* __restrict grad_out = args.grad_output + row * channels;
      for (int64_t c = 0; c < channels; ++c) g[c] = static_cast<acc_t>(grad_out[c]);
      const acc_t* __restrict attn = args.weights + row * samples;
      acc_t* __restrict grad_loc = args.grad_locations + row * samples * 2;
      acc_t* __restrict grad_attn = args.grad_weights + row * samples;
      if constexpr (kFloat8Path<scalar_t, kChannels>) {
        backward_row_float8<kChannels>(corners, table, samples, base, grad_base, g, attn, grad_loc, grad_attn);
        continue;
      }
      for (int64_t i = 0; i < samples; ++i) {
        if (!corners.inside[i]) {  // a sample off the map: no slope
          grad_attn[i] = grad_loc[2 * i] = grad_loc[2 * i + 1] = acc_t(0);
          continue;
        }
        acc_t g_dot_v[4];                  // per corner: sum over channels of grad_output * value
        for (int k = 0; k < 4; ++k) {
          const int64_t offset = int64_t(corners.slot[k][i]) * channels;
          const scalar_t* __restrict v = base + offset;
          acc_t* __restrict gv = grad_base + offset;
          const acc_t scale = corners.weight[k][i];  // zero for a corner outside the map
          acc_t dot = 0;
#pragma omp simd reduction(+ : dot)
          for (int64_t c = 0; c < channels; ++c) {
            dot += g[c] * static_cast<acc_t>(v[c]);
            gv[c] += scale * g[c];
          }
          g_dot_v[k] = dot;
        }
        const acc_t fh = corners.frac_h[i], fw = corners.frac_w[i];
        const acc_t rh = acc_t(1) - fh, rw = acc_t(1) - fw;
        const acc_t dfrac_w[4] = {-rh, rh, -fh, fh};  // d(sample)/d(frac_w) per corner value
        const acc_t dfrac_h[4] = {-rw, -fw, rw, fw};
        acc_t g_attn = 0, g_frac_w = 0, g_frac_h = 0;
        for (int k = 0; k < 4; ++k) {
          if (!corners.valid[k][i]) continue;  // read a clamped pixel: contributes nothing
          g_attn += corners.bilinear[k][i] * g_dot_v[k];
          g_frac_w += dfrac_w[k] * g_dot_v[k];
          g_frac_h += dfrac_h[k] * g_dot_v[k];
        }
        const acc_t a = attn[i];
        grad_attn[i] = g_attn;
        grad_loc[2 * i] = a * g_frac_w * table.width[i];
        grad_loc[2 * i + 1] = a * g_frac_h * table.height[i];
      }
    }
  }
}

// Runs body(begin, end) over [0, total) in blocks of `block` that the threads take from a shared
// counter, so a thread slowed down by other work on its core takes fewer blocks. `body` also gets
// the index of the worker, for per-thread scratch, and never more than `block` items at once (the
// forward's scratch holds one block), on one thread too.
template <typename Body>
void parallel_blocks(int64_t total, int64_t block, const Body& body) {
  if (total <= 0) return;
  const int64_t blocks = (total + block - 1) / block;
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), blocks);
  if (workers <= 1 || at::in_parallel_region()) {
    for (int64_t b = 0; b < blocks; ++b) body(int64_t(0), b * block, std::min(total, (b + 1) * block));
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, workers, 1, [&](int64_t first, int64_t last) {
    for (int64_t worker = first; worker < last; ++worker) {
      for (int64_t b = next.fetch_add(1, std::memory_order_relaxed); b < blocks;
           b = next.fetch_add(1, std::memory_order_relaxed)) {
        body(worker, b * block, std::min(total, (b + 1) * block));
      }
    }
  });
}

// Runs the statement with kChannels set to the channel count when it is a common one (compiled
// as a constant), else 0. A plain statement, not a lambda: a lambda would not inherit the AVX2
// target of the function it is written in.
#define MSDA_DISPATCH_CHANNELS(channels, ...)  \
  switch (channels) {                          \
    case 8: {                                  \
      constexpr int kChannels = 8;             \
      __VA_ARGS__;                             \
      break;                                   \
    }                                          \
    case 16: {                                 \
      constexpr int kChannels = 16;            \
      __VA_ARGS__;                             \
      break;                                   \
    }                                          \
    case 32: {                                 \
      constexpr int kChannels = 32;            \
      __VA_ARGS__;                             \
      break;                                   \
    }                                          \
    case 64: {                                 \
      constexpr int kChannels = 64;            \
      __VA_ARGS__;                             \
      break;                                   \
    }                                          \
    default: {                                 \
      constexpr int kChannels = 0;             \
      __VA_ARGS__;                             \
    }                                          \
  }

template <typename scalar_t>
void forward_range(const Args<scalar_t>& args, const SampleTable<at::opmath_type<scalar_t>>& table,
                   Corners<at::opmath_type<scalar_t>>* corners, int64_t begin, int64_t end) {
  MSDA_DISPATCH_CHANNELS(args.d.channels, forward_queries<scalar_t, kChannels>(args, table, corners, begin, end));
}

template <typename scalar_t>
void backward_range(const Args<scalar_t>& args, const SampleTable<at::opmath_type<scalar_t>>& table,
                    Corners<at::opmath_type<scalar_t>>* corners, int64_t chunks, at::opmath_type<scalar_t>* extra,
                    int64_t begin, int64_t end) {
  MSDA_DISPATCH_CHANNELS(args.d.channels,
                         backward_tasks<scalar_t, kChannels>(args, table, corners, corners + 1, chunks, extra, begin, end));
}

// The same loops compiled for AVX2+FMA (8 floats per instruction instead of SSE's 4, and a
// vectorised floor), chosen at run time, so one build serves every x86-64 machine.
#if defined(__x86_64__) && defined(__GNUC__)
#define MSDA_HAVE_AVX2_PATH 1
template <typename scalar_t>
__attribute__((target("avx2,fma"))) void forward_range_avx2(const Args<scalar_t>& args,
                                                             const SampleTable<at::opmath_type<scalar_t>>& table,
                                                             Corners<at::opmath_type<scalar_t>>* corners,
                                                             int64_t begin, int64_t end) {
  MSDA_DISPATCH_CHANNELS(args.d.channels, forward_queries<scalar_t, kChannels>(args, table, corners, begin, end));
}

template <typename scalar_t>
__attribute__((target("avx2,fma"))) void backward_range_avx2(const Args<scalar_t>& args,
                                                              const SampleTable<at::opmath_type<scalar_t>>& table,
                                                              Corners<at::opmath_type<scalar_t>>* corners,
                                                              int64_t chunks, at::opmath_type<scalar_t>* extra,
                                                              int64_t begin, int64_t end) {
  MSDA_DISPATCH_CHANNELS(args.d.channels,
                         backward_tasks<scalar_t, kChannels>(args, table, corners, corners + 1, chunks, extra, begin, end));
}

bool cpu_has_avx2() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
}
#endif

// by_head: `args.value` has its heads first (heads_first_pays below).
template <typename scalar_t>
void forward_kernel(const Args<scalar_t>& args, bool by_head) {
  using acc_t = at::opmath_type<scalar_t>;
  const SampleTable<acc_t> table(args.d, args.shapes, args.starts, by_head);
  const int64_t samples = args.d.heads * args.d.levels * args.d.points;
  std::vector<Corners<acc_t>> scratch(kForwardBlock * std::max(1, at::get_num_threads()), Corners<acc_t>(samples));
  parallel_blocks(args.d.batch * args.d.queries, kForwardBlock,
                  [&](int64_t worker, int64_t begin, int64_t end) {
                    Corners<acc_t>* corners = &scratch[kForwardBlock * worker];
#ifdef MSDA_HAVE_AVX2_PATH
                    if (cpu_has_avx2()) return forward_range_avx2<scalar_t>(args, table, corners, begin, end);
#endif
                    forward_range<scalar_t>(args, table, corners, begin, end);
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
void backward_kernel(const Args<scalar_t>& args, int64_t chunks, at::opmath_type<scalar_t>* extra, bool by_head) {
  using acc_t = at::opmath_type<scalar_t>;
  const SampleTable<acc_t> table(args.d, args.shapes, args.starts, by_head);
  const int64_t samples = args.d.levels * args.d.points;
  std::vector<Corners<acc_t>> scratch(2 * std::max(1, at::get_num_threads()), Corners<acc_t>(samples));
  parallel_blocks(args.d.batch * args.d.heads * chunks, 1, [&](int64_t worker, int64_t begin, int64_t end) {
    Corners<acc_t>* corners = &scratch[2 * worker];  // this row's and the next row's
#ifdef MSDA_HAVE_AVX2_PATH
    if (cpu_has_avx2()) return backward_range_avx2<scalar_t>(args, table, corners, chunks, extra, begin, end);
#endif
    backward_range<scalar_t>(args, table, corners, chunks, extra, begin, end);
  });
}

// The kernel's large outputs (the forward's output, the backward's three gradients) come from a
// cache of 2 MiB-aligned blocks that Linux may back with huge pages (transparent huge
// pages in "madvise" mode, the common default), not from malloc. A tensor this large is mapped
// fresh by malloc on every call and unmapped when freed, and touching it first, page by page,
// cost more than the kernel's arithmetic: with 4 KiB pages the encoder forward's 45 MB output
// took 20 ms of page faults before a value was read. A freed block goes back to the cache (up
// to kCachedBytes in all, the rest is unmapped), so a training loop's next step reuses mapped
// memory. Advice the system refuses changes nothing but the speed.
class BlockCache {
 public:
  static constexpr size_t kAlign = size_t(1) << 21;
  static constexpr size_t kCachedBytes = size_t(1) << 30;  // idle blocks kept at most

  static BlockCache& instance() {
    static BlockCache* cache = new BlockCache();  // never destroyed: tensors may outlive exit handlers
    return *cache;
  }

  // A block of at least `bytes` (rounded up to kAlign): the smallest cached one no more than twice
  // that size, else a new mapping.
  std::pair<void*, size_t> take(size_t bytes) {
    bytes = (bytes + kAlign - 1) / kAlign * kAlign;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto it = idle_.lower_bound(bytes);
      if (it != idle_.end() && it->first <= 2 * bytes) {
        const std::pair<void*, size_t> block{it->second, it->first};
        idle_bytes_ -= it->first;
        idle_.erase(it);
        return block;
      }
    }
    return {map(bytes), bytes};
  }

  void give(void* data, size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (idle_bytes_ + bytes <= kCachedBytes) {
        idle_.emplace(bytes, data);
        idle_bytes_ += bytes;
        return;
      }
    }
    unmap(data, bytes);
  }

 private:
  static void* map(size_t bytes) {
#if defined(__linux__)
    // Over-map by one alignment and trim, so the block starts on a 2 MiB boundary.
    void* raw = mmap(nullptr, bytes + kAlign, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    TORCH_CHECK(raw != MAP_FAILED, "cannot map ", bytes, " bytes for the deformable attention's output");
    const uintptr_t begin = reinterpret_cast<uintptr_t>(raw);
    const uintptr_t aligned = (begin + kAlign - 1) & ~uintptr_t(kAlign - 1);
    if (aligned > begin) munmap(raw, aligned - begin);
    munmap(reinterpret_cast<void*>(aligned + bytes), begin + kAlign - aligned);  // the tail: never empty
#if defined(MADV_HUGEPAGE)
    madvise(reinterpret_cast<void*>(aligned), bytes, MADV_HUGEPAGE);
#endif
    return reinterpret_cast<void*>(aligned);
#else
    void* data = std::aligned_alloc(kAlign, bytes);
    TORCH_CHECK(data != nullptr, "cannot allocate ", bytes, " bytes for the deformable attention's output");
    return data;
#endif
  }

  static void unmap(void* data, size_t bytes) {
#if defined(__linux__)
    munmap(data, bytes);
#else
    std::free(data);
#endif
  }

  std::mutex mutex_;
  std::multimap<size_t, void*> idle_;
  size_t idle_bytes_ = 0;
};

// An uninitialised tensor of the given sizes and options: in a block of the cache when it takes at
// least one block (smaller ones malloc serves from memory it already holds, like any tensor).
at::Tensor empty_cached(at::IntArrayRef sizes, const at::TensorOptions& options) {
  const size_t bytes = static_cast<size_t>(c10::multiply_integers(sizes)) * options.dtype().itemsize();
  if (bytes < BlockCache::kAlign) return at::empty(sizes, options);
  const auto block = BlockCache::instance().take(bytes);
  const size_t block_bytes = block.second;
  return at::from_blob(
      block.first, sizes, [block_bytes](void* data) { BlockCache::instance().give(data, block_bytes); }, options);
}

// Whether the kernel reads `value` (and the backward writes `grad_value`) with its heads first:
// the copies read and write all of `value` once more (twice in the backward), which pays when
// the queries read it many times over (the encoder: as many queries as pixels), not for a
// decoder's few hundred queries, whose forward takes less than a copy.
bool heads_first_pays(const Dims& d) { return d.heads > 1 && 4 * d.queries >= d.spatial; }

// [batch, A, B, channels] -> [batch, B, A, channels]: `value` with its heads first and the
// backward's heads-first `grad_value` back. One pass in parallel, each row of channels copied
// whole: ATen's copy of the permuted tensor took about twice as long.
at::Tensor swap_middle_dims(const at::Tensor& t) {
  const int64_t batch = t.size(0), a_size = t.size(1), b_size = t.size(2);
  auto out = empty_cached({batch, b_size, a_size, t.size(3)}, t.options());
  const int64_t row_bytes = t.size(3) * t.element_size();
  const char* src = static_cast<const char*>(t.data_ptr());
  char* dst = static_cast<char*>(out.data_ptr());
  at::parallel_for(0, batch * a_size, std::max<int64_t>(1, 2048 / b_size), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {  // row = n * a_size + a
      const int64_t n = row / a_size, a = row % a_size;
      for (int64_t b = 0; b < b_size; ++b) {
        std::memcpy(dst + ((n * b_size + b) * a_size + a) * row_bytes, src + (row * b_size + b) * row_bytes,
                    row_bytes);
      }
    }
  });
  return out;
}

}  // namespace

at::Tensor msda_cpu_forward(const at::Tensor& value, const at::Tensor& spatial_shapes,
                            const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                            const at::Tensor& attention_weights) {
  msda_check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  const Dims d = dims_of(value, sampling_locations);
  TORCH_CHECK(d.spatial * d.heads < (int64_t(1) << 31), "value has ", d.spatial, " positions x ", d.heads,
              " heads; at most 2^31 - 1 are supported");
  auto output = empty_cached({d.batch, d.queries, d.heads * d.channels}, value.options());
  const bool by_head = heads_first_pays(d);
  const at::Tensor read = by_head ? swap_middle_dims(value) : value;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "msda_cpu_forward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    Args<scalar_t> args{read.data_ptr<scalar_t>(), spatial_shapes.data_ptr<int64_t>(),
                        level_start_index.data_ptr<int64_t>(), sampling_locations.data_ptr<acc_t>(),
                        attention_weights.data_ptr<acc_t>(), output.data_ptr<scalar_t>(), nullptr, nullptr,
                        nullptr, nullptr, d};
    forward_kernel<scalar_t>(args, by_head);
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
  TORCH_CHECK(d.spatial * d.heads < (int64_t(1) << 31), "value has ", d.spatial, " positions x ", d.heads,
              " heads; at most 2^31 - 1 are supported");
  const bool by_head = heads_first_pays(d);
  const at::Tensor read = by_head ? swap_middle_dims(value) : value;
  auto grad_value = empty_cached(read.sizes(), value.options().dtype(sampling_locations.scalar_type())).zero_();
  // Every entry of these two is written by the kernel: no zeroing pass.
  auto grad_locations = empty_cached(sampling_locations.sizes(), sampling_locations.options());
  auto grad_weights = empty_cached(attention_weights.sizes(), attention_weights.options());
  const int64_t chunks = backward_chunks(d);
  std::vector<int64_t> extra_sizes{chunks - 1};
  extra_sizes.insert(extra_sizes.end(), read.sizes().begin(), read.sizes().end());
  auto extra = chunks > 1 ? empty_cached(extra_sizes, grad_value.options()).zero_() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "msda_cpu_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    Args<scalar_t> args{read.data_ptr<scalar_t>(), spatial_shapes.data_ptr<int64_t>(),
                        level_start_index.data_ptr<int64_t>(), sampling_locations.data_ptr<acc_t>(),
                        attention_weights.data_ptr<acc_t>(), nullptr, grad_output.data_ptr<scalar_t>(),
                        grad_value.data_ptr<acc_t>(), grad_locations.data_ptr<acc_t>(),
                        grad_weights.data_ptr<acc_t>(), d};
    backward_kernel<scalar_t>(args, chunks, chunks > 1 ? extra.data_ptr<acc_t>() : nullptr, by_head);
  });
  if (chunks > 1) grad_value.add_(extra.sum(0));
  return {by_head ? swap_middle_dims(grad_value) : grad_value, grad_locations, grad_weights};
}
