"""Where cbq_hf finds text and keeps its caches: file locations, not kernel routes (those are `kernels/*/paths.py`).

Calibration and evaluation text is found without any setting, first source that has it:

1. ``shared``: WikiText-2 in a ``shared/data/wikitext-2`` folder beside the working folder or the source tree
   (``wiki.valid.tokens`` for calibration, ``wiki.test.raw`` for evaluation), or under ``$CBQ_HF_DATA``;
2. ``datasets``: WikiText-2 (``Salesforce/wikitext``, ``wikitext-2-raw-v1``) downloaded once with `datasets` into
   the cache, when the Hugging Face Hub is reachable (never tried with ``HF_HUB_OFFLINE`` /
   ``HF_DATASETS_OFFLINE`` set; an unreachable Hub is detected in seconds, not by a hanging download);
3. ``shipped``: the sample texts in ``cbq_hf/texts/`` (Python documentation prose, PSF License; see its README):
   enough for a demo, not WikiText-2, so its perplexities compare only with each other.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

logger = logging.getLogger(__name__)

#: WikiText-2 file names per purpose, as in the shared data folder.
_SHARED_NAMES = {"calibration": "wiki.valid.tokens", "evaluation": "wiki.test.raw"}
#: `datasets` split and cached file name per purpose.
_DATASETS_SPLITS = {"calibration": ("validation", "wiki.valid.raw"), "evaluation": ("test", "wiki.test.raw")}
_SPLITS = {"valid": "calibration", "test": "evaluation"}
_OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
#: The folder holding the `cbq_hf` package (the repository root in a source checkout), searched for shared/data.
_SOURCE_TREE = Path(__file__).resolve().parent.parent
_TEXTS_DIR = Path(__file__).resolve().parent / "texts"


@dataclass(frozen=True)
class TextSource:
    """A text file and where it came from.

    Attributes:
        path: the UTF-8 file.
        origin: "shared", "datasets" or "shipped" (see the module docstring).
        description: what it is, in words a run prints ("WikiText-2 test (…/wiki.test.raw)").
    """

    path: Path
    origin: str
    description: str

    @property
    def is_wikitext2(self) -> bool:
        return self.origin in ("shared", "datasets")


def cache_dir() -> Path:
    """Cache root: $CBQ_HF_CACHE, else ~/.cache/cbq_hf."""
    return Path(os.environ.get("CBQ_HF_CACHE") or Path.home() / ".cache" / "cbq_hf")


def shared_data_dir() -> Path | None:
    """The shared data folder: $CBQ_HF_DATA, else shared/data beside the current folder or the source tree."""
    env = os.environ.get("CBQ_HF_DATA")
    if env:
        return Path(env)
    for base in (Path.cwd(), _SOURCE_TREE):
        for cand in (base / "shared" / "data", base.parent / "shared" / "data"):
            if cand.is_dir():
                return cand
    return None


def shipped_text(purpose: str) -> Path:
    """The sample text shipped with the package for `purpose` ("calibration" or "evaluation")."""
    _check_purpose(purpose)
    return _TEXTS_DIR / f"{purpose}.txt"


def wikitext2_file(split: str, download: bool = True) -> Path | None:
    """The full WikiText-2 file of `split` ("valid": calibration, "test": evaluation) from the shared folder or,
    when `download` and the Hub is reachable, from the `datasets` download cache; None when neither has it."""
    purpose = _SPLITS[split]
    source = _shared(purpose) or (_downloaded(purpose) if download else None)
    return source.path if source else None


def text_source(purpose: str) -> TextSource:
    """The text for `purpose` ("calibration" or "evaluation"), from the first source that has it (module
    docstring). Never raises for a missing network: the shipped text is the last resort."""
    _check_purpose(purpose)
    source = _shared(purpose) or _downloaded(purpose)
    if source is not None:
        return source
    path = shipped_text(purpose)
    return TextSource(
        path,
        "shipped",
        f"the {purpose} sample text shipped with cbq_hf ({path.name}, Python docs prose; not WikiText-2)",
    )


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face Hub can be reached: False at once in offline mode, else a TCP connection to the
    Hub's host (``HF_ENDPOINT`` or huggingface.co) within `timeout` seconds."""
    if any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on") for v in _OFFLINE_VARS):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co").hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def _check_purpose(purpose: str) -> None:
    if purpose not in _SHARED_NAMES:
        raise ValueError(f"text purpose must be 'calibration' or 'evaluation', got {purpose!r}")


def _shared(purpose: str) -> TextSource | None:
    root = shared_data_dir()
    path = root / "wikitext-2" / _SHARED_NAMES[purpose] if root is not None else None
    if path is None or not path.is_file():
        return None
    split = "validation" if purpose == "calibration" else "test"
    return TextSource(path, "shared", f"WikiText-2 {split} ({path})")


def _downloaded(purpose: str) -> TextSource | None:
    """WikiText-2 via `datasets`, written once to the cache as one text file; None when the Hub is unreachable or
    the download fails (logged)."""
    split, name = _DATASETS_SPLITS[purpose]
    path = cache_dir() / "wikitext-2" / name
    description = f"WikiText-2 {split} (downloaded with datasets, cached at {path})"
    if path.is_file():
        return TextSource(path, "datasets", description)
    if not hub_reachable():
        return None
    try:
        import datasets

        ds = datasets.load_dataset("Salesforce/wikitext", "wikitext-2-raw-v1", split=split)
        text = "".join(ds["text"])
    except Exception as e:  # network drop, rate limit, changed dataset: fall through to the next source
        logger.warning("cbq_hf: downloading WikiText-2 %s with datasets failed (%s: %s)", split, type(e).__name__, e)
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return TextSource(path, "datasets", description)
