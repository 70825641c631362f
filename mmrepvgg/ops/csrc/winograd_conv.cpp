// Winograd F(m x m, 3 x 3) convolution on CPU, NHWC, for the fused model's 3x3 convs.
//
// One op, mmrepvgg::winograd_conv3x3, in three steps: the input transform writes every
// tile's B^T d B, laid out [position, group, tile, channel]; the products are one matrix
// product per (tile position, group), by the register-blocked kernel of
// winograd_products.h, against the transformed weights G w G^T; the output transform
// applies A^T M A, adds the bias, optionally the ReLU, and writes the NHWC output. The
// transforms run over tiles in parallel with the channels innermost (contiguous in
// NHWC), so the compiler vectorises them; the tile side S is a template parameter so
// that the small matrix products unroll.
//
// The op takes the 3x3 weights as they are and transforms them itself, once: the first
// call with a weight tensor computes and packs G w G^T and keeps it in a cache keyed by
// the tensor's storage, until that storage is freed or written to. So a package or a
// checkpoint holds the weights at their own size, and only memory holds the transformed
// form, (m+2)^2/9 times larger.
//
// The product kernel uses the widest vectors the compiler may use (-march=native): with
// AVX-512, 16-float vectors in 32 registers; otherwise 8-float vectors in 16 registers.
// Both paths are compiled where AVX-512 is, so that each can be tested there.
// The transform matrices come from Python (mmrepvgg.ops.winograd derives them); this
// file only applies them. Built by mmrepvgg.ops.winograd_kernel.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/core/Storage.h>
#include <torch/library.h>

#include "winograd_products.h"

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <map>
#include <mutex>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

namespace {

using namespace mmrepvgg_winograd;

constexpr int64_t kChannelBlock = 64;  // channels per pass: a tile's S*S*64 floats fit L1

// The transformed input and the products are scratch, megabytes per conv: they live in
// buffers kept per calling thread and grown on demand, because a fresh allocation of that
// size is fresh pages from the OS, and faulting them in cost as much as the transforms.
at::Tensor scratch(int slot, at::IntArrayRef shape, const at::TensorOptions& options) {
  thread_local at::Tensor buffers[2];
  at::Tensor& buffer = buffers[slot];
  const int64_t size = c10::multiply_integers(shape);
  if (!buffer.defined() || buffer.numel() < size || buffer.dtype() != options.dtype())
    buffer = at::empty({size}, options);
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


// The packed weights of every weight tensor the op has been called with, kept while the
// tensor's storage lives and is not written to (its version counter), per tile side and
// vector width. A dead storage's entry is dropped at the next call, so a freed model's
// transformed weights go with it.
struct PackedWeights {
  c10::weak_intrusive_ptr<c10::StorageImpl> storage;
  int64_t version;
  at::Tensor packed;
};
typedef std::tuple<const void*, const void*, int64_t, int64_t> CacheKey;
std::mutex cache_mutex;
std::map<CacheKey, PackedWeights> cache;
std::atomic<int> chosen_width{0};  // 0: the widest compiled in

int64_t tensor_version(const at::Tensor& t) {
  // inference tensors are read-only and keep no version counter
  return t.is_inference() ? -1 : static_cast<int64_t>(t._version());
}

void drop_dead_entries() {  // with cache_mutex held
  for (auto it = cache.begin(); it != cache.end();)
    it = it->second.storage.expired() ? cache.erase(it) : std::next(it);
}

// The cached transform of `weight` for tile side S and product path `path` (the vector
// width, or 0 for the bfloat16 products), made by `make()` the first time or after the
// weights were written to.
template <typename Make>
at::Tensor cached_weights(const at::Tensor& weight, int64_t side, int64_t path, Make make) {
  std::lock_guard<std::mutex> lock(cache_mutex);
  drop_dead_entries();
  const CacheKey key(weight.storage().unsafeGetStorageImpl(), weight.data_ptr(), side, path);
  const int64_t version = tensor_version(weight);
  auto it = cache.find(key);
  if (it != cache.end() && it->second.version == version) return it->second.packed;
  at::Tensor made = make();
  cache.insert_or_assign(key, PackedWeights{weight.storage().getWeakStorageImpl(), version, made});
  return made;
}

template <int W, int S>
at::Tensor packed_weights(const at::Tensor& weight, const at::Tensor& kernel_transform,
                          int64_t groups) {
  return cached_weights(weight, S, W,
                        [&] { return pack_weights<W, S>(weight, kernel_transform, groups); });
}

// The products in bfloat16, for a model run in bfloat16: the transformed weights (from
// the packed float32 ones) as [S*S*groups, in/groups, out/groups] bfloat16, multiplied by
// at::bmm, which oneDNN runs with AVX512-BF16 or AMX where the CPU has them.
template <int S>
at::Tensor bf16_weights(const at::Tensor& weight, const at::Tensor& kernel_transform,
                        int64_t groups) {
  return cached_weights(weight, S, 0, [&] {
    constexpr int W = 8, kPanel = 2 * W;
    const int64_t out_per_group = weight.size(0) / groups, depth = weight.size(1);
    const int64_t panels = (out_per_group + kPanel - 1) / kPanel;
    const at::Tensor packed = pack_weights<W, S>(weight.to(at::kFloat), kernel_transform, groups);
    return packed.view({S * S * groups, panels, depth, kPanel})
        .permute({0, 2, 1, 3})
        .reshape({S * S * groups, depth, panels * kPanel})
        .narrow(2, 0, out_per_group)
        .to(at::kBFloat16)
        .contiguous();
  });
}

// The conv, with activations of type T (float or BFloat16) in memory; the transforms
// compute in float32 either way. W: the vector width of the float32 products.
template <int W, int M, typename T>
at::Tensor winograd_conv(const at::Tensor& input, const at::Tensor& weight,
                         const std::optional<at::Tensor>& bias, const at::Tensor& kernel_transform,
                         const at::Tensor& input_transform, const at::Tensor& output_transform,
                         int64_t groups, bool relu) {
  constexpr int S = M + 2;
  constexpr bool kBF16 = std::is_same_v<T, at::BFloat16>;
  const int64_t out_channels = weight.size(0);
  const at::Tensor x = input.contiguous(at::MemoryFormat::ChannelsLast);
  const int64_t n = x.size(0), channels = x.size(1), height = x.size(2), width = x.size(3);
  const int64_t in_per_group = channels / groups, out_per_group = out_channels / groups;
  const int64_t rows = (height + M - 1) / M, cols = (width + M - 1) / M;
  const int64_t tiles = n * rows * cols;
  const at::Tensor bt = input_transform.contiguous(), at_ = output_transform.contiguous();
  const float* bt_data = bt.data_ptr<float>();
  const float* at_data = at_.data_ptr<float>();
  const T* x_data = x.data_ptr<T>();

  // v: [S*S*groups, tiles, in_per_group]
  const at::Tensor v = scratch(0, {S * S * groups, tiles, in_per_group}, x.options());
  T* v_data = v.data_ptr<T>();
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
              const T* src = x_data + ((b * height + h) * width + w) * channels + c0;
              std::copy(src, src + block, dst);
            }
          }
        }
        input_tile<S>(bt_data, d.data(), tmp.data(), out.data());
        for (int pos = 0; pos < S * S; ++pos) {
          T* dst = v_data + ((pos * groups + g) * tiles + t) * in_per_group + cg;
          const float* src = out.data() + pos * kChannelBlock;
          std::copy(src, src + block, dst);
        }
      }
    }
  });

  // products: [S*S*groups, tiles, out_per_group]
  at::Tensor prod = scratch(1, {S * S * groups, tiles, out_per_group}, x.options());
  if constexpr (kBF16) {
    at::bmm_out(prod, v, bf16_weights<S>(weight, kernel_transform, groups));
  } else {
    const at::Tensor packed = packed_weights<W, S>(weight, kernel_transform, groups);
    batched_product<W>(S * S * groups, tiles, in_per_group, out_per_group, v_data,
                       packed.data_ptr<float>(), prod.data_ptr<float>());
  }
  const T* prod_data = prod.data_ptr<T>();

  at::Tensor y = at::empty({n, out_channels, height, width},
                           x.options().memory_format(at::MemoryFormat::ChannelsLast));
  T* y_data = y.data_ptr<T>();
  std::vector<float> bias_values(out_channels, 0.f);
  if (bias.has_value() && bias->defined()) {
    const T* bias_data = bias->data_ptr<T>();
    std::copy(bias_data, bias_data + out_channels, bias_values.begin());
  }
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
          const T* src = prod_data + ((pos * groups + g) * tiles + t) * out_per_group + cg;
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
            const float* __restrict__ shift = bias_values.data() + c0;
            T* __restrict__ dst = y_data + ((b * height + h) * width + w) * out_channels + c0;
            for (int64_t c = 0; c < block; ++c) {
              const float value = src[c] + shift[c];
              dst[c] = static_cast<T>(relu ? std::max(value, 0.f) : value);
            }
          }
        }
      }
    }
  });
  return y;
}

// The vector width the products use: the one chosen (winograd_set_vector_width), else
// the widest compiled in.
int product_width() {
  const int chosen = chosen_width.load();
  return chosen ? chosen : kWidths[0];
}

template <int W>
at::Tensor dispatch_tile(int64_t tile, const at::Tensor& input, const at::Tensor& weight,
                         const std::optional<at::Tensor>& bias,
                         const at::Tensor& kernel_transform, const at::Tensor& input_transform,
                         const at::Tensor& output_transform, int64_t groups, bool relu) {
  const bool bf16 = input.scalar_type() == at::kBFloat16;
  switch (tile) {  // the tiles compiled in, each with its own unrolled transforms
#define MMREPVGG_TILE(M)                                                                   \
  case M:                                                                                 \
    return bf16 ? winograd_conv<W, M, at::BFloat16>(input, weight, bias, kernel_transform, \
                                                    input_transform, output_transform,    \
                                                    groups, relu)                         \
                : winograd_conv<W, M, float>(input, weight, bias, kernel_transform,        \
                                             input_transform, output_transform, groups,   \
                                             relu);
    MMREPVGG_TILE(2)
    MMREPVGG_TILE(4)
    MMREPVGG_TILE(6)
    MMREPVGG_TILE(7)
#undef MMREPVGG_TILE
  }
  TORCH_CHECK(false, "winograd_conv3x3: tile ", tile, " is not compiled in; valid: 2, 4, 6, 7");
}

at::Tensor winograd_conv3x3(const at::Tensor& input, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias,
                            const at::Tensor& kernel_transform, const at::Tensor& input_transform,
                            const at::Tensor& output_transform, int64_t groups, bool relu) {
  const auto dtype = input.scalar_type();
  TORCH_CHECK(input.dim() == 4 && (dtype == at::kFloat || dtype == at::kBFloat16) &&
                  input.device().is_cpu(),
              "winograd_conv3x3: input must be a 4-D float32 or bfloat16 CPU tensor, got ",
              input.sizes(), " ", dtype, " on ", input.device());
  // the weights are 3-D so that a module.to(memory_format=channels_last) leaves them be
  TORCH_CHECK(weight.dim() == 3 && weight.size(2) == 9 && weight.is_contiguous() &&
                  weight.scalar_type() == dtype,
              "winograd_conv3x3: weight must be a contiguous [out, in/groups, 9] tensor (the "
              "3x3 kernels, flattened) of the input's dtype ", dtype, ", got ", weight.sizes(),
              " ", weight.scalar_type());
  TORCH_CHECK(input_transform.dim() == 2 && output_transform.dim() == 2 &&
                  input_transform.scalar_type() == at::kFloat &&
                  output_transform.scalar_type() == at::kFloat &&
                  input_transform.size(0) == input_transform.size(1) &&
                  output_transform.size(1) == input_transform.size(0),
              "winograd_conv3x3: the transforms must be float32 [S, S] and [m, S] matrices, got ",
              input_transform.sizes(), " and ", output_transform.sizes());
  const int64_t side = input_transform.size(0), tile = output_transform.size(0);
  TORCH_CHECK(kernel_transform.dim() == 2 && kernel_transform.size(0) == side &&
                  kernel_transform.size(1) == 3 && kernel_transform.is_contiguous() &&
                  kernel_transform.scalar_type() == at::kDouble,
              "winograd_conv3x3: kernel_transform must be a contiguous float64 [", side,
              ", 3] matrix (G), got ", kernel_transform.sizes(), " ",
              kernel_transform.scalar_type());
  const int64_t out_channels = weight.size(0);
  TORCH_CHECK(groups > 0 && out_channels % groups == 0 && side == tile + 2 &&
                  weight.size(1) * groups == input.size(1),
              "winograd_conv3x3: weight ", weight.sizes(), " does not fit input ", input.sizes(),
              " with tile ", tile, " and ", groups, " groups");
  TORCH_CHECK(!bias.has_value() || !bias->defined() ||
                  (bias->numel() == out_channels && bias->is_contiguous() &&
                   bias->scalar_type() == dtype),
              "winograd_conv3x3: bias must be a contiguous ", dtype, " tensor of ", out_channels,
              " values");
  const int width = product_width();
#if defined(__AVX512F__)
  if (width == 16)
    return dispatch_tile<16>(tile, input, weight, bias, kernel_transform, input_transform,
                             output_transform, groups, relu);
#endif
  return dispatch_tile<8>(tile, input, weight, bias, kernel_transform, input_transform,
                          output_transform, groups, relu);
}

// The product paths compiled in: floats per vector, widest first.
std::vector<int64_t> winograd_vector_widths() {
  return std::vector<int64_t>(std::begin(kWidths), std::end(kWidths));
}

// Use the products with `width` floats per vector from now on, process-wide (0: the
// widest compiled in); returns the width used until now. For testing each path.
int64_t winograd_set_vector_width(int64_t width) {
  const std::vector<int64_t> widths = winograd_vector_widths();
  TORCH_CHECK(width == 0 || std::find(widths.begin(), widths.end(), width) != widths.end(),
              "winograd_set_vector_width: ", width, " floats per vector is not compiled in "
              "for this CPU; compiled in: ", widths, " (or 0, the widest)");
  const int64_t previous = product_width();
  chosen_width.store(static_cast<int>(width));
  return previous;
}

// Bytes of transformed weights held for live weight tensors (the memory the transform
// costs on top of the weights).
int64_t winograd_transformed_bytes() {
  std::lock_guard<std::mutex> lock(cache_mutex);
  drop_dead_entries();
  int64_t bytes = 0;
  for (const auto& entry : cache) bytes += entry.second.packed.nbytes();
  return bytes;
}

}  // namespace

TORCH_LIBRARY(mmrepvgg, m) {
  m.def("winograd_conv3x3(Tensor input, Tensor weight, Tensor? bias, Tensor kernel_transform, "
        "Tensor input_transform, Tensor output_transform, int groups, bool relu) -> Tensor");
  m.def("winograd_vector_widths() -> int[]", &winograd_vector_widths);
  m.def("winograd_set_vector_width(int width) -> int", &winograd_set_vector_width);
  m.def("winograd_transformed_bytes() -> int", &winograd_transformed_bytes);
}

TORCH_LIBRARY_IMPL(mmrepvgg, CPU, m) { m.impl("winograd_conv3x3", &winograd_conv3x3); }
