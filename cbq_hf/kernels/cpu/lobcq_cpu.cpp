// LO-BCQ CPU kernels for CBQLinear (format "lobcq"): a GEMV/small-GEMM straight from the packed buffers, and
// dequantization into a workspace for prefill. Built with cbq_cpu.cpp by cbq_hf/kernels/cpu/build.py; its ops join
// the torch namespace cbq_hf_cpu.
//
// Storage (cbq_hf/formats/lobcq.py, one linear W [N, K]):
//   * qweight uint8 [N, ceil(K / 2)]: 4-bit entry index of value k in byte k / 2, low nibble first;
//   * selectors uint8 [N, ceil(nb * sb / 8)]: codebook id of block j (nb = ceil(K / Lb) blocks of Lb values) at bit
//     offset j * sb of its row (sb = log2(number of codebooks); absent when sb = 0);
//   * scales uint8 [N, A]: FP8 E4M3 bit pattern of the scale of each array of La values;
//   * tensor_scale float32, codebooks [nc, 16] (passed here as float32, exact: small integers).
// Value k of row n is  C[sel(k / Lb)][idx(k)] * (e4m3(scale(k / La)) * tensor_scale)  in float32: the same two
// float32 products as lobcq.decode, so a decoded row is bit-identical to the reference's W_hat row.
//
// The GEMM decodes one weight row at a time into a small per-thread buffer (the row, exactly) and takes its dot
// product with every token: weights are read once per call whatever M is, and nothing of the size of W is
// allocated. Activations arrive already LO-BCQ-encoded (the format's vectorised run-time encoder, shared by the
// projections that read the same input).

#include <torch/library.h>
#include <ATen/core/Tensor.h>
#include <ATen/Functions.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

#include <immintrin.h>

#include "cpu_common.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

struct LobcqWeights {
  const uint8_t* q;    // qweight
  const uint8_t* sel;  // selectors (nullptr when sel_bits == 0)
  const uint8_t* sc;   // E4M3 scale codes
  const float* cb;     // codebooks [nc, 16] as float32
  const float* e4m3;   // float32 value of every E4M3 bit pattern [256]
  float ts;            // tensor scale
  int64_t N, K, qb, selb, A;
  int sel_bits, block_len, array_len;
};

// Codebook id of block j of a selector row (row_bytes long): sel_bits <= 8 bits at bit offset j * sel_bits.
inline int selector_of(const uint8_t* row, int64_t row_bytes, int64_t j, int sel_bits) {
  if (sel_bits == 0) return 0;
  const int64_t bit = j * sel_bits, b = bit >> 3;
  unsigned v = row[b];
  if (b + 1 < row_bytes) v |= static_cast<unsigned>(row[b + 1]) << 8;
  return static_cast<int>((v >> (bit & 7)) & ((1u << sel_bits) - 1u));
}

// W_hat row n (K floats) into o.
void decode_row(const LobcqWeights& w, int64_t n, float* o) {
  const uint8_t* q = w.q + n * w.qb;
  const uint8_t* sr = w.sel ? w.sel + n * w.selb : nullptr;
  const uint8_t* sc = w.sc + n * w.A;
  for (int64_t a = 0; a < w.A; ++a) {
    const float s = w.e4m3[sc[a]] * w.ts;
    const int64_t k1 = std::min(w.K, (a + 1) * w.array_len);
    for (int64_t k = a * w.array_len; k < k1;) {
      const int64_t j = k / w.block_len, kb = std::min(k1, (j + 1) * w.block_len);
      const float* c = w.cb + 16 * selector_of(sr, w.selb, j, w.sel_bits);
      for (; k < kb; ++k) o[k] = c[(q[k >> 1] >> ((k & 1) * 4)) & 15] * s;
    }
  }
}

#if defined(__AVX512F__) && defined(__AVX512BW__)
// The codebook entries of 16 values whose 4-bit indices are the nibbles of the low 8 bytes (low nibble first): values
// 0-7 from the 16-float table c0, 8-15 from c1, in one two-table permute (index bit 4 picks c1).
inline __m512 lookup16(__m128i bytes, const float* c0, const float* c1) {
  const __m128i lo4 = _mm_set1_epi8(15);
  const __m512i idx = _mm512_or_si512(
      _mm512_cvtepu8_epi32(_mm_unpacklo_epi8(_mm_and_si128(bytes, lo4), _mm_and_si128(_mm_srli_epi16(bytes, 4), lo4))),
      _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 16, 16, 16, 16, 16, 16, 16, 16));
  return _mm512_permutex2var_ps(_mm512_loadu_ps(c0), idx, _mm512_loadu_ps(c1));
}

// Values k .. k + nv - 1 (nv <= 16, k a multiple of 16) of a row: two blocks of 8 whose codebooks (16-float tables
// c0, c1) are looked up with one permute each, scaled by s. FULL: nv == 16 (plain loads and stores); STREAM: full
// steps use streaming stores where aligned (store64, for a workspace of kStreamMinBytes or more).
template <bool FULL, bool STREAM = false>
inline void decode16(const uint8_t* q, int64_t k, int nv, const float* c0, const float* c1, __m512 s, float* o) {
  const __m128i bytes = FULL ? _mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + k / 2))
                             : _mm_maskz_loadu_epi8(static_cast<__mmask16>((1u << ((nv + 1) / 2)) - 1), q + k / 2);
  const __m512 v = lookup16(bytes, c0, c1);
  if (FULL) store64<STREAM>(o + k, _mm512_castps_si512(_mm512_mul_ps(v, s)));
  else _mm512_mask_storeu_ps(o + k, static_cast<__mmask16>((1u << nv) - 1), _mm512_mul_ps(v, s));
}

// decode_row for the default geometry (blocks of 8 values, arrays a multiple of 16 values), 16 values per step.
template <bool STREAM>
void decode_row_16(const LobcqWeights& w, int64_t n, float* o) {
  const uint8_t* q = w.q + n * w.qb;
  const uint8_t* sr = w.sel ? w.sel + n * w.selb : nullptr;
  const uint8_t* sc = w.sc + n * w.A;
  const float* cb = w.cb;
  const int64_t K = w.K, La = w.array_len, selb = w.selb;
  const int sb = w.sel_bits;
  for (int64_t a = 0; a < w.A; ++a) {
    const __m512 s = _mm512_set1_ps(w.e4m3[sc[a]] * w.ts);
    const int64_t k1 = std::min(K, (a + 1) * La);
    int64_t k = a * La;
    if (sb == 4) {  // the default 16 codebooks: one selector byte per two blocks
      for (; k + 16 <= k1; k += 16) {
        const unsigned b = sr[k / 16];
        decode16<true, STREAM>(q, k, 16, cb + 16 * (b & 15u), cb + 16 * (b >> 4), s, o);
      }
    } else {
      for (; k + 16 <= k1; k += 16)
        decode16<true, STREAM>(q, k, 16, cb + 16 * selector_of(sr, selb, k / 8, sb),
                       cb + 16 * selector_of(sr, selb, k / 8 + 1, sb), s, o);
    }
    if (k < k1) {
      const int nv = static_cast<int>(k1 - k);
      decode16<false>(q, k, nv, cb + 16 * selector_of(sr, selb, k / 8, sb),
                      cb + 16 * (nv > 8 ? selector_of(sr, selb, k / 8 + 1, sb) : 0), s, o);
    }
  }
}

// sum_k W_hat[n, k] x[k] for the default geometry without materialising the row (decode: one token): per array,
// sum_k C[sel][idx] x_k in float32, then times the array's scale.
float row_dot_16(const LobcqWeights& w, int64_t n, const float* x) {
  const uint8_t* q = w.q + n * w.qb;
  const uint8_t* sr = w.sel + n * w.selb;
  const uint8_t* sc = w.sc + n * w.A;
  const float* cb = w.cb;
  const int64_t K = w.K, La = w.array_len;
  __m512 tot = _mm512_setzero_ps();
  for (int64_t a = 0; a < w.A; ++a) {
    const int64_t k1 = std::min(K, (a + 1) * La);
    __m512 acc = _mm512_setzero_ps();
    int64_t k = a * La;
    for (; k + 16 <= k1; k += 16) {
      const unsigned b = sr[k / 16];
      const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + k / 2));
      const __m512 v = lookup16(bytes, cb + 16 * (b & 15u), cb + 16 * (b >> 4));
      acc = _mm512_fmadd_ps(v, _mm512_loadu_ps(x + k), acc);
    }
    if (k < k1) {
      alignas(64) float t[16];
      const int nv = static_cast<int>(k1 - k);
      decode16<false>(q + k / 2, 0, nv, cb + 16 * selector_of(sr, w.selb, k / 8, 4),
                      cb + 16 * (nv > 8 ? selector_of(sr, w.selb, k / 8 + 1, 4) : 0), _mm512_set1_ps(1.f), t);
      const __mmask16 m = static_cast<__mmask16>((1u << nv) - 1);
      acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, t), _mm512_maskz_loadu_ps(m, x + k), acc);
    }
    tot = _mm512_fmadd_ps(acc, _mm512_set1_ps(w.e4m3[sc[a]] * w.ts), tot);
  }
  return _mm512_reduce_add_ps(tot);
}

inline float dot(const float* a, const float* b, int64_t K) {
  __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + k), _mm512_loadu_ps(b + k), acc0);
    acc1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + k + 16), _mm512_loadu_ps(b + k + 16), acc1);
  }
  for (; k < K; k += 16) {
    const __mmask16 m = static_cast<__mmask16>((1u << std::min<int64_t>(16, K - k)) - 1);
    acc0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + k), _mm512_maskz_loadu_ps(m, b + k), acc0);
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
}
#else
inline float dot(const float* a, const float* b, int64_t K) {
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + k), _mm256_loadu_ps(b + k), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + k + 8), _mm256_loadu_ps(b + k + 8), acc1);
  }
  alignas(32) float t[8];
  _mm256_store_ps(t, _mm256_add_ps(acc0, acc1));
  float s = ((t[0] + t[1]) + (t[2] + t[3])) + ((t[4] + t[5]) + (t[6] + t[7]));
  for (; k < K; ++k) s += a[k] * b[k];
  return s;
}
#endif

// The decoder for this geometry and build; `stream`: rows go straight to a large workspace (streaming stores).
using RowDecoder = void (*)(const LobcqWeights&, int64_t, float*);
RowDecoder row_decoder(const LobcqWeights& w, bool stream = false) {
#if defined(__AVX512F__) && defined(__AVX512BW__)
  if (w.block_len == 8 && w.array_len % 16 == 0) return stream ? decode_row_16<true> : decode_row_16<false>;
#endif
  return decode_row;
}

LobcqWeights lobcq_weights(const at::Tensor& qweight, const std::optional<at::Tensor>& selectors,
                           const at::Tensor& scales, double tensor_scale, const at::Tensor& codebooks,
                           const at::Tensor& e4m3, int64_t K, int64_t block_len, int64_t array_len,
                           int64_t sel_bits) {
  check_cpu(qweight, "qweight");
  check_cpu(scales, "scales");
  check_cpu(codebooks, "codebooks");
  check_cpu(e4m3, "e4m3");
  TORCH_CHECK(qweight.scalar_type() == at::kByte && qweight.dim() == 2, "qweight must be uint8 [N, ceil(K / 2)]");
  TORCH_CHECK(block_len > 0 && array_len > 0 && sel_bits >= 0 && sel_bits <= 8, "bad LO-BCQ geometry");
  const int64_t N = qweight.size(0), A = (K + array_len - 1) / array_len, nb = (K + block_len - 1) / block_len;
  TORCH_CHECK(qweight.size(1) == (K + 1) / 2, "qweight row bytes do not match K");
  TORCH_CHECK(scales.scalar_type() == at::kByte && scales.numel() == N * A, "scales must be uint8 [N, ceil(K / La)]");
  TORCH_CHECK(codebooks.scalar_type() == at::kFloat && codebooks.numel() == (int64_t{16} << sel_bits),
              "codebooks must be float32 [2^sel_bits, 16]");
  TORCH_CHECK(e4m3.scalar_type() == at::kFloat && e4m3.numel() == 256, "e4m3 must be float32 [256]");
  const int64_t selb = (nb * sel_bits + 7) / 8;
  const uint8_t* sel = nullptr;
  if (sel_bits > 0) {
    TORCH_CHECK(selectors.has_value(), "selectors are required when sel_bits > 0");
    check_cpu(*selectors, "selectors");
    TORCH_CHECK(selectors->scalar_type() == at::kByte && selectors->numel() == N * selb,
                "selectors must be uint8 [N, ceil(nb * sel_bits / 8)]");
    sel = selectors->data_ptr<uint8_t>();
  }
  return {qweight.data_ptr<uint8_t>(), sel, scales.data_ptr<uint8_t>(), codebooks.data_ptr<float>(),
          e4m3.data_ptr<float>(), static_cast<float>(tensor_scale), N, K, qweight.size(1), selb, A,
          static_cast<int>(sel_bits), static_cast<int>(block_len), static_cast<int>(array_len)};
}

// y [..., N] = x [..., K] (float32) @ W_hat^T (+ bias), W_hat decoded row by row.
at::Tensor lobcq_gemm(const at::Tensor& x, const at::Tensor& qweight, const std::optional<at::Tensor>& selectors,
                      const at::Tensor& scales, double tensor_scale, const at::Tensor& codebooks,
                      const at::Tensor& e4m3, const std::optional<at::Tensor>& bias, int64_t block_len,
                      int64_t array_len, int64_t sel_bits) {
  check_cpu(x, "x");
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() >= 1, "x must be float32 [..., K]");
  const int64_t K = x.size(-1);
  TORCH_CHECK(K > 0, "x must have K > 0");
  const LobcqWeights w =
      lobcq_weights(qweight, selectors, scales, tensor_scale, codebooks, e4m3, K, block_len, array_len, sel_bits);
  const float* b = bias_data(bias, w.N);
  const int64_t M = x.numel() / K, N = w.N;
  std::vector<int64_t> sizes = x.sizes().vec();
  sizes.back() = N;
  auto y = at::empty(sizes, x.options());
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const RowDecoder decode = row_decoder(w);
#if defined(__AVX512F__) && defined(__AVX512BW__)
  if (M == 1 && w.block_len == 8 && w.array_len % 16 == 0 && w.sel_bits == 4) {
    at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
      for (int64_t n = n0; n < n1; ++n) yp[n] = row_dot_16(w, n, xp) + (b ? b[n] : 0.f);
    });
    return y;
  }
#endif
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    std::vector<float> row(static_cast<size_t>(K));
    for (int64_t n = n0; n < n1; ++n) {
      decode(w, n, row.data());
      const float bn = b ? b[n] : 0.f;
      for (int64_t m = 0; m < M; ++m) yp[m * N + n] = dot(row.data(), xp + m * K, K) + bn;
    }
  });
  return y;
}

// W_hat [N, K] into out (float32 or bfloat16, rounded to nearest even), for prefill: one dense GEMM after it.
void lobcq_dequantize_into(const at::Tensor& qweight, const std::optional<at::Tensor>& selectors,
                           const at::Tensor& scales, double tensor_scale, const at::Tensor& codebooks,
                           const at::Tensor& e4m3, int64_t block_len, int64_t array_len, int64_t sel_bits,
                           at::Tensor out) {
  check_cpu(out, "out");
  TORCH_CHECK(out.dim() == 2 && (out.scalar_type() == at::kFloat || out.scalar_type() == at::kBFloat16),
              "out must be float32 or bfloat16 [N, K]");
  const int64_t K = out.size(1);
  const LobcqWeights w =
      lobcq_weights(qweight, selectors, scales, tensor_scale, codebooks, e4m3, K, block_len, array_len, sel_bits);
  TORCH_CHECK(out.size(0) == w.N, "out must be [N, K]");
  const bool bf16 = out.scalar_type() == at::kBFloat16;
  const bool stream = streamed(out);
  const RowDecoder decode = row_decoder(w, stream && !bf16);
  at::parallel_for(0, w.N, 16, [&](int64_t n0, int64_t n1) {
    std::vector<float> row(bf16 ? static_cast<size_t>(K) : 0);
    for (int64_t n = n0; n < n1; ++n) {
      if (!bf16) {
        decode(w, n, out.data_ptr<float>() + n * K);
        continue;
      }
      decode(w, n, row.data());
      at::BFloat16* o = out.data_ptr<at::BFloat16>() + n * K;
      int64_t k = 0;
#if defined(__AVX512F__) && defined(__AVX512BW__)
      const auto convert = [&](auto stream_c) {
        for (; k + 16 <= K; k += 16) store32<decltype(stream_c)::value>(o + k, bf16_lanes(_mm512_loadu_ps(&row[k])));
      };
      stream ? convert(std::true_type{}) : convert(std::false_type{});
#endif
      for (; k < K; ++k) o[k] = c10::BFloat16(row[k]);
    }
    if (stream) _mm_sfence();  // see streamed()
  });
}

// ------------------------------------------------------------------------------------------ run-time activations
// Nearest FP8 E4M3 code (round to nearest, ties to the even code) of v in [0, 448] given the ascending values of the
// positive finite codes 0..126 (e4m3[0..126]); what torch's float -> float8_e4m3fn conversion gives after the clamp.
inline int e4m3_round(float v, const float* e4m3) {
  const float* hi = std::upper_bound(e4m3, e4m3 + 127, v);  // first value > v
  if (hi == e4m3) return 0;
  const int i = static_cast<int>(hi - e4m3) - 1;          // e4m3[i] <= v
  if (i == 126) return 126;
  const double below = static_cast<double>(v) - e4m3[i], above = static_cast<double>(e4m3[i + 1]) - v;
  if (below < above) return i;
  if (above < below) return i + 1;
  return (i % 2 == 0) ? i : i + 1;
}

// One token, as lobcq.fake_quantize_activations computes it (per-token tensor scale, max-based E4M3 array
// scales, per block the codebook with the least squared error, ties to the smaller id, each value its table
// slot's entry), written as decoded values into o. lut_v / lut_i: [nc][S] values and entry indices of the table
// slots ceil(2y) in [-h, h].
void encode_act_row(const float* x, int64_t K, int block_len, int array_len, int cmax, int nc, int S,
                    const float* lut_v, const uint8_t* lut_i, const float* cb, const float* e4m3, float* o,
                    std::vector<float>& y, std::vector<float>& real, std::vector<int>& slot, const float* lut_t) {
  const int h = (S - 1) / 2;
  float top = 0.f;
  for (int64_t k = 0; k < K; ++k) top = std::max(top, std::fabs(x[k]));
  const float ts = std::max(top / static_cast<float>(cmax * 448.0), 1e-30f);
  const float cts = static_cast<float>(cmax) * ts;
  const int64_t A = (K + array_len - 1) / array_len;
  y.assign(static_cast<size_t>(A * array_len), 0.f);
  real.resize(static_cast<size_t>(A));
  for (int64_t a = 0; a < A; ++a) {
    const int64_t k0 = a * array_len, k1 = std::min(K, k0 + array_len);
    float amax = 0.f;
    for (int64_t k = k0; k < k1; ++k) amax = std::max(amax, std::fabs(x[k]));
    const float r = e4m3[e4m3_round(std::min(std::max(amax / cts, 0.f), 448.f), e4m3)] * ts;
    real[a] = r;
    for (int64_t k = k0; k < k1; ++k) y[k] = r > 0.f ? x[k] / std::max(r, 1e-30f) : 0.f;
  }
  const int64_t nb = (K + block_len - 1) / block_len;
  const bool padded = K % block_len != 0;
  slot.resize(static_cast<size_t>(block_len));
  for (int64_t j = 0; j < nb; ++j) {
    const float* yb = y.data() + j * block_len;
    for (int l = 0; l < block_len; ++l)
      slot[l] = static_cast<int>(std::min(std::max(std::ceil(2.f * yb[l]), static_cast<float>(-h)),
                                          static_cast<float>(h))) + h;
    int best = 0;
#if defined(__AVX512F__)
    if (lut_t != nullptr) {
      // 16 codebooks in the lanes of one register: lut_t[slot] holds the slot's value under every codebook, and
      // each lane sums its squared errors in the same order and with the same roundings as the scalar loop below.
      __m512 err = _mm512_setzero_ps();
      for (int l = 0; l < block_len; ++l) {
        const __m512 d = _mm512_sub_ps(_mm512_loadu_ps(lut_t + 16 * slot[l]), _mm512_set1_ps(yb[l]));
        __m512 e = _mm512_mul_ps(d, d);
        if (padded) e = _mm512_mul_ps(e, _mm512_set1_ps((j * block_len + l < K) ? 1.f : 0.f));
        err = _mm512_add_ps(err, e);
      }
      const __mmask16 is_min = _mm512_cmp_ps_mask(err, _mm512_set1_ps(_mm512_reduce_min_ps(err)), _CMP_EQ_OQ);
      best = is_min ? __builtin_ctz(static_cast<unsigned>(is_min)) : 0;
    } else
#endif
    {
    float best_err = 0.f;
    for (int c = 0; c < nc; ++c) {
      float err = 0.f;
      for (int l = 0; l < block_len; ++l) {
        const float d = lut_v[c * S + slot[l]] - yb[l];
        float e = d * d;
        if (padded) e *= (j * block_len + l < K) ? 1.f : 0.f;
        err += e;
      }
      if (c == 0 || err < best_err) {
        best = c;
        best_err = err;
      }
    }
    }
    const int64_t kend = std::min(K, (j + 1) * block_len);
    const float r = real[(j * block_len) / array_len];
    for (int64_t k = j * block_len; k < kend; ++k)
      o[k] = cb[best * 16 + lut_i[best * S + slot[k - j * block_len]]] * r;
  }
}

// x_hat [..., K] (float32) of activations x [..., K] (float32): run-time LO-BCQ of every token.
at::Tensor lobcq_encode_act(const at::Tensor& x, const at::Tensor& lut_values, const at::Tensor& lut_index,
                            const at::Tensor& codebooks, const at::Tensor& e4m3, int64_t block_len,
                            int64_t array_len, int64_t cmax) {
  check_cpu(x, "x");
  check_cpu(lut_values, "lut_values");
  check_cpu(lut_index, "lut_index");
  check_cpu(codebooks, "codebooks");
  check_cpu(e4m3, "e4m3");
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() >= 1 && x.size(-1) > 0, "x must be float32 [..., K]");
  TORCH_CHECK(lut_values.scalar_type() == at::kFloat && lut_values.dim() == 2, "lut_values must be float32 [nc, S]");
  TORCH_CHECK(lut_index.scalar_type() == at::kByte && lut_index.sizes() == lut_values.sizes(),
              "lut_index must be uint8 [nc, S]");
  const int nc = static_cast<int>(lut_values.size(0)), S = static_cast<int>(lut_values.size(1));
  TORCH_CHECK(S == 4 * (cmax + 1) + 1, "the table must have 4 * (cmax + 1) + 1 slots");
  TORCH_CHECK(codebooks.scalar_type() == at::kFloat && codebooks.numel() == nc * 16, "codebooks must be float32 [nc, 16]");
  TORCH_CHECK(e4m3.scalar_type() == at::kFloat && e4m3.numel() == 256, "e4m3 must be float32 [256]");
  TORCH_CHECK(block_len > 0 && array_len % block_len == 0, "array_len must be a multiple of block_len");
  const int64_t K = x.size(-1), M = x.numel() / K;
  auto out = at::empty_like(x);
  const float* xp = x.data_ptr<float>();
  float* op = out.data_ptr<float>();
  // [S][16] transposed table for the 16-lane codebook choice (AVX-512 builds, 16 codebooks)
  std::vector<float> lut_t;
#if defined(__AVX512F__)
  if (nc == 16) {
    lut_t.resize(static_cast<size_t>(S) * 16);
    const float* lv = lut_values.data_ptr<float>();
    for (int c = 0; c < 16; ++c)
      for (int sl = 0; sl < S; ++sl) lut_t[sl * 16 + c] = lv[c * S + sl];
  }
#endif
  at::parallel_for(0, M, 1, [&](int64_t m0, int64_t m1) {
    std::vector<float> y, real;  // per-token scratch, reused across the thread's tokens
    std::vector<int> slot;
    for (int64_t m = m0; m < m1; ++m)
      encode_act_row(xp + m * K, K, static_cast<int>(block_len), static_cast<int>(array_len), static_cast<int>(cmax),
                     nc, S, lut_values.data_ptr<float>(), lut_index.data_ptr<uint8_t>(), codebooks.data_ptr<float>(),
                     e4m3.data_ptr<float>(), op + m * K, y, real, slot, lut_t.empty() ? nullptr : lut_t.data());
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(cbq_hf_cpu, m) {
  m.def("lobcq_gemm(Tensor x, Tensor qweight, Tensor? selectors, Tensor scales, float tensor_scale, Tensor codebooks, "
        "Tensor e4m3, Tensor? bias, int block_len, int array_len, int sel_bits) -> Tensor");
  m.def("lobcq_dequantize_into(Tensor qweight, Tensor? selectors, Tensor scales, float tensor_scale, "
        "Tensor codebooks, Tensor e4m3, int block_len, int array_len, int sel_bits, Tensor(a!) out) -> ()");
  m.def("lobcq_encode_act(Tensor x, Tensor lut_values, Tensor lut_index, Tensor codebooks, Tensor e4m3, "
        "int block_len, int array_len, int cmax) -> Tensor");
}

TORCH_LIBRARY_IMPL(cbq_hf_cpu, CPU, m) {
  m.impl("lobcq_gemm", &lobcq_gemm);
  m.impl("lobcq_dequantize_into", &lobcq_dequantize_into);
  m.impl("lobcq_encode_act", &lobcq_encode_act);
}
