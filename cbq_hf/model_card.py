"""README.md model card written beside every saved cbq checkpoint."""

from __future__ import annotations

import os

_TEMPLATE = """---
library_name: transformers
tags:
- cbq_hf
- quantized
- {bits}-bit
base_model: {base_model}
---

# {title}

Quantized with [`cbq_hf`](https://pypi.org/project/cbq_hf/) ({method_long}).

## Load it

```python
import cbq_hf  # registers the "cbq" quantization method with transformers: required before loading
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained("{repo}")
```

## Settings

| setting | value |
|---|---|
{settings}

## Measured

| what | value |
|---|---|
{measured}
"""


def base_model_name(name: str | None) -> str:
    """The base model as the card names it: the Hub id or path given to `from_pretrained` (transformers keeps it as
    `config._name_or_path`), except for the demo checkpoint that cbq_hf rebuilds in its cache, which is named by
    the Hub id of the model it was rebuilt from."""
    if not name:
        return "unknown"
    from .demo import demo_hub_id

    return demo_hub_id(name) or name


def render_model_card(model, repo: str = "PATH_OR_REPO_ID") -> str:
    """The model card of a cbq `model`: its load snippet reads `from_pretrained(repo)` (the folder the user saved
    to, or the Hub repo id), `base_model` is the model it was quantized from (`base_model_name`)."""
    cfg = model.config.quantization_config
    d = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    info = d.get("run_info", {}) or {}
    keys = [
        "format",
        "bits",
        "group_size",
        "sym",
        "act_bits",
        "method",
        "dataset",
        "nsamples",
        "seqlen",
        "seed",
        "window_size",
        "window_overlap",
        "epochs",
        "lora_rank",
        "use_cfp",
        "smooth_alpha",
        "modules_to_not_convert",
        "lm_head_bits",
    ]
    settings = "\n".join(f"| `{k}` | {d.get(k)!s} |" for k in keys if k in d)
    measured = "\n".join(f"| {k} | {v} |" for k, v in sorted(info.items()) if k != "base_model") or "| - | - |"
    act = f"A{d['act_bits']}" if d.get("act_bits") else "A16"
    method_long = {"cbq": "CBQ cross-block reconstruction", "rtn": "round-to-nearest"}.get(d.get("method"), "")
    base = base_model_name(info.get("base_model"))
    return _TEMPLATE.format(
        bits=d.get("bits"),
        base_model=base,
        title=f"{os.path.basename(str(base))} W{d.get('bits')}{act} (cbq_hf)",
        method_long=method_long,
        repo=repo,
        settings=settings,
        measured=measured,
    )


def write_model_card(model, folder: str, repo: str | os.PathLike | None = None) -> None:
    """Write README.md into `folder` unless a card is already there.

    Args:
        model: the cbq model being saved.
        folder: where the card is written (the temporary folder of an atomic save).
        repo: what its load snippet passes to `from_pretrained`: the folder as the user gave it to
            `save_pretrained`, or a Hub repo id; `folder` when None.
    """
    path = os.path.join(folder, "README.md")
    if os.path.exists(path):
        return
    target = os.fspath(repo if repo is not None else folder)
    target = target.rstrip("/\\") or target
    with open(path, "w", encoding="utf-8") as f:
        f.write(render_model_card(model, target))
