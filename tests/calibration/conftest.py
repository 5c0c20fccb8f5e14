"""Fixtures of the calibration tests: tiny random Llama and Qwen2 models, calibration ids, a stub tokenizer."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from calib_helpers import tiny_qwen2
from helpers import tiny_llama

FAMILIES = {"llama": lambda layers=2: tiny_llama(layers=layers).eval(), "qwen2": tiny_qwen2}


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Tiny models on a shared 2-core machine: one thread avoids OpenMP barrier waits (50 ms per tiny op)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(params=list(FAMILIES), ids=list(FAMILIES))
def family(request):
    """Builder of a tiny model of each family: family(layers=...)."""
    return FAMILIES[request.param]


@pytest.fixture
def calib_ids() -> torch.Tensor:
    return torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(1))
