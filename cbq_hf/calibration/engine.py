"""The CBQ calibration engine: cross-block windows with homologous reconstruction, learnable step sizes,
LoRA-Rounding and coarse-to-fine preprocessing (issue #3). Entry point: `calibrate(model, config, input_ids)`.

Flow, per window of consecutive decoder blocks (`windows.window_schedule`):

1. Blocks entering the window get a float copy (the reference), are moved to the calibration device in float32,
   preprocessed by CFP (`preprocess`) and have their linears wrapped in trainable `rounding.QuantLinearSim`.
2. Targets: the float window on the float stream X_fp (accumulated term) and on the quantized stream X_q
   (homologous term). Streams and targets live in CPU memory or on disk (`config.activation_storage`,
   `streams`); only the window's blocks are on the calibration device.
3. The window's quantizer parameters are trained jointly (Adam) on loss.window_loss + rounding regulariser.
   A non-finite loss (or parameter) sends the window back to its starting point with a warning; a window whose
   hard-rounded loss ends above where it started is also sent back (so CBQ is never worse than its initial grid).
4. Blocks leaving the window are frozen: hard-rounded, packed into `CBQLinear`, moved back to the model's
   device; X_q advances through the frozen blocks and X_fp through the float ones.
5. With `config.checkpoint_dir`, the state after each finished window is saved (`checkpoint`) and a rerun of the
   same calibration resumes at the first unfinished window.

Device and memory: only the current window's blocks (live and float reference) are on the calibration device,
in float32; streams and targets stay on the CPU or on disk (`streams`), read one batch at a time. The library
never sets torch's thread count.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..formats import get_format
from ..formats.lobcq import LOBCQFormat
from ..formats.uniform import UniformFormat
from ..modeling import empty_cbq_linear, find_decoder_blocks, quantizable_linears, set_module
from ..nn.linear import CBQLinear
from .capture import BlockInputs, capture_block_inputs
from .checkpoint import CheckpointStore, restore_frozen_block, restore_live_block, run_identity
from .lobcq_sim import LOBCQLinearSim
from .loss import window_loss
from .offload import OffloadPlan, finish
from .preprocess import StatsCollector, smooth_block, weight_truncation
from .rounding import QuantLinearSim
from .streams import Stream, StreamStorage
from .windows import Window, window_schedule

logger = logging.getLogger(__name__)

#: Calibration tokens of each linear's float input kept for smooth_alpha="auto" (the per-group search).
SEARCH_TOKENS = 512

#: Calibration batches used to measure a window's loss before and after training.
EVAL_BATCHES = 4
#: Relative error allowed when checking that a CFP fold left the float block unchanged.
FOLD_TOLERANCE = 1e-4


def resolve_device(config, model: nn.Module) -> torch.device:
    """Calibration device: `config.calibration_device`, or with "auto" the model's CUDA device, any CUDA device,
    else the CPU."""
    if config.calibration_device != "auto":
        return torch.device(config.calibration_device)
    dev = next(model.parameters()).device
    if dev.type == "cuda":
        return dev
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


@dataclass
class _BlockState:
    fp: nn.Module
    sims: dict[str, QuantLinearSim] = field(default_factory=dict)


def _cast_float(module: nn.Module, dtype: torch.dtype, device: torch.device) -> None:
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


def calibrate(model: nn.Module, config, input_ids: torch.Tensor, progress: bool = True) -> dict[str, Any]:
    """Quantize `model` in place with CBQ; every quantizable decoder linear becomes a packed `CBQLinear`.

    Args:
        model: a loaded float causal LM (decoder blocks found by `modeling.find_decoder_blocks`).
        config: a `CBQConfig` (method "cbq"); the engine reads its calibration fields.
        input_ids: calibration tokens, LongTensor [nsamples, seqlen].
        progress: show a tqdm bar per window.

    Returns:
        A report: per window the blocks, start/end loss, steps, status and seconds; totals and CFP counts.
    """
    t_start = time.perf_counter()
    fmt = get_format(config)
    assert isinstance(fmt, (UniformFormat, LOBCQFormat))
    prefix, blocks = find_decoder_blocks(model)
    targets = quantizable_linears(model, config.modules_to_not_convert)
    per_block: dict[int, dict[str, str]] = {i: {} for i in range(len(blocks))}
    for full in targets:
        idx, _, rel = full[len(prefix) + 1 :].partition(".")
        per_block[int(idx)][rel] = full
        fmt.check_shape(targets[full].out_features, targets[full].in_features, full)
    del targets  # it holds every float linear: kept, no frozen block's float weights could be freed
    device = resolve_device(config, model)
    plan = OffloadPlan(model, prefix, blocks)  # accelerate device_map / offload: where each block lives
    orig_dtype = next(model.parameters()).dtype
    was_training = model.training
    model.eval()
    torch.manual_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed)

    identity = run_identity(config, input_ids, model, len(blocks)) if config.checkpoint_dir else None
    inputs = capture_block_inputs(model, input_ids, config.batch_size)
    streams = StreamStorage(
        config.activation_storage, os.path.join(config.checkpoint_dir, "streams") if config.checkpoint_dir else None
    )
    x_fp = streams.from_tensor(inputs.hidden)
    inputs.hidden = inputs.hidden.new_empty((0, *inputs.hidden.shape[1:]))  # x_fp holds it now
    x_q = x_fp.clone()
    schedule = window_schedule(len(blocks), config.window_size, config.window_overlap)
    states: dict[int, _BlockState] = {}
    report: dict[str, Any] = {
        "device": str(device),
        "num_blocks": len(blocks),
        "windows": [],
        "cfp": {
            "outlier_channels": 0,
            "folded_linears": 0,
            "explicit_scale_linears": 0,
            "truncation_outlier_weights": 0,
        },
    }
    store = None
    first_window = 0
    if config.checkpoint_dir:
        store = CheckpointStore(config.checkpoint_dir, identity, config.to_dict())
        saved = store.load_state()
        if saved is not None:
            first_window = saved["next_window"]
            with_scale = config.has_input_scale()
            for b in range(schedule[first_window - 1].freeze_end):
                plan.onload(b, blocks[b])
                restore_frozen_block(
                    blocks[b], store.load_tensors(f"block_{b}.safetensors", saved), per_block[b], fmt, with_scale
                )
                _cast_float(blocks[b], orig_dtype, plan.home(b))
                plan.offload(b, blocks[b])
            window_tensors = store.load_tensors(f"window_{first_window - 1}.safetensors", saved)
            for b in saved["inflight_blocks"]:
                live = blocks[b]  # rebuilt exactly as when it entered its first window, then given its saved state
                plan.onload(b, live)
                live.requires_grad_(False)
                _cast_float(live, torch.float32, device)
                fp = copy.deepcopy(live)
                own = {k.partition("/")[2]: v for k, v in window_tensors.items() if k.partition("/")[0] == str(b)}
                states[b] = _BlockState(fp=fp, sims=restore_live_block(live, own, per_block[b], config, fmt))
            x_q, x_fp = store.load_stream("x_q", saved, streams), store.load_stream("x_fp", saved, streams)
            gen.set_state(window_tensors["gen_state"])
            report["windows"], report["cfp"] = saved["windows"], saved["cfp"]
            report["resumed_from_window"] = first_window
            logger.info(
                "resuming calibration from %s at window %d/%d", config.checkpoint_dir, first_window + 1, len(schedule)
            )
    bar = tqdm(
        schedule[first_window:],
        desc="CBQ windows",
        unit="window",
        disable=not progress,
        initial=first_window,
        total=len(schedule),
    )
    try:
        for win in bar:
            t0 = time.perf_counter()
            new = [b for b in win.blocks if b not in states]
            for b in new:
                live = blocks[b]
                plan.onload(b, live)  # offloaded weights loaded, accelerate hooks removed
                live.requires_grad_(False)
                _cast_float(live, torch.float32, device)
                states[b] = _BlockState(fp=copy.deepcopy(live))
            keep = SEARCH_TOKENS if config.smooth_alpha == "auto" else 0
            collectors = {b: StatsCollector(states[b].fp, list(per_block[b]), keep_tokens=keep) for b in new}
            t_acc, next_fp, first_in = _run_float(win, states, inputs, x_fp, device, collectors)
            use_hom = config.use_homologous and config.loss_weight_homologous > 0
            t_hom = _run_float(win, states, inputs, x_q, device, {})[0] if use_hom else None
            for b in new:
                _prepare_block(
                    b,
                    blocks[b],
                    states[b],
                    per_block[b],
                    collectors[b],
                    first_in[b],
                    inputs,
                    config,
                    fmt,
                    device,
                    gen,
                    report["cfp"],
                )
            vectors = _block_vectors(win, blocks, states) if config.lr_norm > 0 else []
            try:
                entry = _train_window(
                    win, len(schedule), blocks, states, inputs, x_q, t_acc, t_hom, config, device, gen, vectors
                )
            finally:
                for v in vectors:  # trained inside the window only: the frozen model's parameters need no grad
                    v.requires_grad_(False)
            # Freeze the blocks leaving the window and advance the quantized stream through them.
            for b in win.frozen:
                _freeze_block(blocks[b], states.pop(b), per_block[b], fmt, config, device)
            x_q = _advance(list(win.frozen), blocks, inputs, x_q, device)
            for b in win.frozen:
                _cast_float(blocks[b], orig_dtype, plan.home(b))
                plan.offload(b, blocks[b])  # runs where accelerate ran it
            x_fp = next_fp
            inputs.clear_device_cache()
            entry["seconds"] = round(time.perf_counter() - t0, 2)
            report["windows"].append(entry)
            if store is not None:
                for b in win.frozen:
                    store.save_frozen_block(b, blocks[b])
                store.save_state(win.index + 1, x_q, x_fp, {b: blocks[b] for b in states}, gen.get_state(), report)
            bar.set_postfix(loss=f"{entry['loss_start']:.3g}->{entry['loss_end']:.3g}")
            logger.info(
                "window %d/%d (blocks %d-%d): loss %.4g -> %.4g (%s), %.1f s",
                win.index + 1,
                len(schedule),
                win.start,
                win.end - 1,
                entry["loss_start"],
                entry["loss_end"],
                entry["status"],
                entry["seconds"],
            )
    finally:
        model.train(was_training)
        streams.close()
    finish(model, plan)  # dispatched model: no meta tensor left, every block hooked where accelerate ran it
    report["seconds"] = round(time.perf_counter() - t_start, 2)
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
    return report


# ------------------------------------------------------------------------------------------------ streams
@torch.no_grad()
def _run_float(
    win: Window,
    states: dict[int, _BlockState],
    inputs: BlockInputs,
    x: Stream,
    device: torch.device,
    collectors: dict[int, StatsCollector],
) -> tuple[Stream, Stream, dict[int, torch.Tensor]]:
    """Float window on stream x: (window output, stream at the window's freeze end, first-batch block inputs)."""
    out = x.empty_like()
    nxt = x.empty_like() if win.freeze_end < win.end else None
    first_in: dict[int, torch.Tensor] = {}
    for c in collectors.values():
        c.__enter__()
    try:
        for c_idx, (s, e) in enumerate(inputs.batches):
            h = x[s:e].to(device)
            for b in win.blocks:
                if c_idx == 0:
                    first_in[b] = h
                h = inputs.call_block(states[b].fp, b, c_idx, h)
                if b + 1 == win.freeze_end and nxt is not None:
                    nxt[s:e] = h.cpu()
            out[s:e] = h.cpu()
            for c in collectors.values():
                c.end_batch()
    finally:
        for c in collectors.values():
            c.__exit__(None, None, None)
    return out, (nxt if nxt is not None else out), first_in


@torch.no_grad()
def _advance(frozen: list[int], blocks: nn.ModuleList, inputs: BlockInputs, x: Stream, device: torch.device) -> Stream:
    out = x.empty_like()
    for c_idx, (s, e) in enumerate(inputs.batches):
        h = x[s:e].to(device)
        for b in frozen:
            h = inputs.call_block(blocks[b], b, c_idx, h)
        out[s:e] = h.cpu()
    return out


# ------------------------------------------------------------------------------------------------ preparation
@torch.no_grad()
def _prepare_block(
    b: int,
    live: nn.Module,
    state: _BlockState,
    names: dict[str, str],
    stats: StatsCollector,
    first_in: torch.Tensor,
    inputs: BlockInputs,
    config,
    fmt: UniformFormat,
    device: torch.device,
    gen: torch.Generator,
    cfp_report: dict[str, int],
) -> None:
    """CFP on the live block (float function unchanged), then wrap its quantizable linears for training."""
    linears = {rel: live.get_submodule(rel) for rel in names}
    input_scales: dict[str, torch.Tensor | None] = dict.fromkeys(names)
    divisors: dict[str, torch.Tensor] = {}
    if (config.use_cfp or config.smooth_alpha is not None) and linears:
        ref = inputs.call_block(state.fp, b, 0, first_in)

        def unchanged() -> bool:
            out = inputs.call_block(live, b, 0, first_in)
            return bool((out - ref).norm() <= FOLD_TOLERANCE * ref.norm())

        sm = smooth_block(
            live,
            linears,
            stats.stats,
            config.cfp_lambda1,
            config.cfp_lambda2,
            config.cfp_alpha,
            unchanged,
            smooth_alpha=config.smooth_alpha,
            fmt=fmt,
        )
        if sm.alphas:
            logger.info(
                "block %d smoothing: %s",
                b,
                ", ".join(f"{k}: {'CFP' if a is None else f'alpha {a}'}" for k, a in sm.alphas.items()),
            )
            chosen = cfp_report.setdefault("smooth_alpha_chosen", {})
            for a in sm.alphas.values():
                key = "cfp" if a is None else f"{a:g}"
                chosen[key] = chosen.get(key, 0) + 1
        input_scales, divisors = sm.input_scales, sm.divisors
        cfp_report["outlier_channels"] += sm.outlier_channels
        cfp_report["folded_linears"] += len(sm.folded)
        cfp_report["explicit_scale_linears"] += len(sm.explicit)
    for rel, lin in linears.items():
        ms = stats.mean_square(rel)  # of the float input; the smoothed input is x / divisor
        if rel in divisors:
            ms = ms / divisors[rel].float().cpu().pow(2)
        s = input_scales[rel]
        truncation = None
        if config.use_cfp:
            truncation, n_out = weight_truncation(lin.weight, config.cfp_lambda1, config.cfp_lambda2)
            cfp_report["truncation_outlier_weights"] += n_out
        if isinstance(fmt, LOBCQFormat):  # LO-BCQ: learned array scales and codeword choice (lobcq_sim)
            sim = LOBCQLinearSim(
                lin,
                fmt,
                lora_rank=config.lora_rank,
                use_lora_rounding=config.use_lora_rounding,
                learn_weight_scales=config.learn_weight_scales,
                input_scale=None if s is None else s.to(device),
                channel_weight=ms,
                generator=gen,
            ).to(device)
        else:
            sim = QuantLinearSim(
                lin,
                fmt.spec,
                fmt.act_bits,
                lora_rank=config.lora_rank,
                use_lora_rounding=config.use_lora_rounding,
                learn_weight_scales=config.learn_weight_scales,
                learn_act_clipping=config.learn_act_clipping,
                input_scale=None if s is None else s.to(device),
                channel_weight=ms.to(device),
                truncation=truncation,
                generator=gen,
            ).to(device)
        state.sims[rel] = sim
        set_module(live, rel, sim)


# ------------------------------------------------------------------------------------------------ training
def _window_sims(win: Window, states: dict[int, _BlockState]) -> list[QuantLinearSim]:
    return [sim for b in win.blocks for sim in states[b].sims.values()]


def _forward_window(
    win: Window, blocks: nn.ModuleList, inputs: BlockInputs, c_idx: int, h: torch.Tensor
) -> torch.Tensor:
    for b in win.blocks:
        h = inputs.call_block(blocks[b], b, c_idx, h)
    return h


def _block_vectors(win: Window, blocks: nn.ModuleList, states: dict[int, _BlockState]) -> list[nn.Parameter]:
    """The float vector parameters (norm weights and biases) of the window's blocks outside their quantized
    linears, made trainable (lr_norm). A block shared by two windows trains in both."""
    out = []
    for b in win.blocks:
        inside = {id(p) for sim in states[b].sims.values() for p in sim.parameters()}
        for p in blocks[b].parameters():
            if p.dim() == 1 and p.is_floating_point() and id(p) not in inside:
                p.requires_grad_(True)
                out.append(p)
    return out


def _train_window(
    win: Window,
    n_windows: int,
    blocks: nn.ModuleList,
    states: dict[int, _BlockState],
    inputs: BlockInputs,
    x_q: Stream,
    t_acc: Stream,
    t_hom: Stream | None,
    config,
    device: torch.device,
    gen: torch.Generator,
    vectors: list[nn.Parameter],
) -> dict[str, Any]:
    """Train the window's quantizers (and `vectors`: the blocks' norm parameters, with lr_norm) on the window loss;
    put everything back at its start when the loss ends higher or turns non-finite."""
    sims = _window_sims(win, states)
    kl = config.kl_weight if config.use_kl else 0.0
    label = f"window {win.index + 1}/{n_windows} (blocks {win.start}-{win.end - 1})"

    def batch_loss(c_idx: int) -> torch.Tensor:
        s, e = inputs.batches[c_idx]
        out = _forward_window(win, blocks, inputs, c_idx, x_q[s:e].to(device))
        hom = t_hom[s:e].to(device) if t_hom is not None else None
        return window_loss(
            out,
            t_acc[s:e].to(device),
            hom,
            config.loss_weight_accumulated,
            config.loss_weight_homologous,
            kl,
            config.token_normalized_loss,
        )

    eval_ids = list(range(min(EVAL_BATCHES, len(inputs.batches))))

    @torch.no_grad()
    def eval_loss() -> float:
        return sum(float(batch_loss(i)) for i in eval_ids) / len(eval_ids)

    snapshot = [sim.snapshot() for sim in sims]
    vector_snapshot = [v.detach().clone() for v in vectors]

    def restore_start() -> None:
        for sim, snap in zip(sims, snapshot):
            sim.restore(snap)
        with torch.no_grad():
            for v, snap in zip(vectors, vector_snapshot):
                v.copy_(snap)

    loss_start = eval_loss()
    entry: dict[str, Any] = {"blocks": [win.start, win.end - 1], "loss_start": loss_start, "steps": 0, "status": "ok"}
    rounding = [p for sim in sims for p in sim.rounding_parameters()]
    scales = [p for sim in sims for p in sim.scale_parameters()]
    groups = [
        g
        for g in (
            {"params": rounding, "lr": config.lr},
            {"params": scales, "lr": config.lr_scale},
            {"params": vectors, "lr": config.lr_norm},
        )
        if g["params"]
    ]
    total = config.epochs * len(inputs.batches)
    if not math.isfinite(loss_start):
        _fallback(restore_start, label, "its starting loss is not finite")
        entry.update(status="nan_fallback", loss_end=loss_start)
        return entry
    if not groups or total == 0:
        entry["loss_end"] = loss_start
        return entry
    opt = torch.optim.Adam(groups)
    step = 0
    failed = False
    for _ in range(config.epochs):
        for c_idx in torch.randperm(len(inputs.batches), generator=gen).tolist():
            beta = config.beta_start + (config.beta_end - config.beta_start) * step / max(total - 1, 1)
            loss = batch_loss(c_idx)
            if config.use_lora_rounding and config.rounding_reg_weight > 0:
                reg = torch.stack([sim.regularizer(beta) for sim in sims]).mean()
                loss = loss + config.rounding_reg_weight * reg
            if not torch.isfinite(loss):
                failed = True
                break
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
        if failed:
            break
    entry["steps"] = step
    params_ok = all(torch.isfinite(p).all() for sim in sims for p in sim.parameters())
    params_ok = params_ok and all(torch.isfinite(v).all() for v in vectors)
    if failed or not params_ok:
        _fallback(restore_start, label, "its loss became NaN/inf")
        entry.update(status="nan_fallback", loss_end=loss_start)
        return entry
    loss_end = eval_loss()
    if not math.isfinite(loss_end):
        _fallback(restore_start, label, "its final loss is NaN/inf")
        entry.update(status="nan_fallback", loss_end=loss_start)
    elif loss_end > loss_start:
        restore_start()
        logger.info("%s: loss rose %.4g -> %.4g; keeping its starting point", label, loss_start, loss_end)
        entry.update(status="reverted", loss_end=loss_start, loss_trained=loss_end)
    else:
        entry["loss_end"] = loss_end
    return entry


def _fallback(restore_start: Callable[[], None], label: str, why: str) -> None:
    restore_start()
    warnings.warn(
        f"cbq_hf: {label}: {why}; falling back to the window's starting point.", RuntimeWarning, stacklevel=3
    )
    logger.warning("%s: %s; falling back to the window's starting point", label, why)


# ------------------------------------------------------------------------------------------------ freezing
@torch.no_grad()
def _freeze_block(
    live: nn.Module, state: _BlockState, names: dict[str, str], fmt: UniformFormat, config, device: torch.device
) -> None:
    """Replace every `QuantLinearSim` of the block by its packed `CBQLinear` (hard rounding)."""
    with_scale = config.has_input_scale()
    for rel, sim in state.sims.items():
        if isinstance(sim, LOBCQLinearSim):
            packed = sim.freeze()  # packed LO-BCQ buffers (checks its scales)
        else:
            codes, scales, zeros, clip = sim.freeze()
            if not torch.isfinite(scales).all():
                raise RuntimeError(f"cbq_hf: non-finite step sizes in {names[rel]} at freeze time")
            packed = fmt.pack(codes, scales, zeros, clip)
        q = empty_cbq_linear(sim, fmt, with_scale, device=device, name=names[rel])
        input_scale = None
        if with_scale:
            input_scale = sim.input_scale if sim.input_scale is not None else torch.ones(sim.in_features)
        q.load_packed(
            {k: v.to(device) for k, v in packed.items()},
            bias=sim.bias,
            input_scale=None if input_scale is None else input_scale.to(device),
        )
        set_module(live, rel, q)
    state.sims.clear()
