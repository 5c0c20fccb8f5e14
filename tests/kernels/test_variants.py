"""Every build variant this CPU can run (not only the best one) passes the kernel tests.

The AVX-512 build accumulates two rows per 512-bit register while the AVX2/AVX-VNNI builds use 256-bit chains, so
a machine that picks the AVX-512 build would otherwise never test the code the AVX2-only machines run.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cbq_hf.kernels.cpu import build

HERE = Path(__file__).parent
_flags = build.cpu_flags()
_default = build.select_variant() if not os.environ.get(build.VARIANT_ENV) else None
_others = [v for v, need in build._REQUIRED_FLAGS.items() if need <= _flags and v != _default]


@pytest.mark.skipif(
    not _others, reason="this CPU runs only one build variant (tested by test_cpu.py and test_lobcq_cpu.py)"
)
@pytest.mark.parametrize("variant", _others or ["none"])
def test_lower_variant_passes_the_cpu_kernel_tests(variant):
    env = dict(os.environ, **{build.VARIANT_ENV: variant})
    check = subprocess.run(
        [sys.executable, "-c", "from cbq_hf.kernels.cpu import build; build.load(); print(build.loaded_variant())"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert check.returncode == 0 and check.stdout.split()[-1] == variant, check.stderr[-2000:]
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-x",
            "-p",
            "no:cacheprovider",
            str(HERE / "test_cpu.py"),
            str(HERE / "test_lobcq_cpu.py"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        cwd=HERE.parent.parent,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert " passed" in run.stdout and "skipped" not in run.stdout, run.stdout[-1000:]


def test_forcing_a_variant_this_cpu_cannot_run_is_refused(monkeypatch):
    monkeypatch.setenv(build.VARIANT_ENV, "avx512vnni")
    with pytest.raises(ValueError, match="needs CPU flags this CPU lacks"):
        build.select_variant({"avx2", "fma", "f16c"})
    monkeypatch.setenv(build.VARIANT_ENV, "sse2")
    with pytest.raises(ValueError, match="is not one of"):
        build.select_variant({"avx2", "fma", "f16c"})
    monkeypatch.setenv(build.VARIANT_ENV, "AVX2")
    assert build.select_variant({"avx2", "fma", "f16c", "avx512f"}) == "avx2"


def test_each_checkout_has_its_own_build_directory(monkeypatch, tmp_path):
    """The build directory depends on where the sources are: torch writes their absolute paths into the build file,
    so two checkouts sharing one directory would rebuild it for each other."""
    here = build.build_dir("avx2")
    assert build.build_dir("avx2") == here
    monkeypatch.setattr(build, "SOURCE", tmp_path / "cbq_cpu.cpp")
    assert build.build_dir("avx2") != here
