// The Winograd op's products and the weight packing they read (included by
// winograd_conv.cpp): one register-blocked matrix product per (tile position, group),
// with vectors of W floats, on weights transformed (G w G^T) and packed here.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <utility>

namespace mmrepvgg_winograd {

// ---- The products: one matrix product per (tile position, group), [tiles x in] times
// [in x out]. A small register-blocked kernel: at batch 4 these products have only 64-800
// rows, a shape on which MKL's threaded sgemm reached 60-75% of its large-matrix rate.
// The weights are packed (once, by pack_weights) as panels of two vectors' worth of
// output channels, k-major, so that a panel streams contiguously; the transformed input
// is read in place.
//
// Lanes<W>: the vector of W floats and the register blocking that fits its register file:
// R rows x 2 vectors of accumulators, plus the panel's 2 vectors and a broadcast row value.
template <int W> struct Lanes;
template <> struct Lanes<8> {  // AVX2: 16 registers -> 6 x 2 accumulators + 3
  typedef float Vec __attribute__((vector_size(32)));
  static constexpr int kRows = 6;
};
#if defined(__AVX512F__)
// AVX-512: 32 vector registers would hold 14 x 2 accumulators, but 14 rows need 14 row
// pointers, more than the general registers, and the spills made it slower (measured on
// an AVX-512 AMD EPYC); 7 rows, and twice AVX2's outputs per panel.
template <> struct Lanes<16> {
  typedef float Vec __attribute__((vector_size(64)));
  static constexpr int kRows = 7;
};
constexpr int kWidths[] = {16, 8};  // widest first
#else
constexpr int kWidths[] = {8};
#endif

// A pass's slice of a panel, [depth, 2W] floats, should stay in L1 while every block of
// rows reuses it: 16 KB, 256 input channels at W = 8, 128 at W = 16.
template <int W> constexpr int64_t slice_depth() { return 16384 / (2 * W * sizeof(float)); }

// c[0:R, 0:width] = a[0:R, 0:depth] (row stride lda) times one packed panel [depth, 2W]
// (accumulate: c += the product)
template <int W, int R>
void panel_product(int64_t depth, const float* __restrict__ a, int64_t lda,
                   const float* __restrict__ panel, float* __restrict__ c, int64_t ldc,
                   int64_t width, bool accumulate, const float* ahead, uint64_t ahead_scale) {
  typedef typename Lanes<W>::Vec Vec;
  constexpr int kPanel = 2 * W;
  Vec acc[R][2];
  for (int i = 0; i < R; ++i) acc[i][0] = acc[i][1] = Vec{};
  for (int64_t k = 0; k < depth; ++k) {
    // weight row (k * ahead_scale) >> 32 of the next slice: this block's share of its
    // rows, evenly over the depth (a multiply, not a division, per step)
    __builtin_prefetch(ahead + ((k * ahead_scale) >> 32) * kPanel);
    Vec b0, b1;
    std::memcpy(&b0, panel + k * kPanel, sizeof(Vec));
    std::memcpy(&b1, panel + k * kPanel + W, sizeof(Vec));
    for (int i = 0; i < R; ++i) {
      const float ai = a[i * lda + k];
      acc[i][0] += ai * b0;
      acc[i][1] += ai * b1;
    }
  }
  for (int i = 0; i < R; ++i) {
    float row[kPanel];
    std::memcpy(row, &acc[i][0], sizeof(Vec));
    std::memcpy(row + W, &acc[i][1], sizeof(Vec));
    float* __restrict__ out = c + i * ldc;
    if (accumulate) {
      for (int64_t j = 0; j < width; ++j) out[j] += row[j];
    } else {
      for (int64_t j = 0; j < width; ++j) out[j] = row[j];
    }
  }
}

typedef void (*PanelProduct)(int64_t, const float*, int64_t, const float*, float*, int64_t,
                             int64_t, bool, const float*, uint64_t);

// panel_product<W, 1> ... panel_product<W, kRows>, indexed by rows - 1
template <int W, size_t... I>
constexpr std::array<PanelProduct, sizeof...(I)> panel_products(std::index_sequence<I...>) {
  return {&panel_product<W, static_cast<int>(I) + 1>...};
}

// c[0:rows, 0:width] = a[0:rows, 0:depth] times one packed panel, in passes of
// slice_depth input channels (the panel's slice is reused from L1 by every block of
// rows). The rows go in blocks of as equal sizes as kRows allows (16 rows at kRows 6:
// 6, 5, 5, not 6, 6, 4): a block of few rows has too few accumulators to hide the
// multiply-add latency (measured on AVX2: 16 rows 25% faster so).
template <int W>
void rows_product(int64_t rows, int64_t depth, const float* a, const float* panel, float* c,
                  int64_t ldc, int64_t width) {
  constexpr int kRows = Lanes<W>::kRows, kPanel = 2 * W;
  static constexpr auto kernels = panel_products<W>(std::make_index_sequence<kRows>{});
  const int64_t blocks = (rows + kRows - 1) / kRows;
  for (int64_t k0 = 0; k0 < depth; k0 += slice_depth<W>()) {
    const int64_t part = std::min(slice_depth<W>(), depth - k0);
    const float* slice = panel + k0 * kPanel;
    const bool accumulate = k0 > 0;
    // The next slice of weights (the next pass, or the next panel: packed contiguously)
    // is prefetched while this one is used, spread over all blocks of rows. Fetched on
    // demand, the first block waited for the slice and the others found it in L1: one
    // core read 3-5 GB/s with no overlap of fetching and multiply-adds. Spread, 16 rows
    // with 512 inputs (stage 3 at batch 4) ran 1.4x faster, measured on AVX2.
    const float* ahead = slice + part * kPanel;
    for (int64_t block = 0, i = 0; block < blocks; ++block) {
      const int64_t size = (rows - i + blocks - block - 1) / (blocks - block);
      const int64_t first = block * part / blocks, last = (block + 1) * part / blocks;
      const uint64_t scale = (static_cast<uint64_t>(last - first) << 32) / part;
      kernels[size - 1](part, a + i * depth + k0, depth, slice, c + i * ldc, ldc, width,
                        accumulate, ahead + first * kPanel, scale);
      i += size;
    }
  }
}

// c[b] = a[b] (rows x depth) times the packed b-th weight matrix (depth x out), every b.
template <int W>
void batched_product(int64_t batch, int64_t rows, int64_t depth, int64_t out, const float* a,
                     const float* packed, float* c) {
  constexpr int kPanel = 2 * W;
  const int64_t panels = (out + kPanel - 1) / kPanel;
  at::parallel_for(0, batch * panels, 1, [&](int64_t begin, int64_t end) {
    for (int64_t job = begin; job < end; ++job) {
      const int64_t b = job / panels, p = job % panels;
      rows_product<W>(rows, depth, a + b * rows * depth,
                      packed + (b * panels + p) * depth * kPanel, c + b * rows * out + p * kPanel,
                      out, std::min<int64_t>(kPanel, out - p * kPanel));
    }
  });
}

// ---- The weights: G w G^T for every (output, input) channel pair, in float64 (rounded
// once, to float32, at the end), packed for batched_product<W>:
// [S*S * groups * panels, in/groups, 2W], panel p of group g at tile position pos holding
// output channels g*out/groups + p*2W ... (the last panel zero-padded).
template <int W, int S>
at::Tensor pack_weights(const at::Tensor& weight, const at::Tensor& kernel_transform,
                        int64_t groups) {
  constexpr int kPanel = 2 * W;
  const int64_t out_channels = weight.size(0), depth = weight.size(1);
  const int64_t out_per_group = out_channels / groups;
  const int64_t panels = (out_per_group + kPanel - 1) / kPanel;
  at::Tensor packed = at::empty({S * S * groups * panels, depth, kPanel}, weight.options());
  const float* w = weight.data_ptr<float>();
  const double* g = kernel_transform.data_ptr<double>();  // [S, 3]
  float* dst = packed.data_ptr<float>();
  const int64_t position_stride = groups * panels * depth * kPanel;
  at::parallel_for(0, groups * panels, 1, [&](int64_t begin, int64_t end) {
    // one panel's kernels per input channel, output channels innermost (vectorised)
    double taps[9][kPanel], half[S][3][kPanel], full[S * S][kPanel];
    for (int64_t job = begin; job < end; ++job) {
      const int64_t group = job / panels, p = job % panels;
      const int64_t first = group * out_per_group + p * kPanel;
      const int64_t width = std::min<int64_t>(kPanel, out_per_group - p * kPanel);
      for (int64_t k = 0; k < depth; ++k) {
        for (int t = 0; t < 9; ++t)
          for (int j = 0; j < kPanel; ++j)
            taps[t][j] = j < width ? w[((first + j) * depth + k) * 9 + t] : 0.0;
        for (int u = 0; u < S; ++u)  // G w
          for (int b = 0; b < 3; ++b)
            for (int j = 0; j < kPanel; ++j)
              half[u][b][j] = g[u * 3] * taps[b][j] + g[u * 3 + 1] * taps[3 + b][j] +
                              g[u * 3 + 2] * taps[6 + b][j];
        for (int u = 0; u < S; ++u)  // (G w) G^T
          for (int v = 0; v < S; ++v)
            for (int j = 0; j < kPanel; ++j)
              full[u * S + v][j] = half[u][0][j] * g[v * 3] + half[u][1][j] * g[v * 3 + 1] +
                                   half[u][2][j] * g[v * 3 + 2];
        for (int pos = 0; pos < S * S; ++pos) {
          float* out = dst + pos * position_stride + (job * depth + k) * kPanel;
          for (int j = 0; j < kPanel; ++j) out[j] = static_cast<float>(full[pos][j]);
        }
      }
    }
  });
  return packed;
}

}  // namespace mmrepvgg_winograd
