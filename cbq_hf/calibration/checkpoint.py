"""Resumable calibration: a finished window is the unit of work and is never recomputed after an interruption.

Layout of `checkpoint_dir`:
  block_<i>.pt   a frozen decoder block (packed `CBQLinear` modules and any CFP-folded norm), written once.
  state.pt       after each finished window: the next window's index, both streams (X_q, X_fp), the blocks still
                 training (live module with its quantizer parameters, and its float reference), the random
                 generator state, the report so far and a signature of the run.
Writes go to a temporary file renamed into place, so a crash never leaves a half-written file. A checkpoint whose
signature (config fields that change the result, calibration tokens, number of blocks) differs from the current
run is ignored with a warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)

#: Config fields that do not change the calibration result.
_IGNORED_FIELDS = ("checkpoint_dir", "run_info", "calibration_device", "tokenizer", "dataset",
                   "modules_to_not_convert")


def run_signature(config, input_ids: torch.Tensor, num_blocks: int) -> str:
    """Hash of what decides the calibration result."""
    fields = {k: v for k, v in config.to_dict().items() if k not in _IGNORED_FIELDS}
    h = hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode())
    h.update(input_ids.detach().cpu().contiguous().numpy().tobytes())
    h.update(str(num_blocks).encode())
    return h.hexdigest()


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


class CheckpointStore:
    """Reads and writes the resumable state of one calibration run in `folder`."""

    def __init__(self, folder: str | os.PathLike, signature: str) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.signature = signature

    def save_frozen_block(self, index: int, block: nn.Module) -> None:
        _atomic_save(block, self.folder / f"block_{index}.pt")

    def load_frozen_block(self, index: int) -> nn.Module:
        return torch.load(self.folder / f"block_{index}.pt", weights_only=False)

    def save_state(self, state: dict[str, Any]) -> None:
        _atomic_save({**state, "signature": self.signature}, self.folder / "state.pt")

    def load_state(self) -> dict[str, Any] | None:
        """The saved state, or None when there is none or it belongs to a different run."""
        path = self.folder / "state.pt"
        if not path.exists():
            return None
        state = torch.load(path, weights_only=False)
        if state.get("signature") != self.signature:
            logger.warning("checkpoint in %s belongs to a different calibration run (config, data or model "
                           "differ); starting from the beginning", self.folder)
            return None
        return state
