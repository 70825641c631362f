// Winograd F(m x m, 3 x 3) convolution on CPU, NHWC, for the fused model's 3x3 convs.
//
// One op, mmrepvgg::winograd_conv3x3, in three steps: the input transform writes every
// tile's B^T d B, laid out [position, group, tile, channel]; the products are one matrix
// product per (tile position, group), by the register-blocked kernel below, against
// weights packed once in Python; the output transform applies A^T M A, adds the bias,
// optionally the ReLU, and writes the NHWC output. The transforms run over tiles in
// parallel with the channels innermost (contiguous in NHWC), so the compiler vectorises
// them; the tile side S is a template parameter so that the small matrix products unroll.
// The transform matrices come from Python (mmrepvgg.deploy.winograd derives them); this
// file only applies them. Built with -march=native by mmrepvgg.deploy.winograd_kernel.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t kChannelBlock = 64;  // channels per pass: a tile's S*S*64 floats fit L1

// The transformed input and the products are scratch, megabytes per conv: they live in
// buffers kept per calling thread and grown on demand, because a fresh allocation of that
// size is fresh pages from the OS, and faulting them in cost as much as the transforms.
at::Tensor scratch(int slot, at::IntArrayRef shape, const at::TensorOptions& options) {
  thread_local at::Tensor buffers[2];
  at::Tensor& buffer = buffers[slot];
  const int64_t size = c10::multiply_integers(shape);
  if (!buffer.defined() || buffer.numel() < size) buffer = at::empty({size}, options);
  return buffer.narrow(0, 0, size).view(shape);
}

// The transforms are products of small matrices whose entries are blocks of
// kChannelBlock channels. Each output block is accumulated in registers over the K taps
// (K is a template parameter, so the tap loop unrolls and the channel loop vectorises).

// out[r][j] = sum_k mat[r][k] src[k][j]  (mat R x K, src K x J blocks)
template <int R, int K, int J>
void multiply_left(const float* mat, const float* src, float* out) {
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < J; ++j) {
      float* __restrict__ dst = out + (r * J + j) * kChannelBlock;
      for (int64_t c = 0; c < kChannelBlock; ++c) {
        float sum = 0.f;
        for (int k = 0; k < K; ++k) sum += mat[r * K + k] * src[(k * J + j) * kChannelBlock + c];
        dst[c] = sum;
      }
    }
}

// out[i][r] = sum_k mat[r][k] src[i][k]  (mat R x K, src I x K blocks): src times mat^T
template <int I, int R, int K>
void multiply_right_transposed(const float* mat, const float* src, float* out) {
  for (int i = 0; i < I; ++i)
    for (int r = 0; r < R; ++r) {
      float* __restrict__ dst = out + (i * R + r) * kChannelBlock;
      for (int64_t c = 0; c < kChannelBlock; ++c) {
        float sum = 0.f;
        for (int k = 0; k < K; ++k) sum += mat[r * K + k] * src[(i * K + k) * kChannelBlock + c];
        dst[c] = sum;
      }
    }
}

// v = B^T d B for one tile (S x S blocks)
template <int S>
void input_tile(const float* bt, const float* d, float* tmp, float* v) {
  multiply_left<S, S, S>(bt, d, tmp);
  multiply_right_transposed<S, S, S>(bt, tmp, v);
}

// y = A^T m A for one tile (m: S x S blocks, y: M x M blocks)
template <int S, int M>
void output_tile(const float* at, const float* m, float* tmp, float* y) {
  multiply_left<M, S, S>(at, m, tmp);
  multiply_right_transposed<M, M, S>(at, tmp, y);
}


// ---- The products: one matrix product per (tile position, group), [tiles x in] times
// [in x out]. A small register-blocked kernel: at batch 4 these products have only 64-800
// rows, a shape on which MKL's threaded sgemm reached 60-75% of its large-matrix rate.
// The weights are packed once (in Python) as panels of kPanel output channels, k-major,
// so that a panel streams contiguously; the transformed input is read in place.

constexpr int kPanel = 16;  // output channels per panel: two 8-float vectors
constexpr int kRows = 6;    // rows per register block, at most: 6 x 2 accumulators, 2 + 1 more
constexpr int64_t kDepth = 256;  // input channels per pass: a panel's slice (16 KB) stays in L1
typedef float Vec8 __attribute__((vector_size(32)));

// c[0:R, 0:width] = a[0:R, 0:depth] (row stride lda) times one packed panel [depth, kPanel]
// (accumulate: c += the product)
template <int R>
inline void panel_product(int64_t depth, const float* __restrict__ a, int64_t lda,
                          const float* __restrict__ panel, float* __restrict__ c, int64_t ldc,
                          int64_t width, bool accumulate, const float* ahead,
                          uint64_t ahead_scale) {
  Vec8 acc[R][2];
  for (int i = 0; i < R; ++i) acc[i][0] = acc[i][1] = Vec8{};
  for (int64_t k = 0; k < depth; ++k) {
    // weight row (k * ahead_scale) >> 32 of the next slice: this block's share of its
    // rows, evenly over the depth (a multiply, not a division, per step)
    __builtin_prefetch(ahead + ((k * ahead_scale) >> 32) * kPanel);
    Vec8 b0, b1;
    std::memcpy(&b0, panel + k * kPanel, sizeof(Vec8));
    std::memcpy(&b1, panel + k * kPanel + 8, sizeof(Vec8));
    for (int i = 0; i < R; ++i) {
      const float ai = a[i * lda + k];
      acc[i][0] += ai * b0;
      acc[i][1] += ai * b1;
    }
  }
  for (int i = 0; i < R; ++i) {
    float row[kPanel];
    std::memcpy(row, &acc[i][0], sizeof(Vec8));
    std::memcpy(row + 8, &acc[i][1], sizeof(Vec8));
    float* __restrict__ out = c + i * ldc;
    if (accumulate) {
      for (int64_t j = 0; j < width; ++j) out[j] += row[j];
    } else {
      for (int64_t j = 0; j < width; ++j) out[j] = row[j];
    }
  }
}

// c[0:rows, 0:width] = a[0:rows, 0:depth] times one packed panel, in passes of kDepth
// input channels (the panel's slice is reused from L1 by every block of rows). The rows
// go in blocks of as equal sizes as kRows allows (16 rows: 6, 5, 5, not 6, 6, 4): a block
// of fewer than 5 rows has too few accumulators to hide the multiply-add latency
// (measured: 16 rows 25% faster so).
void rows_product(int64_t rows, int64_t depth, const float* a, const float* panel, float* c,
                  int64_t ldc, int64_t width) {
  const int64_t blocks = (rows + kRows - 1) / kRows;
  for (int64_t k0 = 0; k0 < depth; k0 += kDepth) {
    const int64_t part = std::min(kDepth, depth - k0);
    const float* slice = panel + k0 * kPanel;
    const bool accumulate = k0 > 0;
    // The next slice of weights (the next pass, or the next panel: packed contiguously)
    // is prefetched while this one is used, spread over all blocks of rows. Fetched on
    // demand, the first block waited for the slice and the others found it in L1: one
    // core read 3-5 GB/s with no overlap of fetching and multiply-adds. Spread, 16 rows
    // with 512 inputs (stage 3 at batch 4) ran 1.4x faster, measured.
    const float* ahead = slice + part * kPanel;
    for (int64_t block = 0, i = 0; block < blocks; ++block) {
      const int64_t size = (rows - i + blocks - block - 1) / (blocks - block);
      const float* rows_a = a + i * depth + k0;
      float* out = c + i * ldc;
      const int64_t first = block * part / blocks, last = (block + 1) * part / blocks;
      const uint64_t scale = (static_cast<uint64_t>(last - first) << 32) / part;
#define MMREPVGG_ROWS(R)                                                                   \
  case R:                                                                                 \
    panel_product<R>(part, rows_a, depth, slice, out, ldc, width, accumulate,             \
                     ahead + first * kPanel, scale);                                      \
    break;
      switch (size) {
        MMREPVGG_ROWS(1)
        MMREPVGG_ROWS(2)
        MMREPVGG_ROWS(3)
        MMREPVGG_ROWS(4)
        MMREPVGG_ROWS(5)
        MMREPVGG_ROWS(6)
      }
#undef MMREPVGG_ROWS
      i += size;
    }
  }
}

// c[b] = a[b] (rows x depth) times the packed b-th weight matrix (depth x out), every b.
void batched_product(int64_t batch, int64_t rows, int64_t depth, int64_t out, const float* a,
                     const float* packed, float* c) {
  const int64_t panels = (out + kPanel - 1) / kPanel;
  at::parallel_for(0, batch * panels, 1, [&](int64_t begin, int64_t end) {
    for (int64_t job = begin; job < end; ++job) {
      const int64_t b = job / panels, p = job % panels;
      rows_product(rows, depth, a + b * rows * depth, packed + (b * panels + p) * depth * kPanel,
                   c + b * rows * out + p * kPanel, out,
                   std::min<int64_t>(kPanel, out - p * kPanel));
    }
  });
}

template <int M>
at::Tensor winograd_conv(const at::Tensor& input, const at::Tensor& kernel,
                         const std::optional<at::Tensor>& bias, const at::Tensor& input_transform,
                         const at::Tensor& output_transform, int64_t groups,
                         int64_t out_channels, bool relu) {
  constexpr int S = M + 2;
  const at::Tensor x = input.contiguous(at::MemoryFormat::ChannelsLast);
  const int64_t n = x.size(0), channels = x.size(1), height = x.size(2), width = x.size(3);
  const int64_t in_per_group = channels / groups, out_per_group = out_channels / groups;
  const int64_t rows = (height + M - 1) / M, cols = (width + M - 1) / M;
  const int64_t tiles = n * rows * cols;
  const at::Tensor bt = input_transform.contiguous(), at_ = output_transform.contiguous();
  const float* bt_data = bt.data_ptr<float>();
  const float* at_data = at_.data_ptr<float>();
  const float* x_data = x.data_ptr<float>();

  // v: [S*S*groups, tiles, in_per_group]
  float* v_data = scratch(0, {S * S * groups, tiles, in_per_group}, x.options()).data_ptr<float>();
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> d(S * S * kChannelBlock), tmp(S * S * kChannelBlock),
        out(S * S * kChannelBlock);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / (rows * cols), r = (t / cols) % rows, s = t % cols;
      const int64_t top = r * M - 1, left = s * M - 1;
      for (int64_t g = 0; g < groups; ++g)
      for (int64_t cg = 0; cg < in_per_group; cg += kChannelBlock) {
        const int64_t c0 = g * in_per_group + cg;
        const int64_t block = std::min(kChannelBlock, in_per_group - cg);
        for (int k = 0; k < S; ++k) {
          const int64_t h = top + k;
          for (int l = 0; l < S; ++l) {
            const int64_t w = left + l;
            float* __restrict__ dst = d.data() + (k * S + l) * kChannelBlock;
            if (h < 0 || h >= height || w < 0 || w >= width) {
              std::fill(dst, dst + block, 0.f);
            } else {
              const float* src = x_data + ((b * height + h) * width + w) * channels + c0;
              std::copy(src, src + block, dst);
            }
          }
        }
        input_tile<S>(bt_data, d.data(), tmp.data(), out.data());
        for (int pos = 0; pos < S * S; ++pos) {
          float* dst = v_data + ((pos * groups + g) * tiles + t) * in_per_group + cg;
          const float* src = out.data() + pos * kChannelBlock;
          std::copy(src, src + block, dst);
        }
      }
    }
  });

  // products: [S*S*groups, tiles, out_per_group]
  float* prod_data =
      scratch(1, {S * S * groups, tiles, out_per_group}, x.options()).data_ptr<float>();
  batched_product(S * S * groups, tiles, in_per_group, out_per_group, v_data,
                  kernel.data_ptr<float>(), prod_data);

  at::Tensor y = at::empty({n, out_channels, height, width},
                           x.options().memory_format(at::MemoryFormat::ChannelsLast));
  float* y_data = y.data_ptr<float>();
  const float* bias_data = bias.has_value() && bias->defined() ? bias->data_ptr<float>() : nullptr;
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> m(S * S * kChannelBlock), tmp(M * S * kChannelBlock),
        out(M * M * kChannelBlock);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / (rows * cols), r = (t / cols) % rows, s = t % cols;
      for (int64_t g = 0; g < groups; ++g)
      for (int64_t cg = 0; cg < out_per_group; cg += kChannelBlock) {
        const int64_t c0 = g * out_per_group + cg;
        const int64_t block = std::min(kChannelBlock, out_per_group - cg);
        for (int pos = 0; pos < S * S; ++pos) {
          const float* src = prod_data + ((pos * groups + g) * tiles + t) * out_per_group + cg;
          std::copy(src, src + block, m.data() + pos * kChannelBlock);
        }
        output_tile<S, M>(at_data, m.data(), tmp.data(), out.data());
        for (int i = 0; i < M; ++i) {
          const int64_t h = r * M + i;
          if (h >= height) break;
          for (int j = 0; j < M; ++j) {
            const int64_t w = s * M + j;
            if (w >= width) break;
            const float* __restrict__ src = out.data() + (i * M + j) * kChannelBlock;
            float* __restrict__ dst = y_data + ((b * height + h) * width + w) * out_channels + c0;
            for (int64_t c = 0; c < block; ++c) {
              float value = src[c] + (bias_data ? bias_data[c0 + c] : 0.f);
              dst[c] = relu ? std::max(value, 0.f) : value;
            }
          }
        }
      }
    }
  });
  return y;
}

at::Tensor winograd_conv3x3(const at::Tensor& input, const at::Tensor& kernel,
                            const std::optional<at::Tensor>& bias,
                            const at::Tensor& input_transform, const at::Tensor& output_transform,
                            int64_t groups, int64_t out_channels, bool relu) {
  TORCH_CHECK(input.dim() == 4 && input.scalar_type() == at::kFloat && input.device().is_cpu(),
              "winograd_conv3x3: input must be a 4-D float32 CPU tensor, got ", input.sizes(),
              " ", input.scalar_type(), " on ", input.device());
  // packed weights are 3-D so that a module.to(memory_format=channels_last) leaves them be
  TORCH_CHECK(kernel.dim() == 3 && kernel.is_contiguous() && kernel.scalar_type() == at::kFloat &&
                  kernel.size(2) == kPanel,
              "winograd_conv3x3: kernel must be a contiguous float32 [S*S*groups*panels, "
              "in/groups, ", kPanel, "] tensor (packed), got ", kernel.sizes());
  TORCH_CHECK(input_transform.dim() == 2 && output_transform.dim() == 2 &&
                  input_transform.scalar_type() == at::kFloat &&
                  output_transform.scalar_type() == at::kFloat &&
                  input_transform.size(0) == input_transform.size(1) &&
                  output_transform.size(1) == input_transform.size(0),
              "winograd_conv3x3: the transforms must be float32 [S, S] and [m, S] matrices, got ",
              input_transform.sizes(), " and ", output_transform.sizes());
  const int64_t side = input_transform.size(0), tile = output_transform.size(0);
  const int64_t panels = groups > 0 ? (out_channels / groups + kPanel - 1) / kPanel : 0;
  TORCH_CHECK(groups > 0 && out_channels % groups == 0 && side == tile + 2 &&
                  kernel.size(0) == side * side * groups * panels &&
                  kernel.size(1) * groups == input.size(1),
              "winograd_conv3x3: kernel ", kernel.sizes(), " does not fit input ", input.sizes(),
              " with tile ", tile, ", ", groups, " groups and ", out_channels, " output channels");
  TORCH_CHECK(!bias.has_value() || !bias->defined() ||
                  (bias->numel() == out_channels && bias->is_contiguous() &&
                   bias->scalar_type() == at::kFloat),
              "winograd_conv3x3: bias must be a contiguous float32 tensor of ", out_channels,
              " values");
  switch (tile) {  // the tiles compiled in, each with its own unrolled transforms
#define MMREPVGG_TILE(M)                                                                     \
  case M:                                                                                   \
    return winograd_conv<M>(input, kernel, bias, input_transform, output_transform, groups,  \
                            out_channels, relu);
    MMREPVGG_TILE(2)
    MMREPVGG_TILE(4)
    MMREPVGG_TILE(6)
    MMREPVGG_TILE(7)
#undef MMREPVGG_TILE
  }
  TORCH_CHECK(false, "winograd_conv3x3: tile ", tile, " is not compiled in; valid: 2, 4, 6, 7");
}

}  // namespace

TORCH_LIBRARY(mmrepvgg, m) {
  m.def("winograd_conv3x3(Tensor input, Tensor kernel, Tensor? bias, Tensor input_transform, "
        "Tensor output_transform, int groups, int out_channels, bool relu) -> Tensor");
}

TORCH_LIBRARY_IMPL(mmrepvgg, CPU, m) { m.impl("winograd_conv3x3", &winograd_conv3x3); }
