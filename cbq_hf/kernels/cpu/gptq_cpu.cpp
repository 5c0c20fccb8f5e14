// GPTQ's column loop (cbq_hf/calibration/gptq.py, `gptq_quantize`) inside one lazy batch of B columns, on a fixed
// grid: each column is quantized from its value after the error feedback of the columns before it, and its scaled
// error is fed into the columns after it,
//   q        = clamp(round(w[n, i] / scale[n, i]) + zero[n, i], 0, qmax)      (round half to even, as torch.round)
//   e        = (w[n, i] - (q - zero[n, i]) * step[n, i]) / hinv[i, i]
//   w[n, j] -= e * hinv[i, j]   for j > i
// Rows are independent (the loop couples columns only), so the rows run in parallel and each row's batch stays in
// cache; the Python loop of the same arithmetic made ~10 small torch ops per column. Each value is computed with the
// same float32 operations in the same order as the torch ops (no fused multiply-add: -ffp-contract=off), so the
// results are bit-identical.
#include <torch/library.h>
#include <ATen/core/Tensor.h>
#include <ATen/Functions.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <tuple>

namespace {

void check_block(const at::Tensor& t, const char* name, int64_t N, int64_t B) {
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous() && t.scalar_type() == at::kFloat, name,
              " must be a contiguous float32 CPU tensor");
  TORCH_CHECK(t.dim() == 2 && t.size(0) == N && t.size(1) == B, name, " must be [", N, ", ", B, "], got ", t.sizes());
}

// w [N, B]: the batch's columns after the feedback of the batches before it; hinv [B, B]: the batch's block of the
// upper Cholesky factor of H^-1; scale, zero, step [N, B]: the grid of each column. Returns (w_start: each column as
// it was when quantized, codes, err: the scaled errors that the caller feeds into the later batches), all [N, B].
std::tuple<at::Tensor, at::Tensor, at::Tensor> gptq_columns(const at::Tensor& w, const at::Tensor& hinv,
                                                            const at::Tensor& scale, const at::Tensor& zero,
                                                            const at::Tensor& step, int64_t qmax) {
  TORCH_CHECK(w.dim() == 2, "w must be [N, B]");
  const int64_t N = w.size(0), B = w.size(1);
  check_block(w, "w", N, B);
  check_block(hinv, "hinv", B, B);
  check_block(scale, "scale", N, B);
  check_block(zero, "zero", N, B);
  check_block(step, "step", N, B);
  at::Tensor work = w.clone();
  at::Tensor w_start = at::empty_like(w), codes = at::empty_like(w), err = at::empty_like(w);
  float* wp = work.data_ptr<float>();
  const float* hp = hinv.data_ptr<float>();
  const float* sp = scale.data_ptr<float>();
  const float* zp = zero.data_ptr<float>();
  const float* tp = step.data_ptr<float>();
  float* ws = w_start.data_ptr<float>();
  float* cp = codes.data_ptr<float>();
  float* ep = err.data_ptr<float>();
  const float qm = static_cast<float>(qmax);
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      float* row = wp + n * B;
      for (int64_t i = 0; i < B; ++i) {
        const int64_t at_ = n * B + i;
        const float wc = row[i];
        const float q = std::min(std::max(std::nearbyint(wc / sp[at_]) + zp[at_], 0.0f), qm);
        ws[at_] = wc;
        cp[at_] = q;
        const float e = (wc - (q - zp[at_]) * tp[at_]) / hp[i * B + i];
        ep[at_] = e;
        const float* hr = hp + i * B;
#pragma omp simd
        for (int64_t j = i + 1; j < B; ++j) row[j] -= e * hr[j];
      }
    }
  });
  return {w_start, codes, err};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(cbq_hf_cpu, m) {
  m.def("gptq_columns(Tensor w, Tensor hinv, Tensor scale, Tensor zero, Tensor step, int qmax) -> "
        "(Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(cbq_hf_cpu, CPU, m) { m.impl("gptq_columns", &gptq_columns); }
