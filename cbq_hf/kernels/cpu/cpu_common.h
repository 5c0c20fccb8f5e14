// Helpers shared by the CPU kernel sources (cbq_cpu.cpp, lut2_cpu.cpp, lobcq_cpu.cpp): argument checks, loading 16
// activations as float32 lanes, reused per-thread scratch buffers, and the walk of weight units in concurrent streams.
// Internal to each translation unit.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>

#include <immintrin.h>

#include <cstdint>
#include <optional>
#include <type_traits>
#include <vector>

namespace {

void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be on the CPU");
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

// The data of an optional float32 bias [N] (checked), or nullptr.
inline const float* bias_data(const std::optional<at::Tensor>& bias, int64_t N) {
  if (!bias) return nullptr;
  check_cpu(*bias, "bias");
  TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->numel() == N, "bias must be float [N]");
  return bias->data_ptr<float>();
}

// Reused per-thread scratch (token arrangement, tables): fresh buffers per call cost page faults for large M.
template <typename T>
T* scratch(int64_t n, int which) {
  thread_local std::vector<T> buf[2];
  if (static_cast<int64_t>(buf[which].size()) < n) buf[which].resize(n);
  return buf[which].data();
}

// Walks one thread's weight units [u0, u1) (panels, blocks) S at a time: the range is cut into S contiguous parts
// walked in step (units u0 + t, u0 + t + L, ...), so the weights arrive as S concurrent streams from places far apart
// in memory; the remainder runs one at a time. fn(std::integral_constant<int, NP>, const int64_t* units), NP = S or 1.
template <int S, typename Fn>
void walk_streams(int64_t u0, int64_t u1, Fn fn) {
  const int64_t L = (u1 - u0) / S;  // units per stream
  for (int64_t t = 0; t < L; ++t) {
    int64_t units[S];
    for (int i = 0; i < S; ++i) units[i] = u0 + t + i * L;
    fn(std::integral_constant<int, S>{}, static_cast<const int64_t*>(units));
  }
  for (int64_t u = u0 + S * L; u < u1; ++u) fn(std::integral_constant<int, 1>{}, static_cast<const int64_t*>(&u));
}

#if defined(__AVX512F__) && defined(__AVX512BW__)
// 16 activations (count n <= 16, the rest read as zero) as float32 lanes.
inline __m512 load16(const float* x, int n) { return _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << n) - 1), x); }
inline __m512 load16(const at::BFloat16* x, int n) {
  const __m256i h = _mm256_maskz_loadu_epi16(static_cast<__mmask16>((1u << n) - 1), x);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
#endif

}  // namespace
