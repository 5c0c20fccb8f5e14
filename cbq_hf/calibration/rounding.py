"""Trainable quantizers of one linear during calibration: learnable step sizes, LoRA-Rounding, activation clipping.

`QuantLinearSim` is the uniform format's stand-in (`formats.stand_in`) for an `nn.Linear` while its window trains;
`freeze()` returns the packed `CBQLinear` buffers of the hard-rounded codes and stored-exact steps.

Choices (and why):

- Step sizes start from a per-group grid search: min-max with a set of clip ratios (plus the CFP truncation
  threshold when given), keeping per group the candidate with the smallest weight error, weighted by the mean
  square of each input channel when activation statistics are known. The learned step is
  s = s0 * exp(log_delta): well conditioned for Adam whatever the magnitude of s0. Zero points stay at their
  initial integers. Every forward uses the float16-rounded step (straight-through), so what trains is what is
  stored.
- LoRA-Rounding: V = V0 + A1 @ A2 with rank r learned factors (A2 starts at zero). V0 is a fixed buffer set so
  that h(V0) equals the rounding residual W/s0 - floor(W/s0): at the start the rounding is round-to-nearest, so
  an untrained (or zero-epoch) calibration is never worse than the initial grid. With V = A1 @ A2 alone every
  offset would start at h = 0.5 and the first hard rounding would round every weight up.
- Codes with LoRA-Rounding are floor(W / s0) + h(V): the offsets choose floor or ceiling on the *initial* grid and
  the learned step s only rescales the codes, W_q = s * (q - z). The paper's floor(W / s) + h(V) on the moving grid
  couples the two badly: each small step update carries the weights next to a grid point across it while their
  learned h stays put, a whole-step error. Measured (2-block proxy, W4A16 g128, 16 x 256 tokens, 32 steps,
  relative MSE of the output): moving grid 0.0089, fixed steps 0.0065, initial-grid floor 0.0058.
- The forward uses hard rounding (h >= 0.5) with the gradient of the soft h (straight-through). AdaRound's soft
  forward needs thousands of steps for the regulariser to push h to 0/1; with the few steps per window that fit
  on a CPU the soft model is close to the float one and the loss would not see the quantization. The annealed
  regulariser sum(1 - |2h - 1|^beta) (averaged per element) still pushes offsets away from the decision boundary.
- Activations (act_bits): per-token symmetric dynamic quantization like `fake_quantize_activations`, with one
  learnable clipping ratio per linear in [0.2, 1] trained through the step size (LSQ-style straight-through).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..formats.stand_in import QuantStandIn, StandInOptions
from ..formats.uniform import UniformSpec, expand_groups, minmax_qparams, pack_uniform, round_scale
from ..rotation import hadamard_transform

ZETA = 1.1
GAMMA = -0.1
#: Clip ratios tried per group when initialising step sizes (1.0 = plain min-max).
CLIP_GRID = tuple(1.0 - 0.05 * i for i in range(11))
#: Smallest learnable activation clipping ratio.
MIN_ACT_CLIP = 0.2


def rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    """h(V) = clip(sigmoid(V) * (zeta - gamma) + gamma, 0, 1)."""
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def inverse_rectified_sigmoid(h: torch.Tensor) -> torch.Tensor:
    """V with h(V) = h for h in [0, 1)."""
    p = ((h - GAMMA) / (ZETA - GAMMA)).clamp(1e-6, 1 - 1e-6)
    return torch.log(p / (1 - p))


def rounding_regularizer(h: torch.Tensor, beta: float) -> torch.Tensor:
    """mean(1 - |2h - 1|^beta): zero when every offset is 0 or 1."""
    return (1 - (2 * h - 1).abs().pow(beta)).mean()


def round_ste(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.round(x) - x).detach()


def _group_sum(t: torch.Tensor, spec: UniformSpec) -> torch.Tensor:
    """Sum of t [N, K] over each group -> [N, G]."""
    n, k = t.shape
    g = spec.group_len(k)
    pad = spec.num_groups(k) * g - k
    return F.pad(t, (0, pad)).view(n, -1, g).sum(-1)


def _fake_quant(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: UniformSpec) -> torch.Tensor:
    k = w.shape[1]
    s = expand_groups(scale, k, spec)
    z = expand_groups(zero, k, spec)
    return (torch.clamp(torch.round(w / s) + z, 0, spec.qmax) - z) * s


@torch.no_grad()
def init_qparams(
    weight: torch.Tensor,
    spec: UniformSpec,
    channel_weight: torch.Tensor | None = None,
    truncation: torch.Tensor | None = None,
    clip_grid: tuple[float, ...] = CLIP_GRID,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group (scale, zero) [N, G] minimising the (channel-weighted) squared weight error over clip ratios.

    Args:
        weight: W [N, K] float.
        spec: the grid.
        channel_weight: optional [K] importance of each input channel (mean square of the activations).
        truncation: optional [N] per-row magnitude threshold (CFP weight truncation); tried as one more candidate.
        clip_grid: clip ratios tried; 1.0 must be among them so the result is never worse than min-max.
    """
    w = weight.float()
    n, k = w.shape
    cw = torch.ones(k) if channel_weight is None else channel_weight.float().clamp(min=1e-12)
    cw = cw.to(w.device).expand(n, k)
    candidates: list[float | torch.Tensor] = list(clip_grid)
    if truncation is not None:
        absmax = _group_absmax(w, spec)
        candidates.append((truncation.to(w.device).float()[:, None] / absmax.clamp(min=1e-12)).clamp(max=1.0))
    best_scale = best_zero = best_err = None
    for clip in candidates:
        scale, zero = minmax_qparams(w, spec, clip)
        err = _group_sum((_fake_quant(w, scale, zero, spec) - w).pow(2) * cw, spec)
        if best_err is None:
            best_scale, best_zero, best_err = scale, zero, err
        else:
            better = err < best_err
            best_scale = torch.where(better, scale, best_scale)
            best_zero = torch.where(better, zero, best_zero)
            best_err = torch.where(better, err, best_err)
    return best_scale, best_zero


def _group_absmax(w: torch.Tensor, spec: UniformSpec) -> torch.Tensor:
    n, k = w.shape
    g = spec.group_len(k)
    pad = spec.num_groups(k) * g - k
    return F.pad(w.abs(), (0, pad)).view(n, -1, g).amax(-1)


def _group_view_op(t: torch.Tensor, g: int, fn) -> list[torch.Tensor]:
    """`fn` applied to the [N, G_full, g] view of the whole groups of t [N, K] and to the [N, 1, K % g] view of a
    shorter last group (when there is one); returns their results."""
    n, k = t.shape
    full = k // g * g
    out = [fn(t[:, :full].view(n, k // g, g), slice(0, k // g))] if full else []
    if full < k:
        out.append(fn(t[:, full:].view(n, 1, k - full), slice(k // g, k // g + 1)))
    return out


def mul_groups(t: torch.Tensor, per_group: torch.Tensor, g: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """t [N, K] times per_group [N, G] expanded over each group of `g` channels, in one pass into a new tensor of
    `dtype` (t's by default), without building the [N, K] expansion."""
    t = t.contiguous()
    out = torch.empty(t.shape, dtype=dtype or t.dtype, device=t.device)
    views = iter(_group_view_op(out, g, lambda v, gs: v))
    _group_view_op(t, g, lambda v, gs: torch.mul(v, per_group[:, gs, None], out=next(views)))
    return out


def sum_groups(t: torch.Tensor, g: int) -> torch.Tensor:
    """Sum of t [N, K] over each group of `g` channels -> [N, G]."""
    return torch.cat(_group_view_op(t.contiguous(), g, lambda v, gs: v.sum(-1)), dim=1)


class _LoRARoundedWeight(torch.autograd.Function):
    """W_q = (clamp(base + [h >= 0.5], 0, qmax) - z) * round_scale(scale0 * exp(log_delta)) and the soft offsets
    h = rectified_sigmoid(v0 + a1 @ a2), forward and backward written out (straight-through hard rounding and
    step rounding, as the composed ops of `QuantLinearSim` define them). `base` = floor(W / scale0) + z.

    `constants` = (v0, base, z [N, K], scale0 [N, G], group length, qmax, dtype of W_q: bfloat16 under bfloat16
    autocast saves the cast the matmul would make). Every value of the forward equals the
    composed ops' (each step is exact in float32); the backward equals theirs up to summation order. It makes about
    a third of the memory passes over [N, K] that autograd of the composed ops makes, which is what a calibration
    step on a CPU spends most of its time on.
    """

    @staticmethod
    def forward(ctx, a1, a2, log_delta, constants):
        v0, base, zero_k, scale0, group_len, qmax, out_dtype = constants
        with torch.autocast(a1.device.type, enabled=False):  # the offsets in float32 under autocast too
            h = torch.mm(a1, a2)
        h = h.add_(v0).sigmoid_().mul_(ZETA - GAMMA).add_(GAMMA)
        h_in = (h >= 0) & (h <= 1)  # where rectified_sigmoid's clamp passes the gradient
        h.clamp_(0.0, 1.0)
        qpre = base + (h >= 0.5)
        q = qpre.clamp(0, qmax)
        q_in = q == qpre  # where the code clamp passes the gradient
        qz = q.sub_(zero_k)
        e = torch.exp(log_delta)
        step = round_scale(scale0 * e)
        w = mul_groups(qz, step, group_len, out_dtype)
        ctx.save_for_backward(a1, a2, h, h_in, q_in, qz, step, scale0, e)
        ctx.group_len = group_len
        return w, h

    @staticmethod
    def backward(ctx, g_w, g_h):
        a1, a2, h, h_in, q_in, qz, step, scale0, e = ctx.saved_tensors
        g = ctx.group_len
        g_log_delta = sum_groups(g_w * qz, g).mul_(scale0).mul_(e) if ctx.needs_input_grad[2] else None
        t = mul_groups(g_w, step, g, torch.float32).mul_(q_in)  # d loss / d h through the straight-through codes
        if g_h is not None:
            t.add_(g_h)
        sig = (h - GAMMA).div_(ZETA - GAMMA)  # sigmoid(V) where the clamp passed it (elsewhere h_in masks)
        t.mul_(h_in).mul_(ZETA - GAMMA).mul_(sig)
        t.mul_(sig.neg_().add_(1.0))  # sigmoid'(V) = sig * (1 - sig)
        return t @ a2.t(), a1.t() @ t, g_log_delta, None


class _LoRARoundedWeightCPU(torch.autograd.Function):
    """`_LoRARoundedWeight` and, when beta > 0, `rounding_regularizer` of the same offsets, in the CPU extension's
    kernels (``lora_round_fwd`` / ``lora_round_bwd``, cbq_hf/kernels/cpu/rounding_cpu.cpp): one pass over [N, K]
    each way: the forward computes the rank-r product, the sigmoid, the codes and the regulariser's terms element by
    element (writing the weight and the offsets the backward reads), the backward the gradients of both terms and
    the LoRA factors' sums, so no [N, K] gradient tensor is written. The same values as `_LoRARoundedWeight` and
    `_RoundingRegularizer` up to float rounding (float32 exp/log approximations, summation order).

    `constants` = (v0, base as int16, zero [N, G], scale0 [N, G], group length, qmax, dtype of W_q (float32 or
    bfloat16), beta of the regulariser (0: not computed), the op namespace). Returns (W_q, regulariser: mean(1 -
    |2h - 1|^beta), 0 when beta is 0).
    """

    @staticmethod
    def forward(ctx, a1, a2, log_delta, constants):
        v0, base16, zero, scale0, group_len, qmax, out_dtype, beta, ops = constants
        e = torch.exp(log_delta)
        step = round_scale(scale0 * e).contiguous()
        bf16 = out_dtype == torch.bfloat16
        w, h, reg_sum = ops.lora_round_fwd(v0, a1, a2, base16, zero, step, group_len, qmax, bf16, beta)
        ctx.save_for_backward(a1, a2, h, step, scale0, e)
        ctx.constants = (base16, zero, group_len, qmax, beta, ops)
        reg = 1.0 - reg_sum / v0.numel() if beta > 0 else reg_sum
        return w, reg

    @staticmethod
    def backward(ctx, g_w, g_reg):
        a1, a2, h, step, scale0, e = ctx.saved_tensors
        base16, zero, group_len, qmax, beta, ops = ctx.constants
        reg_coef = -float(g_reg) / h.numel() if g_reg is not None and beta > 0 else 0.0
        if g_w is None:
            g_w = torch.zeros(h.shape, dtype=torch.float32)
        g_a1, g_a2, g_raw = ops.lora_round_bwd(
            g_w.contiguous(), reg_coef, h, a1, a2, base16, zero, step, group_len, qmax, beta
        )
        g_log_delta = g_raw.mul_(scale0).mul_(e) if ctx.needs_input_grad[2] else None
        return g_a1, g_a2, g_log_delta, None


#: Whether calibration on the CPU uses the extension's kernels (LoRA-Rounding's `_LoRARoundedWeightCPU` with its
#: regulariser, the end-to-end stage's fixed-code weight) when they are built; False keeps the
#: PyTorch ops everywhere (to compare the two).
USE_CPU_KERNELS = True


def cpu_calibration_ops():
    """The op namespace with the calibration kernels (cbq_hf/kernels/cpu/rounding_cpu.cpp), or None where the CPU
    kernels are not built or `USE_CPU_KERNELS` is off."""
    if not USE_CPU_KERNELS:
        return None
    from ..kernels.cpu import build

    return build.load()


class _RoundingRegularizer(torch.autograd.Function):
    """`rounding_regularizer(h, beta)` = mean(1 - |2h - 1|^beta) with its gradient written out:
    d/dh = -2 beta / numel * |2h - 1|^beta / (2h - 1) (zero where 2h = 1, as beta > 1 makes it). Fewer passes over
    [N, K] than autograd of the composed ops."""

    @staticmethod
    def forward(ctx, h, beta):
        d = torch.mul(h, 2.0).sub_(1.0)
        t = d.abs().pow_(beta)
        ctx.save_for_backward(d, t)
        ctx.beta = beta
        return 1.0 - t.mean()

    @staticmethod
    def backward(ctx, g):
        d, t = ctx.saved_tensors
        grad = torch.div(t, d).nan_to_num_(0.0, 0.0, 0.0).mul_(g * (-2.0 * ctx.beta / d.numel()))
        return grad, None


def autocast_dtype(device_type: str) -> torch.dtype:
    """The dtype autocast gives matrix products on `device_type` now (float32 where autocast is off)."""
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else torch.float32


def fake_quantize_activations_ste(x: torch.Tensor, act_bits: int, clip: torch.Tensor) -> torch.Tensor:
    """Per-token symmetric quantization of x (as `fake_quantize_activations`), differentiable through `clip`."""
    qmax = 2 ** (act_bits - 1) - 1
    step = (x.detach().abs().amax(-1, keepdim=True) * clip / qmax).clamp(min=1e-8)
    return torch.clamp(round_ste(x / step), -qmax - 1, qmax) * step


class QuantLinearSim(QuantStandIn):
    """Calibration-time stand-in for an `nn.Linear`: y = Q_act(x / input_scale) @ Q(W).T + b.

    Args:
        linear: the float linear (its weight already includes any CFP column scaling).
        spec: the weight grid.
        act_bits: activation bits, or None for weight-only.
        options: how it is built (`StandInOptions`: LoRA rank, what is learned, input scale, channel weights,
            CFP truncation, generator); the keyword arguments of the same names override it.
    """

    def __init__(
        self,
        linear: nn.Linear,
        spec: UniformSpec,
        act_bits: int | None = None,
        *,
        options: StandInOptions | None = None,
        **overrides,
    ) -> None:
        super().__init__()
        o = StandInOptions(**{**(options or StandInOptions()).__dict__, **overrides})
        lora_rank, use_lora_rounding, input_scale = o.lora_rank, o.use_lora_rounding, o.input_scale
        learn_weight_scales, learn_act_clipping, generator = o.learn_weight_scales, o.learn_act_clipping, o.generator
        channel_weight, truncation = o.channel_weight, o.truncation
        w = linear.weight.detach().float().clone()
        n, k = w.shape
        self.spec = spec
        self.act_bits = act_bits
        self.in_features, self.out_features = k, n
        self.register_buffer("weight", w)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float().clone())
        self.register_buffer("input_scale", None if input_scale is None else input_scale.detach().float().clone())
        scale0, zero = init_qparams(w, spec, channel_weight, truncation)
        self.register_buffer("scale0", scale0)
        self.register_buffer("zero", zero)
        delta = torch.zeros_like(scale0)
        if learn_weight_scales:
            self.log_delta = nn.Parameter(delta)
        else:
            self.register_buffer("log_delta", delta)
        self.use_lora_rounding = use_lora_rounding
        #: Hard (0/1) rounding offsets in the forward; False gives AdaRound's soft offsets while training.
        self.hard = True
        if use_lora_rounding:
            x = w / expand_groups(scale0, k, spec)
            self.register_buffer("v0", inverse_rectified_sigmoid(x - torch.floor(x)))
            a1 = torch.randn(n, lora_rank, generator=generator) / math.sqrt(lora_rank)
            self.a1 = nn.Parameter(a1.to(w.device))
            self.a2 = nn.Parameter(torch.zeros(lora_rank, k, device=w.device))
        clip = torch.ones(1, device=w.device)
        if act_bits is not None and learn_act_clipping:
            self.act_clip = nn.Parameter(clip)
        else:
            self.register_buffer("act_clip", clip)

    @torch.no_grad()
    def start_from(self, weight: torch.Tensor) -> None:
        """Round `weight` [N, K] instead of the linear's weight, on the same starting grid (scale0, zero): the
        initial hard rounding becomes torch.round(weight / scale0) exactly (`gptq.gptq_start` gives the
        error-compensated weight of GPTQ). Offsets within 1e-4 of 1/2 are moved to that side of 1/2, so the
        inverse sigmoid's float error cannot flip a decision."""
        self.weight.copy_(weight)
        if self.use_lora_rounding:
            x = self.weight / expand_groups(self.scale0, self.in_features, self.spec)
            floor = torch.floor(x)
            frac = x - floor
            frac = torch.where(torch.round(x) > floor, frac.clamp(min=0.5 + 1e-4), frac.clamp(max=0.5 - 1e-4))
            self.v0.copy_(inverse_rectified_sigmoid(frac))

    # ---------------------------------------------------------------- parameters
    def rounding_parameters(self) -> list[nn.Parameter]:
        return [self.a1, self.a2] if self.use_lora_rounding else []

    def scale_parameters(self) -> list[nn.Parameter]:
        return [p for p in (self.log_delta, self.act_clip) if isinstance(p, nn.Parameter)]

    def scale(self) -> torch.Tensor:
        """Current step sizes [N, G], rounded to what is stored (straight-through)."""
        s = self.scale0 * torch.exp(self.log_delta)
        return s + (round_scale(s) - s).detach()

    def offsets(self) -> torch.Tensor:
        """Soft rounding offsets h(V) in [0, 1], [N, K]."""
        return rectified_sigmoid(self.v0 + self.a1 @ self.a2)

    def clip_ratio(self) -> torch.Tensor:
        return self.act_clip.clamp(MIN_ACT_CLIP, 1.0)

    # ---------------------------------------------------------------- quantization
    def _codes(self, scale: torch.Tensor) -> torch.Tensor:
        """Float codes (differentiable, integer-valued in the forward) on grid `scale`."""
        k = self.in_features
        s = expand_groups(scale, k, self.spec)
        z = expand_groups(self.zero, k, self.spec)
        if self.use_lora_rounding:
            h = self.offsets()
            if self.hard:
                h = h + ((h >= 0.5).to(h.dtype) - h).detach()
            # The rounding offsets choose between the floor and the ceiling of W on the *initial* grid; the learned
            # step then only rescales those codes. Flooring on the moving grid instead (floor(W / s) + h) lets a
            # 0.1% step change push every weight near a grid point over it while its learned h stays put, a
            # whole-step error: that made learned steps worse than fixed ones (2-block proxy, W4A16, 32 steps:
            # relative MSE 0.0089 vs 0.0065).
            q = torch.floor(self.weight / expand_groups(self.scale0, k, self.spec)) + h
        else:
            q = round_ste(self.weight / s)
        return torch.clamp(q + z, 0, self.spec.qmax)

    def _fused_constants(self) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...] | None]:
        """(floor(W / scale0) + z, z expanded to [N, K]) for `_LoRARoundedWeight`, and the CPU kernels' (v0, the
        same base as int16, z [N, G]) or None where they do not apply; rebuilt when W, v0, scale0 or z change (a
        resumed window loads them)."""
        tensors = (self.weight, self.v0, self.scale0, self.zero)
        key = tuple((t.data_ptr(), t._version, t.device) for t in tensors)
        if getattr(self, "_constants_key", None) != key:
            k = self.in_features
            z = expand_groups(self.zero, k, self.spec)
            base = torch.floor(self.weight / expand_groups(self.scale0, k, self.spec)).add_(z)
            kernel_args = None
            fits = bool(base.abs().max() < 2**15) if base.numel() else False
            if self.weight.device.type == "cpu" and fits and cpu_calibration_ops() is not None:
                # the kernels take contiguous rows (an expert's weight can be a transposed view)
                kernel_args = (self.v0.contiguous(), base.to(torch.int16).contiguous(), self.zero.contiguous())
            self._constants, self._constants_key = (base, z, kernel_args), key
        return self._constants

    def quantized_weight(self) -> torch.Tensor:
        """The quantized weight [N, K] the forward uses (differentiable w.r.t. the trainable parameters)."""
        if not (self.use_lora_rounding and self.hard):
            scale = self.scale()
            z = expand_groups(self.zero, self.in_features, self.spec)
            return (self._codes(scale) - z) * expand_groups(scale, self.in_features, self.spec)
        base, z, kernel_args = self._fused_constants()
        dtype = autocast_dtype(self.weight.device.type)
        if not torch.is_grad_enabled():  # the evaluation batches between two optimizer steps share one weight
            state = (base, dtype, *((t.data_ptr(), t._version) for t in (self.a1, self.a2, self.log_delta)))
            cached = getattr(self, "_eval_weight", None)
            if cached is not None and cached[0][0] is base and cached[0][1:] == state[1:]:
                return cached[1]
        group_len = self.spec.group_len(self.in_features)
        ops = cpu_calibration_ops() if kernel_args is not None and dtype in (torch.float32, torch.bfloat16) else None
        grad = torch.is_grad_enabled()
        if ops is not None:
            # the regulariser the training step will ask for, computed in the same pass as the weight
            beta = float(self.regularizer_beta) if grad and self.regularizer_beta else 0.0
            v0, base16, zero = kernel_args
            constants = (v0, base16, zero, self.scale0.contiguous(), group_len, self.spec.qmax, dtype, beta, ops)
            w, reg = _LoRARoundedWeightCPU.apply(self.a1, self.a2, self.log_delta, constants)
            last = ("regularizer", beta, reg) if beta > 0 else None
        else:
            constants = (self.v0, base, z, self.scale0, group_len, self.spec.qmax, dtype)
            w, h = _LoRARoundedWeight.apply(self.a1, self.a2, self.log_delta, constants)
            last = ("offsets", h)
        if grad:
            self._last_forward = last
        else:
            self._eval_weight = (state, w)
        return w

    def regularizer(self, beta: float) -> torch.Tensor:
        """Rounding regulariser of the soft offsets: the one the last forward with grad computed with the weight
        (CPU kernels, when `regularizer_beta` was `beta`), else from that forward's offsets (its graph reaches the
        LoRA factors through the same pass), else computed anew."""
        if not self.use_lora_rounding:
            return self.weight.new_zeros(())
        last = getattr(self, "_last_forward", None)
        self._last_forward = None
        if last is not None and last[0] == "regularizer" and last[1] == float(beta):
            return last[2]
        if last is not None and last[0] == "offsets":
            return _RoundingRegularizer.apply(last[1], float(beta))
        return rounding_regularizer(self.offsets(), beta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if getattr(self, "online_hadamard", False):  # the online rotation of `CBQConfig(rotation=...)`, as CBQLinear
            x = hadamard_transform(x)
        if self.input_scale is not None:
            x = x / self.input_scale
        if self.act_bits is not None:
            x = fake_quantize_activations_ste(x, self.act_bits, self.clip_ratio())
        return F.linear(x, self.quantized_weight(), self.bias)

    # ---------------------------------------------------------------- freezing
    @torch.no_grad()
    def freeze_codes(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float | None]:
        """Hard-rounded (codes uint8 [N, K], scales [N, G] stored-exact, zeros [N, G], activation clip or None)."""
        scale = round_scale(self.scale0 * torch.exp(self.log_delta))
        hard, self.hard = self.hard, True
        codes = self._codes(scale).round().to(torch.uint8)
        self.hard = hard
        clip = float(self.clip_ratio()) if self.act_bits is not None else None
        return codes.cpu(), scale.cpu(), self.zero.cpu(), clip

    @torch.no_grad()
    def freeze(self) -> dict[str, torch.Tensor]:
        """Packed buffers of the hard-rounded weight (`formats.uniform.pack_uniform` of `freeze_codes`).

        Raises:
            RuntimeError: a trained step size is not finite.
        """
        codes, scales, zeros, clip = self.freeze_codes()
        if not torch.isfinite(scales).all():
            raise RuntimeError("cbq_hf: non-finite step sizes at freeze time")
        return pack_uniform(codes, scales, zeros, self.spec, self.act_bits, clip)
