"""Capture what the decoder blocks receive: the hidden states entering the first block and, for every block, the
keyword arguments the model passes it (attention mask, position embeddings, cache flags, ...).

How (and why not an exception): while capturing, every decoder block is swapped for a `_Recorder` that stores
its call and hands the hidden states straight back. The model's own forward then runs end to end (embeddings,
rotary tables, mask construction, final norm) without running any block, so nothing has to be interrupted and
no forward is copied per architecture. The lm head is never run: we call the module that owns the list of
blocks (e.g. ``model.model`` for Llama). Each block keeps its own keyword arguments, so architectures that give
different masks to different layers (sliding-window layer types) are handled.

The only thing a recorder cannot know is whether the real block returns a tensor or a tuple whose first item is
the hidden states; the first recorder runs the real first block once, on the first batch, to find out.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..modeling import find_decoder_blocks
from .offload import input_device

logger = logging.getLogger(__name__)

#: Keyword arguments never replayed: calibration runs without a KV cache.
_DROPPED_KWARGS = ("past_key_values", "past_key_value", "layer_past")


@dataclass
class BlockCall:
    """How one block was called, minus the hidden states: positional args after them and keyword args."""

    hidden_positional: bool
    args: tuple[Any, ...]
    kwargs: dict[str, Any]


@dataclass
class BlockInputs:
    """Captured inputs of the decoder blocks for every calibration batch.

    hidden: [nsamples, seqlen, hidden] float32 on CPU: the input of the first block.
    batches: (start, end) sample ranges of the calibration batches.
    calls: calls[c][b] is the call of block b for batch c.
    returns_tuple: whether a block returns a tuple (hidden states first) rather than a tensor.
    """

    hidden: torch.Tensor
    batches: list[tuple[int, int]]
    calls: list[list[BlockCall]]
    returns_tuple: bool = False
    _device_cache: dict = field(default_factory=dict, repr=False)

    def call_block(self, block: nn.Module, index: int, batch: int, hidden: torch.Tensor) -> torch.Tensor:
        """Run decoder block `block` (the model's block number `index`) on `hidden` with batch `batch`'s kwargs."""
        call = self._on_device(index, batch, hidden.device)
        if call.hidden_positional:
            out = block(hidden, *call.args, **call.kwargs)
        else:
            out = block(*call.args, hidden_states=hidden, **call.kwargs)
        return out[0] if isinstance(out, (tuple, list)) else out

    def _on_device(self, index: int, batch: int, device: torch.device) -> BlockCall:
        key = (index, batch, str(device))
        if key not in self._device_cache:
            call = self.calls[batch][index]
            self._device_cache[key] = BlockCall(
                call.hidden_positional, _to_device(call.args, device), _to_device(call.kwargs, device)
            )
        return self._device_cache[key]

    def clear_device_cache(self) -> None:
        self._device_cache.clear()


def _to_device(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to_device(o, device) for o in obj)
    if isinstance(obj, list):
        return [_to_device(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    return obj


class _Recorder(nn.Module):
    """Stands in for a decoder block during capture: records the call, returns the hidden states unchanged."""

    def __init__(self, block: nn.Module, index: int, sink: list[BlockCall], state: dict[str, Any]) -> None:
        super().__init__()
        self.block = block
        self.index = index
        self.sink = sink
        self.state = state

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        kwargs = {k: (None if k in _DROPPED_KWARGS else v) for k, v in kwargs.items()}
        if args:
            hidden, call = args[0], BlockCall(True, tuple(args[1:]), kwargs)
        else:
            kwargs = dict(kwargs)
            hidden = kwargs.pop("hidden_states")
            call = BlockCall(False, tuple(args), kwargs)
        self.sink.append(call)
        if self.index == 0:
            self.state["hidden"] = hidden
            if "returns_tuple" not in self.state:  # probe the real block's output structure once
                with torch.no_grad():
                    if call.hidden_positional:
                        out = self.block(hidden, *call.args, **call.kwargs)
                    else:
                        out = self.block(*call.args, hidden_states=hidden, **call.kwargs)
                self.state["returns_tuple"] = isinstance(out, (tuple, list))
        return (hidden,) if self.state["returns_tuple"] else hidden


def _blocks_owner(model: nn.Module, prefix: str) -> nn.Module:
    parent, _, _ = prefix.rpartition(".")
    return model.get_submodule(parent) if parent else model


@torch.no_grad()
def capture_block_inputs(model: nn.Module, input_ids: torch.Tensor, batch_size: int) -> BlockInputs:
    """Hidden states entering the first decoder block and every block's call arguments, per batch.

    Args:
        model: a causal LM (or its base model) with a list of decoder blocks (`find_decoder_blocks`).
        input_ids: LongTensor [nsamples, seqlen] of calibration tokens.
        batch_size: samples per batch; the calls are recorded per batch (masks have a batch dimension).
    """
    if input_ids.dim() != 2 or input_ids.shape[0] < 1:
        raise ValueError(f"input_ids must be a LongTensor [nsamples, seqlen], got shape {tuple(input_ids.shape)}")
    prefix, blocks = find_decoder_blocks(model)
    owner = _blocks_owner(model, prefix)
    device = input_device(model)  # embeddings' execution device under accelerate offload
    originals = list(blocks)
    state: dict[str, Any] = {}
    sinks: list[list[BlockCall]] = [[] for _ in originals]
    hidden_parts: list[torch.Tensor] = []
    batches: list[tuple[int, int]] = []
    n = input_ids.shape[0]
    try:
        for i, block in enumerate(originals):
            blocks[i] = _Recorder(block, i, sinks[i], state)
        for start in range(0, n, batch_size):
            end = min(start + batch_size, n)
            state.pop("hidden", None)
            owner(input_ids=input_ids[start:end].to(device), use_cache=False)
            if "hidden" not in state:
                raise RuntimeError(
                    f"{type(owner).__name__}.forward did not call its decoder blocks "
                    f"({prefix}); cannot capture calibration inputs."
                )
            hidden_parts.append(state["hidden"].detach().float().cpu())
            batches.append((start, end))
    finally:
        for i, block in enumerate(originals):
            blocks[i] = block
    for i, sink in enumerate(sinks):
        if len(sink) != len(batches):
            raise RuntimeError(
                f"decoder block {i} was called {len(sink)} times for {len(batches)} batches; "
                f"cbq_hf needs each block called once per forward."
            )
    calls = [[sinks[b][c] for b in range(len(originals))] for c in range(len(batches))]
    logger.info("captured inputs of %d decoder blocks for %d samples in %d batches", len(originals), n, len(batches))
    return BlockInputs(torch.cat(hidden_parts), batches, calls, bool(state.get("returns_tuple", False)))
