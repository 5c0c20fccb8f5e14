"""End-to-end stage after the windows: the step sizes (and activation clipping ratios) of every packed uniform
linear trained jointly against the float model's output, codes fixed.

Block-wise windows correct the error each window sees; what they cannot see is how the errors of all windows add
up at the output. This stage trains the cheap-to-hold quantizer parameters of the whole model (one step per group
and linear, one clipping ratio per linear) on the KL divergence between the float model's next-token
distribution (computed once, before calibration changes the model: its final hidden states are kept) and the
quantized model's. The codes and zero points stay as the windows froze them. The model's other parameters are
frozen. A stage whose KL ends above where it started is reverted.

Memory: the whole model runs forward and backward on the calibration device, plus one int8 copy of the codes per
linear; a model dispatched by accelerate over several devices / offloaded is skipped with a warning. The experts of
mixture-of-experts blocks (`CBQExperts`) keep their windows' steps; the stage trains the other linears.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..formats.uniform import UniformFormat, round_scale, unpack_codes
from ..kernels.reference import scale_input
from ..nn.experts import CBQExperts
from ..nn.linear import CBQLinear
from ..rotation import hadamard_transform
from .cbq import autocast
from .rounding import (
    MIN_ACT_CLIP,
    autocast_dtype,
    cpu_calibration_ops,
    fake_quantize_activations_ste,
    mul_groups,
    sum_groups,
)

logger = logging.getLogger(__name__)

#: Calibration batches the KL is measured on before and after the stage.
EVAL_BATCHES = 4


class _ScaledCodes(torch.autograd.Function):
    """W = qz * round_scale(scale0 * exp(log_delta)) from fixed codes qz = q - z (int8 [N, K]): the gradient reaches
    log_delta only. W comes out in `out_dtype` (the autocast dtype of the matrix product that reads it, so it is
    not cast again); on the CPU with the extension's kernels (`ops`), forward and backward are one pass each."""

    @staticmethod
    def forward(ctx, log_delta, qz, scale0, group_len, out_dtype, ops):
        e = torch.exp(log_delta)
        step = round_scale(scale0 * e)
        if ops is not None:
            w = ops.scaled_codes_fwd(qz, step.contiguous(), group_len, out_dtype == torch.bfloat16)
        else:
            w = mul_groups(qz, step, group_len, out_dtype)
        ctx.save_for_backward(qz, scale0, e)
        ctx.group_len, ctx.ops = group_len, ops
        return w

    @staticmethod
    def backward(ctx, g_w):
        qz, scale0, e = ctx.saved_tensors
        if ctx.ops is not None:
            raw = ctx.ops.scaled_codes_bwd(g_w.contiguous(), qz, ctx.group_len)
        else:
            raw = sum_groups(g_w.float() * qz, ctx.group_len)
        return raw.mul_(scale0).mul_(e), None, None, None, None, None


class _KLToReference(torch.autograd.Function):
    """Mean over tokens of KL(softmax(ref) || softmax(logits)) for float32 logits [T, V] and reference logits
    [T, V] (no gradient; overwritten), written out: sum_v p (log p - logits) + logsumexp(logits) per token, with
    p = softmax(ref), and the gradient softmax(logits) - p. The same values as `F.kl_div` of the two log-softmaxes
    up to float rounding (it takes sum_v p = 1), in about half the passes over [T, V]: at a 49k vocabulary the
    composed ops cost as much as the model's forward."""

    @staticmethod
    def forward(ctx, logits, ref):
        lse = torch.logsumexp(logits, -1, keepdim=True)
        ref_logp = ref.sub_(torch.logsumexp(ref, -1, keepdim=True))
        p = torch.exp(ref_logp)
        per_token = ref_logp.sub_(logits).mul_(p).sum(-1) + lse.squeeze(-1)
        ctx.save_for_backward(logits, lse, p)
        return per_token.mean()

    @staticmethod
    def backward(ctx, g):
        logits, lse, p = ctx.saved_tensors
        return torch.sub(logits, lse).exp_().sub_(p).mul_(g / lse.numel()), None


def kl_to_reference(logits: torch.Tensor, ref_logits: torch.Tensor) -> torch.Tensor:
    """Mean KL(softmax(ref_logits) || softmax(logits)) over all tokens: logits [..., V] float32 (differentiable);
    `ref_logits` [..., V] float32 is used as scratch space (its values are lost)."""
    v = logits.shape[-1]
    return _KLToReference.apply(logits.reshape(-1, v), ref_logits.reshape(-1, v))


class TrainableSteps(nn.Module):
    """Stands in for a packed uniform `CBQLinear` during the stage: the same function, with its steps and
    activation clipping ratio trainable (straight-through rounding of the steps to float16)."""

    def __init__(self, q: CBQLinear) -> None:
        super().__init__()
        self.q, spec = q, q.fmt.spec
        codes = unpack_codes(q.qweight, spec.slot_bits, q.in_features).float()
        zeros = q.zeros.float().index_select(1, torch.arange(q.in_features, device=codes.device) // self._g())
        self.register_buffer("qz", (codes - zeros).to(torch.int8))
        self.register_buffer("scale0", q.scales.float())
        self.log_delta = nn.Parameter(torch.zeros_like(self.scale0))
        clip = q.act_clip.float().clone() if q.fmt.act_bits is not None else None
        self.act_clip = None if clip is None else nn.Parameter(clip)

    def _g(self) -> int:
        return self.q.fmt.spec.group_len(self.q.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.q
        if q.input_hadamard is not None:
            x = hadamard_transform(x)
        x = scale_input(q.input_scale, x)
        dev = x.device.type
        dtype = autocast_dtype(dev)
        if self.act_clip is not None or dtype == torch.float32:  # autocast casts x for the product itself
            x = x.float()
        if self.act_clip is not None:
            x = fake_quantize_activations_ste(x, q.fmt.act_bits, self.act_clip.clamp(MIN_ACT_CLIP, 1.0))
        ops = cpu_calibration_ops() if dev == "cpu" and dtype in (torch.float32, torch.bfloat16) else None
        w = _ScaledCodes.apply(self.log_delta, self.qz, self.scale0, self._g(), dtype, ops)
        return F.linear(x, w, None if q.bias is None else q.bias.float())

    @torch.no_grad()
    def write_back(self) -> CBQLinear:
        """The packed linear with the trained steps and clipping ratio stored."""
        self.q.scales.copy_(round_scale(self.scale0 * torch.exp(self.log_delta)).to(self.q.scales.dtype))
        if self.act_clip is not None:
            self.q.act_clip.copy_(self.act_clip.clamp(MIN_ACT_CLIP, 1.0))
        self.q._kernel_cache.clear()
        return self.q


def _final_hidden(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The decoder's last hidden state (what the output head reads) for token ids `ids`."""
    device = model.get_output_embeddings().weight.device
    return model.get_decoder()(input_ids=ids.to(device)).last_hidden_state


@torch.no_grad()
def float_targets(model: nn.Module, input_ids: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Final hidden states [n, seqlen, hidden] of the float model on the calibration tokens (kept on the CPU)."""
    out = [
        _final_hidden(model, input_ids[s : s + batch_size]).float().cpu() for s in range(0, len(input_ids), batch_size)
    ]
    return torch.cat(out)


def _swap(model: nn.Module, to_train: bool) -> list[TrainableSteps]:
    """Replace every uniform `CBQLinear` by its `TrainableSteps` (or put them back); returns the stand-ins.

    The matrices of a `CBQExperts` keep the steps their windows gave them: its kernels read their packed buffers
    directly, so they cannot be stood in for."""
    in_experts = {id(m) for e in model.modules() if isinstance(e, CBQExperts) for m in e.modules()}
    found = []
    for parent in list(model.modules()):
        if id(parent) in in_experts:
            continue
        for name, child in list(parent.named_children()):
            if to_train and isinstance(child, CBQLinear) and isinstance(child.fmt, UniformFormat):
                setattr(parent, name, TrainableSteps(child))
                found.append(getattr(parent, name))
            elif not to_train and isinstance(child, TrainableSteps):
                setattr(parent, name, child.write_back())
    return found


class _Head:
    """The output head of the stage: its weight cast once to the autocast dtype (a frozen weight is otherwise cast
    again at every call: 28M values for a 49k x 576 head, twice per step)."""

    def __init__(self, model: nn.Module, calibration_dtype: str) -> None:
        self.module = model.get_output_embeddings()
        self.calibration_dtype = calibration_dtype
        weight = self.module.weight
        with autocast(weight.device, calibration_dtype) as ctx:
            low = ctx.fast_dtype if torch.is_autocast_enabled(weight.device.type) else None
        plain = type(self.module) is nn.Linear
        self.weight = weight.detach().to(low) if plain and low is not None and weight.dtype != low else None

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.weight is None:
            return self.module(hidden)
        return F.linear(hidden, self.weight, self.module.bias)


def _kl(model: nn.Module, ids: torch.Tensor, target_hidden: torch.Tensor, head: _Head) -> torch.Tensor:
    """Mean KL(float || quantized) of the next-token distributions on a batch (float32; the matrix products in
    bfloat16 autocast where `head.calibration_dtype` asks for it, as in the windows)."""
    device = head.module.weight.device
    with autocast(device, head.calibration_dtype):
        logits = head(_final_hidden(model, ids)).float()
        with torch.no_grad():
            ref = head(target_hidden.to(device, head.module.weight.dtype)).float()
    return kl_to_reference(logits, ref)


def train_end_to_end(model: nn.Module, input_ids: torch.Tensor, targets: torch.Tensor, config) -> dict[str, Any]:
    """Train every uniform packed linear's steps and clipping ratio (and, with `config.e2e_lr_norm` > 0, the
    normalisation layers' weights) on the KL to the float model's outputs for `config.e2e_epochs` passes over the
    calibration tokens (batch `config.batch_size`, Adam at `config.e2e_lr`). Returns the stage's report (KL
    before / after, steps, status)."""
    was_training = model.training
    model.eval()
    model.requires_grad_(False)
    stand_ins = _swap(model, to_train=True)
    if not stand_ins:  # e.g. format="lobcq": no uniform linear outside the experts has steps to train
        model.train(was_training)
        logger.info("end-to-end stage: no packed uniform linear to train; skipped")
        return {"kl_start": None, "kl_end": None, "steps": 0, "status": "skipped", "linears": 0}
    batches = [(s, min(s + config.batch_size, len(input_ids))) for s in range(0, len(input_ids), config.batch_size)]
    groups = [{"params": [p for m in stand_ins for p in m.parameters()], "lr": config.e2e_lr}]
    if config.e2e_lr_norm > 0:
        groups.append({"params": _norm_vectors(model), "lr": config.e2e_lr_norm})
    params = [p for g in groups for p in g["params"]]
    start = [p.detach().clone() for p in params]
    head = _Head(model, config.calibration_dtype)
    try:
        kl_start = _eval_kl(model, input_ids, targets, batches, head)
        steps = _run(model, input_ids, targets, batches, groups, head, config)
        kl_end = _eval_kl(model, input_ids, targets, batches, head)
        status = "ok"
        if not (math.isfinite(kl_end) and kl_end <= kl_start):
            with torch.no_grad():
                for p, s in zip(params, start):
                    p.copy_(s)
            status = "reverted"
    finally:
        _swap(model, to_train=False)
        model.requires_grad_(False)
        model.train(was_training)
    logger.info("end-to-end stage: KL %.4g -> %.4g over %d steps (%s)", kl_start, kl_end, steps, status)
    return {"kl_start": kl_start, "kl_end": kl_end, "steps": steps, "status": status, "linears": len(stand_ins)}


@torch.no_grad()
def _eval_kl(model, input_ids, targets, batches, head: _Head) -> float:
    ids = batches[:EVAL_BATCHES]
    return sum(float(_kl(model, input_ids[s:e], targets[s:e], head)) for s, e in ids) / len(ids)


def _norm_vectors(model: nn.Module) -> list[nn.Parameter]:
    """The weights and biases of the model's normalisation layers (RMSNorm / LayerNorm: the per-channel scales
    that feed the quantized linears), made trainable for `e2e_lr_norm`. They stay float in the checkpoint."""
    out = []
    for module in model.get_decoder().modules():
        if "norm" in type(module).__name__.lower():
            for p in module.parameters(recurse=False):
                if p.is_floating_point():
                    p.requires_grad_(True)
                    out.append(p)
    return out


def _run(model, input_ids, targets, batches, groups: list[dict], head: _Head, config) -> int:
    """Adam over the parameter `groups` (each with its lr) for `config.e2e_epochs` shuffled passes; stops at a
    non-finite loss. Returns steps."""
    gen = torch.Generator().manual_seed(config.seed)
    opt = torch.optim.Adam(groups)
    step = 0
    for _ in range(config.e2e_epochs):
        for i in torch.randperm(len(batches), generator=gen).tolist():
            s, e = batches[i]
            loss = _kl(model, input_ids[s:e], targets[s:e], head)
            if not torch.isfinite(loss):
                return step
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
    return step
