// Integer GEMM of the activation-quantized formats (W4A8, W4A4, W2A8, ...) on the AMX tile units (Intel Xeon, 4th
// generation and later), for prefill: many tokens against the same weights. Same numbers as the VNNI panel kernel
// (cbq_cpu.cpp, panel_int), bit for bit: per row n, token m and group g the bracket sum_k q_k c_k - z_g sum_k c_k is
// an exact int32, folded as acc = fma(s_g, float(bracket), acc) in group order, then y = acc * step_m + bias_n.
//
// One TDPBUSD multiplies a tile of 16 weight rows x 64 codes (unsigned bytes, unpacked from the panel layout of
// panel_layout.h into an L2-resident slab once per 16 rows) by a tile of 64 codes x 16 tokens (signed bytes, "VNNI"
// order: row kq holds codes 4 kq .. 4 kq + 3 of each of the 16 tokens), accumulating 16 x 16 int32 sums: 16384
// multiply-adds per instruction where a 512-bit VPDPBUSD does 64. Three weight tiles share each token tile; their
// group sums are stored and folded into float accumulators ([rows][tokens] per weight tile, in L1) with AVX-512
// while the next group's products run in a second set of tiles (kBlock).
//
// AMX needs Linux to grant the process the tile state (arch_prctl ARCH_REQ_XCOMP_PERM), which `amx_available` asks
// for once; CPUs or kernels without it report false and the Python side never calls gemm_int_amx.

#include <torch/library.h>
#include <ATen/core/Tensor.h>
#include <ATen/Functions.h>
#include <ATen/Parallel.h>

#include <immintrin.h>

#include "cpu_common.h"
#include "panel_layout.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__linux__) && defined(__x86_64__)
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__linux__) && defined(__x86_64__) && \
    (defined(__clang__) || __GNUC__ >= 11)
#define CBQ_HAS_AMX 1
#pragma GCC push_options
#pragma GCC target("amx-tile,amx-int8")
#else
#define CBQ_HAS_AMX 0
#endif

namespace {

constexpr int64_t kTile = 16;       // weight rows and tokens per tile
constexpr int64_t kTileBytes = 1024;  // 16 rows x 64 bytes, every tile used here

#if CBQ_HAS_AMX
// The tile configuration (palette 1): all eight tiles 16 rows of 64 bytes (see kBlock for their use).
struct alignas(64) TileConfig {
  uint8_t palette_id = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {64, 64, 64, 64, 64, 64, 64, 64};
  uint8_t rows[16] = {16, 16, 16, 16, 16, 16, 16, 16};
};

bool request_amx() {
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
  const bool tile = (d >> 24) & 1u, int8 = (d >> 25) & 1u;
  if (!tile || !int8) return false;
  constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
}

bool amx_ready() {
  static const bool ok = request_amx();
  return ok;
}

// The 16 weight rows of panels p0 and p0 + 1 (zero rows where p0 + 1 is past the last panel) as unsigned code bytes,
// one 1 KB tile per chunk: slab[c][r][k] = code k of chunk c of row r; and their scales (float) and zero points
// (int32) per group: sc[gi][r], zp[gi][r].
template <int SLOT>
void unpack_slab(const uint8_t* w, const Geometry& g, int64_t p0, uint8_t* slab, float* sc, int32_t* zp) {
  constexpr int64_t CB = kChunk * SLOT / 8;
  const int64_t cpg = g.chunks_per_group(), pb = g.panel_bytes();
  for (int half = 0; half < 2; ++half) {
    const int64_t p = p0 + half;
    const int64_t r0 = half * kRows;
    if (p >= g.panels()) {
      for (int64_t c = 0; c < g.Kp / kChunk; ++c) std::memset(slab + c * kTileBytes + r0 * 64, 0, kRows * 64);
      for (int64_t gi = 0; gi < g.G; ++gi)
        for (int64_t r = 0; r < kRows; ++r) sc[gi * kTile + r0 + r] = 0.f, zp[gi * kTile + r0 + r] = 0;
      continue;
    }
    const uint8_t* panel = w + p * pb;
    for (int64_t gi = 0; gi < g.G; ++gi) {
      const uint8_t* meta = panel + g.meta_offset(gi);
      const at::Half* s = meta_scales(meta, gi);
      const uint8_t* z = meta_zeros(meta, gi);
      for (int64_t r = 0; r < kRows; ++r) {
        sc[gi * kTile + r0 + r] = static_cast<float>(s[r]);
        zp[gi * kTile + r0 + r] = z[r];
      }
      const uint8_t* codes = panel + g.group_offset(gi);
      for (int64_t ch = 0; ch < cpg; ++ch) {
        uint8_t* dst = slab + (gi * cpg + ch) * kTileBytes + r0 * 64;
        for (int64_t r = 0; r < kRows; ++r) {
          const uint8_t* src = codes + (ch * kRows + r) * CB;
          if constexpr (SLOT == 4) {
            const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src));
            const __m256i m = _mm256_set1_epi8(15);
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + r * 64), _mm256_and_si256(v, m));
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + r * 64 + 32),
                                _mm256_and_si256(_mm256_srli_epi16(v, 4), m));
          } else {  // 2-bit: code c in byte c % 16, bits 2 (c / 16)
            const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src));
            const __m128i m = _mm_set1_epi8(3);
            for (int f = 0; f < 4; ++f)
              _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + r * 64 + 16 * f),
                               _mm_and_si128(_mm_srli_epi16(v, 2 * f), m));
          }
        }
      }
    }
  }
}

// Token codes [M, K] into tiles: xt[mt][c][kq][t][i] = code 4 kq + i of chunk c of token 16 mt + t (zero in the group
// padding and for the padding tokens), and per group the code sums csum[mt][gi][t].
void arrange_tokens(const int8_t* codes, int64_t M, const Geometry& g, int8_t* xt, int32_t* csum) {
  const int64_t mtiles = (M + kTile - 1) / kTile, chunks = g.Kp / kChunk;
  at::parallel_for(0, mtiles, 1, [&](int64_t t0, int64_t t1) {
    int8_t* row = scratch<int8_t>(g.Kp, 1);  // one token, padded per group
    for (int64_t mt = t0; mt < t1; ++mt) {
      int32_t* base = reinterpret_cast<int32_t*>(xt + mt * chunks * kTileBytes);
      for (int64_t t = 0; t < kTile; ++t) {
        const int64_t m = mt * kTile + t;
        std::memset(row, 0, g.Kp);
        for (int64_t gi = 0; gi < g.G; ++gi) {
          int32_t s = 0;
          if (m < M) {
            const int64_t k0 = gi * g.glen, len = std::min(g.glen, g.K - k0);
            const int8_t* src = codes + m * g.K + k0;
            std::memcpy(row + gi * g.Gp, src, len);
            for (int64_t k = 0; k < len; ++k) s += src[k];
          }
          csum[(mt * g.G + gi) * kTile + t] = s;
        }
        // four codes (one int32) at a time: word kq of chunk c goes to row kq, column t of the chunk's tile
        const int32_t* words = reinterpret_cast<const int32_t*>(row);
        for (int64_t c = 0; c < chunks; ++c)
          for (int64_t kq = 0; kq < kChunk / 4; ++kq) base[c * kTile * kTile + kq * kTile + t] = words[c * 16 + kq];
      }
    }
  });
}

// Weight tiles per pass over a token tile: each token tile is loaded once per chunk for kBlock weight tiles. Their
// int32 sums alternate between two sets of tiles, 0-2 (even groups) and 3-5 (odd groups), so that the next group's
// products are issued before this group's sums are stored and folded (tile 6: weight codes, tile 7: token codes).
constexpr int kBlock = 3;

// (GCC's tile intrinsics are macros that paste the tile number into the instruction: literals only.)
#define CBQ_DOT_TILE(I, a)  \
  do {                      \
    _tile_loadd(6, a, 64);  \
    _tile_dpbusd(I, 6, 7);  \
  } while (0)

// Zero, then accumulate group gi's chunks into the sum tiles T0, T0 + 1, T0 + 2 (token tile at xm, weight tiles at
// slab + i * stride).
#define CBQ_DOT_GROUP(T0, T1, T2, slab, stride, xm, gi, cpg)                \
  do {                                                                      \
    _tile_zero(T0);                                                         \
    _tile_zero(T1);                                                         \
    _tile_zero(T2);                                                         \
    for (int64_t ch_ = 0; ch_ < (cpg); ++ch_) {                             \
      const int64_t c_ = (gi) * (cpg) + ch_;                                \
      _tile_loadd(7, (xm) + c_ * kTileBytes, 64);                           \
      CBQ_DOT_TILE(T0, (slab) + c_ * kTileBytes);                           \
      CBQ_DOT_TILE(T1, (slab) + (stride) + c_ * kTileBytes);                \
      CBQ_DOT_TILE(T2, (slab) + 2 * (stride) + c_ * kTileBytes);            \
    }                                                                       \
  } while (0)

inline void dot_group(int set, const uint8_t* slab, int64_t stride, const int8_t* xm, int64_t gi, int64_t cpg) {
  if (set == 0) CBQ_DOT_GROUP(0, 1, 2, slab, stride, xm, gi, cpg);
  else CBQ_DOT_GROUP(3, 4, 5, slab, stride, xm, gi, cpg);
}

// The largest padded group (codes) for which every group bracket and its parts stay below 2^24 in magnitude (codes
// and zero points < 2^8, activation codes |c| <= 2^7), so that the bracket computed in float is the exact int32.
constexpr int64_t kFloatBracketMaxGroup = 512;

inline void store_group(int set, int32_t (*cb)[kTile * kTile]) {
  if (set == 0) {
    _tile_stored(0, cb[0], 64);
    _tile_stored(1, cb[1], 64);
    _tile_stored(2, cb[2], 64);
  } else {
    _tile_stored(3, cb[0], 64);
    _tile_stored(4, cb[1], 64);
    _tile_stored(5, cb[2], 64);
  }
}

template <int SLOT, bool FLOAT_BRACKET>
void amx_int(const Geometry& g, const uint8_t* w, const int8_t* xt, const int32_t* csum, const float* steps,
             int64_t M, const float* bias, float* y) {
  const int64_t ntiles = (g.panels() + 1) / 2, mtiles = (M + kTile - 1) / kTile, chunks = g.Kp / kChunk;
  const int64_t cpg = g.chunks_per_group(), blocks = (ntiles + kBlock - 1) / kBlock;
  const int64_t slab_bytes = chunks * kTileBytes;
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    TileConfig cfg;
    _tile_loadconfig(&cfg);
    uint8_t* slab = scratch<uint8_t>(kBlock * slab_bytes, 0);
    float* sc = scratch<float>(kBlock * g.G * kTile, 0);
    int32_t* zp = scratch<int32_t>(kBlock * g.G * kTile, 0);
    float* zf = scratch<float>(kBlock * g.G * kTile, 1);
    alignas(64) int32_t cbuf[2][kBlock][kTile * kTile];  // two groups' sums: one folded while the next is stored
    alignas(64) float acc[kBlock][kTile * kTile];        // [weight tile][row][token]
    for (int64_t blk = b0; blk < b1; ++blk) {
      for (int i = 0; i < kBlock; ++i)  // weight tiles past the last are zero rows (computed, never stored)
        unpack_slab<SLOT>(w, g, 2 * (blk * kBlock + i), slab + i * slab_bytes, sc + i * g.G * kTile,
                          zp + i * g.G * kTile);
      for (int64_t j = 0; j < kBlock * g.G * kTile; ++j) zf[j] = static_cast<float>(zp[j]);
      for (int64_t mt = 0; mt < mtiles; ++mt) {
        const int8_t* xm = xt + mt * chunks * kTileBytes;
        const int32_t* cs = csum + mt * g.G * kTile;
        std::memset(acc, 0, sizeof(acc));
        // Software pipeline: group gi + 1's tile products are issued before group gi's sums are stored and folded,
        // so neither the tile unit waits for a store nor the vector units for the tiles.
        dot_group(0, slab, slab_bytes, xm, 0, cpg);
        for (int64_t gi = 0; gi < g.G; ++gi) {
          const int set = static_cast<int>(gi & 1);
          int32_t(*cb)[kTile * kTile] = cbuf[set];
          if (gi + 1 < g.G) dot_group(1 - set, slab, slab_bytes, xm, gi + 1, cpg);
          store_group(set, cb);
          const __m512i csv = _mm512_loadu_si512(cs + gi * kTile);
          const __m512 csf = _mm512_cvtepi32_ps(csv);
          for (int i = 0; i < kBlock; ++i) {
            const int64_t o = (i * g.G + gi) * kTile;
#pragma GCC unroll 16
            for (int r = 0; r < kTile; ++r) {
              // the bracket sum_k q_k c_k - z sum_k c_k, exact (see kFloatBracketMaxGroup); cpu_int's folding
              __m512 bracket;
              if constexpr (FLOAT_BRACKET)
                bracket = _mm512_fnmadd_ps(_mm512_set1_ps(zf[o + r]), csf,
                                           _mm512_cvtepi32_ps(_mm512_load_si512(cb[i] + r * kTile)));
              else
                bracket = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_load_si512(cb[i] + r * kTile),
                                                              _mm512_mullo_epi32(_mm512_set1_epi32(zp[o + r]), csv)));
              float* a = acc[i] + r * kTile;
              _mm512_store_ps(a, _mm512_fmadd_ps(_mm512_set1_ps(sc[o + r]), bracket, _mm512_load_ps(a)));
            }
          }
        }
        const int64_t toks = std::min<int64_t>(kTile, M - mt * kTile);
        // y[m, n0 .. n0 + 15] = acc * step_m + bias (a multiply, then an add: cpu_int's rounding), 16 rows at once:
        // lane r of token t is acc[i][16 r + t]
        const __m512i rows_idx = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14,
                                                                      15), _mm512_set1_epi32(kTile));
        for (int i = 0; i < kBlock; ++i) {
          const int64_t n0 = (blk * kBlock + i) * kTile;
          if (n0 >= g.N) break;
          const __mmask16 live = static_cast<__mmask16>((1u << std::min<int64_t>(kTile, g.N - n0)) - 1);
          const __m512 b = bias ? _mm512_maskz_loadu_ps(live, bias + n0) : _mm512_setzero_ps();
          for (int64_t t = 0; t < toks; ++t) {
            const int64_t m = mt * kTile + t;
            const __m512 v = _mm512_i32gather_ps(rows_idx, acc[i] + t, 4);
            _mm512_mask_storeu_ps(y + m * g.N + n0, live, _mm512_add_ps(_mm512_mul_ps(v, _mm512_set1_ps(steps[m])), b));
          }
        }
      }
    }
    _tile_release();
  });
}
#endif

bool amx_available() {
#if CBQ_HAS_AMX
  return amx_ready();
#else
  return false;
#endif
}

// y [..., N] from token codes [M, K] (int8, from quantize_act) with per-token steps [M], against the panel layout.
// `like` gives the output's leading dims (the activations the codes came from).
at::Tensor gemm_int_amx(const at::Tensor& codes, const at::Tensor& steps, const at::Tensor& like,
                        const at::Tensor& wpack, const std::optional<at::Tensor>& bias, int64_t slot, int64_t N,
                        int64_t glen) {
  TORCH_CHECK(amx_available(), "gemm_int_amx needs a CPU with AMX-INT8 and an AVX-512 build of the cbq_hf kernels");
  check_cpu(codes, "codes");
  check_cpu(steps, "steps");
  TORCH_CHECK(codes.scalar_type() == at::kChar && codes.dim() == 2, "codes must be int8 [M, K]");
  TORCH_CHECK(slot == 2 || slot == 4, "the AMX integer kernel takes 2- or 4-bit slots");
  const int64_t M = codes.size(0), K = codes.size(1);
  TORCH_CHECK(steps.scalar_type() == at::kFloat && steps.numel() == M, "steps must be float32 [M]");
  TORCH_CHECK(like.size(-1) == K && like.numel() / K == M, "like must be [..., K] with M rows");
  const PanelWeights pw = panel_weights(K, wpack, bias, slot, N, glen);
  const Geometry& g = pw.g;
  const float* b = pw.bias;
  std::vector<int64_t> sizes = like.sizes().vec();
  sizes.back() = N;
  auto y = at::empty(sizes, like.options().dtype(at::kFloat));
#if CBQ_HAS_AMX
  const int64_t mtiles = (M + kTile - 1) / kTile;
  auto xt = at::empty({mtiles * (g.Kp / kChunk) * kTileBytes}, codes.options());
  auto cs = at::empty({mtiles * g.G * kTile}, codes.options().dtype(at::kInt));
  arrange_tokens(codes.data_ptr<int8_t>(), M, g, xt.data_ptr<int8_t>(), cs.data_ptr<int32_t>());
  const auto run = [&](auto slot_c, auto float_c) {
    amx_int<decltype(slot_c)::value, decltype(float_c)::value>(g, pw.w, xt.data_ptr<int8_t>(),
                                                               cs.data_ptr<int32_t>(), steps.data_ptr<float>(), M, b,
                                                               y.data_ptr<float>());
  };
  using F = std::true_type;
  using I = std::false_type;
  const bool fb = g.Gp <= kFloatBracketMaxGroup;
  if (slot == 4) fb ? run(std::integral_constant<int, 4>{}, F{}) : run(std::integral_constant<int, 4>{}, I{});
  else fb ? run(std::integral_constant<int, 2>{}, F{}) : run(std::integral_constant<int, 2>{}, I{});
#endif
  return y;
}

}  // namespace

#if CBQ_HAS_AMX
#undef CBQ_DOT_TILE
#undef CBQ_DOT_GROUP
#pragma GCC pop_options
#endif

TORCH_LIBRARY_FRAGMENT(cbq_hf_cpu, m) {
  m.def("amx_available() -> bool");
  m.def("gemm_int_amx(Tensor codes, Tensor steps, Tensor like, Tensor wpack, Tensor? bias, int slot, int N, int glen) "
        "-> Tensor");
}

TORCH_LIBRARY_IMPL(cbq_hf_cpu, CatchAll, m) { m.impl("amx_available", &amx_available); }

TORCH_LIBRARY_IMPL(cbq_hf_cpu, CPU, m) { m.impl("gemm_int_amx", &gemm_int_amx); }
