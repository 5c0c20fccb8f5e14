// Table-lookup GEMV / small GEMM for 2-bit uniform weights with float activations (AVX-512 builds): the `cpu_lut2`
// path of CBQLinear. Built with cbq_cpu.cpp by cbq_hf/kernels/cpu/build.py; its ops join the namespace cbq_hf_cpu.
//
// Why a table: with 2-bit codes, two codes (q_a, q_b) take 16 values, so for a token x the 16 possible partial
// sums q_a x_a + q_b x_b form one 512-bit register, and one `vpermps` looks up the partial sums of 16 rows at once
// (the 4-bit index of each row in its 32-bit lane). Per 32 weights that is a permute, an add and a shift, where
// the float path converts codes and multiplies them (docs/benchmarks_kernels.md, "2-bit weights"). For 4-bit codes
// one code is the whole index, which measured no faster than the fixed-point path, so this path is 2-bit only.
//
// Layout (built by `lut2_repack` from the on-disk layout at first use, never saved):
//   * rows are taken in blocks of 16 (the last block padded with zero rows); groups of `glen` codes are padded with
//     zero codes to Gw = ceil(glen / 16) words of 16 codes;
//   * wlut = [ceil(N / 16) blocks][G groups][meta 64 B, then Gw words x 16 rows x uint32]: meta = the 16 rows'
//     fp16 scales (32 B), their uint8 zero points (16 B), 16 B of padding; word w of row r holds the group's codes
//     16w .. 16w + 15, code 16w + 2j + h at bits 4j + 2h (so nibble j indexes pair j);
//   * one block-group is one 64 + 64 Gw byte record, read sequentially.
// Per token: table t[g][pair][16] with t[.][i] = (i & 3) x_a + (i >> 2) x_b over the group's pairs (zero in the
// padding), and xsum[g] = sum of the group's x. Per row and group: acc = sum over pairs of t[pair][nibble], then
// out += s_g (acc - z_g xsum_g): the reference's sum (q - z) s x up to float rounding (the table entries are
// rounded once, then summed in float32, like the float path's FMAs).

#include <torch/library.h>
#include <ATen/core/Tensor.h>
#include <ATen/Functions.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <immintrin.h>

#include "cpu_common.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t kBlockRows = 16;   // rows per block: one 512-bit register of 32-bit lanes
constexpr int64_t kWordCodes = 16;   // 2-bit codes per 32-bit word
constexpr int64_t kMetaBytes = 64;   // scales, zeros and padding before each group's words
constexpr int64_t kPrefetch = 2048;  // bytes ahead in a block's stream that each word step prefetches

struct LutGeometry {
  int64_t K, N, glen, G, Gw, blocks, group_bytes, block_bytes;
  LutGeometry(int64_t K_, int64_t N_, int64_t glen_) : K(K_), N(N_), glen(glen_) {
    TORCH_CHECK(K > 0 && N > 0 && glen > 0, "empty geometry");
    G = (K + glen - 1) / glen;
    Gw = (glen + kWordCodes - 1) / kWordCodes;
    blocks = (N + kBlockRows - 1) / kBlockRows;
    group_bytes = kMetaBytes + Gw * kBlockRows * 4;
    block_bytes = G * group_bytes;
  }
  int64_t pairs() const { return G * Gw * kWordCodes / 2; }  // table entries of 16 floats per token
};

// The table layout from the on-disk layout: qweight uint8 [N, ceil(K / 4)] (code k at bits 2 (k % 4) of byte k / 4),
// scales fp16 [N, G], zeros uint8 [N, G].
at::Tensor lut2_repack(const at::Tensor& qweight, const at::Tensor& scales, const at::Tensor& zeros, int64_t K,
                       int64_t glen) {
  check_cpu(qweight, "qweight");
  check_cpu(scales, "scales");
  check_cpu(zeros, "zeros");
  TORCH_CHECK(qweight.scalar_type() == at::kByte && qweight.dim() == 2, "qweight must be uint8 [N, bytes]");
  TORCH_CHECK(scales.scalar_type() == at::kHalf && zeros.scalar_type() == at::kByte, "scales fp16, zeros uint8");
  const int64_t N = qweight.size(0);
  const LutGeometry g(K, N, glen);
  TORCH_CHECK(qweight.size(1) == (K + 3) / 4, "qweight row bytes do not match K for 2-bit codes");
  TORCH_CHECK(scales.numel() == N * g.G && zeros.numel() == N * g.G, "scales/zeros must be [N, G]");
  auto out = at::zeros({g.blocks * g.block_bytes}, qweight.options());
  uint8_t* o = out.data_ptr<uint8_t>();
  const uint8_t* q = qweight.data_ptr<uint8_t>();
  const at::Half* si = scales.data_ptr<at::Half>();
  const uint8_t* zi = zeros.data_ptr<uint8_t>();
  const int64_t rb = qweight.size(1);
  at::parallel_for(0, g.blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b)
      for (int64_t r = 0; r < kBlockRows && b * kBlockRows + r < N; ++r) {
        const int64_t n = b * kBlockRows + r;
        const uint8_t* qr = q + n * rb;
        for (int64_t gi = 0; gi < g.G; ++gi) {
          uint8_t* rec = o + b * g.block_bytes + gi * g.group_bytes;
          std::memcpy(rec + 2 * r, si + n * g.G + gi, 2);
          rec[32 + r] = zi[n * g.G + gi];
          uint32_t* words = reinterpret_cast<uint32_t*>(rec + kMetaBytes);
          const int64_t len = std::min(g.glen, K - gi * g.glen);
          for (int64_t j = 0; j < len; ++j) {
            const int64_t k = gi * g.glen + j;
            const uint32_t code = (qr[k / 4] >> (2 * (k % 4))) & 3u;
            words[(j / kWordCodes) * kBlockRows + r] |= code << (2 * (j % kWordCodes));
          }
        }
      }
  });
  return out;
}

#if defined(__AVX512F__) && defined(__AVX512BW__)
constexpr bool kHasLut2 = true;

// One token's tables (tab [pairs][16]) and group sums (xsum [G]).
template <typename T>
void build_tables(const T* x, const LutGeometry& g, float* tab, float* xsum) {
  const __m512 ca = _mm512_setr_ps(0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3);
  const __m512 cb = _mm512_setr_ps(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
  alignas(64) float xv[16];
  for (int64_t gi = 0; gi < g.G; ++gi) {
    const T* xg = x + gi * g.glen;
    const int64_t len = std::min(g.glen, g.K - gi * g.glen);
    float* tg = tab + gi * g.Gw * kWordCodes / 2 * 16;
    __m512 s = _mm512_setzero_ps();
    for (int64_t w = 0; w < g.Gw; ++w) {
      const int n = static_cast<int>(std::clamp<int64_t>(len - w * kWordCodes, 0, kWordCodes));
      const __m512 v = n > 0 ? load16(xg + w * kWordCodes, n) : _mm512_setzero_ps();
      s = _mm512_add_ps(s, v);
      _mm512_store_ps(xv, v);
      for (int j = 0; j < 8; ++j)
        _mm512_storeu_ps(tg + (w * 8 + j) * 16,
                         _mm512_fmadd_ps(cb, _mm512_set1_ps(xv[2 * j + 1]), _mm512_mul_ps(ca, _mm512_set1_ps(xv[2 * j]))));
    }
    xsum[gi] = _mm512_reduce_add_ps(s);
  }
}

// NB blocks (far apart in memory: NB weight streams) against one token: out[b] = the 16 rows' sums.
template <int NB>
inline void blocks_token(const uint8_t* const* w, const float* tab, const float* xsum, const LutGeometry& g,
                         __m512* out) {
  for (int b = 0; b < NB; ++b) out[b] = _mm512_setzero_ps();
  for (int64_t gi = 0; gi < g.G; ++gi) {
    // one accumulator per block: two (even / odd pairs) measured no faster and made GCC spill in the inner loop
    __m512 acc[NB];
    for (int b = 0; b < NB; ++b) acc[b] = _mm512_setzero_ps();
    const float* tg = tab + gi * g.Gw * 8 * 16;
    const uint8_t* rec[NB];
    for (int b = 0; b < NB; ++b) rec[b] = w[b] + gi * g.group_bytes;
    for (int64_t wi = 0; wi < g.Gw; ++wi) {
      __m512i W[NB];
      for (int b = 0; b < NB; ++b) {
        const uint8_t* p = rec[b] + kMetaBytes + wi * 64;
        W[b] = _mm512_loadu_si512(p);
        _mm_prefetch(reinterpret_cast<const char*>(p + kPrefetch), _MM_HINT_T0);
      }
      const float* t = tg + wi * 8 * 16;
#pragma GCC unroll 8
      for (int j = 0; j < 8; ++j) {
        const __m512 T = _mm512_loadu_ps(t + j * 16);
        for (int b = 0; b < NB; ++b) {
          acc[b] = _mm512_add_ps(acc[b], _mm512_permutexvar_ps(W[b], T));
          W[b] = _mm512_srli_epi32(W[b], 4);
        }
      }
    }
    const __m512 xs = _mm512_set1_ps(xsum[gi]);
    for (int b = 0; b < NB; ++b) {
      const __m512 sc = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(rec[b])));
      const __m512 z = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(rec[b] + 32))));
      out[b] = _mm512_fmadd_ps(sc, _mm512_fnmadd_ps(z, xs, acc[b]), out[b]);
    }
  }
}

// Every block for every token, S blocks at a time (walk_streams).
template <int S>
void run_blocks(const LutGeometry& g, const uint8_t* wl, int64_t M, const float* tab, const float* xsum,
                const float* bias, float* y) {
  const int64_t tab_stride = g.pairs() * 16;
  at::parallel_for(0, g.blocks, 4, [&](int64_t b0, int64_t b1) {
    alignas(64) float vals[kBlockRows];
    const auto store = [&](int64_t blk, int64_t m, __m512 v) {
      _mm512_store_ps(vals, v);
      const int64_t n0 = blk * kBlockRows, rows = std::min(kBlockRows, g.N - n0);
      float* yr = y + m * g.N + n0;
      for (int64_t r = 0; r < rows; ++r) yr[r] = vals[r] + (bias ? bias[n0 + r] : 0.f);
    };
    const auto run = [&](auto nb_c, const int64_t* blk) {
      constexpr int NB = decltype(nb_c)::value;
      const uint8_t* w[NB];
      for (int i = 0; i < NB; ++i) w[i] = wl + blk[i] * g.block_bytes;
      __m512 out[NB];
      for (int64_t m = 0; m < M; ++m) {
        blocks_token<NB>(w, tab + m * tab_stride, xsum + m * g.G, g, out);
        for (int i = 0; i < NB; ++i) store(blk[i], m, out[i]);
      }
    };
    walk_streams<S>(b0, b1, run);
  });
}
#else
constexpr bool kHasLut2 = false;
#endif

// y [..., N] float32 = x [..., K] (float32 or bfloat16) times the weights in the table layout (see the header), plus
// bias; `streams` = blocks each thread walks at once (1, 2 or 4).
at::Tensor gemm_lut2(const at::Tensor& x, const at::Tensor& wlut, const std::optional<at::Tensor>& bias, int64_t N,
                     int64_t glen, int64_t streams) {
  TORCH_CHECK(kHasLut2, "gemm_lut2 needs an AVX-512 build of the cbq_hf CPU kernels");
  check_cpu(x, "x");
  check_cpu(wlut, "wlut");
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) > 0, "x must be [..., K] with K > 0");
  const bool is_f32 = x.scalar_type() == at::kFloat;
  TORCH_CHECK(is_f32 || x.scalar_type() == at::kBFloat16, "x must be float32 or bfloat16");
  TORCH_CHECK(streams == 1 || streams == 2 || streams == 4, "streams must be 1, 2 or 4");
  const int64_t K = x.size(-1), M = x.numel() / K;
  const LutGeometry g(K, N, glen);
  TORCH_CHECK(wlut.scalar_type() == at::kByte && wlut.numel() == g.blocks * g.block_bytes,
              "wlut does not match the 2-bit table layout");
  const float* b = bias_data(bias, N);
  std::vector<int64_t> sizes = x.sizes().vec();
  sizes.back() = N;
  auto y = at::empty(sizes, x.options().dtype(at::kFloat));
#if defined(__AVX512F__) && defined(__AVX512BW__)
  const int64_t tab_stride = g.pairs() * 16;
  float* tab = scratch<float>(M * tab_stride, 0);
  float* xsum = scratch<float>(M * g.G, 1);
  at::parallel_for(0, M, 4, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      if (is_f32) build_tables(x.data_ptr<float>() + m * K, g, tab + m * tab_stride, xsum + m * g.G);
      else build_tables(x.data_ptr<at::BFloat16>() + m * K, g, tab + m * tab_stride, xsum + m * g.G);
    }
  });
  const uint8_t* wl = wlut.data_ptr<uint8_t>();
  float* yp = y.data_ptr<float>();
  if (streams == 1) run_blocks<1>(g, wl, M, tab, xsum, b, yp);
  else if (streams == 2) run_blocks<2>(g, wl, M, tab, xsum, b, yp);
  else run_blocks<4>(g, wl, M, tab, xsum, b, yp);
#endif
  return y;
}

bool lut2_available() { return kHasLut2; }

}  // namespace

namespace cbq_hf_cpu_direct {  // see cbq_cpu.cpp
at::Tensor gemm_lut2(const at::Tensor& x, const at::Tensor& wlut, const std::optional<at::Tensor>& bias, int64_t N,
                     int64_t glen, int64_t streams) {
  return ::gemm_lut2(x, wlut, bias, N, glen, streams);
}
}  // namespace cbq_hf_cpu_direct

TORCH_LIBRARY_FRAGMENT(cbq_hf_cpu, m) {
  m.def("lut2_repack(Tensor qweight, Tensor scales, Tensor zeros, int K, int glen) -> Tensor");
  m.def("gemm_lut2(Tensor x, Tensor wlut, Tensor? bias, int N, int glen, int streams) -> Tensor");
  m.def("lut2_available() -> bool");
}

TORCH_LIBRARY_IMPL(cbq_hf_cpu, CatchAll, m) { m.impl("lut2_available", &lut2_available); }

TORCH_LIBRARY_IMPL(cbq_hf_cpu, CPU, m) {
  m.impl("lut2_repack", &lut2_repack);
  m.impl("gemm_lut2", &gemm_lut2);
}
