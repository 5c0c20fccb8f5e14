"""The Triton CUDA paths against the reference.

On a machine with CUDA they run compiled on the GPU. Without one (CI) the very same kernels run on CPU tensors in
Triton's interpreter (``TRITON_INTERPRET=1``, set by tests/conftest.py before anything imports Triton), forced by
name: that checks their indexing, unpacking, masking and arithmetic, not their speed. Tests that need the real
automatic choice on CUDA skip without a GPU.
"""

import logging
import sys

import pytest
import torch

pytest.importorskip("triton", reason="the GPU paths' tests need Triton (pip install triton, in the test extra)")

from kernel_helpers import assert_close, magnitude, make_linear

from cbq_hf.kernels import reference
from cbq_hf.kernels.dispatch import force_kernel
from cbq_hf.kernels.gpu import paths

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
needs_cuda = pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")

from cbq_hf.kernels.gpu import triton_uniform  # noqa: E402

if not ON_GPU and not paths.interpreting():
    pytest.skip("no GPU and TRITON_INTERPRET is not set (tests/conftest.py sets it)", allow_module_level=True)


@pytest.fixture(autouse=True)
def _loaded():
    paths._state["mod"] = triton_uniform


SHAPES = [(130, 200, 64), (3, 72, -1), (64, 576, 48), (24, 1100, 32), (9, 100, 37)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _ids(s):
    return f"n{s[0]}k{s[1]}g{s[2]}"


def _linear(*args, **kwargs):
    return make_linear(*args, **kwargs).to(DEVICE)


def _run(lin, x, kernel):
    with torch.no_grad(), force_kernel(kernel):
        y = lin(x)
    assert lin.last_kernel == kernel
    return y


def _check(lin, x, kernels):
    ref = reference.linear(lin, x)
    for kernel in kernels:
        y = _run(lin, x, kernel)
        assert y.dtype == x.dtype and y.shape == ref.shape and y.device == x.device
        assert_close(
            y.cpu(),
            ref.cpu(),
            magnitude(lin.cpu(), x.cpu()),
            torch.float32 if x.dtype == torch.float32 else torch.bfloat16,
        )
        lin.to(DEVICE)


# (rows, dtype): m=3 is a [2, 3] batch of sequences; every dtype and both decode and prefill-sized tiles are covered
# on every shape without the full product (the interpreter runs ~0.1-0.5 s per call).
_M_DTYPE = [(1, "fp32"), (3, "bf16"), (40, "fp32"), (1, "fp16")]


@pytest.mark.parametrize("m,dtype", _M_DTYPE, ids=lambda v: f"m{v}" if isinstance(v, int) else v)
@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
@pytest.mark.parametrize("bits", [2, 3, 4, 8], ids=lambda b: f"w{b}")
def test_weight_only_paths_match_reference(bits, shape, m, dtype):
    n, k, g = shape
    lin = _linear(n, k, bits, g, sym=(bits + n) % 2 == 0, bias=m != 3)
    x = (torch.randn(2, m, k) if m == 3 else torch.randn(m, k)).to(DTYPES[dtype]).to(DEVICE)
    _check(lin, x, ["gpu_packed", "gpu_dequant"])


@pytest.mark.parametrize("m,dtype", [(1, "fp32"), (17, "bf16")], ids=lambda v: f"m{v}" if isinstance(v, int) else v)
@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
@pytest.mark.parametrize("bits", [2, 3, 4, 8], ids=lambda b: f"w{b}")
@pytest.mark.parametrize("act_bits", [8, 4], ids=lambda a: f"a{a}")
def test_activation_quantized_paths_match_reference(act_bits, bits, shape, m, dtype):
    n, k, g = shape
    lin = _linear(n, k, bits, g, act_bits=act_bits, sym=bits % 2 == 0)
    x = torch.randn(m, k).to(DTYPES[dtype]).to(DEVICE)
    x[0, 1] = 40.0  # an outlier: its token's step is large, the other codes small
    integer = paths.supports_int(lin, x)
    # the integer path needs 2/4-bit slots and groups that are a multiple of 32 long (or one group per row)
    assert integer == (bits != 8 and (g == -1 or g % 32 == 0))
    _check(lin, x, ["gpu_packed", "gpu_dequant"] + (["gpu_int"] if integer else []))


def test_integer_path_refuses_groups_it_cannot_tile():
    lin = _linear(9, 100, 4, 37, act_bits=8)
    x = torch.randn(2, 100, device=DEVICE)
    with pytest.raises(RuntimeError, match="gpu_int.*cannot run"):
        _run(lin, x, "gpu_int")


@pytest.mark.parametrize("group", [64, 37, 100, -1], ids=lambda g: f"g{g}")
@pytest.mark.parametrize("bits", [2, 3, 4, 8], ids=lambda b: f"w{b}")
def test_dequantize_equals_the_reference_weight(bits, group):
    lin = make_linear(70, 300, bits, group)
    out = torch.empty(70, 300, device=DEVICE)
    spec = lin.fmt.spec
    triton_uniform.dequantize(
        lin.qweight.to(DEVICE), lin.scales.to(DEVICE), lin.zeros.to(DEVICE), spec.slot_bits, spec.group_len(300), out
    )
    assert torch.equal(out.cpu(), lin.dequantized_weight())


def test_cpu_tensors_never_take_a_gpu_path_automatically(monkeypatch):
    lin = make_linear(16, 64, 4, 32)
    with torch.no_grad():
        lin(torch.randn(1, 64))
    assert not lin.last_kernel.startswith("gpu_")


def test_missing_triton_means_reference_with_one_warning(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "cbq_hf.kernels.gpu.triton_uniform", None)  # import fails
    paths._state.clear()
    lin = _linear(8, 64, 4, 32)
    x = torch.randn(2, 64, device=DEVICE)
    with caplog.at_level(logging.WARNING, logger="cbq_hf.kernels.gpu.paths"):
        assert not paths.supports_packed(lin, x)
        assert not paths.supports_packed(lin, x)
    warnings = [r for r in caplog.records if "Triton is not available" in r.getMessage()]
    assert len(warnings) == 1 and "pip install triton" in warnings[0].getMessage()


@needs_cuda
@pytest.mark.parametrize("act_bits", [None, 8], ids=lambda a: f"a{a}")
def test_cuda_calls_choose_the_gpu_paths(act_bits):
    lin = _linear(64, 256, 4, 64, act_bits=act_bits)
    with torch.no_grad():
        lin(torch.randn(1, 256, device="cuda"))
        assert lin.last_kernel == ("gpu_int" if act_bits else "gpu_packed")
        lin(torch.randn(paths.DEQUANT_MIN_M, 256, device="cuda"))
        assert lin.last_kernel == "gpu_dequant"


@pytest.mark.parametrize("act_bits,kernel", [(None, "gpu_packed"), (8, "gpu_int")])
def test_quantized_model_runs_through_the_gpu_path(llama_dir, act_bits, kernel):
    """A whole RTN-quantized tiny Llama through one GPU path: same logits as the reference path, and (weight-only)
    the same greedy generate() tokens; on CUDA after `.to("cuda")`, else in the interpreter on CPU."""
    from transformers import AutoModelForCausalLM

    from cbq_hf import CBQConfig, CBQLinear

    cfg = CBQConfig(method="rtn", bits=4, group_size=32, act_bits=act_bits)
    model = AutoModelForCausalLM.from_pretrained(llama_dir, quantization_config=cfg).to(DEVICE).eval()
    ids = torch.randint(0, 128, (2, 9), device=DEVICE)
    with torch.no_grad():
        with force_kernel("reference"):
            ref = model(ids).logits
            ref_gen = model.generate(ids[:1], max_new_tokens=4, do_sample=False)
        with force_kernel(kernel):
            out = model(ids).logits
            gen = model.generate(ids[:1], max_new_tokens=4, do_sample=False)
    linears = [m for m in model.modules() if isinstance(m, CBQLinear)]
    assert linears and all(m.last_kernel == kernel for m in linears)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    if act_bits is None:  # run-time activation codes may flip on a rounding-order difference (docs/lobcq.md)
        assert torch.equal(gen, ref_gen)
