"""Shared fixtures: tiny randomly initialised models built from a config (fast, no downloads)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import tiny_llama, tiny_model_dir

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Without a GPU, Triton kernels (the CUDA paths) run on CPU tensors in Triton's interpreter; it must be chosen
# before anything imports triton (its own jit helpers are decorated at import). tests/kernels/test_gpu.py uses it.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def llama_dir(tmp_path) -> str:
    """Folder with a saved tiny random Llama (fp32)."""
    return tiny_model_dir(tmp_path / "fp", tiny_llama())
