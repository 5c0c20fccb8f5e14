"""Entry point of data-driven calibration: `calibrate(model, config, input_ids)` runs CBQ over the decoder blocks.

The walk over blocks (capture, windows, onload/offload, streams, packing, checkpoints) is `pipeline.BlockPipeline`;
the method trained in each window is `cbq.CBQMethod`; the formats provide the trainable stand-ins
(`QuantFormat.stand_in`). docs/concepts.md explains windows and streams.
"""

from __future__ import annotations

import time
import warnings
from typing import Any

import torch
from torch import nn

from ..rotation import apply_rotation
from .cbq import CBQMethod
from .e2e import float_targets, train_end_to_end
from .offload import is_dispatched
from .pipeline import BlockPipeline, resolve_device

__all__ = ["calibrate", "resolve_device"]


def calibrate(model: nn.Module, config, input_ids: torch.Tensor, progress: bool = True) -> dict[str, Any]:
    """Quantize `model` in place with CBQ; every quantizable decoder linear becomes a packed `CBQLinear`.

    Args:
        model: a loaded float causal LM (decoder blocks found by `modeling.find_decoder_blocks`).
        config: a `CBQConfig` (method "cbq"); the engine reads its calibration fields.
        input_ids: calibration tokens, LongTensor [nsamples, seqlen].
        progress: show a tqdm bar over the windows.

    Returns:
        A report: per window the blocks, start/end loss, steps, status and seconds; totals (seconds: windows and
        end-to-end stage) and CFP counts; under "e2e" the end-to-end stage's KL, steps and seconds; for a
        mixture-of-experts model, under "experts", the routing mode, the calibration tokens routed to each expert
        (experts module name -> count per expert) and the experts packed by RTN because none reached them.
    """
    apply_rotation(model, config)  # CBQConfig(rotation=...): the blocks are calibrated rotated
    t0 = time.perf_counter()
    targets = _end_to_end_targets(model, config, input_ids)
    target_seconds = time.perf_counter() - t0
    pipeline = BlockPipeline(model, config, input_ids)
    report = pipeline.run(CBQMethod(config), progress)
    if targets is not None:
        t0 = time.perf_counter()
        report["e2e"] = train_end_to_end(model, input_ids, targets, config)
        report["e2e"]["seconds"] = round(time.perf_counter() - t0 + target_seconds, 2)
        report["seconds"] = round(report["seconds"] + report["e2e"]["seconds"], 2)
    statuses = [w["status"] for w in report["windows"]]
    if isinstance(getattr(config, "run_info", None), dict):  # JSON-safe summary saved with the checkpoint
        config.run_info["cbq_calibration"] = {
            "windows": len(statuses),
            "windows_reverted": statuses.count("reverted"),
            "windows_nan_fallback": statuses.count("nan_fallback"),
            "seconds": report["seconds"],
            "device": report["device"],
            **report["cfp"],
        }
        if "e2e" in report:
            config.run_info["cbq_calibration"]["e2e"] = report["e2e"]
        if "experts" in report:  # routing mode, calibration tokens routed to each expert, experts packed by RTN
            config.run_info["cbq_calibration"]["experts"] = report["experts"]
    return report


def _end_to_end_targets(model: nn.Module, config, input_ids: torch.Tensor) -> torch.Tensor | None:
    """The float model's final hidden states for the end-to-end stage (before the windows change the model), or
    None when the stage is off or cannot run (a model dispatched by accelerate: the stage runs the whole model)."""
    if config.e2e_epochs == 0:
        return None
    if not (callable(getattr(model, "get_decoder", None)) and callable(getattr(model, "get_output_embeddings", None))):
        warnings.warn(
            f"cbq_hf: the end-to-end stage needs a transformers causal LM (get_decoder, get_output_embeddings); "
            f"{type(model).__name__} has neither, so it is skipped (e2e_epochs=0 silences this).",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    if is_dispatched(model):
        warnings.warn(
            "cbq_hf: e2e_epochs is set but the model is dispatched by accelerate (device_map with offload or several "
            "devices); the end-to-end stage needs the whole model on one device and is skipped.",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    return float_targets(model, input_ids, config.batch_size)
