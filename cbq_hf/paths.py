"""Where cbq_hf finds shared data and keeps its caches (overridable by environment variables)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Cache root: $CBQ_HF_CACHE, else ~/.cache/cbq_hf."""
    return Path(os.environ.get("CBQ_HF_CACHE") or Path.home() / ".cache" / "cbq_hf")


def shared_data_dir() -> Path | None:
    """The shared data folder: $CBQ_HF_DATA, else ../shared/data beside the current folder or the source tree."""
    env = os.environ.get("CBQ_HF_DATA")
    if env:
        return Path(env)
    here = Path(__file__).resolve().parent.parent
    for base in (Path.cwd(), here):
        for cand in (base / "shared" / "data", base.parent / "shared" / "data"):
            if cand.is_dir():
                return cand
    return None


def wikitext2_file(split: str) -> Path | None:
    """Local WikiText-2 file: split "valid" (calibration) or "test" (evaluation); None when absent."""
    root = shared_data_dir()
    if root is None:
        return None
    name = {"valid": "wiki.valid.tokens", "test": "wiki.test.raw"}[split]
    p = root / "wikitext-2" / name
    return p if p.is_file() else None
