"""The walk over decoder blocks that every data-driven calibration method shares.

`BlockPipeline` owns what does not depend on the method: finding the decoder blocks and their quantizable linears,
the capture of the first block's inputs, the window schedule (`windows`), onloading a window's blocks onto the
calibration device (in float32, with a float reference copy) and offloading the frozen ones where accelerate runs
them (`offload`), the two activation streams (`streams`: X_fp through the float blocks, X_q through the frozen
quantized ones), packing the stand-ins of blocks that leave their last window into `CBQLinear`, and per-window
checkpoints with resume (`checkpoint`).

A method plugs in with three calls per window (`CalibrationMethod`): which statistics it wants recorded while the
float window runs on X_fp, how it prepares the blocks entering the window (preprocessing, one stand-in per
quantizable linear, built by the format), and how it trains the window. CBQ (`cbq.CBQMethod`) is one such method.

Device and memory: only the current window's blocks (live and float reference) are on the calibration device, in
float32; streams stay on the CPU or on disk and are read one batch at a time. The library never sets torch's
thread count.
"""

from __future__ import annotations

import copy
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from ..formats import get_format
from ..formats.stand_in import QuantStandIn
from ..modeling import empty_cbq_linear, find_decoder_blocks, quantizable_experts, quantizable_linears, set_module
from ..nn.linear import CBQLinear
from .capture import capture_block_inputs
from .checkpoint import CheckpointStore, restore_frozen_block, restore_live_block, run_identity
from .moe import fuse_block, fused_experts_names, inside_experts, start_counting, take_counts, unfuse_block
from .offload import OffloadPlan, finish
from .streams import Stream, StreamStorage
from .windows import Window, window_schedule

logger = logging.getLogger(__name__)


@dataclass
class BlockState:
    """A block inside its windows: its float reference copy and the stand-ins that replaced its linears."""

    fp: nn.Module
    stand_ins: dict[str, QuantStandIn] = field(default_factory=dict)


class CalibrationMethod(Protocol):
    """What a method gives the pipeline (see module docstring)."""

    def start(self, pipe: BlockPipeline) -> None:
        """Before the first window (of this process): e.g. add the method's totals to `pipe.report`."""

    def observers(self, pipe: BlockPipeline, new: list[int]) -> dict[int, Any]:
        """Per new block, a context manager with `end_batch()` that records statistics of its float run."""

    def prepare(self, pipe: BlockPipeline, new: list[int], observers: dict[int, Any], first_in: dict) -> None:
        """Turn the new blocks' quantizable linears into stand-ins (`pipe.states[b].stand_ins`)."""

    def train(self, pipe: BlockPipeline, win: Window, fp_out: Stream) -> dict[str, Any]:
        """Train the window against `fp_out` (the float window's output on X_fp); return its report entry."""


def resolve_device(config, model: nn.Module) -> torch.device:
    """Calibration device: `config.calibration_device`, or with "auto" the model's CUDA device, any CUDA device,
    else the CPU."""
    if config.calibration_device != "auto":
        return torch.device(config.calibration_device)
    dev = next(model.parameters()).device
    if dev.type == "cuda":
        return dev
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def cast_float(module: nn.Module, dtype: torch.dtype, device: torch.device) -> None:
    """Move `module` to `device` and cast its float params/buffers to `dtype`, leaving `CBQLinear` storage (fp16
    scales) untouched apart from the move."""
    for m in module.modules():
        if isinstance(m, CBQLinear):
            m.to(device)
            if m.bias is not None:
                m.bias.data = m.bias.data.to(dtype)
            continue
        for _, p in list(m.named_parameters(recurse=False)):
            p.data = p.data.to(device, dtype if p.is_floating_point() else p.dtype)
        for name, b in list(m.named_buffers(recurse=False)):
            if b is not None:
                setattr(m, name, b.to(device, dtype if b.is_floating_point() else b.dtype))


@torch.no_grad()
def pack_block(
    live: nn.Module, state: BlockState, names: dict[str, str], fmt, with_scale: bool, device: torch.device
) -> None:
    """Replace every stand-in of the block by its packed `CBQLinear` (the stand-in's `freeze()`) on `device`; expert
    matrices (`moe.inside_experts`) never carry an input scale."""
    for rel, sim in state.stand_ins.items():
        packed = sim.freeze()
        scaled = with_scale and not inside_experts(live, rel)
        q = empty_cbq_linear(sim, fmt, scaled, device=device, name=names[rel])
        input_scale = None
        if scaled:
            input_scale = sim.input_scale if sim.input_scale is not None else torch.ones(sim.in_features)
            input_scale = input_scale.to(device)
        q.load_packed({k: v.to(device) for k, v in packed.items()}, bias=sim.bias, input_scale=input_scale)
        set_module(live, rel, q)
    state.stand_ins.clear()


def walk_blocks(model: nn.Module, convert, progress: bool = True, desc: str = "blocks") -> None:
    """The data-free walk (RTN): for each decoder block, load it where it can be changed (offloaded weights
    loaded, accelerate hooks removed), call `convert(index, block)`, and put it back where accelerate runs it; a
    model without a device map is converted in place. Ends with `offload.finish`."""
    prefix, blocks = find_decoder_blocks(model)
    plan = OffloadPlan(model, prefix, blocks)
    for i in tqdm(range(len(blocks)), desc=desc, disable=not progress, unit="block"):
        plan.onload(i, blocks[i])
        convert(i, blocks[i])
        blocks[i].to(plan.home(i))
        plan.offload(i, blocks[i])
    finish(model, plan)


def _log_estimate(config, seconds_per_window: float, windows_left: int, num_blocks: int) -> None:
    """After the first window: the estimated time left, and faster presets (a warning beyond 15 minutes)."""
    from ..presets import estimate_message, estimated_seconds

    left = estimated_seconds(config, seconds_per_window, windows_left, num_blocks)
    logger.log(
        logging.WARNING if left > 900 else logging.INFO,
        estimate_message(config, seconds_per_window, windows_left, num_blocks),
    )


class BlockPipeline:
    """One calibration run over the decoder blocks of `model` (see module docstring).

    Args:
        model: a loaded float causal LM (decoder blocks found by `modeling.find_decoder_blocks`).
        config: its `CBQConfig` (window schedule, batch size, seed, activation storage, checkpoint folder).
        input_ids: calibration tokens, LongTensor [nsamples, seqlen].
    """

    def __init__(self, model: nn.Module, config, input_ids: torch.Tensor) -> None:
        self.t_start = time.perf_counter()
        self.model, self.config, self.fmt = model, config, get_format(config)
        self.prefix, self.blocks = find_decoder_blocks(model)
        self.experts_rel: list[list[str]] = [[] for _ in self.blocks]  # fused experts unfused at onload (`moe`)
        self.names = self._names_per_block()
        self.device = resolve_device(config, model)
        self.plan = OffloadPlan(model, self.prefix, self.blocks)  # accelerate device_map: where each block lives
        self.orig_dtype = next(model.parameters()).dtype
        self.was_training = model.training
        model.eval()
        torch.manual_seed(config.seed)
        self.gen = torch.Generator().manual_seed(config.seed)
        identity = run_identity(config, input_ids, model, len(self.blocks)) if config.checkpoint_dir else None
        self.inputs = capture_block_inputs(model, input_ids, config.batch_size)
        folder = os.path.join(config.checkpoint_dir, "streams") if config.checkpoint_dir else None
        self.streams = StreamStorage(config.activation_storage, folder)
        self.x_fp = self.streams.from_tensor(self.inputs.hidden)
        self.inputs.hidden = self.inputs.hidden.new_empty((0, *self.inputs.hidden.shape[1:]))  # x_fp holds it
        self.x_q = self.x_fp.clone()
        self.schedule = window_schedule(len(self.blocks), config.window_size, config.window_overlap)
        self.states: dict[int, BlockState] = {}
        #: (block index, X_fp at that block's input) that the last window's float run reached: the next window starts
        #: its float run there instead of recomputing the blocks the two windows share.
        self._fp_ahead: tuple[int, Stream] | None = None
        self.report: dict[str, Any] = {"device": str(self.device), "num_blocks": len(self.blocks), "windows": []}
        if any(self.experts_rel):
            mode = "all_experts" if config.moe_calibrate_all_experts else "routed"
            self.report["experts"] = {"routing": mode, "tokens": {}, "rtn_experts": []}
        self.store = CheckpointStore(config.checkpoint_dir, identity, config.to_dict()) if identity else None
        self.first_window = self._resume() if self.store is not None else 0

    def _names_per_block(self) -> list[dict[str, str]]:
        """Per block: relative name -> full name of every quantizable linear and expert matrix (shapes checked
        against the format); fills `experts_rel`."""
        targets = quantizable_linears(self.model, self.config.modules_to_not_convert)
        names: list[dict[str, str]] = [{} for _ in self.blocks]
        for full, lin in targets.items():
            idx, _, rel = full[len(self.prefix) + 1 :].partition(".")
            names[int(idx)][rel] = full
            self.fmt.check_shape(lin.out_features, lin.in_features, full)
        experts = quantizable_experts(self.model, self.config.modules_to_not_convert)
        for full in experts:
            idx, _, rel = full[len(self.prefix) + 1 :].partition(".")
            self.experts_rel[int(idx)].append(rel)
        for idx, matrices in fused_experts_names(self.prefix, experts, self.fmt).items():
            names[idx].update(matrices)
        return names  # `targets` (every float linear) is dropped: frozen blocks' float weights can be freed

    # ---------------------------------------------------------------- the walk
    def run(self, method: CalibrationMethod, progress: bool = True) -> dict[str, Any]:
        """Run every remaining window with `method`; returns the report (per window: blocks, losses, status,
        seconds; totals)."""
        method.start(self)
        n = len(self.schedule)
        bar = tqdm(
            self.schedule[self.first_window :],
            desc="CBQ windows",
            unit="window",
            disable=not progress,
            initial=self.first_window,
            total=n,
        )
        try:
            for win in bar:
                entry = self._run_window(win, method)
                if win.index == self.first_window and win.index + 1 < n:
                    _log_estimate(self.config, entry["seconds"], n - win.index - 1, len(self.blocks))
                bar.set_postfix(loss=f"{entry['loss_start']:.3g}->{entry['loss_end']:.3g}")
                logger.info(
                    "window %d/%d (blocks %d-%d): loss %.4g -> %.4g (%s), %.1f s",
                    win.index + 1,
                    n,
                    win.start,
                    win.end - 1,
                    entry["loss_start"],
                    entry["loss_end"],
                    entry["status"],
                    entry["seconds"],
                )
        finally:
            self.model.train(self.was_training)
            self.streams.close()
        finish(self.model, self.plan)  # dispatched model: no meta tensor left, every block hooked where it ran
        self.report["seconds"] = round(time.perf_counter() - self.t_start, 2)
        return self.report

    def _run_window(self, win: Window, method: CalibrationMethod) -> dict[str, Any]:
        t0 = time.perf_counter()
        new = [b for b in win.blocks if b not in self.states]
        for b in new:
            self.states[b] = BlockState(fp=self._onload(b))
        observers = method.observers(self, new)
        for b in new:
            start_counting(self.states[b].fp, self.config.moe_calibrate_all_experts)
        first, x = win.start, self.x_fp
        ahead = self._fp_ahead
        if ahead is not None and win.start < ahead[0] <= win.freeze_end and all(b >= ahead[0] for b in new):
            first, x = ahead  # the previous window's float output: its blocks' float run on X_fp is known
        fp_out, next_fp, first_in = self.run_float(win, x, observers, first)
        self._fp_ahead = (win.end, fp_out)
        self._record_routing(new)
        method.prepare(self, new, observers, first_in)
        entry = method.train(self, win, fp_out)
        self._leave(win)
        self.x_fp = next_fp
        self.inputs.clear_device_cache()
        entry["seconds"] = round(time.perf_counter() - t0, 2)
        self.report["windows"].append(entry)
        if self.store is not None:
            for b in win.frozen:
                self.store.save_frozen_block(b, self.blocks[b])
            live = {b: self.blocks[b] for b in self.states}
            self.store.save_state(win.index + 1, self.x_q, self.x_fp, live, self.gen.get_state(), self.report)
        return entry

    def _onload(self, b: int) -> nn.Module:
        """Bring block `b` onto the calibration device in float32 (offloaded weights loaded, accelerate hooks
        removed, fused experts unfused, no gradients); returns its float reference copy."""
        live = self.blocks[b]
        self.plan.onload(b, live)
        unfuse_block(live, self.experts_rel[b], False, f"{self.prefix}.{b}")
        live.requires_grad_(False)
        cast_float(live, torch.float32, self.device)
        return copy.deepcopy(live)

    def _leave(self, win: Window) -> None:
        """Pack the blocks leaving with `win`, advance X_q through them, and put them back where they run."""
        with_scale = self.config.has_input_scale()
        for b in win.frozen:
            state = self.states.pop(b)
            pack_block(self.blocks[b], state, self.names[b], self.fmt, with_scale, self.device)
            self._fuse(b, state.fp)
        self.x_q = self.run_blocks(list(win.frozen), self.x_q)
        for b in win.frozen:
            cast_float(self.blocks[b], self.orig_dtype, self.plan.home(b))
            self.plan.offload(b, self.blocks[b])

    def _record_routing(self, new: list[int]) -> None:
        """Tokens routed to each expert of the new blocks in their first float run, into the report."""
        if "experts" in self.report:
            for b in new:
                for rel, counts in take_counts(self.states[b].fp).items():
                    self.report["experts"]["tokens"][f"{self.prefix}.{b}.{rel}"] = counts

    def _fuse(self, b: int, fp: nn.Module | None) -> None:
        """Assemble block `b`'s packed expert matrices into `CBQExperts`; experts that no calibration token reached
        are packed by RTN from the float copy `fp` (None when restoring a saved frozen block)."""
        if not self.experts_rel[b]:
            return
        tokens = self.report["experts"]["tokens"]
        counts = {rel: tokens.get(f"{self.prefix}.{b}.{rel}", []) for rel in self.experts_rel[b]}
        rtn = fuse_block(self.blocks[b], fp, counts, self.fmt)
        self.report["experts"]["rtn_experts"] += [f"{self.prefix}.{b}.{n}" for n in rtn]
        if rtn:
            logger.info("block %d: %d expert(s) received no calibration token; packed by RTN: %s", b, len(rtn), rtn)

    # ---------------------------------------------------------------- streams
    @torch.no_grad()
    def run_float(
        self, win: Window, x: Stream, observers: dict[int, Any], first: int | None = None
    ) -> tuple[Stream, Stream, dict]:
        """The float window on stream `x`, the input of block `first` (default: the window's first block; a later
        one when the blocks before it have run on `x` already): (its output, the stream at the window's freeze end,
        the first batch's input of every block it ran). `observers` record statistics of their block while it runs.
        """
        first = win.start if first is None else first
        out = x.empty_like()
        nxt = x.empty_like() if first < win.freeze_end < win.end else None
        first_in: dict[int, torch.Tensor] = {}
        for c in observers.values():
            c.__enter__()
        try:
            for c_idx, (s, e) in enumerate(self.inputs.batches):
                h = x[s:e].to(self.device)
                for b in range(first, win.end):
                    if c_idx == 0:
                        first_in[b] = h
                    h = self.inputs.call_block(self.states[b].fp, b, c_idx, h)
                    if b + 1 == win.freeze_end and nxt is not None:
                        nxt[s:e] = h.cpu()
                out[s:e] = h.cpu()
                for c in observers.values():
                    c.end_batch()
        finally:
            for c in observers.values():
                c.__exit__(None, None, None)
        if first == win.freeze_end:
            return out, x, first_in
        return out, (nxt if nxt is not None else out), first_in

    @torch.no_grad()
    def run_blocks(self, indices: list[int], x: Stream) -> Stream:
        """Stream `x` through the model's blocks `indices` (as they are now), batch by batch."""
        out = x.empty_like()
        for c_idx, (s, e) in enumerate(self.inputs.batches):
            h = x[s:e].to(self.device)
            for b in indices:
                h = self.inputs.call_block(self.blocks[b], b, c_idx, h)
            out[s:e] = h.cpu()
        return out

    def forward_window(self, win: Window, c_idx: int, h: torch.Tensor) -> torch.Tensor:
        """Batch `c_idx` (hidden states `h`) through the live blocks of `win` (stand-ins included), with grad."""
        for b in win.blocks:
            h = self.inputs.call_block(self.blocks[b], b, c_idx, h)
        return h

    # ---------------------------------------------------------------- resume
    def _resume(self) -> int:
        """Restore the last committed state of `self.store` (if any); returns the first window still to run."""
        saved = self.store.load_state()
        if saved is None:
            return 0
        first = saved["next_window"]
        with_scale = self.config.has_input_scale()
        for b in range(self.schedule[first - 1].freeze_end):
            self.plan.onload(b, self.blocks[b])
            unfuse_block(self.blocks[b], self.experts_rel[b], False)
            tensors = self.store.load_tensors(f"block_{b}.safetensors", saved)
            restore_frozen_block(self.blocks[b], tensors, self.names[b], self.fmt, with_scale)
            self._fuse(b, None)
            cast_float(self.blocks[b], self.orig_dtype, self.plan.home(b))
            self.plan.offload(b, self.blocks[b])
        window_tensors = self.store.load_tensors(f"window_{first - 1}.safetensors", saved)
        for b in saved["inflight_blocks"]:  # rebuilt as when it entered its first window, then given its state
            fp = self._onload(b)
            own = {k.partition("/")[2]: v for k, v in window_tensors.items() if k.partition("/")[0] == str(b)}
            sims = restore_live_block(self.blocks[b], own, self.names[b], self.config, self.fmt)
            self.states[b] = BlockState(fp=fp, stand_ins=sims)
        self.x_q = self.store.load_stream("x_q", saved, self.streams)
        self.x_fp = self.store.load_stream("x_fp", saved, self.streams)
        self.gen.set_state(window_tensors["gen_state"])
        self.report.update(saved["method_report"], windows=saved["windows"], resumed_from_window=first)
        logger.info(
            "resuming calibration from %s at window %d/%d", self.config.checkpoint_dir, first + 1, len(self.schedule)
        )
        return first
