// Helpers shared by the CPU kernel sources (cbq_cpu.cpp, lut2_cpu.cpp, lobcq_cpu.cpp): argument checks, loading 16
// activations as float32 lanes, reused per-thread scratch buffers, the walk of weight units in concurrent streams, and
// the (optionally streaming) stores of the dequantization workspaces.
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

// Dequantization workspaces (cbq_cpu.cpp, lobcq_cpu.cpp) from this size on are written with non-temporal stores
// (store64): a large workspace is written once and read once by the GEMM after it, and cached stores first read
// every line in. A small one is better left in cache for that GEMM: 3.5 MB measured faster cached, 8.4 MB and up
// faster streamed (docs/benchmarks_kernels.md, "Dequantization").
constexpr int64_t kStreamMinBytes = 8 << 20;

// Whether a dequantization workspace is written with streaming stores (kStreamMinBytes). A thread that streamed
// must end with _mm_sfence(): those stores are weakly ordered, and the GEMM reading the workspace may run elsewhere.
inline bool streamed(const at::Tensor& out) { return out.numel() * out.element_size() >= kStreamMinBytes; }

#if defined(__AVX512F__) && defined(__AVX512BW__)
// Stores of 64 / 32 bytes; with STREAM, non-temporal where the address allows (see kStreamMinBytes).
template <bool STREAM>
inline void store64(void* o, __m512i v) {
  if constexpr (STREAM) {
    if ((reinterpret_cast<uintptr_t>(o) & 63) == 0) return _mm512_stream_si512(reinterpret_cast<__m512i*>(o), v);
  }
  _mm512_storeu_si512(o, v);
}

template <bool STREAM>
inline void store32(void* o, __m256i v) {
  if constexpr (STREAM) {
    if ((reinterpret_cast<uintptr_t>(o) & 31) == 0) return _mm256_stream_si256(reinterpret_cast<__m256i*>(o), v);
  }
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(o), v);
}

// 16 floats rounded to bfloat16 (nearest even; finite values and infinities as c10::BFloat16 rounds them), as
// 16-bit lanes.
inline __m256i bf16_lanes(__m512 v) {
  const __m512i b = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
  const __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(b, _mm512_set1_epi32(0x7FFF)), odd), 16);
  return _mm512_cvtepi32_epi16(r);
}

// 16 activations (count n <= 16, the rest read as zero) as float32 lanes.
inline __m512 load16(const float* x, int n) { return _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << n) - 1), x); }
inline __m512 load16(const at::BFloat16* x, int n) {
  const __m256i h = _mm256_maskz_loadu_epi16(static_cast<__mmask16>((1u << n) - 1), x);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
#endif

}  // namespace
