// Python bindings of the decode GEMMs, called straight from the kernel paths' bound forwards
// (cbq_hf/kernels/cpu/paths.py). The same functions are registered as the torch ops cbq_hf_cpu::* (what
// torch.compile traces); a call through the op dispatcher costs ~5 us more for these 6-8 arguments, as much as a
// whole decode GEMV of a small projection (SmolLM2's 576 x 192 k_proj runs in ~12 us).
#include <torch/extension.h>

namespace cbq_hf_cpu_direct {
at::Tensor gemm_float(const at::Tensor& x, const at::Tensor& wpack, const std::optional<at::Tensor>& bias, int64_t slot,
                      int64_t N, int64_t glen, int64_t mode);
at::Tensor gemm_int_act(const at::Tensor& x, double clip, int64_t act_bits, const at::Tensor& wpack,
                        const std::optional<at::Tensor>& bias, int64_t slot, int64_t N, int64_t glen);
at::Tensor gemm_lut2(const at::Tensor& x, const at::Tensor& wlut, const std::optional<at::Tensor>& bias, int64_t N,
                     int64_t glen, int64_t streams);
}  // namespace cbq_hf_cpu_direct

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "cbq_hf CPU decode GEMMs without the op dispatcher (the torch ops cbq_hf_cpu::* are the same functions)";
  m.def("gemm_float", &cbq_hf_cpu_direct::gemm_float);
  m.def("gemm_int_act", &cbq_hf_cpu_direct::gemm_int_act);
  m.def("gemm_lut2", &cbq_hf_cpu_direct::gemm_lut2);
}
