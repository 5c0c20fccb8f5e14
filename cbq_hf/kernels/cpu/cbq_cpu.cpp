// Packed int2/int3/int4/int8 CPU kernels for CBQLinear (AVX2 + FMA + F16C; AVX-VNNI / AVX-512 VNNI dot products when
// the build enables them). Built lazily by cbq_hf/kernels/cpu/build.py; registered as the torch ops cbq_hf_cpu::*.
//
// Panel layout: see panel_layout.h.
//
// Every path computes, per row n and group g:  s_g * (sum_k q_k x_k - z_g * sum_k x_k)  and sums over groups.
//   Float path (fp32/bf16 activations): q_k x_k in fp32 FMAs straight from the packed codes (unpacked by mask and
//   reinterpreted as denormal floats, or converted; see FloatMode), eight rows per pass over the activations.
//   Integer path (act_bits 2..8): x_k = integer activation codes; sum_k q_k x_k - z_g sum_k x_k is an exact int32
//   (u8 x s8 `maddubs` pairs, or VNNI `dpbusd`: 512-bit with two rows per register in the AVX-512 build), scaled by
//   s_g in float, and the token's step at the end.
// Both paths walk 1, 2 or 4 panels at once (run_panels, `set_streams`), so the weights stream from that many places
// in memory.

#include <torch/library.h>
#include <ATen/core/Tensor.h>
#include <ATen/Functions.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <immintrin.h>

#include "cpu_common.h"
#include "panel_layout.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace {

constexpr int64_t kPrefetch = 2048;  // bytes ahead in a panel's weight stream that each chunk step prefetches

// Prefetch the cache lines `kPrefetch` bytes past the `bytes` bytes starting at w (one chunk step of a panel).
inline void prefetch_ahead(const uint8_t* w, int64_t bytes) {
  for (int64_t o = 0; o < bytes; o += 64) _mm_prefetch(reinterpret_cast<const char*>(w + kPrefetch + o), _MM_HINT_T0);
}

// Float path: vector v (0..7) lane i (0..7) of a chunk's unpacked codes holds code `float_code(slot, v, i)`, as the
// bit field [s, s + slot) of a 32-bit lane with s = field_shift(slot, v, mode), turned into a float either by
//   * kConvert: vcvtdq2ps of the masked lane = q * 2^s, or
//   * kDenormal: reinterpreting the masked lane (< 2^24) as a float, which is exactly q * 2^(s - 149) (a denormal,
//     or the smallest normal binade for bit 23). This saves the conversion, the bottleneck of the float path on
//     AVX2 (one vcvtdq2ps per 8 products); it needs DAZ off (run_panels clears it) and activations within range.
// The activations are arranged and pre-scaled by 2^(xexp(mode) - s) to match, so every FMA product is
// q_k * x_k * 2^(xexp - (mode == kDenormal ? 149 : 0)) exactly, and the result is rescaled once at the end.
enum FloatMode { kConvert = 0, kDenormal = 1, kFixed = 2 };
constexpr int kDenormalXExp = 90;  // products q x 2^-59: x up to 2^37 before overflow, down to ~2^-67 without underflow
constexpr float kDenormalMaxAbsX = 1.3e11f;  // < 2^37: larger activations take the kConvert path

inline int float_code(int slot, int v, int i) {
  if (slot == 4) return 4 * i + v / 2 + 32 * (v % 2);  // 32-bit lane i = bytes 4i..4i+3, nibble v
  if (slot == 2) return 2 * i + v / 4 + 16 * (v % 4);  // 16-bit lane i (zero-extended) = bytes 2i, 2i+1, crumb v
  return 32 * (v / 4) + 4 * i + v % 4;                 // two 32-byte halves; lane i = bytes 4i..4i+3, byte v % 4
}

// Where field v sits when it is multiplied: the top field is shifted down (masking it in place could set the sign
// bit), and in kDenormal mode every field must stay below bit 24.
inline int field_shift(int slot, int v, int mode) {
  if (slot == 4) return v == 7 ? 0 : (v == 6 && mode == kDenormal) ? 0 : 4 * v;
  if (slot == 2) return v == 7 ? 0 : 2 * v;
  return v % 4 == 3 ? 0 : 8 * (v % 4);
}

inline int x_exponent(int slot, int v, int mode) {
  return (mode == kDenormal ? kDenormalXExp : 0) - field_shift(slot, v, mode);
}

// Factor that turns the kernel's sums into sum q x.
inline float output_scale(int mode) { return mode == kDenormal ? std::ldexp(1.f, 149 - kDenormalXExp) : 1.f; }

// ------------------------------------------------------------------------------------------ reductions
// out lane r = sum of the 8 lanes of p[r].
inline __m256 reduce_rows(const __m256 p[8]) {
  const __m256 t0 = _mm256_hadd_ps(p[0], p[1]), t1 = _mm256_hadd_ps(p[2], p[3]);
  const __m256 t2 = _mm256_hadd_ps(p[4], p[5]), t3 = _mm256_hadd_ps(p[6], p[7]);
  const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

inline __m256i reduce_rows(const __m256i p[8]) {
  const __m256i t0 = _mm256_hadd_epi32(p[0], p[1]), t1 = _mm256_hadd_epi32(p[2], p[3]);
  const __m256i t2 = _mm256_hadd_epi32(p[4], p[5]), t3 = _mm256_hadd_epi32(p[6], p[7]);
  const __m256i u0 = _mm256_hadd_epi32(t0, t1), u1 = _mm256_hadd_epi32(t2, t3);
  return _mm256_add_epi32(_mm256_permute2x128_si256(u0, u1, 0x20), _mm256_permute2x128_si256(u0, u1, 0x31));
}

inline __m256 load_scales(const at::Half* s) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s)));
}

inline __m256i load_zeros(const uint8_t* z) {
  return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(z)));
}

// ------------------------------------------------------------------------------------------ float activations
// Partial sums of the 8 rows of a panel, in `Lanes::kRegs` registers. With AVX-512 two rows share one 512-bit
// register (row 2j in the low half, 2j + 1 in the high half): half the FMA and conversion instructions of eight
// 256-bit chains, which is what bounds the float path.
#if defined(__AVX512F__)
struct Lanes {
  using F = __m512;
  using I = __m512i;
  static constexpr int kRegs = 4;
  // Register j: rows 2j and 2j + 1 (STRIDE bytes apart; WIDEN16: 16-byte int2 rows, 16-bit lanes zero-extended).
  template <int STRIDE, bool WIDEN16>
  static I load(const uint8_t* words, int j) {
    const uint8_t* w = words + 2 * j * STRIDE;
    if constexpr (WIDEN16) return _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w)));
    if constexpr (STRIDE == 32) return _mm512_loadu_si512(w);
    return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w))),
                              _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + STRIDE)), 1);
  }
  static F x8(const float* x) { return _mm512_castpd_ps(_mm512_broadcast_f64x4(_mm256_castps_pd(_mm256_loadu_ps(x)))); }
  static I set1(int v) { return _mm512_set1_epi32(v); }
  static I srli(I a, int n) { return _mm512_srli_epi32(a, n); }
  static I and_(I a, I b) { return _mm512_and_si512(a, b); }
  static F cvt(I a) { return _mm512_cvtepi32_ps(a); }
  static F cast(I a) { return _mm512_castsi512_ps(a); }
  static F fma(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static void rows(const F* p, __m256 out[8]) {
    for (int j = 0; j < kRegs; ++j) {
      out[2 * j] = _mm512_castps512_ps256(p[j]);
      out[2 * j + 1] = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(p[j]), 1));
    }
  }
};
#else
struct Lanes {
  using F = __m256;
  using I = __m256i;
  static constexpr int kRegs = 8;
  // Register r: row r.
  template <int STRIDE, bool WIDEN16>
  static I load(const uint8_t* words, int r) {
    const uint8_t* w = words + r * STRIDE;
    if constexpr (WIDEN16) return _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w)));
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
  }
  static F x8(const float* x) { return _mm256_loadu_ps(x); }
  static I set1(int v) { return _mm256_set1_epi32(v); }
  static I srli(I a, int n) { return _mm256_srli_epi32(a, n); }
  static I and_(I a, I b) { return _mm256_and_si256(a, b); }
  static F cvt(I a) { return _mm256_cvtepi32_ps(a); }
  static F cast(I a) { return _mm256_castsi256_ps(a); }
  static F fma(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static void rows(const F* p, __m256 out[8]) { std::copy(p, p + kRegs, out); }
};
#endif

struct FloatAcc {
  Lanes::F p[Lanes::kRegs];
  void rows(__m256 out[8]) const { Lanes::rows(p, out); }  // the 8 rows as 256-bit lanes (for reduce_rows)
};

// First field that is shifted down to bit 0 before masking (see field_shift); lower fields are masked in place and
// the top field (v == NV - 1) is only shifted.
template <int B, int NV, int MODE>
constexpr int top_shift_from() { return (MODE == kDenormal && B == 4) ? 6 : NV - 1; }

// a += sum_v float(field v of row r) * xc[8v .. 8v+7] for the 32-byte words of 8 rows at `words` (STRIDE bytes
// apart; with WIDEN16 the rows are 16-byte int2 chunks whose 16-bit lanes are zero-extended to 32 bits, so masked
// fields stay positive); field v = the lane bits [B*v, B*(v+1)) (see field_shift). The loop runs v outer, rows
// inner, so the independent FMA chains are adjacent: row-by-row order leaves the FMA pipes waiting on one chain's
// latency. The loads repeat per v on purpose: fully unrolled, the compiler keeps the rows in registers.
template <int B, int NV, int MODE, int STRIDE, bool WIDEN16 = false>
inline void fma_rows(const uint8_t* words, const float* xc, FloatAcc& a) {
  constexpr int kTop = top_shift_from<B, NV, MODE>();
#pragma GCC unroll 8
  for (int v = 0; v < NV; ++v) {
    const Lanes::F xv = Lanes::x8(xc + 8 * v);
    const Lanes::I m = Lanes::set1(((1 << B) - 1) << (v >= kTop ? 0 : B * v));
#pragma GCC unroll 8
    for (int j = 0; j < Lanes::kRegs; ++j) {
      const Lanes::I wr = Lanes::load<STRIDE, WIDEN16>(words, j);
      Lanes::I q;
      if (v == NV - 1) q = Lanes::srli(wr, B * v);
      else if (v >= kTop) q = Lanes::and_(Lanes::srli(wr, B * v), m);
      else q = Lanes::and_(wr, m);
      const Lanes::F qf = MODE == kDenormal ? Lanes::cast(q) : Lanes::cvt(q);
      a.p[j] = Lanes::fma(qf, xv, a.p[j]);
    }
  }
}

// a += the 8 rows' chunks (at w) times the arranged activations xc (64 floats).
template <int SLOT, int MODE>
inline void chunk_float(const uint8_t* w, const float* xc, FloatAcc& a) {
  if constexpr (SLOT == 4) {
    fma_rows<4, 8, MODE, 32>(w, xc, a);
  } else if constexpr (SLOT == 2) {
    fma_rows<2, 8, MODE, 16, true>(w, xc, a);
  } else {
    fma_rows<8, 4, MODE, 64>(w, xc, a);
    fma_rows<8, 4, MODE, 64>(w + 32, xc + 32, a);
  }
}

// The loop both panel kernels share, over NP panels at once: for every group g and panel i, the 8 rows' partial sums
// (Acc: float or int32 lanes, value-initialised to zero) are accumulated chunk by chunk with chunk(w_i, chunk
// index, acc), then group_end(i, g, acc, out[i], meta_i) folds them into out[i] (meta_i: the panel's current meta
// block, see meta_scales / meta_zeros). The panels are far apart in memory (see run_panels), so the weights arrive as NP concurrent
// streams: one sequential stream is bounded by the hardware prefetcher's depth, several together draw more of the
// core's bandwidth. How many is best depends on the CPU; the Python side picks the count per vendor
// (kernels/cpu/build.py, weight_streams; docs/benchmarks_kernels.md, "Weight streams").
template <int SLOT, int NP, typename Acc, typename Out, typename ChunkFn, typename GroupEndFn>
inline void panel_loop(const uint8_t* const* w0, const Geometry& g, ChunkFn chunk, GroupEndFn group_end, Out* out) {
  constexpr int CB = 64 * SLOT / 8;
  const int64_t cpg = g.chunks_per_group();
  const uint8_t* w[NP];
  for (int i = 0; i < NP; ++i) {
    w[i] = w0[i];
    out[i] = Out{};
  }
  const uint8_t* meta[NP];
  for (int64_t gi = 0; gi < g.G; ++gi) {
    if (gi % kMetaGroups == 0)
      for (int i = 0; i < NP; ++i) {
        meta[i] = w[i];
        w[i] += kMetaBytes;
      }
#pragma GCC unroll 4
    for (int i = 0; i < NP; ++i) {
      Acc acc{};
      for (int64_t ch = 0; ch < cpg; ++ch) {
        prefetch_ahead(w[i], kRows * CB);
        chunk(w[i], gi * cpg + ch, acc);
        w[i] += kRows * CB;
      }
      group_end(i, gi, acc, out[i], meta[i]);
    }
  }
}

// panel_loop with out[i] += s_g * group_dot(g, acc, zeros_g) in 8 float lanes (the float and integer kernels),
// zeros_g: the group's 8 zero points.
template <int SLOT, int NP, typename Acc, typename ChunkFn, typename GroupDotFn>
inline void panel_groups(const uint8_t* const* w0, const Geometry& g, ChunkFn chunk, GroupDotFn group_dot,
                         __m256* out) {
  panel_loop<SLOT, NP, Acc>(
      w0, g, chunk,
      [&](int, int64_t gi, const Acc& acc, __m256& o, const uint8_t* meta) {
        o = _mm256_fmadd_ps(load_scales(meta_scales(meta, gi)), group_dot(gi, acc, meta_zeros(meta, gi)), o);
      },
      out);
}

// The weight streams of NP panels (pointers into wpack).
template <int NP>
struct PanelSet {
  const uint8_t* w[NP];
};

// NP panels (8 rows each) against one arranged token: out[i] = sum_g s_g * (sum q x - z_g * xsum_g).
template <int SLOT, int MODE, int NP>
void panel_float(const PanelSet<NP>& ps, const float* xa, const float* xsum, const Geometry& g, __m256* out) {
  panel_groups<SLOT, NP, FloatAcc>(
      ps.w, g,
      [xa](const uint8_t* wc, int64_t c, FloatAcc& a) { chunk_float<SLOT, MODE>(wc, xa + c * kChunk, a); },
      [xsum](int64_t gi, const FloatAcc& a, const uint8_t* zg) {
        __m256 rows[8];
        a.rows(rows);
        const __m256 z = _mm256_cvtepi32_ps(load_zeros(zg));
        return _mm256_fnmadd_ps(z, _mm256_set1_ps(xsum[gi]), reduce_rows(rows));
      },
      out);
}

// Arrange one token for the float path (see float_code / x_exponent) with zeros in the group padding; xsum = per-group
// sums of the plain values, scaled like the products (by 1 / output_scale).
template <typename T>
void arrange_float(const T* x, const Geometry& g, int mode, float* xa, float* xsum) {
  std::array<int, 64> code;
  std::array<float, 64> scale;
  for (int v = 0; v < 8; ++v)
    for (int i = 0; i < 8; ++i) {
      code[8 * v + i] = float_code(g.slot, v, i);
      scale[8 * v + i] = std::ldexp(1.f, x_exponent(g.slot, v, mode));
    }
  std::vector<float> plain(g.Gp);
  for (int64_t gi = 0; gi < g.G; ++gi) {
    const int64_t k0 = gi * g.glen;
    const int64_t len = std::min(g.glen, g.K - k0);
    std::fill(plain.begin(), plain.end(), 0.f);
    float s = 0.f;
    for (int64_t k = 0; k < len; ++k) {
      plain[k] = static_cast<float>(x[k0 + k]);
      s += plain[k];
    }
    xsum[gi] = s / output_scale(mode);
    float* dst = xa + gi * g.Gp;
    for (int64_t ch = 0; ch < g.Gp; ch += kChunk)
      for (int pos = 0; pos < 64; ++pos) dst[ch + pos] = plain[ch + code[pos]] * scale[pos];
  }
}

// ------------------------------------------------------------------------------------------ integer activations
inline __m256i dot_u8s8(__m256i acc, __m256i w, __m256i x) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpbusd_epi32(acc, w, x);
#elif defined(__AVXVNNI__)
  return _mm256_dpbusd_avx_epi32(acc, w, x);
#else
  // maddubs adds two u8 x s8 products into int16: |15 * -128 * 2| = 3840 is far from the int16 limit (only 4-bit
  // and 2-bit codes come here), so the pair sums are exact; madd with ones widens them to int32.
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), _mm256_set1_epi16(1)));
#endif
}

// Codes 0..31 (lo) and 32..63 (hi) of one row's chunk as bytes.
template <int SLOT>
inline void split_chunk(const uint8_t* w, __m256i& lo, __m256i& hi) {
  if constexpr (SLOT == 2) {
    const __m256i m = _mm256_set1_epi8(3);
    const __m256i wb = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w)));
    lo = _mm256_and_si256(_mm256_srlv_epi32(wb, _mm256_setr_epi32(0, 0, 0, 0, 2, 2, 2, 2)), m);
    hi = _mm256_and_si256(_mm256_srlv_epi32(wb, _mm256_setr_epi32(4, 4, 4, 4, 6, 6, 6, 6)), m);
  } else {
    const __m256i m = _mm256_set1_epi8(15);
    const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
    lo = _mm256_and_si256(wv, m);
    hi = _mm256_and_si256(_mm256_srli_epi16(wv, 4), m);
  }
}

// One panel against one padded int8 token: out = sum_g s_g * (sum q c - z_g * csum_g), the bracket in exact int32.
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
// AVX-512: register j holds rows 2j (low half) and 2j + 1 (high half), the token's 32 codes broadcast to both halves:
// one 512-bit dpbusd does the work of two 256-bit ones (about half the time per chunk of eight rows, hot in L2).
struct IntAcc {
  __m512i p[4];
  __m256i rows() const {
    // u, v: per 128-bit lane, pairwise sums of (p0, p1) and (p2, p3); w: per 128-bit lane q, the sums of lanes
    // 4q..4q+3 of p0..p3. Lanes q = 0, 1 are row 2j, q = 2, 3 row 2j + 1.
    const __m512i u = _mm512_add_epi32(_mm512_unpacklo_epi32(p[0], p[1]), _mm512_unpackhi_epi32(p[0], p[1]));
    const __m512i v = _mm512_add_epi32(_mm512_unpacklo_epi32(p[2], p[3]), _mm512_unpackhi_epi32(p[2], p[3]));
    const __m512i w = _mm512_add_epi32(_mm512_unpacklo_epi64(u, v), _mm512_unpackhi_epi64(u, v));
    const __m256i lo = _mm512_castsi512_si256(w), hi = _mm512_extracti64x4_epi64(w, 1);
    const __m256i r = _mm256_add_epi32(_mm256_permute2x128_si256(lo, hi, 0x20), _mm256_permute2x128_si256(lo, hi, 0x31));
    return _mm256_permutevar8x32_epi32(r, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));  // rows 0,2,4,6,1,3,5,7 -> 0..7
  }
};

// Codes 0..31 (lo) and 32..63 (hi) of rows r (low half) and r + 1 (high half), whose chunks start at w.
template <int SLOT>
inline void split_pair(const uint8_t* w, __m512i& lo, __m512i& hi) {
  if constexpr (SLOT == 2) {
    const __m512i z = _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w)));
    const __m512i wb = _mm512_shuffle_i64x2(z, z, 0x50);  // 128-bit lanes: row r, row r, row r + 1, row r + 1
    const __m512i m = _mm512_set1_epi8(3);
    lo = _mm512_and_si512(_mm512_srlv_epi32(wb, _mm512_setr_epi32(0, 0, 0, 0, 2, 2, 2, 2, 0, 0, 0, 0, 2, 2, 2, 2)), m);
    hi = _mm512_and_si512(_mm512_srlv_epi32(wb, _mm512_setr_epi32(4, 4, 4, 4, 6, 6, 6, 6, 4, 4, 4, 4, 6, 6, 6, 6)), m);
  } else {
    const __m512i m = _mm512_set1_epi8(15);
    const __m512i wv = _mm512_loadu_si512(w);
    lo = _mm512_and_si512(wv, m);
    hi = _mm512_and_si512(_mm512_srli_epi16(wv, 4), m);
  }
}

template <int SLOT>
inline void chunk_int(const uint8_t* wc, const int8_t* x, IntAcc& a) {
  constexpr int CB = 64 * SLOT / 8;
  const __m512i xlo = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x)));
  const __m512i xhi = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 32)));
#pragma GCC unroll 4
  for (int j = 0; j < 4; ++j) {
    __m512i lo, hi;
    split_pair<SLOT>(wc + 2 * j * CB, lo, hi);
    a.p[j] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(a.p[j], lo, xlo), hi, xhi);
  }
}
#else
struct IntAcc {
  __m256i p[8];
  __m256i rows() const { return reduce_rows(p); }
};

template <int SLOT>
inline void chunk_int(const uint8_t* wc, const int8_t* x, IntAcc& a) {
  constexpr int CB = 64 * SLOT / 8;
  const __m256i xlo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x));
  const __m256i xhi = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 32));
#pragma GCC unroll 8
  for (int r = 0; r < 8; ++r) {
    __m256i lo, hi;
    split_chunk<SLOT>(wc + r * CB, lo, hi);
    a.p[r] = dot_u8s8(dot_u8s8(a.p[r], lo, xlo), hi, xhi);
  }
}
#endif

template <int SLOT, int NP>
void panel_int(const PanelSet<NP>& ps, const int8_t* xc, const int32_t* csum, const Geometry& g, __m256* out) {
  panel_groups<SLOT, NP, IntAcc>(
      ps.w, g,
      [xc](const uint8_t* wc, int64_t c, IntAcc& a) { chunk_int<SLOT>(wc, xc + c * kChunk, a); },
      [csum](int64_t gi, const IntAcc& a, const uint8_t* zg) {
        const __m256i corr = _mm256_mullo_epi32(load_zeros(zg), _mm256_set1_epi32(csum[gi]));
        return _mm256_cvtepi32_ps(_mm256_sub_epi32(a.rows(), corr));
      },
      out);
}

// ------------------------------------------------------------------------------------------ fixed-point float path
// kFixed (AVX-512 VNNI builds, 2- and 4-bit codes): float activations as fixed point, so the products run on the
// integer dot-product units (64 per instruction) instead of one conversion + one FMA per 16 codes. Per token and
// group g: step_g = max|x| / F_L (a double), v_k = round(x_k / step_g), |v_k| <= F_L, written as L signed base-256
// digits d_l in [-128, 127] (F_L = 127 * (256^L - 1) / 255, the largest L-digit value). Per row and group, each
// digit plane's sum_k q_k d_l is an exact int32 (dpbusd), and
//   T = sum_l 256^l sum_k q_k d_l - z_g sum_k v_k = sum_k (q_k - z_g) v_k
// is exact in double (|T| <= 15 * 2^31 * group length < 2^53): the zero point cancels exactly, which the float
// kernels' sum q x - z sum x does not. out = sum_g s_g step_g T in double, rounded to float once.
// The only error is the rounding of x_k to a multiple of step_g, at most max|x| / (2 F_L) per activation. L is
// chosen per group: 3 digits (F_3 ~ 2^23, a quarter fewer dot products; docs/benchmarks_kernels.md, "Float
// modes") when that bound summed over the group stays within
// 2^-21 of the group's sum |x| (len * max|x| <= kThreeDigitSpread * sum|x|: Gaussian groups always pass), else 4
// digits (F_4 ~ 2^31): beside a 1000x outlier the ordinary values keep ~2^-22 of their size instead of ~2^-14.
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
constexpr bool kHasFixed = true;
constexpr int kMaxLimbs = 4;  // digit planes stored per chunk (a 3-digit group leaves the fourth zero and unread)
constexpr double kFixedMax3 = 127.0 * (1.0 + 256.0 + 65536.0);
constexpr double kFixedMax4 = kFixedMax3 + 127.0 * 16777216.0;
constexpr float kThreeDigitSpread = 8.f;
// Longest group (codes) whose per-lane digit sums S stay within int32 after 256 * S_hi + S_lo: each lane adds 8
// products |q d| <= 15 * 128 per 64 codes, so 257 * 15 * 128 * 8 * (Gp / 64) < 2^31 needs Gp <= 34752.
constexpr int64_t kFixedMaxGroup = 32768;

struct FixedAcc {
  IntAcc p[kMaxLimbs];  // digit plane l: registers j = rows 2j, 2j + 1 (see IntAcc)
};

// a += the 8 rows' chunks at wc times the chunk's first L digit planes at x (kMaxLimbs x 64 int8).
template <int SLOT, int L>
inline void chunk_fixed(const uint8_t* wc, const int8_t* x, FixedAcc& a) {
  constexpr int CB = 64 * SLOT / 8;
  __m512i xlo[L], xhi[L];
  for (int l = 0; l < L; ++l) {
    xlo[l] = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 64 * l)));
    xhi[l] = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 64 * l + 32)));
  }
#pragma GCC unroll 4
  for (int j = 0; j < 4; ++j) {
    __m512i lo, hi;
    split_pair<SLOT>(wc + 2 * j * CB, lo, hi);
    for (int l = 0; l < L; ++l)
      a.p[l].p[j] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(a.p[l].p[j], lo, xlo[l]), hi, xhi[l]);
  }
}

// One token arranged for panel_fixed: xa [Kp / 64][kMaxLimbs][64] digits; per group g: step[g] = step_g, vsum[g] =
// sum_k v_k, four[g] = whether it uses 4 digits.
struct FixedToken {
  const int8_t* xa;
  const double* step;
  const double* vsum;
  const uint8_t* four;
};

// NP panels against one arranged token: out[i] = sum_g s_g step_g sum_k (q_k - z_g) v_k.
template <int SLOT, int NP>
void panel_fixed(const PanelSet<NP>& ps, const FixedToken& t, const Geometry& g, __m256* out) {
  const __m512d base = _mm512_set1_pd(65536.0);
  const int64_t cpg = g.chunks_per_group();
  __m512d acc[NP];
  panel_loop<SLOT, NP, FixedAcc>(
      ps.w, g,
      [&](const uint8_t* wc, int64_t c, FixedAcc& a) {
        const int8_t* x = t.xa + c * kMaxLimbs * kChunk;
        if (t.four[c / cpg]) chunk_fixed<SLOT, 4>(wc, x, a);
        else chunk_fixed<SLOT, 3>(wc, x, a);
      },
      [&](int, int64_t gi, const FixedAcc& a, __m512d& o, const uint8_t* meta) {
        // Digit planes (0, 1) paired per lane in int32: 256 * S_1 + S_0 (exact while the group has at most
        // kFixedMaxGroup codes), likewise (2, 3) for 4 digits, so two lane reductions instead of three or four.
        IntAcc low, high;
        for (int j = 0; j < 4; ++j) {
          low.p[j] = _mm512_add_epi32(_mm512_slli_epi32(a.p[1].p[j], 8), a.p[0].p[j]);
          high.p[j] = t.four[gi] ? _mm512_add_epi32(_mm512_slli_epi32(a.p[3].p[j], 8), a.p[2].p[j]) : a.p[2].p[j];
        }
        __m512d v = _mm512_fmadd_pd(_mm512_cvtepi32_pd(high.rows()), base, _mm512_cvtepi32_pd(low.rows()));
        v = _mm512_fnmadd_pd(_mm512_cvtepi32_pd(load_zeros(meta_zeros(meta, gi))), _mm512_set1_pd(t.vsum[gi]), v);
        const __m512d ss = _mm512_mul_pd(_mm512_cvtps_pd(load_scales(meta_scales(meta, gi))),
                                         _mm512_set1_pd(t.step[gi]));
        o = _mm512_fmadd_pd(v, ss, o);
      },
      acc);
  for (int i = 0; i < NP; ++i) out[i] = _mm512_cvtpd_ps(acc[i]);
}

// Arrange one token for panel_fixed (zeros in the group padding and in the unused fourth digit plane); 16
// activations per step.
template <typename T>
void arrange_fixed(const T* x, const Geometry& g, int8_t* xa, double* gstep, double* gv, uint8_t* four) {
  std::memset(xa, 0, g.Kp * kMaxLimbs);
  for (int64_t gi = 0; gi < g.G; ++gi) {
    const T* xg = x + gi * g.glen;
    const int64_t len = std::min(g.glen, g.K - gi * g.glen);
    __m512 m = _mm512_setzero_ps(), s = _mm512_setzero_ps();
    for (int64_t k = 0; k < len; k += 16) {
      const __m512 a = _mm512_abs_ps(load16(xg + k, static_cast<int>(std::min<int64_t>(16, len - k))));
      m = _mm512_max_ps(m, a);
      s = _mm512_add_ps(s, a);
    }
    const float amax = _mm512_reduce_max_ps(m);
    const bool use4 = static_cast<float>(len) * amax > kThreeDigitSpread * _mm512_reduce_add_ps(s);
    const double fmax = use4 ? kFixedMax4 : kFixedMax3;
    const int limbs = use4 ? 4 : 3;
    const __m512i vmax = _mm512_set1_epi32(static_cast<int32_t>(fmax));
    const __m512i vmin = _mm512_set1_epi32(-static_cast<int32_t>(fmax));
    // In double: a float step would underflow to zero for groups whose largest |x| is below ~3e-36.
    const double step = amax > 0.f ? static_cast<double>(amax) / fmax : 1.0;
    const __m512d inv = _mm512_set1_pd(1.0 / step);
    __m512d vsum = _mm512_setzero_pd();
    int8_t* dst = xa + gi * g.Gp * kMaxLimbs;
    for (int64_t k = 0; k < len; k += 16) {
      const int n = static_cast<int>(std::min<int64_t>(16, len - k));
      const __m512 xf = load16(xg + k, n);
      // round(x / step) in double (nearest-even), clamped to the L-digit range
      const __m256i vl = _mm512_cvtpd_epi32(_mm512_mul_pd(_mm512_cvtps_pd(_mm512_castps512_ps256(xf)), inv));
      const __m256i vh = _mm512_cvtpd_epi32(
          _mm512_mul_pd(_mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(xf), 1))), inv));
      __m512i v = _mm512_min_epi32(_mm512_max_epi32(_mm512_inserti64x4(_mm512_castsi256_si512(vl), vh, 1), vmin), vmax);
      vsum = _mm512_add_pd(vsum, _mm512_add_pd(_mm512_cvtepi32_pd(_mm512_castsi512_si256(v)),
                                               _mm512_cvtepi32_pd(_mm512_extracti64x4_epi64(v, 1))));
      int8_t* c = dst + (k / kChunk) * kMaxLimbs * kChunk + k % kChunk;  // 16 codes never straddle a chunk
      for (int l = 0; l < limbs; ++l) {
        // digit = the low byte as a signed value; v = (v - digit) / 256 exactly
        _mm_storeu_si128(reinterpret_cast<__m128i*>(c + l * kChunk), _mm512_cvtepi32_epi8(v));
        const __m512i d = _mm512_srai_epi32(_mm512_slli_epi32(v, 24), 24);
        v = _mm512_srai_epi32(_mm512_sub_epi32(v, d), 8);
      }
    }
    gstep[gi] = step;
    gv[gi] = _mm512_reduce_add_pd(vsum);  // exact: integers below 2^53
    four[gi] = use4;
  }
}
#else
constexpr bool kHasFixed = false;
constexpr int64_t kFixedMaxGroup = 0;
#endif

// Pad one token's int8 codes per group (zeros in the padding) and sum them per group.
void arrange_int(const int8_t* c, const Geometry& g, int8_t* xa, int32_t* csum) {
  std::memset(xa, 0, g.Kp);
  for (int64_t gi = 0; gi < g.G; ++gi) {
    const int64_t k0 = gi * g.glen;
    const int64_t len = std::min(g.glen, g.K - k0);
    int32_t s = 0;
    for (int64_t k = 0; k < len; ++k) s += c[k0 + k];
    std::memcpy(xa + gi * g.Gp, c + k0, len);
    csum[gi] = s;
  }
}

// ------------------------------------------------------------------------------------------ shared driver
// Runs panel_fn(panel, token) -> 8 row values for every panel and token (threads over panels, at::get_num_threads),
// and writes y [M, N] = value * row_scale(token) + bias.
// Denormal operands must be honoured by the kDenormal float mode: clear DAZ (set by torch.set_flush_denormal) in the
// running thread for the scope, restore it after.
struct KeepDenormals {
  unsigned saved;
  KeepDenormals() : saved(_mm_getcsr()) {
    if (saved & 0x0040u) _mm_setcsr(saved & ~0x0040u);
  }
  ~KeepDenormals() {
    if (saved & 0x0040u) _mm_setcsr(saved);
  }
};

// Panels each thread streams at once (see panel_groups): 1, 2 or 4, set at run time by `set_streams`.
int g_streams = 4;

int64_t set_streams(int64_t n) {
  TORCH_CHECK(n == 1 || n == 2 || n == 4, "streams must be 1, 2 or 4");
  const int old = g_streams;
  g_streams = static_cast<int>(n);
  return old;
}

// panel_fn(PanelSet<NP>, token m, out[NP]) for NP = S or 1, a thread's panels [p0, p1) walked S at a time
// (walk_streams).
template <int S, typename PanelFn, typename TokenScale>
void run_panels_n(const Geometry& g, const uint8_t* w, int64_t M, const float* bias, float* y, PanelFn panel_fn,
                  TokenScale token_scale) {
  const int64_t pb = g.panel_bytes();
  at::parallel_for(0, g.panels(), 4, [&](int64_t p0, int64_t p1) {
    const KeepDenormals keep;
    alignas(32) float out[kRows];
    __m256 res[S];
    const auto store = [&](int64_t p, int64_t m, __m256 v) {
      _mm256_store_ps(out, v);
      const int64_t n0 = p * kRows, rows = std::min(kRows, g.N - n0);
      const float ts = token_scale(m);
      float* yr = y + m * g.N + n0;
      for (int64_t r = 0; r < rows; ++r) yr[r] = out[r] * ts + (bias ? bias[n0 + r] : 0.f);
    };
    const auto set_of = [&](auto np_c, const int64_t* ps) {
      constexpr int NP = decltype(np_c)::value;
      PanelSet<NP> s;
      for (int i = 0; i < NP; ++i) s.w[i] = w + ps[i] * pb;
      return s;
    };
    walk_streams<S>(p0, p1, [&](auto np_c, const int64_t* ps) {
      constexpr int NP = decltype(np_c)::value;
      const auto set = set_of(np_c, ps);
      for (int64_t m = 0; m < M; ++m) {
        panel_fn(set, m, res);
        for (int i = 0; i < NP; ++i) store(ps[i], m, res[i]);
      }
    });
  });
}

template <typename PanelFn, typename TokenScale>
void run_panels(const Geometry& g, const uint8_t* w, int64_t M, const float* bias, float* y, PanelFn panel_fn,
                TokenScale token_scale) {
  if (g_streams == 1) run_panels_n<1>(g, w, M, bias, y, panel_fn, token_scale);
  else if (g_streams == 2) run_panels_n<2>(g, w, M, bias, y, panel_fn, token_scale);
  else run_panels_n<4>(g, w, M, bias, y, panel_fn, token_scale);
}

// ------------------------------------------------------------------------------------------ activation quantizer
// Bit-for-bit the reference: step = max(amax * clip / qmax, 1e-8); code = clamp(round_half_even(x / step)).
template <typename T>
void quantize_rows(const T* x, int64_t M, int64_t K, float clip, int act_bits, int8_t* codes, float* steps) {
  const float qmax = static_cast<float>((1 << (act_bits - 1)) - 1);
  const float qmin = -qmax - 1.f;
  at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
#if !(defined(__AVX512F__) && defined(__AVX512BW__))
    std::vector<float> row(K);
#endif
    for (int64_t m = m0; m < m1; ++m) {
      const T* xr = x + m * K;
      int8_t* c = codes + m * K;
#if defined(__AVX512F__) && defined(__AVX512BW__)
      // The same operations 16 lanes at a time: vdivps and round-to-nearest-even are exact IEEE operations, so the
      // codes are the scalar loop's (NaNs are skipped by the max, as std::max(amax, NaN) skips them).
      __m512 mv = _mm512_setzero_ps();
      for (int64_t k = 0; k < K; k += 16)
        mv = _mm512_max_ps(_mm512_abs_ps(load16(xr + k, static_cast<int>(std::min<int64_t>(16, K - k)))), mv);
      const float amax = _mm512_reduce_max_ps(mv);
#else
      float amax = 0.f;
      for (int64_t k = 0; k < K; ++k) {
        row[k] = static_cast<float>(xr[k]);
        amax = std::max(amax, std::fabs(row[k]));
      }
#endif
      float step = amax * clip;
      step = step / qmax;
      step = std::max(step, 1e-8f);
      steps[m] = step;
#if defined(__AVX512F__) && defined(__AVX512BW__)
      const __m512 vs = _mm512_set1_ps(step), lo = _mm512_set1_ps(qmin), hi = _mm512_set1_ps(qmax);
      for (int64_t k = 0; k < K; k += 16) {
        const int n = static_cast<int>(std::min<int64_t>(16, K - k));
        const __m512 q = _mm512_roundscale_ps(_mm512_div_ps(load16(xr + k, n), vs),
                                              _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        _mm_mask_storeu_epi8(c + k, static_cast<__mmask16>((1u << n) - 1),
                             _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(_mm512_min_ps(_mm512_max_ps(q, lo), hi))));
      }
#else
      for (int64_t k = 0; k < K; ++k) {
        const float q = std::nearbyint(row[k] / step);
        c[k] = static_cast<int8_t>(std::min(std::max(q, qmin), qmax));
      }
#endif
    }
  });
}

// ------------------------------------------------------------------------------------------ op wrappers
// x [..., K] as M = (product of the leading dims) rows of K values; the GEMMs take any leading dims, so a
// CBQLinear passes its [batch, tokens, K] input as it is (a Python reshape/view per call costs more than a decode
// GEMV of a small projection).
int64_t rows_of(const at::Tensor& x) {
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) > 0, "x must be [..., K] with K > 0");
  return x.numel() / x.size(-1);
}

// The output sizes [..., N] of x [..., K].
std::vector<int64_t> out_sizes(const at::Tensor& x, int64_t N) {
  std::vector<int64_t> s = x.sizes().vec();
  s.back() = N;
  return s;
}

// quantize_rows of x [..., K] (float32 or bfloat16, checked here) into codes [M, K] and steps [M].
void quantize_into(const at::Tensor& x, double clip, int64_t act_bits, int8_t* codes, float* steps) {
  check_cpu(x, "x");
  TORCH_CHECK(act_bits >= 2 && act_bits <= 8, "act_bits must be in [2, 8]");
  const int64_t M = rows_of(x), K = x.size(-1);
  if (x.scalar_type() == at::kFloat)
    quantize_rows(x.data_ptr<float>(), M, K, static_cast<float>(clip), static_cast<int>(act_bits), codes, steps);
  else if (x.scalar_type() == at::kBFloat16)
    quantize_rows(x.data_ptr<at::BFloat16>(), M, K, static_cast<float>(clip), static_cast<int>(act_bits), codes,
                  steps);
  else
    TORCH_CHECK(false, "quantize_act: x must be float32 or bfloat16");
}

std::tuple<at::Tensor, at::Tensor> quantize_act(const at::Tensor& x, double clip, int64_t act_bits) {
  TORCH_CHECK(x.dim() == 2, "x must be [M, K]");  // before the sizes; quantize_into checks the rest
  const int64_t M = x.size(0), K = x.size(1);
  auto codes = at::empty({M, K}, x.options().dtype(at::kChar));
  auto steps = at::empty({M}, x.options().dtype(at::kFloat));
  quantize_into(x, clip, act_bits, codes.data_ptr<int8_t>(), steps.data_ptr<float>());
  return {codes, steps};
}

template <typename Fn>
void with_slot(int slot, Fn fn) {
  if (slot == 2) fn(std::integral_constant<int, 2>{});
  else if (slot == 4) fn(std::integral_constant<int, 4>{});
  else fn(std::integral_constant<int, 8>{});
}

// run_panels for the kernels that take 2- and 4-bit slots only: panel(slot constant, panel set, token, out).
template <typename PanelForSlot, typename TokenScale>
void run_sub8(const PanelWeights& pw, int64_t M, float* y, PanelForSlot panel, TokenScale token_scale) {
  with_slot(pw.g.slot, [&](auto s) {
    if constexpr (decltype(s)::value != 8)
      run_panels(
          pw.g, pw.w, M, pw.bias, y,
          [&](const auto& set, int64_t m, __m256* out) { panel(s, set, m, out); }, token_scale);
  });
}

template <typename T>
float max_abs(const T* x, int64_t n) {
  float m = 0.f;
  for (int64_t i = 0; i < n; ++i) {
    const float v = std::fabs(static_cast<float>(x[i]));
    m = v > m || std::isnan(v) ? v : m;  // a NaN sticks, so it selects kConvert below
  }
  return m;
}

// Whether every value is finite (the fixed-point mode has no step for an infinity or a NaN). 16 lanes at a time
// where AVX-512 is built: a scalar pass over a decode token cost ~1 us, a tenth of a small GEMV.
template <typename T>
bool all_finite(const T* x, int64_t n) {
#if defined(__AVX512F__) && defined(__AVX512BW__)
  const __m512i exp = _mm512_set1_epi32(0x7f800000);  // all exponent bits set: an infinity or a NaN
  __mmask16 bad = 0;
  for (int64_t k = 0; k < n; k += 16) {
    const __m512i v = _mm512_castps_si512(load16(x + k, static_cast<int>(std::min<int64_t>(16, n - k))));
    bad |= _mm512_cmpeq_epi32_mask(_mm512_and_si512(v, exp), exp);
  }
  return bad == 0;
#else
  return std::isfinite(max_abs(x, n));
#endif
}

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
// gemm_float's fixed-point mode (see panel_fixed).
at::Tensor gemm_fixed(const at::Tensor& x, const PanelWeights& pw, int64_t M, int64_t N, bool is_f32) {
  const Geometry& g = pw.g;
  int8_t* xf = scratch<int8_t>(M * g.Kp * kMaxLimbs, 0);
  double* gstep = scratch<double>(M * g.G, 1);
  double* gv = scratch<double>(M * g.G, 0);
  uint8_t* four = scratch<uint8_t>(M * g.G, 0);
  at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      int8_t* xm = xf + m * g.Kp * kMaxLimbs;
      const int64_t o = m * g.G;
      if (is_f32) arrange_fixed(x.data_ptr<float>() + m * g.K, g, xm, gstep + o, gv + o, four + o);
      else arrange_fixed(x.data_ptr<at::BFloat16>() + m * g.K, g, xm, gstep + o, gv + o, four + o);
    }
  });
  auto y = at::empty(out_sizes(x, N), x.options().dtype(at::kFloat));
  run_sub8(
      pw, M, y.data_ptr<float>(),
      [&](auto s, const auto& set, int64_t m, __m256* out) {
        const int64_t o = m * g.G;
        panel_fixed<decltype(s)::value>(set, FixedToken{xf + m * g.Kp * kMaxLimbs, gstep + o, gv + o, four + o}, g,
                                        out);
      },
      [&](int64_t) { return 1.f; });
  return y;
}
#endif

// mode: kConvert, kDenormal, or -1 = kDenormal when every |x| < kDenormalMaxAbsX (always true for bf16-range LLM
// activations in practice), else kConvert; kFixed (AVX-512 VNNI builds) runs gemm_fixed.
at::Tensor gemm_float(const at::Tensor& x, const at::Tensor& wpack, const std::optional<at::Tensor>& bias, int64_t slot,
                      int64_t N, int64_t glen, int64_t mode) {
  check_cpu(x, "x");
  const bool is_f32 = x.scalar_type() == at::kFloat;
  TORCH_CHECK(is_f32 || x.scalar_type() == at::kBFloat16, "x must be float32 or bfloat16");
  const int64_t M = rows_of(x);
  const PanelWeights pw = panel_weights(x.size(-1), wpack, bias, slot, N, glen);
  const Geometry& g = pw.g;
  if (mode < 0) {
    const float amax =
        is_f32 ? max_abs(x.data_ptr<float>(), x.numel()) : max_abs(x.data_ptr<at::BFloat16>(), x.numel());
    mode = amax < kDenormalMaxAbsX ? kDenormal : kConvert;
  }
  TORCH_CHECK(mode == kConvert || mode == kDenormal || mode == kFixed, "mode must be -1, 0, 1 or 2");
  if (mode == kFixed) {
    // Not built (AVX2 builds), 8-bit codes, groups over kFixedMaxGroup codes, or non-finite activations (no step
    // to scale them by): kConvert.
    if (!kHasFixed || g.slot == 8 || g.Gp > kFixedMaxGroup ||
        !(is_f32 ? all_finite(x.data_ptr<float>(), x.numel()) : all_finite(x.data_ptr<at::BFloat16>(), x.numel())))
      mode = kConvert;
  }
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
  if (mode == kFixed) return gemm_fixed(x, pw, M, N, is_f32);
#endif
  const int md = static_cast<int>(mode);
  float* xa = scratch<float>(M * g.Kp, 0);
  float* xsum = scratch<float>(M * g.G, 1);
  at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      if (is_f32)
        arrange_float(x.data_ptr<float>() + m * g.K, g, md, xa + m * g.Kp, xsum + m * g.G);
      else
        arrange_float(x.data_ptr<at::BFloat16>() + m * g.K, g, md, xa + m * g.Kp, xsum + m * g.G);
    }
  });
  auto y = at::empty(out_sizes(x, N), x.options().dtype(at::kFloat));
  const float out_scale = output_scale(md);
  const auto run = [&](auto slot_c, auto mode_c) {
    constexpr int S = decltype(slot_c)::value, MD = decltype(mode_c)::value;
    run_panels(
        g, pw.w, M, pw.bias, y.data_ptr<float>(),
        [&](const auto& set, int64_t m, __m256* out) {
          panel_float<S, MD>(set, xa + m * g.Kp, xsum + m * g.G, g, out);
        },
        [&](int64_t) { return out_scale; });
  };
  with_slot(g.slot, [&](auto s) {
    if (md == kDenormal) run(s, std::integral_constant<int, kDenormal>{});
    else run(s, std::integral_constant<int, kConvert>{});
  });
  return y;
}

// The integer GEMM on raw codes [M, K] and steps [M].
// y has the sizes [..., N] of the activations x [..., K] that c and st were quantized from.
at::Tensor gemm_int_raw(const int8_t* c, const float* st, int64_t M, int64_t K, const at::Tensor& wpack,
                        const std::optional<at::Tensor>& bias, int64_t slot, int64_t N, int64_t glen,
                        const at::Tensor& x) {
  TORCH_CHECK(slot == 2 || slot == 4, "the integer kernel takes 2- or 4-bit slots");
  const PanelWeights pw = panel_weights(K, wpack, bias, slot, N, glen);
  const Geometry& g = pw.g;
  int8_t* xa = scratch<int8_t>(M * g.Kp, 0);
  int32_t* csum = scratch<int32_t>(M * g.G, 1);
  at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) arrange_int(c + m * g.K, g, xa + m * g.Kp, csum + m * g.G);
  });
  auto y = at::empty(out_sizes(x, N), x.options().dtype(at::kFloat));
  run_sub8(
      pw, M, y.data_ptr<float>(),
      [&](auto s, const auto& set, int64_t m, __m256* out) {
        panel_int<decltype(s)::value>(set, xa + m * g.Kp, csum + m * g.G, g, out);
      },
      [&](int64_t m) { return st[m]; });
  return y;
}

// The integer path: activations quantized per token exactly as `quantize_act` does (into reused scratch: one op
// dispatch and no code/step tensors per linear), then the integer GEMM.
at::Tensor gemm_int_act(const at::Tensor& x, double clip, int64_t act_bits, const at::Tensor& wpack,
                        const std::optional<at::Tensor>& bias, int64_t slot, int64_t N, int64_t glen) {
  const int64_t M = rows_of(x), K = x.size(-1);
  int8_t* codes = scratch<int8_t>(M * K, 1);
  float* steps = scratch<float>(M, 0);
  quantize_into(x, clip, act_bits, codes, steps);
  return gemm_int_raw(codes, steps, M, K, wpack, bias, slot, N, glen, x);
}

// The panel layout (wpack, with the scales and zeros inside) from the on-disk layout: qweight uint8
// [N, ceil(K * slot / 8)] (code k of a row at bits slot * (k % (8 / slot)) of byte k / (8 / slot)), scales fp16
// [N, G], zeros uint8 [N, G].
at::Tensor repack(const at::Tensor& qweight, const at::Tensor& scales, const at::Tensor& zeros, int64_t slot, int64_t K,
                  int64_t glen) {
  check_cpu(qweight, "qweight");
  check_cpu(scales, "scales");
  check_cpu(zeros, "zeros");
  TORCH_CHECK(qweight.scalar_type() == at::kByte && qweight.dim() == 2, "qweight must be uint8 [N, bytes]");
  TORCH_CHECK(scales.scalar_type() == at::kHalf && zeros.scalar_type() == at::kByte, "scales fp16, zeros uint8");
  const int64_t N = qweight.size(0);
  const Geometry g(K, N, glen, static_cast<int>(slot));
  TORCH_CHECK(qweight.size(1) == (K * slot + 7) / 8, "qweight row bytes do not match K");
  TORCH_CHECK(scales.numel() == N * g.G && zeros.numel() == N * g.G, "scales/zeros must be [N, G]");
  auto wpack = at::zeros({g.panels() * g.panel_bytes()}, qweight.options());
  const uint8_t* q = qweight.data_ptr<uint8_t>();
  const int64_t rb = qweight.size(1), per_byte = 8 / slot, mask = (1 << slot) - 1;
  const int64_t pb = g.panel_bytes();
  std::array<int, 64> byte_of, shift_of;
  for (int c = 0; c < 64; ++c) code_position(g.slot, c, byte_of[c], shift_of[c]);
  uint8_t* out = wpack.data_ptr<uint8_t>();
  const at::Half* si = scales.data_ptr<at::Half>();
  const uint8_t* zi = zeros.data_ptr<uint8_t>();
  at::parallel_for(0, g.panels(), 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      for (int64_t r = 0; r < kRows && p * kRows + r < N; ++r) {
        const int64_t n = p * kRows + r;
        const uint8_t* qr = q + n * rb;
        for (int64_t gi = 0; gi < g.G; ++gi) {
          uint8_t* meta = out + p * pb + g.meta_offset(gi);
          std::memcpy(const_cast<at::Half*>(meta_scales(meta, gi)) + r, si + n * g.G + gi, sizeof(at::Half));
          const_cast<uint8_t*>(meta_zeros(meta, gi))[r] = zi[n * g.G + gi];
          const int64_t len = std::min(g.glen, K - gi * g.glen);
          for (int64_t j = 0; j < len; ++j) {
            const int64_t k = gi * g.glen + j, ch = j / kChunk, c = j % kChunk;
            const int code = (qr[k / per_byte] >> (slot * (k % per_byte))) & mask;
            uint8_t* chunk = out + p * pb + g.group_offset(gi) + (ch * kRows + r) * g.CB;
            chunk[byte_of[c]] |= static_cast<uint8_t>(code << shift_of[c]);
          }
        }
      }
    }
  });
  return wpack;
}

// W_hat = (q - z) * s in float32 for rows [n0, n1) from the on-disk layout (SLOT a constant so the unpack vectorises).
// float -> bfloat16, round to nearest even (the values here are finite: codes times fp16 scales).
inline uint16_t to_bf16(float f) {
  uint32_t b;
  std::memcpy(&b, &f, 4);
  return static_cast<uint16_t>((b + 0x7FFFu + ((b >> 16) & 1u)) >> 16);
}

inline void store8(float* o, __m256 v) { _mm256_storeu_ps(o, v); }

inline void store8(at::BFloat16* o, __m256 v) {
  const __m256i b = _mm256_castps_si256(v);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
  const __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(b, _mm256_set1_epi32(0x7FFF)), odd), 16);
  const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(o), packed);
}

inline void store1(float* o, float v) { *o = v; }
inline void store1(at::BFloat16* o, float v) {
  const uint16_t h = to_bf16(v);
  std::memcpy(o, &h, 2);
}

// Codes k .. k + 7 of a row (k a multiple of 8 / SLOT codes per byte) as 8 int32 lanes, on-disk order: code k at
// byte k * SLOT / 8, bits (k % (8 / SLOT)) * SLOT.
template <int SLOT>
inline __m256i codes8(const uint8_t* qr, int64_t k) {
  if constexpr (SLOT == 8) {
    return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(qr + k)));
  } else {
    uint32_t u = 0;
    std::memcpy(&u, qr + k * SLOT / 8, SLOT);  // 8 codes = SLOT bytes
    const __m256i shifts = SLOT == 4 ? _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28)
                                     : _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14);
    return _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(u)), shifts),
                            _mm256_set1_epi32((1 << SLOT) - 1));
  }
}

#if defined(__AVX512F__) && defined(__AVX512BW__)
// The same, sixteen codes at a time (AVX-512 builds).
template <int SLOT>
inline __m512i codes16(const uint8_t* qr, int64_t k) {
  if constexpr (SLOT == 8) {
    return _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qr + k)));
  } else {
    uint32_t u[2] = {0, 0};
    std::memcpy(u, qr + k * SLOT / 8, 2 * SLOT);  // 16 codes = 2 * SLOT bytes
    const __m512i both = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_set1_epi32(static_cast<int>(u[0]))),
                                            _mm256_set1_epi32(static_cast<int>(u[1])), 1);
    const __m512i shifts = SLOT == 4
        ? _mm512_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28, 0, 4, 8, 12, 16, 20, 24, 28)
        : _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const __m512i src = SLOT == 4 ? both : _mm512_set1_epi32(static_cast<int>(u[0]));  // 16 2-bit codes: 4 bytes
    return _mm512_and_si512(_mm512_srlv_epi32(src, shifts), _mm512_set1_epi32((1 << SLOT) - 1));
  }
}

template <bool STREAM = false>
inline void store16(float* o, __m512 v) { store64<STREAM>(o, _mm512_castps_si512(v)); }

template <bool STREAM = false>
inline void store16(at::BFloat16* o, __m512 v) { store32<STREAM>(o, bf16_lanes(v)); }

// 2- and 4-bit groups by table lookup: a group has at most 16 distinct values q s - z s (q = 0..15), computed once
// per group exactly as the arithmetic path computes them (same products, same rounding), then one permute per 32
// (bf16) or 16 (float32) codes replaces the per-code convert / multiply / subtract / round: about half the time of
// the arithmetic version (docs/benchmarks_kernels.md, "Dequantization").
inline __m512 group_values(float sc, float zs) {
  const __m512 q = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  return _mm512_sub_ps(_mm512_mul_ps(q, _mm512_set1_ps(sc)), _mm512_set1_ps(zs));
}

// The 32 codes k .. k + 31 of a row (k a multiple of the codes per byte; on-disk order: code k at bits
// SLOT * (k % (8 / SLOT)) of byte k * SLOT / 8) as 16-bit lanes, in code order.
template <int SLOT>
inline __m512i codes32_u16(const uint8_t* qr, int64_t k) {
  if constexpr (SLOT == 4) {
    const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qr + k / 2)));
    return _mm512_or_si512(_mm512_and_si512(b, _mm512_set1_epi32(0xF)),
                           _mm512_slli_epi32(_mm512_and_si512(b, _mm512_set1_epi32(0xF0)), 12));
  } else {  // 2-bit: byte b copied into the four 16-bit lanes of a 64-bit lane, lane j shifted right by 2 j
    __m512i b = _mm512_cvtepu8_epi64(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(qr + k / 4)));
    b = _mm512_or_si512(b, _mm512_slli_epi64(b, 16));
    b = _mm512_or_si512(b, _mm512_slli_epi64(b, 32));
    const __m512i shifts = _mm512_set1_epi64(0x0006000400020000LL);
    return _mm512_and_si512(_mm512_srlv_epi16(b, shifts), _mm512_set1_epi16(3));
  }
}

// Codes k .. of one 2- or 4-bit group, 32 at a time while they last (k a multiple of the codes per byte), by lookup
// in the group's values; returns the first code not written.
template <int SLOT, bool STREAM>
inline int64_t lookup_group(const uint8_t* qr, int64_t k, int64_t k1, __m512 values, at::BFloat16* orow) {
  const __m512i table = _mm512_castsi256_si512(bf16_lanes(values));
  for (; k + 32 <= k1; k += 32) store64<STREAM>(orow + k, _mm512_permutexvar_epi16(codes32_u16<SLOT>(qr, k), table));
  return k;
}

template <int SLOT, bool STREAM>
inline int64_t lookup_group(const uint8_t* qr, int64_t k, int64_t k1, __m512 values, float* orow) {
  for (; k + 32 <= k1; k += 32) {
    const __m512i c = codes32_u16<SLOT>(qr, k);
    store16<STREAM>(orow + k, _mm512_permutexvar_ps(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(c)), values));
    store16<STREAM>(orow + k + 16,
                    _mm512_permutexvar_ps(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(c, 1)), values));
  }
  return k;
}
#endif

// W_hat rows n0..n1 of the on-disk layout into o [N, K] (float32 or bfloat16): (q - z) * s, computed as q s - z s,
// both products exact in float32 (codes < 2^8 times fp16 scales), so the value is the reference's exactly before
// the optional rounding to bfloat16. On AVX-512 2- and 4-bit groups go by table
// lookup (lookup_group) 32 codes at a time, the rest 16 or 8 per step; scalar at ragged group edges.
template <int SLOT, bool STREAM, typename OutT>
void dequantize_rows(const uint8_t* q, int64_t rb, const at::Half* s, const uint8_t* z, int64_t K, int64_t G,
                     int64_t glen, int64_t n0, int64_t n1, OutT* o) {
  constexpr int per_byte = 8 / SLOT, mask = (1 << SLOT) - 1;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* qr = q + n * rb;
    OutT* orow = o + n * K;
    for (int64_t gi = 0; gi < G; ++gi) {
      const float sc = static_cast<float>(s[n * G + gi]);
      const float zs = static_cast<float>(z[n * G + gi]) * sc;
      const int64_t k0 = gi * glen, k1 = std::min(K, k0 + glen);
      int64_t k = k0;
      if (k0 % per_byte == 0) {
#if defined(__AVX512F__) && defined(__AVX512BW__)
        if constexpr (SLOT != 8) k = lookup_group<SLOT, STREAM>(qr, k, k1, group_values(sc, zs), orow);
        const __m512 ws = _mm512_set1_ps(sc), wz = _mm512_set1_ps(zs);
        for (; k + 16 <= k1; k += 16)
          store16<STREAM>(orow + k, _mm512_sub_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(codes16<SLOT>(qr, k)), ws), wz));
#endif
        const __m256 vs = _mm256_set1_ps(sc), vz = _mm256_set1_ps(zs);
        for (; k + 8 <= k1; k += 8)
          store8(orow + k, _mm256_sub_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(codes8<SLOT>(qr, k)), vs), vz));
      }
      for (; k < k1; ++k) {
        const int code = (qr[k / per_byte] >> ((k % per_byte) * SLOT)) & mask;
        store1(orow + k, static_cast<float>(code) * sc - zs);
      }
    }
  }
}

// W_hat into `out` [N, K] (a reused workspace, float32 or bfloat16).
void dequantize_into(const at::Tensor& qweight, const at::Tensor& scales, const at::Tensor& zeros, int64_t slot,
                     int64_t glen, at::Tensor out) {
  check_cpu(qweight, "qweight");
  check_cpu(scales, "scales");
  check_cpu(zeros, "zeros");
  check_cpu(out, "out");
  TORCH_CHECK((out.scalar_type() == at::kFloat || out.scalar_type() == at::kBFloat16) && out.dim() == 2,
              "out must be float32 or bfloat16 [N, K]");
  TORCH_CHECK(scales.scalar_type() == at::kHalf && zeros.scalar_type() == at::kByte, "scales fp16, zeros uint8");
  TORCH_CHECK(slot == 2 || slot == 4 || slot == 8, "slot must be 2, 4 or 8");
  const int64_t N = out.size(0), K = out.size(1), G = scales.size(1), rb = qweight.size(1);
  const bool bf16 = out.scalar_type() == at::kBFloat16;
  const bool stream = streamed(out);
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    with_slot(static_cast<int>(slot), [&](auto sl) {
      constexpr int S = decltype(sl)::value;
      const auto rows = [&](auto stream_c, auto* o) {
        dequantize_rows<S, decltype(stream_c)::value>(qweight.data_ptr<uint8_t>(), rb, scales.data_ptr<at::Half>(),
                                                      zeros.data_ptr<uint8_t>(), K, G, glen, n0, n1, o);
      };
      if (bf16) stream ? rows(std::true_type{}, out.data_ptr<at::BFloat16>())
                       : rows(std::false_type{}, out.data_ptr<at::BFloat16>());
      else stream ? rows(std::true_type{}, out.data_ptr<float>()) : rows(std::false_type{}, out.data_ptr<float>());
    });
    if (stream) _mm_sfence();  // see streamed()
  });
}

}  // namespace

// Direct entry points for the Python bindings (bindings.cpp): the same functions as the ops below, called without
// the dispatcher.
namespace cbq_hf_cpu_direct {
at::Tensor gemm_float(const at::Tensor& x, const at::Tensor& wpack, const std::optional<at::Tensor>& bias, int64_t slot,
                      int64_t N, int64_t glen, int64_t mode) {
  return ::gemm_float(x, wpack, bias, slot, N, glen, mode);
}
at::Tensor gemm_int_act(const at::Tensor& x, double clip, int64_t act_bits, const at::Tensor& wpack,
                        const std::optional<at::Tensor>& bias, int64_t slot, int64_t N, int64_t glen) {
  return ::gemm_int_act(x, clip, act_bits, wpack, bias, slot, N, glen);
}
}  // namespace cbq_hf_cpu_direct

TORCH_LIBRARY(cbq_hf_cpu, m) {
  m.def("quantize_act(Tensor x, float clip, int act_bits) -> (Tensor, Tensor)");
  m.def("set_streams(int n) -> int");
  m.def("gemm_float(Tensor x, Tensor wpack, Tensor? bias, int slot, int N, int glen, int mode=-1) -> Tensor");
  m.def("gemm_int_act(Tensor x, float clip, int act_bits, Tensor wpack, Tensor? bias, int slot, int N, int glen) "
        "-> Tensor");
  m.def("repack(Tensor qweight, Tensor scales, Tensor zeros, int slot, int K, int glen) -> Tensor");
  m.def("dequantize_into(Tensor qweight, Tensor scales, Tensor zeros, int slot, int glen, Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(cbq_hf_cpu, CatchAll, m) { m.impl("set_streams", &set_streams); }

TORCH_LIBRARY_IMPL(cbq_hf_cpu, CPU, m) {
  m.impl("quantize_act", &quantize_act);
  m.impl("gemm_float", &gemm_float);
  m.impl("gemm_int_act", &gemm_int_act);
  m.impl("repack", &repack);
  m.impl("dequantize_into", &dequantize_into);
}
