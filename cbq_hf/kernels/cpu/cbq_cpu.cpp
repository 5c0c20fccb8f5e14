// Packed int2/int3/int4/int8 CPU kernels for CBQLinear (AVX2 + FMA; AVX-VNNI / AVX-512 VNNI dot products when the
// build enables them). Built lazily by cbq_hf/kernels/cpu/build.py; registered as the torch ops cbq_hf_cpu::*.
//
// Panel layout (built by cbq_hf/kernels/cpu/layout.py from the on-disk layout, never saved):
//   * every group of `glen` codes is padded with zero codes to Gp = roundup(glen, 64) codes, so K becomes
//     Kp = G * Gp; rows are padded with zero rows to Np = roundup(N, 4);
//   * a "word" holds 8 lanes; lane i holds P codes, code j of lane i at bits [BITS*j, BITS*(j+1)).
//     int4/int3: 32-bit lanes (word = 32 bytes, P = 8); int2: 16-bit lanes (16 bytes, P = 8);
//     int8: 32-bit lanes (32 bytes, P = 4). A word covers C = 8 * P consecutive codes: code c = j * 8 + i;
//   * words of 4 consecutive rows are interleaved: [Np / 4][Kp / C][4 rows][word bytes], so one panel of four
//     output rows is one sequential stream.
// Scales are given as float [Np / 4][G][4]; szs = scale * zero as float [Np][G].
//
// Float path (fp32/bf16 activations):  y = sum_g s_g * sum_{k in g} q_k x_k  -  sum_g (s_g z_g) * sum_{k in g} x_k.
// Integer path (act_bits 8/4): the same with integer codes of x (exact int32 sums per group), times the token step.

#include <torch/library.h>
#include <ATen/core/Tensor.h>
#include <ATen/Functions.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t kRows = 4;
constexpr int64_t kPad = 64;

struct Geometry {
  int64_t K, N, Np, glen, G, Gp, Kp;
  int bits;
  int64_t word_bytes, P, C;

  Geometry(int64_t K_, int64_t N_, int64_t glen_, int bits_) : K(K_), N(N_), glen(glen_), bits(bits_) {
    Np = (N + kRows - 1) / kRows * kRows;
    G = (K + glen - 1) / glen;
    Gp = (glen + kPad - 1) / kPad * kPad;
    Kp = G * Gp;
    if (bits == 2) {
      word_bytes = 16; P = 8;
    } else if (bits == 8) {
      word_bytes = 32; P = 4;
    } else {
      word_bytes = 32; P = 8;
    }
    C = 8 * P;
  }
  int64_t chunks_per_group() const { return Gp / C; }
  int64_t panel_bytes() const { return (Kp / C) * kRows * word_bytes; }
};

inline float hsum(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v);
  __m128 hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi);
  __m128 sh = _mm_movehdup_ps(lo);
  __m128 s = _mm_add_ps(lo, sh);
  sh = _mm_movehl_ps(sh, s);
  s = _mm_add_ss(s, sh);
  return _mm_cvtss_f32(s);
}

template <int BITS>
inline __m256i load_word(const uint8_t* p) {
  if constexpr (BITS == 2) {
    return _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  } else {
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  }
}

// ------------------------------------------------------------------------------------------ float activations
// Copy one token into the padded K layout (zeros in the padding) and sum it per group.
template <typename T>
void pad_token(const T* x, const Geometry& g, float* xp, float* xsum) {
  std::memset(xp, 0, sizeof(float) * g.Kp);
  for (int64_t gi = 0; gi < g.G; ++gi) {
    const int64_t k0 = gi * g.glen;
    const int64_t len = std::min(g.glen, g.K - k0);
    float* dst = xp + gi * g.Gp;
    float s = 0.f;
    for (int64_t k = 0; k < len; ++k) {
      const float v = static_cast<float>(x[k0 + k]);
      dst[k] = v;
      s += v;
    }
    xsum[gi] = s;
  }
}

// Four rows of one panel against one padded token: out[r] = sum_g s[g][r] * sum_k q x.
template <int BITS>
void panel_float(const uint8_t* w, const float* sp, const float* xp, const Geometry& g, float out[4]) {
  constexpr int P = BITS == 8 ? 4 : 8;
  constexpr int WB = BITS == 2 ? 16 : 32;
  const __m256i mask = _mm256_set1_epi32((1 << BITS) - 1);
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  const int64_t cpg = g.chunks_per_group();
  for (int64_t gi = 0; gi < g.G; ++gi) {
    __m256 p0 = _mm256_setzero_ps(), p1 = p0, p2 = p0, p3 = p0;
    const float* xg = xp + gi * g.Gp;
    for (int64_t ch = 0; ch < cpg; ++ch) {
      const float* xc = xg + ch * (8 * P);
      __m256i w0 = load_word<BITS>(w);
      __m256i w1 = load_word<BITS>(w + WB);
      __m256i w2 = load_word<BITS>(w + 2 * WB);
      __m256i w3 = load_word<BITS>(w + 3 * WB);
      w += 4 * WB;
#pragma GCC unroll 8
      for (int j = 0; j < P; ++j) {
        const __m256 xv = _mm256_loadu_ps(xc + 8 * j);
        p0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(w0, mask)), xv, p0);
        p1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(w1, mask)), xv, p1);
        p2 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(w2, mask)), xv, p2);
        p3 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(w3, mask)), xv, p3);
        w0 = _mm256_srli_epi32(w0, BITS);
        w1 = _mm256_srli_epi32(w1, BITS);
        w2 = _mm256_srli_epi32(w2, BITS);
        w3 = _mm256_srli_epi32(w3, BITS);
      }
    }
    const float* s = sp + gi * kRows;
    a0 = _mm256_fmadd_ps(p0, _mm256_set1_ps(s[0]), a0);
    a1 = _mm256_fmadd_ps(p1, _mm256_set1_ps(s[1]), a1);
    a2 = _mm256_fmadd_ps(p2, _mm256_set1_ps(s[2]), a2);
    a3 = _mm256_fmadd_ps(p3, _mm256_set1_ps(s[3]), a3);
  }
  out[0] = hsum(a0);
  out[1] = hsum(a1);
  out[2] = hsum(a2);
  out[3] = hsum(a3);
}

template <int BITS>
void gemm_float_impl(const float* xp, const float* xsum, int64_t M, const uint8_t* wpack, const float* scales,
                     const float* szs, const float* bias, const Geometry& g, float* y) {
  const int64_t panels = g.Np / kRows;
  const int64_t pb = g.panel_bytes();
  at::parallel_for(0, panels, 8, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const uint8_t* w = wpack + p * pb;
      const float* sp = scales + p * g.G * kRows;
      for (int64_t m = 0; m < M; ++m) {
        float out[4];
        panel_float<BITS>(w, sp, xp + m * g.Kp, g, out);
        for (int64_t r = 0; r < kRows; ++r) {
          const int64_t n = p * kRows + r;
          if (n >= g.N) break;
          const float* sz = szs + n * g.G;
          const float* xs = xsum + m * g.G;
          float corr = 0.f;
          for (int64_t gi = 0; gi < g.G; ++gi) corr += sz[gi] * xs[gi];
          y[m * g.N + n] = out[r] - corr + (bias ? bias[n] : 0.f);
        }
      }
    }
  });
}

// ------------------------------------------------------------------------------------------ integer activations
// Position of code c (0..63) of a 64-code chunk in the byte order the integer kernel multiplies it in.
// int4: a 32-byte word w gives lo = w & 15 and hi = (w >> 4) & 15; byte b sits in lane b / 4 at byte b % 4, so its
// low nibble is code j = 2 (b % 4) and its high nibble j = 2 (b % 4) + 1 of lane b / 4.
// int2: a 16-byte word broadcast to both halves and shifted by (0 | 2) and (4 | 6); byte b (< 16) of the first
// vector is crumb 4 (b % 2) of lane b / 2, of the second half crumb 4 (b % 2) + 1, and so on.
std::vector<int> arrangement(int bits) {
  std::vector<int> code_at(64);
  for (int pos = 0; pos < 64; ++pos) {
    int lane, j;
    if (bits == 2) {
      const int vec = pos / 32, half = (pos % 32) / 16, b = pos % 16;
      lane = b / 2;
      j = 4 * (b % 2) + 2 * vec + half;
    } else {
      const int vec = pos / 32, b = pos % 32;
      lane = b / 4;
      j = 2 * (b % 4) + vec;
    }
    code_at[pos] = j * 8 + lane;
  }
  return code_at;
}

inline __m256i dot_u8s8(__m256i acc, __m256i w, __m256i x) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpbusd_epi32(acc, w, x);
#elif defined(__AVXVNNI__)
  return _mm256_dpbusd_avx_epi32(acc, w, x);
#else
  // |w * x| pairs stay far below the int16 limit: w <= 15, |x| <= 128.
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), _mm256_set1_epi16(1)));
#endif
}

template <int BITS>
inline void split_word(const uint8_t* p, __m256i& a, __m256i& b) {
  if constexpr (BITS == 2) {
    const __m256i m = _mm256_set1_epi8(3);
    const __m256i wb = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    a = _mm256_and_si256(_mm256_srlv_epi32(wb, _mm256_setr_epi32(0, 0, 0, 0, 2, 2, 2, 2)), m);
    b = _mm256_and_si256(_mm256_srlv_epi32(wb, _mm256_setr_epi32(4, 4, 4, 4, 6, 6, 6, 6)), m);
  } else {
    const __m256i m = _mm256_set1_epi8(15);
    const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    a = _mm256_and_si256(w, m);
    b = _mm256_and_si256(_mm256_srli_epi16(w, 4), m);
  }
}

// Four rows of one panel against one arranged int8 token: out[r] = sum_g s[g][r] * sum_k q c.
template <int BITS>
void panel_int(const uint8_t* w, const float* sp, const int8_t* xa, const Geometry& g, float out[4]) {
  constexpr int WB = BITS == 2 ? 16 : 32;
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  const int64_t cpg = g.Gp / 64;
  for (int64_t gi = 0; gi < g.G; ++gi) {
    __m256i p0 = _mm256_setzero_si256(), p1 = p0, p2 = p0, p3 = p0;
    const int8_t* xg = xa + gi * g.Gp;
    for (int64_t ch = 0; ch < cpg; ++ch) {
      const __m256i xlo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xg + ch * 64));
      const __m256i xhi = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xg + ch * 64 + 32));
      __m256i lo, hi;
      split_word<BITS>(w, lo, hi);
      p0 = dot_u8s8(dot_u8s8(p0, lo, xlo), hi, xhi);
      split_word<BITS>(w + WB, lo, hi);
      p1 = dot_u8s8(dot_u8s8(p1, lo, xlo), hi, xhi);
      split_word<BITS>(w + 2 * WB, lo, hi);
      p2 = dot_u8s8(dot_u8s8(p2, lo, xlo), hi, xhi);
      split_word<BITS>(w + 3 * WB, lo, hi);
      p3 = dot_u8s8(dot_u8s8(p3, lo, xlo), hi, xhi);
      w += 4 * WB;
    }
    const float* s = sp + gi * kRows;
    a0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p0), _mm256_set1_ps(s[0]), a0);
    a1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p1), _mm256_set1_ps(s[1]), a1);
    a2 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p2), _mm256_set1_ps(s[2]), a2);
    a3 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p3), _mm256_set1_ps(s[3]), a3);
  }
  out[0] = hsum(a0);
  out[1] = hsum(a1);
  out[2] = hsum(a2);
  out[3] = hsum(a3);
}

template <int BITS>
void gemm_int_impl(const int8_t* xa, const int32_t* csum, const float* step, int64_t M, const uint8_t* wpack,
                   const float* scales, const float* szs, const float* bias, const Geometry& g, float* y) {
  const int64_t panels = g.Np / kRows;
  const int64_t pb = g.panel_bytes();
  at::parallel_for(0, panels, 8, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const uint8_t* w = wpack + p * pb;
      const float* sp = scales + p * g.G * kRows;
      for (int64_t m = 0; m < M; ++m) {
        float out[4];
        panel_int<BITS>(w, sp, xa + m * g.Kp, g, out);
        for (int64_t r = 0; r < kRows; ++r) {
          const int64_t n = p * kRows + r;
          if (n >= g.N) break;
          const float* sz = szs + n * g.G;
          const int32_t* cs = csum + m * g.G;
          float corr = 0.f;
          for (int64_t gi = 0; gi < g.G; ++gi) corr += sz[gi] * static_cast<float>(cs[gi]);
          y[m * g.N + n] = step[m] * (out[r] - corr) + (bias ? bias[n] : 0.f);
        }
      }
    }
  });
}

// ------------------------------------------------------------------------------------------ activation quantizer
// Bit-for-bit the reference: step = max(amax * clip / qmax, 1e-8); code = clamp(round_half_even(x / step)).
template <typename T>
void quantize_rows(const T* x, int64_t M, int64_t K, float clip, int act_bits, int8_t* codes, float* steps) {
  const float qmax = static_cast<float>((1 << (act_bits - 1)) - 1);
  const float qmin = -qmax - 1.f;
  at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
    std::vector<float> row(K);
    for (int64_t m = m0; m < m1; ++m) {
      const T* xr = x + m * K;
      float amax = 0.f;
      for (int64_t k = 0; k < K; ++k) {
        row[k] = static_cast<float>(xr[k]);
        amax = std::max(amax, std::fabs(row[k]));
      }
      float step = amax * clip;
      step = step / qmax;
      step = std::max(step, 1e-8f);
      steps[m] = step;
      int8_t* c = codes + m * K;
      for (int64_t k = 0; k < K; ++k) {
        const float q = std::nearbyint(row[k] / step);
        c[k] = static_cast<int8_t>(std::min(std::max(q, qmin), qmax));
      }
    }
  });
}

// ------------------------------------------------------------------------------------------ op wrappers
void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be on the CPU");
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

std::tuple<at::Tensor, at::Tensor> quantize_act(const at::Tensor& x, double clip, int64_t act_bits) {
  check_cpu(x, "x");
  TORCH_CHECK(x.dim() == 2, "x must be [M, K]");
  TORCH_CHECK(act_bits >= 2 && act_bits <= 8, "act_bits must be in [2, 8]");
  const int64_t M = x.size(0), K = x.size(1);
  auto codes = at::empty({M, K}, x.options().dtype(at::kChar));
  auto steps = at::empty({M}, x.options().dtype(at::kFloat));
  if (x.scalar_type() == at::kFloat) {
    quantize_rows(x.data_ptr<float>(), M, K, static_cast<float>(clip), act_bits, codes.data_ptr<int8_t>(),
                  steps.data_ptr<float>());
  } else if (x.scalar_type() == at::kBFloat16) {
    quantize_rows(x.data_ptr<at::BFloat16>(), M, K, static_cast<float>(clip), act_bits, codes.data_ptr<int8_t>(),
                  steps.data_ptr<float>());
  } else {
    TORCH_CHECK(false, "quantize_act: x must be float32 or bfloat16");
  }
  return {codes, steps};
}

void check_weights(const Geometry& g, const at::Tensor& wpack, const at::Tensor& scales, const at::Tensor& szs,
                   const std::optional<at::Tensor>& bias) {
  check_cpu(wpack, "wpack");
  check_cpu(scales, "scales");
  check_cpu(szs, "szs");
  TORCH_CHECK(wpack.scalar_type() == at::kByte && wpack.numel() == (g.Np / kRows) * g.panel_bytes(),
              "wpack does not match the panel layout");
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.numel() == g.Np * g.G, "scales must be float [Np/4, G, 4]");
  TORCH_CHECK(szs.scalar_type() == at::kFloat && szs.numel() == g.Np * g.G, "szs must be float [Np, G]");
  if (bias) {
    check_cpu(*bias, "bias");
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->numel() == g.N, "bias must be float [N]");
  }
  TORCH_CHECK(g.bits == 2 || g.bits == 4 || g.bits == 8, "bits (slot) must be 2, 4 or 8");
}

at::Tensor gemm_float(const at::Tensor& x, const at::Tensor& wpack, const at::Tensor& scales, const at::Tensor& szs,
                      const std::optional<at::Tensor>& bias, int64_t bits, int64_t N, int64_t glen) {
  check_cpu(x, "x");
  TORCH_CHECK(x.dim() == 2, "x must be [M, K]");
  const Geometry g(x.size(1), N, glen, static_cast<int>(bits));
  check_weights(g, wpack, scales, szs, bias);
  const int64_t M = x.size(0);
  auto xp = at::empty({M, g.Kp}, x.options().dtype(at::kFloat));
  auto xsum = at::empty({M, g.G}, x.options().dtype(at::kFloat));
  at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      if (x.scalar_type() == at::kFloat) {
        pad_token(x.data_ptr<float>() + m * g.K, g, xp.data_ptr<float>() + m * g.Kp, xsum.data_ptr<float>() + m * g.G);
      } else {
        pad_token(x.data_ptr<at::BFloat16>() + m * g.K, g, xp.data_ptr<float>() + m * g.Kp,
                  xsum.data_ptr<float>() + m * g.G);
      }
    }
  });
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "x must be float32 or bfloat16");
  auto y = at::empty({M, N}, x.options().dtype(at::kFloat));
  const float* b = bias ? bias->data_ptr<float>() : nullptr;
  const auto run = [&](auto kernel) {
    kernel(xp.data_ptr<float>(), xsum.data_ptr<float>(), M, wpack.data_ptr<uint8_t>(), scales.data_ptr<float>(),
           szs.data_ptr<float>(), b, g, y.data_ptr<float>());
  };
  if (bits == 2) run(gemm_float_impl<2>);
  else if (bits == 4) run(gemm_float_impl<4>);
  else run(gemm_float_impl<8>);
  return y;
}

at::Tensor gemm_int(const at::Tensor& codes, const at::Tensor& steps, const at::Tensor& wpack,
                    const at::Tensor& scales, const at::Tensor& szs, const std::optional<at::Tensor>& bias,
                    int64_t bits, int64_t N, int64_t glen) {
  check_cpu(codes, "codes");
  check_cpu(steps, "steps");
  TORCH_CHECK(codes.dim() == 2 && codes.scalar_type() == at::kChar, "codes must be int8 [M, K]");
  TORCH_CHECK(bits == 2 || bits == 4, "the integer kernel takes 2- or 4-bit slots");
  const Geometry g(codes.size(1), N, glen, static_cast<int>(bits));
  check_weights(g, wpack, scales, szs, bias);
  const int64_t M = codes.size(0);
  TORCH_CHECK(steps.scalar_type() == at::kFloat && steps.numel() == M, "steps must be float [M]");
  const auto code_at = arrangement(static_cast<int>(bits));
  auto xa = at::empty({M, g.Kp}, codes.options());
  auto csum = at::empty({M, g.G}, codes.options().dtype(at::kInt));
  const int8_t* c = codes.data_ptr<int8_t>();
  int8_t* xap = xa.data_ptr<int8_t>();
  int32_t* cs = csum.data_ptr<int32_t>();
  at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
    std::vector<int8_t> padded(g.Gp);
    for (int64_t m = m0; m < m1; ++m) {
      for (int64_t gi = 0; gi < g.G; ++gi) {
        const int64_t k0 = gi * g.glen;
        const int64_t len = std::min(g.glen, g.K - k0);
        std::fill(padded.begin(), padded.end(), 0);
        int32_t s = 0;
        for (int64_t k = 0; k < len; ++k) {
          padded[k] = c[m * g.K + k0 + k];
          s += padded[k];
        }
        cs[m * g.G + gi] = s;
        int8_t* dst = xap + m * g.Kp + gi * g.Gp;
        for (int64_t ch = 0; ch < g.Gp; ch += 64)
          for (int pos = 0; pos < 64; ++pos) dst[ch + pos] = padded[ch + code_at[pos]];
      }
    }
  });
  auto y = at::empty({M, N}, codes.options().dtype(at::kFloat));
  const float* b = bias ? bias->data_ptr<float>() : nullptr;
  const auto run = [&](auto kernel) {
    kernel(xap, cs, steps.data_ptr<float>(), M, wpack.data_ptr<uint8_t>(), scales.data_ptr<float>(),
           szs.data_ptr<float>(), b, g, y.data_ptr<float>());
  };
  if (bits == 2) run(gemm_int_impl<2>);
  else run(gemm_int_impl<4>);
  return y;
}

// W_hat = (q - z) * s in float32 from the on-disk layout, written into `out` [N, K] (a reused workspace).
void dequantize_into(const at::Tensor& qweight, const at::Tensor& scales, const at::Tensor& zeros, int64_t slot,
                     int64_t glen, at::Tensor out) {
  check_cpu(qweight, "qweight");
  check_cpu(scales, "scales");
  check_cpu(zeros, "zeros");
  check_cpu(out, "out");
  TORCH_CHECK(out.scalar_type() == at::kFloat && out.dim() == 2, "out must be float32 [N, K]");
  TORCH_CHECK(scales.scalar_type() == at::kHalf && zeros.scalar_type() == at::kByte, "scales fp16, zeros uint8");
  TORCH_CHECK(slot == 2 || slot == 4 || slot == 8, "slot must be 2, 4 or 8");
  const int64_t N = out.size(0), K = out.size(1), G = scales.size(1), rb = qweight.size(1);
  const uint8_t* q = qweight.data_ptr<uint8_t>();
  const at::Half* s = scales.data_ptr<at::Half>();
  const uint8_t* z = zeros.data_ptr<uint8_t>();
  float* o = out.data_ptr<float>();
  const int per_byte = 8 / static_cast<int>(slot);
  const int mask = (1 << slot) - 1;
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const uint8_t* qr = q + n * rb;
      float* orow = o + n * K;
      for (int64_t gi = 0; gi < G; ++gi) {
        const float sc = static_cast<float>(s[n * G + gi]);
        const float zf = static_cast<float>(z[n * G + gi]);
        const int64_t k1 = std::min(K, (gi + 1) * glen);
        for (int64_t k = gi * glen; k < k1; ++k) {
          const int code = (qr[k / per_byte] >> ((k % per_byte) * slot)) & mask;
          orow[k] = (static_cast<float>(code) - zf) * sc;
        }
      }
    }
  });
}

}  // namespace

TORCH_LIBRARY(cbq_hf_cpu, m) {
  m.def("quantize_act(Tensor x, float clip, int act_bits) -> (Tensor, Tensor)");
  m.def("gemm_float(Tensor x, Tensor wpack, Tensor scales, Tensor szs, Tensor? bias, int bits, int N, int glen) -> Tensor");
  m.def("gemm_int(Tensor codes, Tensor steps, Tensor wpack, Tensor scales, Tensor szs, Tensor? bias, int bits, int N, "
        "int glen) -> Tensor");
  m.def("dequantize_into(Tensor qweight, Tensor scales, Tensor zeros, int slot, int glen, Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(cbq_hf_cpu, CPU, m) {
  m.impl("quantize_act", &quantize_act);
  m.impl("gemm_float", &gemm_float);
  m.impl("gemm_int", &gemm_int);
  m.impl("dequantize_into", &dequantize_into);
}
