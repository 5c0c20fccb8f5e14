"""Perplexity with the fixed protocol of shared/data/README.md.

Read the text as UTF-8, tokenize it once, cut non-overlapping windows of `seqlen` tokens, prepend BOS to each
window when the tokenizer has one, score the first `n_windows`, perplexity = exp(mean next-token NLL).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


def eval_windows(tokenizer, text: str, seqlen: int = 512, n_windows: int = 40) -> torch.Tensor:
    """The evaluation windows [n, seqlen (+1 with BOS)] of `text`."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    ids = torch.tensor(ids, dtype=torch.long)
    n = min(n_windows, ids.numel() // seqlen)
    if n == 0:
        raise ValueError(f"evaluation text has {ids.numel()} tokens, fewer than one window of {seqlen}.")
    windows = ids[: n * seqlen].view(n, seqlen)
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is not None:
        windows = torch.cat([torch.full((n, 1), bos, dtype=torch.long), windows], dim=1)
    return windows


@torch.no_grad()
def perplexity(
    model, tokenizer, text: str, seqlen: int = 512, n_windows: int = 40, batch_size: int = 1, progress: bool = True
) -> float:
    """Perplexity of `model` on `text` (see module docstring). Runs on the model's device."""
    windows = eval_windows(tokenizer, text, seqlen, n_windows)
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for i in tqdm(range(0, len(windows), batch_size), desc="perplexity", disable=not progress, unit="window"):
        batch = windows[i : i + batch_size].to(device)
        logits = model(batch, use_cache=False).logits.float()
        nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum")
        total += nll.item()
        count += batch[:, 1:].numel()
    return math.exp(total / count)
