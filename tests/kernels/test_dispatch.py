import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from kernel_helpers import fp32_matmul_in_bf16, make_linear

import cbq_hf.kernels
from cbq_hf.kernels import dispatch
from cbq_hf.kernels.cpu import build, paths

needs_kernels = pytest.mark.skipif(build.select_variant() is None, reason="CPU without AVX2/FMA")


@pytest.fixture(params=[False, True], ids=["no-amx", "amx"])
def amx(request, monkeypatch):
    """Run a test as on a CPU without AMX, and (where this one has it) with AMX."""
    if request.param and not paths.amx_available():
        pytest.skip("no AMX-INT8 tile units here (or Linux did not grant them)")
    monkeypatch.setitem(paths._capabilities, "amx", request.param)
    return request.param


@needs_kernels
@pytest.mark.parametrize(
    ("bits", "act_bits", "m", "expected"),
    [
        (4, None, 1, "cpu_packed"),
        (4, None, paths.DEQUANT_MIN_M, "cpu_dequant"),
        (4, 8, 1, "cpu_int"),
        (4, 8, paths.AMX_MIN_M - 1, "cpu_int"),
        (4, 8, paths.AMX_MIN_M, "cpu_int"),
        (4, 8, paths.DEQUANT_MIN_M_INT[4] - 1, "cpu_int"),
        (4, 8, paths.DEQUANT_MIN_M_INT[4], "cpu_dequant"),
        (2, 8, paths.DEQUANT_MIN_M_INT[2] - 1, "cpu_int"),
        (2, 8, paths.DEQUANT_MIN_M_INT[2], "cpu_dequant"),
    ],
)
def test_automatic_choice_by_rows(bits, act_bits, m, expected, amx):
    """Where AMX is available, activation-quantized formats take cpu_amx from AMX_MIN_M rows on, and never the
    dequantize path."""
    if amx and act_bits is not None and m >= paths.AMX_MIN_M:
        expected = "cpu_amx"
    lin = make_linear(8, 64, bits, 32, act_bits=act_bits)
    lin(torch.randn(m, 64))
    assert lin.last_kernel == expected


@needs_kernels
@pytest.mark.parametrize("native", [True, False], ids=["bf16-matrix-units", "emulated-bf16"])
def test_bf16_inputs_switch_earlier_only_with_native_bf16_gemm(native, monkeypatch):
    """bf16 prefill moves to dequantize + bf16 GEMM from DEQUANT_MIN_M_BF16 rows where the CPU has bf16 matrix
    units; elsewhere bf16 inputs keep the float32 limits (and the fp32 GEMM). (Without AMX integer units: with them
    the activation-quantized formats take cpu_amx, see test_automatic_choice_by_rows.)"""
    monkeypatch.setitem(paths._capabilities, "bf16_native", native)
    monkeypatch.setitem(paths._capabilities, "amx", False)
    lin = make_linear(8, 64, 4, 32)
    m = paths.DEQUANT_MIN_M_BF16
    assert m < paths.DEQUANT_MIN_M
    lin(torch.randn(m, 64, dtype=torch.bfloat16))
    assert lin.last_kernel == ("cpu_dequant" if native else "cpu_packed")
    lin(torch.randn(m, 64))  # fp32 input: float32 limit either way
    assert lin.last_kernel == "cpu_packed"
    lin8 = make_linear(8, 64, 4, 32, act_bits=8)
    lin8(torch.randn(paths.DEQUANT_MIN_M_INT_BF16, 64, dtype=torch.bfloat16))
    assert lin8.last_kernel == ("cpu_dequant" if native else "cpu_int")


@pytest.mark.parametrize("name", ["reference", "cpu_packed"])
def test_forcing_a_kernel_by_context_and_by_set_kernel(name):
    if name != "reference" and build.select_variant() is None:
        pytest.skip("CPU without AVX2/FMA")
    lin = make_linear(8, 64, 4, 32)
    with dispatch.force_kernel(name):
        lin(torch.randn(2, 64))
    assert lin.last_kernel == name
    assert dispatch.kernel_choice() is None
    cbq_hf.kernels.set_kernel(name)
    try:
        lin(torch.randn(30, 64))
        assert lin.last_kernel == name
    finally:
        cbq_hf.kernels.set_kernel(None)


def test_changing_the_choice_takes_effect_on_the_next_forward():
    """The per-module memo of the selection must not outlive the choice: same module, same input shape."""
    lin = make_linear(8, 64, 4, 32)
    x = torch.randn(1, 64)
    lin(x)
    automatic = lin.last_kernel
    cbq_hf.kernels.set_kernel("reference")
    try:
        lin(x)
        assert lin.last_kernel == "reference"
    finally:
        cbq_hf.kernels.set_kernel(None)
    lin(x)
    assert lin.last_kernel == automatic


def test_forced_kernel_that_cannot_run_raises():
    lin = make_linear(8, 64, 4, 32, act_bits=None)
    with dispatch.force_kernel("cpu_int"), pytest.raises(RuntimeError, match="cannot run"):
        lin(torch.randn(2, 64))
    with pytest.raises(ValueError, match="not a kernel"):
        cbq_hf.kernels.set_kernel("no_such_kernel")
    assert dispatch.kernel_choice() is None


_ENV_CHILD = """
import os, torch
from kernel_helpers import make_linear
from cbq_hf.kernels import dispatch
print(dispatch.kernel_choice())
os.environ["CBQ_KERNEL"] = "cpu_int"  # set after import: never read (cpu_int cannot run this layer)
lin = make_linear(8, 64, 4, 32)
try:
    lin(torch.randn(1, 64))
    print(lin.last_kernel)
except ValueError as e:
    print("ValueError", e)
"""


@pytest.mark.parametrize(
    ("value", "choice", "ran"),
    [("reference", "reference", "reference"), ("", "None", None), ("no_such", "no_such", "ValueError")],
    ids=["reference", "empty", "unknown"],
)
def test_environment_gives_the_initial_choice_read_once(value, choice, ran):
    """CBQ_KERNEL is read at import (a subprocess started with it); an unknown name fails at the first forward."""
    env = {**os.environ, "CBQ_KERNEL": value, "PYTHONPATH": str(Path(__file__).parent)}
    out = subprocess.run(
        [sys.executable, "-c", _ENV_CHILD], check=True, capture_output=True, text=True, env=env
    ).stdout.splitlines()
    assert out[0] == choice
    if ran is None:
        assert out[1] != "reference" and not out[1].startswith("ValueError")
    else:
        assert out[1].startswith(ran)
    if ran == "ValueError":
        assert "CBQ_KERNEL" in out[1]


def test_no_compiler_falls_back_to_reference_with_one_warning(monkeypatch, caplog):
    def broken(variant, bindings):
        raise RuntimeError("no C++ compiler found")

    monkeypatch.setattr(build, "_state", {})
    monkeypatch.setattr(build, "_build", broken)
    lin = make_linear(8, 64, 4, 32)
    with caplog.at_level(logging.WARNING, logger="cbq_hf.kernels.cpu.build"):
        for _ in range(3):
            y = lin(torch.randn(2, 64))
    assert lin.last_kernel == "reference"
    warnings = [r for r in caplog.records if "could not be built" in r.getMessage()]
    assert len(warnings) == 1 and "no C++ compiler" in warnings[0].getMessage()
    assert y.shape == (2, 8)


def test_import_does_not_build_or_import_a_compiler():
    code = (
        "import sys, cbq_hf, cbq_hf.kernels.dispatch as d; from cbq_hf.kernels.cpu import build; "
        "assert 'torch.utils.cpp_extension' not in sys.modules, 'cpp_extension imported'; "
        "assert build._state == {}, 'built at import'; assert 'cpu_packed' in d.available_kernels(); "
        "assert 'gpu_packed' in d.available_kernels(); assert 'triton' not in sys.modules, 'triton imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "CBQ_KERNEL": ""})


@needs_kernels
def test_remembered_choice_follows_rows_forcing_and_reloaded_weights():
    """The per-module memo of the selection must not outlive what it depends on: the row count, a forced kernel,
    and the weights (load_state_dict copies in place, which must also drop the repacked panels)."""
    lin = make_linear(8, 64, 4, 32)
    x = torch.randn(1, 64)
    lin(x)
    assert lin.last_kernel == "cpu_packed"
    lin(torch.randn(paths.DEQUANT_MIN_M, 64))
    assert lin.last_kernel == "cpu_dequant"
    with dispatch.force_kernel("reference"):
        lin(x)
    assert lin.last_kernel == "reference"
    lin(x)
    assert lin.last_kernel == "cpu_packed"

    other = make_linear(8, 64, 4, 32)
    lin.load_state_dict(other.state_dict())
    torch.testing.assert_close(lin(x), other(x), rtol=0, atol=0)


@pytest.fixture
def fp32_matmul_bf16():
    """torch's float32 matmuls on the CPU in bf16 for the test, restored after it."""
    with fp32_matmul_in_bf16():
        yield


@needs_kernels
@pytest.mark.parametrize("native", [True, False], ids=["bf16-matrix-units", "emulated-bf16"])
def test_fp32_inputs_follow_torchs_bf16_matmul_setting(native, monkeypatch, fp32_matmul_bf16):
    """Under the bf16 float32-matmul setting, float32 inputs switch to dequantize + bf16 GEMM at the bf16 crossover,
    as bf16 inputs do; without bf16 matrix units the setting changes nothing here."""
    monkeypatch.setitem(paths._capabilities, "bf16_native", native)
    monkeypatch.setitem(paths._capabilities, "amx", False)
    assert paths.fp32_matmul_in_bf16()
    lin = make_linear(8, 64, 4, 32)
    lin(torch.randn(paths.DEQUANT_MIN_M_BF16, 64))
    assert lin.last_kernel == ("cpu_dequant" if native else "cpu_packed")


def test_fp32_matmul_setting_is_read_from_torch(fp32_matmul_bf16):
    assert paths.fp32_matmul_in_bf16()
    torch.backends.mkldnn.matmul.fp32_precision = "ieee"  # what set_float32_matmul_precision("highest") sets
    assert not paths.fp32_matmul_in_bf16()
