"""CBQ as a method of the block pipeline: cross-block windows trained jointly with homologous reconstruction,
learnable step sizes, LoRA-Rounding and coarse-to-fine preprocessing (CFP).

Per window (`pipeline.BlockPipeline` walks the windows and packs the blocks that leave):

1. Blocks entering the window are preprocessed by CFP (`preprocess`, the float function unchanged) using the
   statistics recorded while the float window ran on X_fp, and each quantizable linear is replaced by its format's
   trainable stand-in (`QuantFormat.stand_in`).
2. Targets: the float window's output on X_fp (accumulated term) and on X_q (homologous term).
3. The window's quantizer parameters are trained jointly (Adam) on `loss.window_loss` + the rounding regulariser.
   A non-finite loss (or parameter) sends the window back to its starting point with a warning; a window whose
   hard-rounded loss ends above where it started is also sent back (CBQ is never worse than its initial grid).

The math lives beside it: `loss` (window loss), `rounding` and `lobcq_sim` (stand-ins), `preprocess` (CFP).
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..formats.stand_in import QuantStandIn, StandInOptions
from ..modeling import set_module
from .gptq import gptq_start
from .loss import window_loss
from .moe import inside_experts
from .pipeline import BlockPipeline
from .preprocess import SmoothingSettings, StatsCollector, smooth_block, weight_truncation
from .streams import Stream
from .windows import Window

logger = logging.getLogger(__name__)

#: Calibration tokens of each linear's float input kept for smooth_alpha="auto" (the per-group search).
SEARCH_TOKENS = 512
#: Calibration batches used to measure a window's loss before and after training.
EVAL_BATCHES = 4
#: Relative error allowed when checking that a CFP fold left the float block unchanged.
FOLD_TOLERANCE = 1e-4


@dataclass
class Targets:
    """What a window is trained towards: the float window's output on X_fp and (homologous term) on X_q."""

    accumulated: Stream
    homologous: Stream | None


class CBQMethod:
    """The CBQ method (see module docstring); `config` is the run's `CBQConfig`."""

    def __init__(self, config) -> None:
        self.config = config

    def start(self, pipe: BlockPipeline) -> None:
        zeros = dict(outlier_channels=0, folded_linears=0, explicit_scale_linears=0, truncation_outlier_weights=0)
        pipe.report.setdefault("cfp", zeros)

    def observers(self, pipe: BlockPipeline, new: list[int]) -> dict[int, StatsCollector]:
        keep = SEARCH_TOKENS if self.config.smooth_alpha == "auto" else 0
        gptq = self.config.rounding_init == "gptq"
        return {b: StatsCollector(pipe.states[b].fp, list(pipe.names[b]), keep, hessian=gptq) for b in new}

    def prepare(self, pipe: BlockPipeline, new: list[int], observers: dict, first_in: dict) -> None:
        for b in new:
            divisors, input_scales = _smooth(pipe, b, observers[b], first_in[b], self.config)
            _make_stand_ins(pipe, b, observers[b], divisors, input_scales)

    def train(self, pipe: BlockPipeline, win: Window, fp_out: Stream) -> dict[str, Any]:
        cfg = self.config
        use_hom = cfg.use_homologous and cfg.loss_weight_homologous > 0
        targets = Targets(fp_out, pipe.run_float(win, pipe.x_q, {})[0] if use_hom else None)
        vectors = _block_vectors(pipe, win) if cfg.lr_norm > 0 else []
        try:
            return _train_window(win, pipe, targets, vectors, cfg)
        finally:
            for v in vectors:  # trained inside the window only: the frozen model's parameters need no grad
                v.requires_grad_(False)


# ------------------------------------------------------------------------------------------------ preparation
@torch.no_grad()
def _smooth(pipe: BlockPipeline, b: int, stats: StatsCollector, first_in: torch.Tensor, config) -> tuple[dict, dict]:
    """CFP / smoothing of block `b` (its float function unchanged); returns per linear the divisor of its input
    statistics and its explicit input scale (None where folded)."""
    live, cfp = pipe.blocks[b], pipe.report["cfp"]
    # Expert matrices are never smoothed: their input is a routed subset of the norm's output, and `CBQExperts`
    # holds no input scale.
    linears = {rel: live.get_submodule(rel) for rel in pipe.names[b] if not inside_experts(live, rel)}
    if not ((config.use_cfp or config.smooth_alpha is not None) and linears):
        return {}, dict.fromkeys(linears)
    ref = pipe.inputs.call_block(pipe.states[b].fp, b, 0, first_in)

    def unchanged() -> bool:
        out = pipe.inputs.call_block(live, b, 0, first_in)
        return bool((out - ref).norm() <= FOLD_TOLERANCE * ref.norm())

    sm = smooth_block(live, linears, stats.stats, SmoothingSettings.from_config(config, pipe.fmt), unchanged)
    if sm.alphas:
        logger.info(
            "block %d smoothing: %s",
            b,
            ", ".join(f"{k}: {'CFP' if a is None else f'alpha {a}'}" for k, a in sm.alphas.items()),
        )
        chosen = cfp.setdefault("smooth_alpha_chosen", {})
        for a in sm.alphas.values():
            key = "cfp" if a is None else f"{a:g}"
            chosen[key] = chosen.get(key, 0) + 1
    cfp["outlier_channels"] += sm.outlier_channels
    cfp["folded_linears"] += len(sm.folded)
    cfp["explicit_scale_linears"] += len(sm.explicit)
    return sm.divisors, sm.input_scales


@torch.no_grad()
def _make_stand_ins(pipe: BlockPipeline, b: int, stats: StatsCollector, divisors: dict, input_scales: dict) -> None:
    """Replace every quantizable linear of block `b` by its format's trainable stand-in."""
    config, live = pipe.config, pipe.blocks[b]
    for rel in pipe.names[b]:
        lin = live.get_submodule(rel)
        ms = stats.mean_square(rel)  # of the float input (None: no token); the smoothed input is x / divisor
        if ms is not None and rel in divisors:
            ms = ms / divisors[rel].float().cpu().pow(2)
        truncation = None
        if config.use_cfp:
            truncation, n_out = weight_truncation(lin.weight, config.cfp_lambda1, config.cfp_lambda2)
            pipe.report["cfp"]["truncation_outlier_weights"] += n_out
        s = input_scales.get(rel)
        options = StandInOptions.from_config(
            config,
            input_scale=None if s is None else s.to(pipe.device),
            channel_weight=None if ms is None else ms.to(pipe.device),
            truncation=truncation,
            generator=pipe.gen,
        )
        sim = pipe.fmt.stand_in(lin, options).to(pipe.device)
        sim.online_hadamard = bool(getattr(lin, "online_hadamard", False))  # cbq_hf.rotation: rotates its input
        hessian = _smoothed_hessian(stats, rel, divisors) if config.rounding_init == "gptq" else None
        if hessian is not None:
            gptq_start(sim, hessian.to(pipe.device))
        pipe.states[b].stand_ins[rel] = sim
        set_module(live, rel, sim)


def _smoothed_hessian(stats: StatsCollector, rel: str, divisors: dict) -> torch.Tensor | None:
    """H [K, K] of the input linear `rel`'s stand-in multiplies: of x / d where smoothing divides its float input
    x by d (folded into a norm or as the input scale), H' = D^-1 H D^-1; None when no token reached it."""
    h = stats.hessian(rel)
    if h is None or rel not in divisors:
        return h
    inv = 1.0 / divisors[rel].float().to(h.device)
    return h * inv[:, None] * inv[None, :]


def _block_vectors(pipe: BlockPipeline, win: Window) -> list[nn.Parameter]:
    """The float vector parameters (norm weights and biases) of the window's blocks outside their stand-ins, made
    trainable (lr_norm). A block shared by two windows trains in both."""
    out = []
    for b in win.blocks:
        inside = {id(p) for sim in pipe.states[b].stand_ins.values() for p in sim.parameters()}
        for p in pipe.blocks[b].parameters():
            if p.dim() == 1 and p.is_floating_point() and id(p) not in inside:
                p.requires_grad_(True)
                out.append(p)
    return out


# ------------------------------------------------------------------------------------------------ training
def has_bf16_matrix_units(device: torch.device) -> bool:
    """Whether `device` multiplies bfloat16 matrices natively: a CUDA device with bfloat16 support, or a CPU with
    AMX or AVX512-BF16 (what `calibration_dtype="auto"` asks)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    probes = (getattr(torch.cpu, name, None) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"))
    return any(bool(probe()) for probe in probes if probe is not None)


def autocast(device: torch.device, calibration_dtype: str) -> torch.autocast:
    """The autocast context of the quantized window's forward: bfloat16 matrix products for "bfloat16" (and for
    "auto" where `has_bf16_matrix_units`), else disabled."""
    bf16 = calibration_dtype == "bfloat16" or (calibration_dtype == "auto" and has_bf16_matrix_units(device))
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)


class _WindowStart:
    """The starting point of a window's trainable parameters, to fall back to."""

    def __init__(self, sims: list[QuantStandIn], vectors: list[nn.Parameter]) -> None:
        self.sims, self.vectors = sims, vectors
        self.snapshots = [sim.snapshot() for sim in sims]
        self.vector_values = [v.detach().clone() for v in vectors]

    @torch.no_grad()
    def restore(self) -> None:
        for sim, snap in zip(self.sims, self.snapshots):
            sim.restore(snap)
        for v, value in zip(self.vectors, self.vector_values):
            v.copy_(value)

    def all_finite(self) -> bool:
        params = [p for sim in self.sims for p in sim.parameters()] + list(self.vectors)
        return all(bool(torch.isfinite(p).all()) for p in params)


def _train_window(
    win: Window, pipe: BlockPipeline, targets: Targets, vectors: list[nn.Parameter], config
) -> dict[str, Any]:
    """Train the window's stand-ins (and `vectors`: the blocks' norm parameters, with lr_norm) on the window loss;
    put everything back at its start when the loss ends higher or turns non-finite. Returns its report entry."""
    sims = [sim for b in win.blocks for sim in pipe.states[b].stand_ins.values()]
    label = f"window {win.index + 1}/{len(pipe.schedule)} (blocks {win.start}-{win.end - 1})"
    start = _WindowStart(sims, vectors)
    loss_start = _eval_loss(win, pipe, targets, config)
    entry: dict[str, Any] = {"blocks": [win.start, win.end - 1], "loss_start": loss_start, "steps": 0, "status": "ok"}
    if not math.isfinite(loss_start):
        _fallback(start, label, "its starting loss is not finite")
        return {**entry, "status": "nan_fallback", "loss_end": loss_start}
    opt = _optimizer(sims, vectors, config)
    if opt is None or config.epochs * len(pipe.inputs.batches) == 0:
        return {**entry, "loss_end": loss_start}
    entry["steps"], failed = _run_steps(win, pipe, targets, opt, sims, config)
    if failed or not start.all_finite():
        _fallback(start, label, "its loss became NaN/inf")
        return {**entry, "status": "nan_fallback", "loss_end": loss_start}
    loss_end = _eval_loss(win, pipe, targets, config)
    if not math.isfinite(loss_end):
        _fallback(start, label, "its final loss is NaN/inf")
        return {**entry, "status": "nan_fallback", "loss_end": loss_start}
    if loss_end > loss_start:
        start.restore()
        logger.info("%s: loss rose %.4g -> %.4g; keeping its starting point", label, loss_start, loss_end)
        return {**entry, "status": "reverted", "loss_end": loss_start, "loss_trained": loss_end}
    return {**entry, "loss_end": loss_end}


def _batch_loss(win: Window, pipe: BlockPipeline, targets: Targets, c_idx: int, config) -> torch.Tensor:
    """Window loss of calibration batch `c_idx` (quantized window on X_q against the targets)."""
    s, e = pipe.inputs.batches[c_idx]
    with autocast(pipe.device, config.calibration_dtype):
        out = pipe.forward_window(win, c_idx, pipe.x_q[s:e].to(pipe.device)).float()
    hom = targets.homologous[s:e].to(pipe.device) if targets.homologous is not None else None
    kl = config.kl_weight if config.use_kl else 0.0
    return window_loss(
        out,
        targets.accumulated[s:e].to(pipe.device),
        hom,
        config.loss_weight_accumulated,
        config.loss_weight_homologous,
        kl,
        config.token_normalized_loss,
    )


@torch.no_grad()
def _eval_loss(win: Window, pipe: BlockPipeline, targets: Targets, config) -> float:
    """Mean window loss over the first `EVAL_BATCHES` calibration batches."""
    ids = range(min(EVAL_BATCHES, len(pipe.inputs.batches)))
    return sum(float(_batch_loss(win, pipe, targets, i, config)) for i in ids) / len(ids)


def _optimizer(sims: list[QuantStandIn], vectors: list[nn.Parameter], config) -> torch.optim.Adam | None:
    """Adam over the rounding (lr), step/clipping (lr_scale) and vector (lr_norm) parameters; None if none."""
    rounding = [p for sim in sims for p in sim.rounding_parameters()]
    scales = [p for sim in sims for p in sim.scale_parameters()]
    groups = [
        {"params": rounding, "lr": config.lr},
        {"params": scales, "lr": config.lr_scale},
        {"params": vectors, "lr": config.lr_norm},
    ]
    groups = [g for g in groups if g["params"]]
    return torch.optim.Adam(groups) if groups else None


def _run_steps(
    win: Window, pipe: BlockPipeline, targets: Targets, opt: torch.optim.Optimizer, sims: list[QuantStandIn], config
) -> tuple[int, bool]:
    """`config.epochs` passes over the calibration batches in random order (annealed rounding regulariser).
    Returns (steps taken, whether a loss turned non-finite)."""
    total = config.epochs * len(pipe.inputs.batches)
    regularized = config.use_lora_rounding and config.rounding_reg_weight > 0
    step = 0
    try:
        for _ in range(config.epochs):
            for c_idx in torch.randperm(len(pipe.inputs.batches), generator=pipe.gen).tolist():
                beta = config.beta_start + (config.beta_end - config.beta_start) * step / max(total - 1, 1)
                for sim in sims:
                    sim.regularizer_beta = beta if regularized else None
                loss = _batch_loss(win, pipe, targets, c_idx, config)
                if regularized:
                    reg = torch.stack([sim.regularizer(beta).to(loss.device) for sim in sims]).mean()
                    loss = loss + config.rounding_reg_weight * reg
                if not torch.isfinite(loss):
                    return step, True
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
    finally:
        for sim in sims:
            sim.regularizer_beta = None
    return step, False


def _fallback(start: _WindowStart, label: str, why: str) -> None:
    start.restore()
    warnings.warn(
        f"cbq_hf: {label}: {why}; falling back to the window's starting point.", RuntimeWarning, stacklevel=3
    )
    logger.warning("%s: %s; falling back to the window's starting point", label, why)
