// Calibration kernels. LoRA-Rounding (cbq_hf/calibration/rounding.py, `_LoRARoundedWeightCPU`): the hard-rounded
// weight of one linear from its LoRA factors, with the rounding regulariser of its soft offsets, and the gradients
// of the LoRA factors and of the step sizes, each in one pass over the [N, K] weight (forward: reads v0 and base,
// writes W_q and the offsets h; backward: reads the weight's gradient, h and base); and the end-to-end stage's
// weight of fixed codes. The composed PyTorch ops make about ten passes for the forward and as many for the
// backward, which is what a calibration step on a CPU spends most of its time on.
//
// Forward, per element (n, k) of group g = k / glen:
//   v    = sum_j a1[n, j] a2[j, k] + v0[n, k]           (the rank-r product, then the fixed V0, as addmm orders it)
//   sig  = sigmoid(v),  h = clamp(sig * (ZETA - GAMMA) + GAMMA, 0, 1)
//   q    = clamp(base + [h >= 0.5], 0, qmax)             (base = floor(W / scale0) + z)
//   w    = (q - z[n, g]) * step[n, g]                    (float32, or bfloat16 rounded to nearest even)
//   reg  = sum |2h - 1|^beta                             (only when beta > 0: the regulariser's sum)
// Backward (straight-through hard rounding and code clamp, as the composed ops define them), from the stored h
// (sig = (h - GAMMA) / (ZETA - GAMMA) where 0 < h < 1) and q recomputed:
//   t           = (g_w * step * [q unclamped] + c * 2 beta |2h - 1|^beta / (2h - 1)) * (ZETA - GAMMA) sig (1 - sig)
//                 where 0 < h < 1, else 0   (c: the gradient reaching the regulariser's sum)
//   g_a1[n, :] = sum_k t[n, k] * a2[:, k],   g_a2[:, k] = sum_n a1[n, :] * t[n, k]
//   g_raw[n, g] = sum over the group of g_w * (q - z)   (the caller multiplies by scale0 * exp(log_delta))
// Where the clamp cut h (h = 0 or 1) the gradient is zero, as the composed ops' clamp gives it except at the
// measure-zero points where the unclamped value is exactly 0 or 1. sigmoid and |.|^beta use float32 exp/log
// approximations (within ~2 ulp of PyTorch's), so a hard-rounding decision can differ from the PyTorch ops' only for
// an offset within float rounding of 1/2.
#include <torch/library.h>
#include <ATen/core/Tensor.h>
#include <ATen/Functions.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <vector>

namespace {

// The constants of rectified_sigmoid, as float32 operands of the composed ops (Python doubles cast to float).
const float kZeta = 1.1f;
const float kGamma = -0.1f;
const float kSpan = static_cast<float>(1.1 - (-0.1));

void check_rows(const at::Tensor& t, const char* name, at::ScalarType dtype, int64_t N, int64_t K) {
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous(), name, " must be a contiguous CPU tensor");
  TORCH_CHECK(t.scalar_type() == dtype, name, " has dtype ", t.scalar_type(), ", expected ", dtype);
  TORCH_CHECK(t.dim() == 2 && t.size(0) == N && t.size(1) == K, name, " must be [", N, ", ", K, "], got ", t.sizes());
}

inline float bf16_to_float(uint16_t b) {
  uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Round to nearest even, as PyTorch's float -> bfloat16 conversion for finite values.
inline uint16_t float_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  u += 0x7FFFu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

// The end-to-end stage's weight of fixed codes (cbq_hf/calibration/e2e.py, `_ScaledCodes`): W = qz * step[n, g]
// from qz = q - z [N, K] int8, in float32 or bfloat16 (rounded to nearest even), one pass.
at::Tensor scaled_codes_fwd(const at::Tensor& qz, const at::Tensor& step, int64_t glen, bool bf16) {
  TORCH_CHECK(qz.dim() == 2, "qz must be [N, K]");
  const int64_t N = qz.size(0), K = qz.size(1);
  TORCH_CHECK(glen > 0, "glen must be positive");
  const int64_t G = (K + glen - 1) / glen;
  check_rows(qz, "qz", at::kChar, N, K);
  check_rows(step, "step", at::kFloat, N, G);
  at::Tensor out = at::empty({N, K}, step.options().dtype(bf16 ? at::kBFloat16 : at::kFloat));
  const int8_t* qp = qz.data_ptr<int8_t>();
  const float* sp = step.data_ptr<float>();
  void* op = out.data_ptr();
  at::parallel_for(0, N, 8, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      for (int64_t g = 0; g < G; ++g) {
        const int64_t k0 = n * K + g * glen, k1 = n * K + std::min(K, (g + 1) * glen);
        const float st = sp[n * G + g];
        if (bf16) {
          uint16_t* o = static_cast<uint16_t*>(op);
#pragma omp simd
          for (int64_t k = k0; k < k1; ++k) o[k] = float_to_bf16(static_cast<float>(qp[k]) * st);
        } else {
          float* o = static_cast<float*>(op);
#pragma omp simd
          for (int64_t k = k0; k < k1; ++k) o[k] = static_cast<float>(qp[k]) * st;
        }
      }
    }
  });
  return out;
}

// Sum over each group of g_w * qz -> [N, G] float32 (the gradient of `scaled_codes_fwd`'s W with respect to the
// steps, before the caller's chain rule through the step's parametrisation). g_w float32 or bfloat16.
at::Tensor scaled_codes_bwd(const at::Tensor& g_w, const at::Tensor& qz, int64_t glen) {
  TORCH_CHECK(qz.dim() == 2, "qz must be [N, K]");
  const int64_t N = qz.size(0), K = qz.size(1);
  TORCH_CHECK(glen > 0, "glen must be positive");
  const int64_t G = (K + glen - 1) / glen;
  const bool bf16 = g_w.scalar_type() == at::kBFloat16;
  check_rows(g_w, "g_w", bf16 ? at::kBFloat16 : at::kFloat, N, K);
  check_rows(qz, "qz", at::kChar, N, K);
  at::Tensor out = at::empty({N, G}, qz.options().dtype(at::kFloat));
  const int8_t* qp = qz.data_ptr<int8_t>();
  const void* gp = g_w.data_ptr();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, N, 8, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      for (int64_t g = 0; g < G; ++g) {
        const int64_t k0 = n * K + g * glen, k1 = n * K + std::min(K, (g + 1) * glen);
        float acc = 0.0f;
        if (bf16) {
          const uint16_t* gw = static_cast<const uint16_t*>(gp);
#pragma omp simd reduction(+ : acc)
          for (int64_t k = k0; k < k1; ++k) acc += bf16_to_float(gw[k]) * static_cast<float>(qp[k]);
        } else {
          const float* gw = static_cast<const float*>(gp);
#pragma omp simd reduction(+ : acc)
          for (int64_t k = k0; k < k1; ++k) acc += gw[k] * static_cast<float>(qp[k]);
        }
        op[n * G + g] = acc;
      }
    }
  });
  return out;
}

// Natural logarithm of x > 0 (finite, normal), Cephes' logf: within ~2 ulp, branch-free so that loops of it
// vectorize.
inline float log_approx(float x) {
  uint32_t u = __builtin_bit_cast(uint32_t, x);
  int32_t e = static_cast<int32_t>((u >> 23) & 0xffu) - 126;  // x = m * 2^e, m in [0.5, 1)
  float m = __builtin_bit_cast(float, (u & 0x807fffffu) | 0x3f000000u);
  // Both sides computed, then selected: a floating-point operation under a condition keeps the loop scalar.
  const bool small = m < 0.707106781186547524f;
  const float m_small = m + m - 1.0f;
  const float m_large = m - 1.0f;
  e = small ? e - 1 : e;
  m = small ? m_small : m_large;
  const float z = m * m;
  float y = 7.0376836292e-2f;
  y = y * m - 1.1514610310e-1f;
  y = y * m + 1.1676998740e-1f;
  y = y * m - 1.2420140846e-1f;
  y = y * m + 1.4249322787e-1f;
  y = y * m - 1.6668057665e-1f;
  y = y * m + 2.0000714765e-1f;
  y = y * m - 2.4999993993e-1f;
  y = y * m + 3.3333331174e-1f;
  y = y * m * z;
  const float fe = static_cast<float>(e);
  y += -2.12194440e-4f * fe;
  y += -0.5f * z;
  return m + y + 0.693359375f * fe;
}

// exp(x) for x <= 0, Cephes' expf polynomial (within ~1 ulp); x below -87 gives exp(-87) instead of a subnormal or
// zero. n = round(x / ln 2) through the 1.5 * 2^23 rounding constant rather than a float -> int conversion: with the
// clamp before it, the conversion keeps GCC from vectorizing the loop.
inline float exp_approx(float x) {
  x = x < -87.0f ? -87.0f : x;
  const float magic = 12582912.0f;
  const float shifted = x * 1.44269504088896341f + magic;
  const int32_t n = static_cast<int32_t>(__builtin_bit_cast(uint32_t, shifted) - __builtin_bit_cast(uint32_t, magic));
  const float fx = shifted - magic;
  x -= fx * 0.693359375f;
  x -= fx * -2.12194440e-4f;
  const float z = x * x;
  float y = 1.9875691500e-4f;
  y = y * x + 1.3981999507e-3f;
  y = y * x + 8.3334519073e-3f;
  y = y * x + 4.1665795894e-2f;
  y = y * x + 1.6666665459e-1f;
  y = y * x + 5.0000001201e-1f;
  y = y * z + x + 1.0f;
  return y * __builtin_bit_cast(float, static_cast<uint32_t>(n + 127) << 23);
}

// |d|^beta for d in [-1, 1], beta > 0 (0 at d = 0).
inline float abs_pow(float d, float beta) {
  const float a = std::abs(d);
  const float p = exp_approx(beta * log_approx(a > 1e-30f ? a : 1e-30f));
  return a > 0.0f ? p : 0.0f;
}

// sigmoid(v) = 1 / (1 + exp(-v)) through exp of the non-positive -|v|, both signs branch-free. |v| is capped at 20:
// beyond it the rectified offset is clamped to 0 or 1 either way, and near exp(-87) the products of the backward
// would be subnormal floats, which the CPU multiplies many times slower.
inline float sigmoid_approx(float v) {
  const float e = exp_approx(-std::min(std::abs(v), 20.0f));
  const float inv = 1.0f / (1.0f + e);
  return v >= 0.0f ? inv : e * inv;
}

// The shapes every LoRA-Rounding kernel shares: v0 and base [N, K], a1 [N, r], a2 [r, K], zero and step [N, G].
struct LoRAShapes {
  int64_t N, K, r, G;
};

LoRAShapes check_lora(const at::Tensor& v0, const at::Tensor& a1, const at::Tensor& a2, const at::Tensor& base,
                      const at::Tensor& zero, const at::Tensor& step, int64_t glen) {
  TORCH_CHECK(v0.dim() == 2 && a1.dim() == 2 && a2.dim() == 2, "v0, a1, a2 must be 2-D");
  TORCH_CHECK(glen > 0, "glen must be positive");
  const int64_t N = v0.size(0), K = v0.size(1), r = a1.size(1), G = (K + glen - 1) / glen;
  check_rows(v0, "v0", at::kFloat, N, K);
  check_rows(a1, "a1", at::kFloat, N, r);
  check_rows(a2, "a2", at::kFloat, r, K);
  check_rows(base, "base", at::kShort, N, K);
  check_rows(zero, "zero", at::kFloat, N, G);
  check_rows(step, "step", at::kFloat, N, G);
  return {N, K, r, G};
}

// Row n's V = a1[n] @ a2 + v0[n] into v [K] (a thread's scratch row).
inline void lora_row(const float* v0, const float* a1, const float* a2, float* v, int64_t n, int64_t K, int64_t r) {
  std::fill(v, v + K, 0.0f);
  for (int64_t j = 0; j < r; ++j) {
    const float a = a1[n * r + j];
    const float* a2r = a2 + j * K;
#pragma omp simd
    for (int64_t k = 0; k < K; ++k) v[k] += a * a2r[k];
  }
  const float* v0r = v0 + n * K;
#pragma omp simd
  for (int64_t k = 0; k < K; ++k) v[k] += v0r[k];
}

inline float offset_of(float v) {
  const float hv = sigmoid_approx(v) * kSpan + kGamma;
  return std::min(std::max(hv, 0.0f), 1.0f);
}

template <bool kBF16, bool kReg>
void forward_rows(const float* v0, const float* a1, const float* a2, const int16_t* base, const float* zero,
                  const float* step, void* out, float* h, double* reg_rows, float* v, int64_t n0, int64_t n1,
                  int64_t K, int64_t G, int64_t glen, int64_t r, float qmax, float beta) {
  for (int64_t n = n0; n < n1; ++n) {
    lora_row(v0, a1, a2, v, n, K, r);
    const int16_t* br = base + n * K;
    float* hr = h + n * K;
    float reg = 0.0f;
    for (int64_t g = 0; g < G; ++g) {
      const int64_t k0 = g * glen, k1 = std::min(K, k0 + glen);
      const float z = zero[n * G + g], st = step[n * G + g];
#pragma omp simd reduction(+ : reg)
      for (int64_t k = k0; k < k1; ++k) {
        const float hv = offset_of(v[k]);
        hr[k] = hv;
        const float qpre = static_cast<float>(br[k]) + (hv >= 0.5f ? 1.0f : 0.0f);
        const float q = std::min(std::max(qpre, 0.0f), qmax);
        const float w = (q - z) * st;
        if constexpr (kBF16) {
          static_cast<uint16_t*>(out)[n * K + k] = float_to_bf16(w);
        } else {
          static_cast<float*>(out)[n * K + k] = w;
        }
        if constexpr (kReg) reg += abs_pow(hv * 2.0f - 1.0f, beta);
      }
    }
    if constexpr (kReg) reg_rows[n] = reg;
  }
}

// W_q [N, K] (float32, or bfloat16 when `bf16`), the offsets h [N, K] float32 (what the backward reads) and, when
// beta > 0, sum |2h - 1|^beta as a float32 scalar (rows summed in float32, the rows' sums in double; 0 when
// beta <= 0).
std::tuple<at::Tensor, at::Tensor, at::Tensor> lora_round_fwd(const at::Tensor& v0, const at::Tensor& a1, const at::Tensor& a2,
                                                  const at::Tensor& base, const at::Tensor& zero,
                                                  const at::Tensor& step, int64_t glen, int64_t qmax, bool bf16,
                                                  double beta) {
  const LoRAShapes s = check_lora(v0, a1, a2, base, zero, step, glen);
  const int64_t N = s.N, K = s.K, r = s.r, G = s.G;
  at::Tensor out = at::empty({N, K}, v0.options().dtype(bf16 ? at::kBFloat16 : at::kFloat));
  at::Tensor h = at::empty({N, K}, v0.options());
  at::Tensor scratch = at::empty({at::get_num_threads(), K}, v0.options());
  std::vector<double> reg_rows(N, 0.0);
  const float* vp = v0.data_ptr<float>();
  const float* a1p = a1.data_ptr<float>();
  const float* a2p = a2.data_ptr<float>();
  const int16_t* bp = base.data_ptr<int16_t>();
  const float* zp = zero.data_ptr<float>();
  const float* sp = step.data_ptr<float>();
  float* scr = scratch.data_ptr<float>();
  void* op = out.data_ptr();
  float* hp = h.data_ptr<float>();
  const float qm = static_cast<float>(qmax), b = static_cast<float>(beta);
  const bool reg = beta > 0;
  at::parallel_for(0, N, 8, [&](int64_t n0, int64_t n1) {
    float* v = scr + at::get_thread_num() * K;
    double* rr = reg_rows.data();
    if (bf16 && reg) {
      forward_rows<true, true>(vp, a1p, a2p, bp, zp, sp, op, hp, rr, v, n0, n1, K, G, glen, r, qm, b);
    } else if (bf16) {
      forward_rows<true, false>(vp, a1p, a2p, bp, zp, sp, op, hp, rr, v, n0, n1, K, G, glen, r, qm, b);
    } else if (reg) {
      forward_rows<false, true>(vp, a1p, a2p, bp, zp, sp, op, hp, rr, v, n0, n1, K, G, glen, r, qm, b);
    } else {
      forward_rows<false, false>(vp, a1p, a2p, bp, zp, sp, op, hp, rr, v, n0, n1, K, G, glen, r, qm, b);
    }
  });
  double total = 0.0;
  for (double x : reg_rows) total += x;
  return {out, h, at::scalar_tensor(static_cast<float>(total), v0.options())};
}

// The regulariser's term is computed even when c = 0 (no regulariser): GCC's code for this loop without it ran 2.5x
// slower on the development machine (AMD EPYC, AVX-512), for reasons not found.
template <bool kBF16>
void backward_rows(const void* g_w, const float* h, const float* a1, const float* a2, const int16_t* base,
                   const float* zero, const float* step, float* g_a1, float* g_a2_part, float* g_raw, float* t,
                   int64_t n0, int64_t n1, int64_t K, int64_t G, int64_t glen, int64_t r, float qmax, float beta,
                   float c) {
  for (int64_t n = n0; n < n1; ++n) {
    const float* hr = h + n * K;
    const int16_t* br = base + n * K;
    for (int64_t g = 0; g < G; ++g) {
      const int64_t k0 = g * glen, k1 = std::min(K, k0 + glen);
      const float z = zero[n * G + g], st = step[n * G + g];
      float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
      for (int64_t k = k0; k < k1; ++k) {
        float gw;
        if constexpr (kBF16) {
          gw = bf16_to_float(static_cast<const uint16_t*>(g_w)[n * K + k]);
        } else {
          gw = static_cast<const float*>(g_w)[n * K + k];
        }
        const float hv = hr[k];
        const float qpre = static_cast<float>(br[k]) + (hv >= 0.5f ? 1.0f : 0.0f);
        const float q = std::min(std::max(qpre, 0.0f), qmax);
        acc += gw * (q - z);
        float tv = q == qpre ? gw * st : 0.0f;
        const float d = hv * 2.0f - 1.0f;
        tv += c * (abs_pow(d, beta) / (d != 0.0f ? d : 1.0f));  // abs_pow is 0 where d = 0
        const float sig = (hv - kGamma) / kSpan;  // sigmoid(V) where the clamp passed it (elsewhere masked)
        tv = (hv > 0.0f && hv < 1.0f) ? tv * kSpan * sig * (1.0f - sig) : 0.0f;
        t[k] = tv;
      }
      g_raw[n * G + g] = acc;
    }
    for (int64_t j = 0; j < r; ++j) {
      const float* a2r = a2 + j * K;
      float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
      for (int64_t k = 0; k < K; ++k) acc += t[k] * a2r[k];
      g_a1[n * r + j] = acc;
      const float a = a1[n * r + j];
      float* part = g_a2_part + j * K;
#pragma omp simd
      for (int64_t k = 0; k < K; ++k) part[k] += a * t[k];
    }
  }
}

// Gradients of `lora_round_fwd`'s outputs, from its offsets h: g_w [N, K] (the dtype of W_q) and reg_coef, the
// gradient reaching the regulariser's sum (used when beta > 0). Returns (g_a1 [N, r], g_a2 [r, K], g_raw [N, G]).
std::tuple<at::Tensor, at::Tensor, at::Tensor> lora_round_bwd(const at::Tensor& g_w, double reg_coef,
                                                              const at::Tensor& h, const at::Tensor& a1,
                                                              const at::Tensor& a2, const at::Tensor& base,
                                                              const at::Tensor& zero, const at::Tensor& step,
                                                              int64_t glen, int64_t qmax, double beta) {
  const LoRAShapes s = check_lora(h, a1, a2, base, zero, step, glen);
  const int64_t N = s.N, K = s.K, r = s.r, G = s.G;
  const bool bf16 = g_w.scalar_type() == at::kBFloat16;
  check_rows(g_w, "g_w", bf16 ? at::kBFloat16 : at::kFloat, N, K);
  const auto opts = h.options();
  at::Tensor g_a1 = at::empty({N, r}, opts);
  at::Tensor g_raw = at::empty({N, G}, opts);
  const int nthreads = at::get_num_threads();
  // One g_a2 accumulator per thread (summed below), and one scratch row per thread.
  at::Tensor parts = at::zeros({nthreads, r, K}, opts);
  at::Tensor rows = at::empty({nthreads, K}, opts);
  const void* gwp = g_w.data_ptr();
  const float* hp = h.data_ptr<float>();
  const float* a1p = a1.data_ptr<float>();
  const float* a2p = a2.data_ptr<float>();
  const int16_t* bp = base.data_ptr<int16_t>();
  const float* zp = zero.data_ptr<float>();
  const float* sp = step.data_ptr<float>();
  float* g1p = g_a1.data_ptr<float>();
  float* grp = g_raw.data_ptr<float>();
  float* pp = parts.data_ptr<float>();
  float* tp = rows.data_ptr<float>();
  const float qm = static_cast<float>(qmax), b = static_cast<float>(beta);
  const float c = beta > 0 ? static_cast<float>(reg_coef * 2.0 * beta) : 0.0f;
  at::parallel_for(0, N, 8, [&](int64_t n0, int64_t n1) {
    const int tid = at::get_thread_num();
    float* part = pp + tid * r * K;
    float* t = tp + tid * K;
    if (bf16) {
      backward_rows<true>(gwp, hp, a1p, a2p, bp, zp, sp, g1p, part, grp, t, n0, n1, K, G, glen, r, qm, b, c);
    } else {
      backward_rows<false>(gwp, hp, a1p, a2p, bp, zp, sp, g1p, part, grp, t, n0, n1, K, G, glen, r, qm, b, c);
    }
  });
  return {g_a1, parts.sum(0), g_raw};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(cbq_hf_cpu, m) {
  m.def("lora_round_fwd(Tensor v0, Tensor a1, Tensor a2, Tensor base, Tensor zero, Tensor step, int glen, int qmax, "
        "bool bf16, float beta) -> (Tensor, Tensor, Tensor)");
  m.def("lora_round_bwd(Tensor g_w, float reg_coef, Tensor h, Tensor a1, Tensor a2, Tensor base, Tensor zero, "
        "Tensor step, int glen, int qmax, float beta) -> (Tensor, Tensor, Tensor)");
  m.def("scaled_codes_fwd(Tensor qz, Tensor step, int glen, bool bf16) -> Tensor");
  m.def("scaled_codes_bwd(Tensor g_w, Tensor qz, int glen) -> Tensor");
}

TORCH_LIBRARY_IMPL(cbq_hf_cpu, CPU, m) {
  m.impl("lora_round_fwd", &lora_round_fwd);
  m.impl("lora_round_bwd", &lora_round_bwd);
  m.impl("scaled_codes_fwd", &scaled_codes_fwd);
  m.impl("scaled_codes_bwd", &scaled_codes_bwd);
}
