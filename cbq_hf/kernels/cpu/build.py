"""Lazy build of the C++ CPU kernels (`cbq_cpu.cpp`) into the torch ops ``torch.ops.cbq_hf_cpu.*``.

Nothing here runs at ``import cbq_hf``: the first `load()` picks an instruction-set variant from the CPU flags,
compiles it with `torch.utils.cpp_extension.load` (ninja + the system C++ compiler) into the cbq_hf cache
directory (reused by later processes), and loads it. When that is impossible (no compiler, no ninja, a CPU
without AVX2) it logs ONE warning and `load()` returns None from then on, so dispatch falls back to the reference.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import sysconfig
import threading
import time
from pathlib import Path

import torch

from ...locations import cache_dir

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cbq_cpu.cpp")
#: Every source of the extension: the uniform-format kernels, the 2-bit table-lookup kernel, the AMX integer GEMM, the
#: LO-BCQ kernels, the calibration's LoRA-Rounding kernels (ops in the same namespace), and the Python bindings of the
#: decode GEMMs (`direct()`).
BINDINGS = Path(__file__).with_name("bindings.cpp")
SOURCES = (
    SOURCE,
    Path(__file__).with_name("lut2_cpu.cpp"),
    Path(__file__).with_name("amx_cpu.cpp"),
    Path(__file__).with_name("lobcq_cpu.cpp"),
    Path(__file__).with_name("rounding_cpu.cpp"),
    Path(__file__).with_name("gptq_cpu.cpp"),
    BINDINGS,
)
#: Headers they include (part of the build's cache key: a changed header must rebuild).
HEADERS = (Path(__file__).with_name("cpu_common.h"), Path(__file__).with_name("panel_layout.h"))

#: -fno-trapping-math lets GCC if-convert (and so vectorize) loops with selects around float arithmetic (the rounding
#: regulariser's exp/log in rounding_cpu.cpp); it changes no value: nothing here reads the floating-point flags.
_COMMON_FLAGS = ["-O3", "-fopenmp", "-ffp-contract=off", "-fno-trapping-math", "-DNDEBUG"]
#: Compiler flags per variant, best first. All use the same source; `dot_u8s8` picks VNNI when the flags allow it.
VARIANT_FLAGS: dict[str, list[str]] = {
    "avx512vnni": ["-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni"],
    "avxvnni": ["-mavx2", "-mfma", "-mf16c", "-mavxvnni"],
    "avx2": ["-mavx2", "-mfma", "-mf16c"],
}
_REQUIRED_FLAGS: dict[str, set[str]] = {
    "avx512vnni": {"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni"},
    "avxvnni": {"avx2", "fma", "f16c", "avx_vnni"},
    "avx2": {"avx2", "fma", "f16c"},
}

_lock = threading.Lock()
_state: dict[str, object] = {}  # "ops": the loaded op namespace, or "error": why it could not be built


def _cpuinfo_field(name: str) -> str:
    """The value of the first `name` line of /proc/cpuinfo (Linux), or "" where there is none."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""
    for line in text.splitlines():
        if line.split(":", 1)[0].strip() == name:
            return line.split(":", 1)[1].strip()
    return ""


def cpu_model() -> str:
    """The CPU's model name ("AMD EPYC", "Intel(R) Xeon(R) Platinum 8480C", ...; empty where /proc/cpuinfo has
    none)."""
    return _cpuinfo_field("model name")


def bf16_matrix_units() -> str:
    """Which bfloat16 matrix units this CPU has, by name: "AMX", "AVX512-BF16" or "none" (Linux /proc/cpuinfo)."""
    flags = cpu_flags()
    return "AMX" if "amx_bf16" in flags else "AVX512-BF16" if "avx512_bf16" in flags else "none"


def cpu_flags() -> set[str]:
    """Instruction-set flags of this CPU (Linux /proc/cpuinfo; empty elsewhere)."""
    return set(_cpuinfo_field("flags").split())


def cpu_vendor() -> str:
    """The CPU's vendor id ("GenuineIntel", "AuthenticAMD", ...; empty where /proc/cpuinfo has none)."""
    return _cpuinfo_field("vendor_id")


VARIANT_ENV = "CBQ_HF_CPU_VARIANT"
STREAMS_ENV = "CBQ_HF_CPU_STREAMS"
#: Panels each kernel thread streams at once, by CPU vendor (4 elsewhere): more concurrent streams draw more memory
#: bandwidth from one core until the core's prefetchers saturate (docs/benchmarks_kernels.md, "Weight streams").
VENDOR_STREAMS = {"AuthenticAMD": 2}
STREAM_CHOICES = (1, 2, 4)


def weight_streams(vendor: str | None = None) -> int:
    """Weight streams per kernel thread for this CPU: ``CBQ_HF_CPU_STREAMS`` (1, 2 or 4) when set, else
    `VENDOR_STREAMS` of the vendor (default 4). Every count gives the same numbers, bit for bit; only the speed
    differs."""
    forced = os.environ.get(STREAMS_ENV, "").strip()
    if forced:
        if forced not in {str(c) for c in STREAM_CHOICES}:
            raise ValueError(
                f"{STREAMS_ENV}={forced!r} is not one of {list(STREAM_CHOICES)}; unset it to use this CPU's default."
            )
        return int(forced)
    return VENDOR_STREAMS.get(cpu_vendor() if vendor is None else vendor, 4)


def select_variant(flags: set[str] | None = None) -> str | None:
    """The best build variant this CPU runs, or None (not x86-64 or no AVX2/FMA).

    ``CBQ_HF_CPU_VARIANT=avx2|avxvnni|avx512vnni`` picks a lower variant instead (to compare them, or to step around
    a misbehaving wider build); one this CPU cannot run is refused with a ValueError.
    """
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    flags = cpu_flags() if flags is None else flags
    forced = os.environ.get(VARIANT_ENV, "").strip().lower()
    if forced:
        if forced not in _REQUIRED_FLAGS:
            raise ValueError(
                f"{VARIANT_ENV}={forced!r} is not one of {sorted(_REQUIRED_FLAGS)}; unset it to let "
                "cbq_hf pick the best variant for this CPU."
            )
        missing = _REQUIRED_FLAGS[forced] - flags
        if missing:
            raise ValueError(
                f"{VARIANT_ENV}={forced!r} needs CPU flags this CPU lacks ({', '.join(sorted(missing))}); "
                "choose a lower variant or unset it."
            )
        return forced
    for name, needed in _REQUIRED_FLAGS.items():
        if needed <= flags:
            return name
    return None


def python_headers_available() -> bool:
    """Whether this Python's C headers are installed (the bindings need them; the ops alone do not)."""
    return Path(sysconfig.get_paths()["include"], "Python.h").is_file()


def _sources(bindings: bool) -> tuple[Path, ...]:
    return SOURCES if bindings else tuple(src for src in SOURCES if src != BINDINGS)


def build_dir(variant: str, bindings: bool = True) -> Path:
    """Where a variant's build lives: keyed by torch version and a hash of the sources, headers, flags and the
    folder the sources are in (torch writes their absolute paths into the build file, so two checkouts sharing one
    build directory would each rebuild it for the other)."""
    digest = hashlib.sha256(
        b"".join(src.read_bytes() for src in _sources(bindings) + HEADERS)
        + " ".join(VARIANT_FLAGS[variant]).encode()
        + str(SOURCE.parent).encode()
    ).hexdigest()[:12]
    tv = torch.__version__.replace("+", "_")
    return cache_dir() / "kernels" / f"cpu-{variant}{'' if bindings else '-ops'}-torch{tv}-{digest}"


def _build(variant: str, bindings: bool):
    """Compile (or reuse) and load the extension; registers ``torch.ops.cbq_hf_cpu``. Returns the Python module of
    the bindings (bindings.cpp), or None when built without them (no Python headers: the ops alone, called through
    the dispatcher, ~5 us slower per call)."""
    from torch.utils import cpp_extension

    path = build_dir(variant, bindings)
    path.mkdir(parents=True, exist_ok=True)
    module = cpp_extension.load(
        name=f"cbq_hf_cpu_{variant}",
        sources=[str(src) for src in _sources(bindings)],
        extra_cflags=_COMMON_FLAGS + VARIANT_FLAGS[variant],
        extra_ldflags=["-fopenmp"],
        build_directory=str(path),
        is_python_module=bindings,
        verbose=False,
    )
    return module if bindings else None


def _register_fakes() -> None:
    """Shape functions so the ops trace under torch.compile / torch.export."""
    lib = "cbq_hf_cpu::"

    @torch.library.register_fake(lib + "gemm_float")
    def _(x, wpack, bias, slot, N, glen, mode=-1):
        return x.new_empty((*x.shape[:-1], N), dtype=torch.float32)

    @torch.library.register_fake(lib + "gemm_int_act")
    def _(x, clip, act_bits, wpack, bias, slot, N, glen):
        return x.new_empty((*x.shape[:-1], N), dtype=torch.float32)

    @torch.library.register_fake(lib + "repack")
    def _(qweight, scales, zeros, slot, K, glen):
        from .layout import panel_bytes

        return qweight.new_empty((-(-qweight.shape[0] // 8) * panel_bytes(K, glen, slot),))

    @torch.library.register_fake(lib + "quantize_act")
    def _(x, clip, act_bits):
        return x.new_empty(x.shape, dtype=torch.int8), x.new_empty((x.shape[0],), dtype=torch.float32)

    @torch.library.register_fake(lib + "dequantize_into")
    def _(qweight, scales, zeros, slot, glen, out):
        return None

    @torch.library.register_fake(lib + "gemm_lut2")
    def _(x, wlut, bias, N, glen, streams):
        return x.new_empty((*x.shape[:-1], N), dtype=torch.float32)

    @torch.library.register_fake(lib + "lut2_repack")
    def _(qweight, scales, zeros, K, glen):
        from .layout import lut2_bytes

        return qweight.new_empty((lut2_bytes(qweight.shape[0], K, glen),))

    @torch.library.register_fake(lib + "gemm_int_amx")
    def _(codes, steps, like, wpack, bias, slot, N, glen):
        return like.new_empty((*like.shape[:-1], N), dtype=torch.float32)

    @torch.library.register_fake(lib + "lobcq_gemm")
    def _(x, qweight, selectors, scales, tensor_scale, codebooks, e4m3, bias, block_len, array_len, sel_bits):
        return x.new_empty((*x.shape[:-1], qweight.shape[0]), dtype=torch.float32)

    @torch.library.register_fake(lib + "lobcq_encode_act")
    def _(x, lut_values, lut_index, codebooks, e4m3, block_len, array_len, cmax):
        return torch.empty_like(x)

    @torch.library.register_fake(lib + "lobcq_dequantize_into")
    def _(qweight, selectors, scales, tensor_scale, codebooks, e4m3, block_len, array_len, sel_bits, out):
        return None


def load():
    """The loaded op namespace ``torch.ops.cbq_hf_cpu``, building it on first call; None if it cannot be built."""
    if "ops" in _state:
        return _state["ops"]
    if "error" in _state:
        return None
    with _lock:
        if "ops" in _state or "error" in _state:
            return _state.get("ops")
        variant = select_variant()
        streams = weight_streams()
        try:
            if variant is None:
                raise RuntimeError(f"this CPU ({platform.machine()}) has no AVX2/FMA support")
            bindings = python_headers_available()
            if not bindings:
                logger.info(
                    "cbq_hf: no Python headers (Python.h); building the CPU kernels without their direct bindings"
                )
            direct_module = _build(variant, bindings)
            _register_fakes()
        except Exception as exc:
            _state["error"] = f"{type(exc).__name__}: {exc}".strip()
            logger.warning(
                "cbq_hf: the packed CPU kernels could not be built (%s); CBQLinear falls back to the slow pure "
                "PyTorch reference path. Install a C++ compiler and `pip install ninja` to enable them.",
                str(_state["error"]).splitlines()[0][:300],
            )
            return None
        _state["ops"] = torch.ops.cbq_hf_cpu
        _state["direct"] = direct_module
        _state["variant"] = variant
        torch.ops.cbq_hf_cpu.set_streams(streams)
        logger.info(
            "cbq_hf: loaded CPU kernels (%s, %d weight streams) from %s",
            variant,
            streams,
            build_dir(variant, direct_module is not None),
        )
        return _state["ops"]


def direct():
    """The decode GEMMs ``gemm_float``, ``gemm_int_act`` and ``gemm_lut2`` as plain Python bindings (same functions
    and arguments as the ops, without the op dispatcher's ~5 us per call; bindings.cpp), or None where `load()` is.
    Eager code only: torch.compile traces the ops (see `paths.eager_or_op`)."""
    return _state.get("direct") if load() is not None else None


#: ``mode`` argument of ``gemm_float``: 0 = convert the codes (vcvtdq2ps), -1 = reinterpret them as denormal floats
#: when the activations' range allows it (else convert), 2 = fixed point: activations as 24- or 32-bit integers per
#: group on the integer dot-product units (AVX-512 VNNI builds only; see the kFixed note in cbq_cpu.cpp).
FLOAT_MODES = {"convert": 0, "auto": -1, "fixed": 2}
#: Variants whose build has the fixed-point mode (elsewhere mode 2 runs as convert).
FIXED_VARIANTS = {"avx512vnni"}
#: Code widths for which those variants take the fixed-point mode without timing: it wins on weights streamed from
#: memory, which a small timed call (in L2, where the modes run about equally fast) cannot show.
FIXED_SLOTS = {4}
#: The same by CPU vendor: Intel cores take it for 2-bit codes too (docs/benchmarks_kernels.md, "Float modes").
VENDOR_FIXED_SLOTS = {"GenuineIntel": {2, 4}}
FLOAT_MODE_ENV = "CBQ_HF_CPU_FLOAT_MODE"


def _time_float_mode(ops, mode: int, slot: int, reps: int = 5) -> float:
    """Best-of-`reps` seconds of one 1 x 2048 x 512 ``gemm_float`` call in `mode` on `slot`-bit codes (groups of
    128 codes for 4 and 8 bits, 64 for 2, as our presets use)."""
    gen = torch.Generator().manual_seed(0)
    n, k, glen = 512, 2048, 64 if slot == 2 else 128
    qweight = torch.randint(0, 256, (n, k * slot // 8), dtype=torch.uint8, generator=gen)
    scales = torch.rand(n, k // glen, generator=gen).add_(0.5).half()
    zeros = torch.full((n, k // glen), 1 << (slot - 1), dtype=torch.uint8)
    wpack = ops.repack(qweight, scales, zeros, slot, k, glen)
    x = torch.randn(1, k, generator=gen)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        ops.gemm_float(x, wpack, None, slot, n, glen, mode)
        best = min(best, time.perf_counter() - t0)
    return best


def float_mode(slot: int = 4) -> int:
    """The ``mode`` to pass to ``gemm_float`` for `slot`-bit codes on this CPU, measured once per process and slot.

    Three ways to multiply packed codes by float activations: convert every code (vcvtdq2ps + FMA), reinterpret it
    as a denormal float (no conversion: ~1.3x faster where denormal operands run at full speed, as on AMD cores, but
    Intel cores take a microcode assist per denormal operand, ~100x slower), or (AVX-512 VNNI builds) fixed point on
    the integer dot-product units, which is taken for the code widths in VENDOR_FIXED_SLOTS / FIXED_SLOTS (see
    there). Between the first two the faster is picked by timing a
    small call in each (a few ms, once per slot). All give the reference's sums within fp32 rounding.
    ``CBQ_HF_CPU_FLOAT_MODE=convert|auto|fixed`` fixes the choice instead (fixed runs as convert where it is
    unavailable).
    """
    modes: dict[int, int] = _state.setdefault("float_mode", {})  # type: ignore[assignment]
    if slot in modes:
        return modes[slot]
    ops = load()
    forced = os.environ.get(FLOAT_MODE_ENV, "").strip().lower()
    if forced:
        if forced not in FLOAT_MODES:
            raise ValueError(
                f"{FLOAT_MODE_ENV}={forced!r} is not one of {sorted(FLOAT_MODES)}; unset it to let "
                "cbq_hf time the modes."
            )
        mode = FLOAT_MODES[forced]
    elif ops is None:
        mode = FLOAT_MODES["convert"]
    else:
        if loaded_variant() in FIXED_VARIANTS and slot in VENDOR_FIXED_SLOTS.get(cpu_vendor(), FIXED_SLOTS):
            best, times = "fixed", {}
        else:
            _time_float_mode(ops, 0, slot, reps=1)  # warm-up: first touch of the scratch buffers
            times = {name: _time_float_mode(ops, FLOAT_MODES[name], slot) for name in ("convert", "auto")}
            best = min(times, key=times.get)
        mode = FLOAT_MODES[best]
        logger.info(
            "cbq_hf: float kernel mode for %d-bit codes: %s (%s)",
            slot,
            best,
            ", ".join(f"{n} {1e3 * t:.3f} ms" for n, t in times.items()) or "measured offline",
        )
    modes[slot] = mode
    return mode


def loaded_variant() -> str | None:
    """The variant that was built and loaded, or None (not yet, or impossible)."""
    return _state.get("variant")  # type: ignore[return-value]


def build_error() -> str | None:
    """Why the build failed, or None."""
    return _state.get("error")  # type: ignore[return-value]
