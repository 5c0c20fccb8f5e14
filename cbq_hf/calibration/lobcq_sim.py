"""Trainable LO-BCQ quantizer of one linear during CBQ calibration: the LO-BCQ counterpart of
`rounding.QuantLinearSim` (same interface: forward, rounding_parameters(), scale_parameters(), regularizer(beta),
snapshot()/restore(), freeze()).

What it does, and how it maps onto the stored format (`formats/lobcq.py`):

- **Starting point** (data-aware, not trained): the codebooks of the RTN encoding (universal, or the layer's own
  with "per_layer"), then per block array a search over the E4M3 scale codes `scale_search` steps around the
  max-based one, re-choosing every block's codebook, minimising the weight error weighted by the mean square of
  each (CFP-smoothed) input channel. It never raises that weighted error over RTN's encoding (the max-based code is
  a candidate).
- **Array scales.** Each block array (La values of a weight row) has a learnable multiplier exp(log_delta) of its
  starting E4M3 scale a0 (the RTN encoding's). Every forward rounds a = a0 * exp(log_delta) to E4M3 (clamped to
  [2^-9, 448], the positive E4M3 range) with a straight-through gradient, so what trains is what is stored: the
  frozen scale code is exactly the E4M3 bit pattern of the forward's scale. Gradient w.r.t. the scale is LSQ's
  (q(W / s) - W / s per value inside the codebook's range, the end entry for clipped values). Caveat (measured on a
  toy linear): one E4M3 step is 6-12% of the scale and the codebooks and selectors are fixed, so a scale step moves
  every value of the array against its codebook and the straight-through gradient does not predict it (a 7% step
  doubled the weight error there); with the engine's default lr_scale (1e-3) and a few steps per window no code
  changes at all, and a window whose loss rises is reverted by the engine.
- **Codeword choice (weights).** The codebook selector of every block is fixed at its RTN choice (encoding with all
  nc codebooks every step would cost nc times more). Within the block's codebook each value sits between two
  neighbouring entries lo <= y <= hi (y = W / s at the current scale); with `use_lora_rounding` it takes hi when the
  learned offset h(V) >= 0.5, V = V0 + A1 @ A2 (rank r), V0 set so that the start is the nearest entry (AdaRound /
  LoRA-Rounding on the codebook grid instead of the integer grid; regulariser as in `rounding`). Without it every
  value takes its nearest entry at the current scale.
- **Activations** (act_bits=4) are LO-BCQ-encoded at run time exactly as `LOBCQFormat.quantize_activations` does
  (universal activation codebooks, per-token s_t), with a straight-through gradient; nothing about them is stored
  or learned here (CFP smoothing, applied before this module is built, is the activation-side calibration).

Forward values are exact: the straight-through terms are written as `value + (t - t.detach())`, so `freeze()`'s
packed buffers dequantize to exactly the weight the last forward used.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..formats.input_memo import LastInputMemo
from ..formats.lobcq import (
    E4M3_MAX,
    LOBCQCodes,
    LOBCQFormat,
    e4m3_decode,
    e4m3_encode,
    encode,
    fake_quantize_activations,
)
from ..formats.stand_in import QuantStandIn, StandInOptions
from .rounding import inverse_rectified_sigmoid, rectified_sigmoid, rounding_regularizer

#: Smallest positive E4M3 value (subnormal 2^-9): learned array scales never reach zero.
E4M3_MIN = 2.0**-9
#: E4M3 codes tried above and below each array's max-based scale code by the starting-point search.
SCALE_SEARCH = 1


def _bracket(entries: torch.Tensor, y: torch.Tensor):
    """For sorted codebook rows `entries` [M, C] and values y [M, L] (each row's values in that row's codebook): the
    entries lo <= y <= hi (clamped to the codebook's ends) and their indices, all [M, L]."""
    cnt = torch.searchsorted(entries, y.detach(), right=True)  # entries <= y
    last = entries.shape[-1] - 1
    lo_i, hi_i = (cnt - 1).clamp(0, last), cnt.clamp(0, last)
    return torch.gather(entries, 1, lo_i), torch.gather(entries, 1, hi_i), lo_i, hi_i


def _nearest_is_hi(y: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Where the nearest of lo <= y <= hi is hi (ties go to the smaller entry)."""
    return (hi - y) < (y - lo)


def _ste(value: torch.Tensor, through: torch.Tensor) -> torch.Tensor:
    """`value` in the forward (exactly), the gradient of `through` in the backward."""
    return value.detach() + (through - through.detach())


class LOBCQLinearSim(QuantStandIn):
    """Calibration-time stand-in for an `nn.Linear` in LO-BCQ: y = Q_act(x / input_scale) @ Q(W).T + b.

    Args:
        linear: the float linear (its weight already includes any CFP column scaling).
        fmt: the LO-BCQ format (spec, act_bits, universal or per-layer weight codebooks).
        options: `StandInOptions` (the keyword arguments of the same names override it): lora_rank of the learned
            codeword-choice factors; use_lora_rounding (learn the choice between the two neighbouring codebook
            entries, else nearest); learn_weight_scales (the per-array scale multipliers, else RTN's); input_scale
            (optional [K] smoothing divisor of the input); channel_weight (optional [K] mean square of each smoothed
            input channel: weights the starting search); generator (LoRA factor initialisation).
        scale_search: E4M3 codes tried on each side of the max-based array scale at the start (0: RTN's start).
    """

    #: Last run-time activation encoding (see `quantize_input`), shared by every instance.
    _act_memo = LastInputMemo()

    def __init__(
        self,
        linear: nn.Linear,
        fmt: LOBCQFormat,
        options: StandInOptions | None = None,
        *,
        scale_search: int = SCALE_SEARCH,
        **overrides,
    ) -> None:
        super().__init__()
        o = StandInOptions(**{**(options or StandInOptions()).__dict__, **overrides})
        lora_rank, use_lora_rounding, learn_weight_scales = o.lora_rank, o.use_lora_rounding, o.learn_weight_scales
        input_scale, channel_weight, generator = o.input_scale, o.channel_weight, o.generator
        spec = fmt.spec
        w = linear.weight.detach().float().clone()
        n, k = w.shape
        self.fmt, self.spec, self.act_bits = fmt, spec, fmt.act_bits
        self.in_features, self.out_features = k, n
        self.padded = spec.padded_len(k)
        self.register_buffer("weight", w)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float().clone())
        self.register_buffer("input_scale", None if input_scale is None else input_scale.detach().float().clone())
        # Starting point: the codebooks of the RTN encoding (universal or per-layer); scales and selectors from a
        # per-array search over neighbouring E4M3 codes weighted by the input channels' mean square (RTN's
        # max-based scales and unweighted choices with scale_search=0).
        codes, cb = fmt.encode_weight(w)
        if scale_search:
            cw = None if channel_weight is None else channel_weight.to(w.device)
            codes = encode(w, cb, spec, scale_search=scale_search, channel_weight=cw)
        self.register_buffer("codebooks", cb.to(torch.int8).cpu().clone())
        self.register_buffer("act_codebooks", fmt.universal() if fmt.act_bits is not None else None)
        self.register_buffer("tensor_scale", codes.tensor_scale.float().reshape(1).to(w.device))
        self.register_buffer("scale0", e4m3_decode(codes.scale_codes).to(w.device))  # [N, A] E4M3 values
        sel = F.pad(codes.selector.long(), (0, self.padded // spec.block_len - codes.selector.shape[1]))
        self.register_buffer("selector", codes.selector.clone().to(w.device))
        # Sorted entries of every (padded) block's codebook: [N * Kp / Lb, 16].
        self.register_buffer("rows", cb.float().to(w.device)[sel.reshape(-1).to(w.device)].contiguous())
        delta = torch.zeros_like(self.scale0)
        if learn_weight_scales:
            self.log_delta = nn.Parameter(delta)
        else:
            self.register_buffer("log_delta", delta)
        self.use_lora_rounding = use_lora_rounding
        if use_lora_rounding:
            h0, _ = self._start_offsets()
            self.register_buffer("v0", inverse_rectified_sigmoid(h0))
            a1 = torch.randn(n, lora_rank, generator=generator) / math.sqrt(lora_rank)
            self.a1 = nn.Parameter(a1.to(w.device))
            self.a2 = nn.Parameter(torch.zeros(lora_rank, self.padded, device=w.device))

    # ---------------------------------------------------------------- parameters
    def rounding_parameters(self) -> list[nn.Parameter]:
        return [self.a1, self.a2] if self.use_lora_rounding else []

    def scale_parameters(self) -> list[nn.Parameter]:
        return [self.log_delta] if isinstance(self.log_delta, nn.Parameter) else []

    def offsets(self) -> torch.Tensor:
        """Soft codeword-choice offsets h(V) in [0, 1], [N, Kp]."""
        return rectified_sigmoid(self.v0 + self.a1 @ self.a2)

    def regularizer(self, beta: float) -> torch.Tensor:
        if not self.use_lora_rounding:
            return self.weight.new_zeros(())
        return rounding_regularizer(self.offsets()[:, : self.in_features], beta)

    # ---------------------------------------------------------------- quantization
    def _scales(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(array scales in X's units [N, A] (E4M3-exact times s_t, straight-through), E4M3 values [N, A])."""
        live = self.scale0 > 0  # an all-zero array keeps scale 0 (and decodes to zeros)
        a = (self.scale0 * torch.exp(self.log_delta)).clamp(E4M3_MIN, E4M3_MAX)
        aq = e4m3_decode(e4m3_encode(a.detach()))
        a = torch.where(live, _ste(aq, a), torch.zeros_like(a))
        return a * self.tensor_scale, torch.where(live, aq, torch.zeros_like(aq))

    def _neighbours(self, real: torch.Tensor):
        """Scaled weight y [N, Kp] and, in the fixed codebook of each block, the entries lo <= y <= hi (clamped
        to the codebook's ends) with their indices (int64 [N, Kp])."""
        n, kp, lb = self.out_features, self.padded, self.spec.block_len
        wp = F.pad(self.weight, (0, kp - self.in_features)).view(n, -1, self.spec.array_len)
        r = real.unsqueeze(-1)
        y = torch.where(r > 0, wp / r.clamp(min=1e-30), torch.zeros_like(wp)).reshape(n, kp)
        lo, hi, lo_i, hi_i = _bracket(self.rows, y.reshape(-1, lb))
        return y, lo.view(n, kp), hi.view(n, kp), lo_i.view(n, kp), hi_i.view(n, kp)

    def _choice(self, y, lo, hi):
        """(take-hi mask [N, Kp] bool, differentiable offset or None)."""
        if self.use_lora_rounding:
            h = self.offsets()
            return h >= 0.5, h
        return _nearest_is_hi(y.detach(), lo, hi), None

    def quantized_weight(self) -> torch.Tensor:
        real, _ = self._scales()
        y, lo, hi, _, _ = self._neighbours(real)
        up, h = self._choice(y, lo, hi)
        val = torch.where(up, hi, lo)
        # LSQ's gradient for the scale: values inside the codebook's range follow y = W / s (straight-through);
        # values beyond its ends are clipped to the end entry, which does not move with s (d val / d y = 0).
        inside = (lo != hi) | (y.detach() == lo)
        q = _ste(val, y * inside)
        if h is not None:
            q = q + (h - h.detach()) * (hi - lo)
        n = self.out_features
        w = (q.view(n, -1, self.spec.array_len) * real.unsqueeze(-1)).reshape(n, self.padded)
        return w[:, : self.in_features]

    @torch.no_grad()
    def column_quantizer(self):
        """The starting encoding as a per-column quantizer for `gptq.gptq_quantize_with`: (column index i, values
        [N]) -> each value as the nearest entry of its block's codebook at its array's current scale (ties to the
        smaller entry, as the hard choice without LoRA-Rounding), dequantized. Scales and selectors stay fixed."""
        real = self._scales()[0].detach()
        n, lb, la = self.out_features, self.spec.block_len, self.spec.array_len
        rows = self.rows.view(n, -1, self.rows.shape[-1]).transpose(0, 1).contiguous()  # [blocks per row, N, 16]

        def quantize(i: int, col: torch.Tensor) -> torch.Tensor:
            r = real[:, i // la]
            y = torch.where(r > 0, col / r.clamp(min=1e-30), torch.zeros_like(col))
            lo, hi, _, _ = _bracket(rows[i // lb], y[:, None])
            lo, hi = lo.squeeze(1), hi.squeeze(1)
            return torch.where(_nearest_is_hi(y, lo, hi), hi, lo) * r

        return quantize

    @torch.no_grad()
    def start_from(self, weight: torch.Tensor) -> None:
        """Encode `weight` [N, K] instead of the linear's weight with the same array scales and codebook selectors:
        the initial hard choice of every value becomes its nearest codebook entry (`gptq.gptq_start` gives GPTQ's
        error-compensated weight). Offsets within 1e-4 of 1/2 are moved to the nearest entry's side of 1/2, so the
        inverse sigmoid's float error cannot flip a choice."""
        self.weight.copy_(weight)
        if self.use_lora_rounding:
            h0, up = self._start_offsets()
            h0 = torch.where(up, h0.clamp(min=0.5 + 1e-4), h0.clamp(max=0.5 - 1e-4))
            self.v0.copy_(inverse_rectified_sigmoid(h0))

    @torch.no_grad()
    def _start_offsets(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(offsets h [N, Kp] that place every value at its position between its two neighbouring entries, where the
        nearest entry is the upper one) at the current scales."""
        y, lo, hi, _, _ = self._neighbours(self._scales()[0])
        gap = hi - lo
        h0 = torch.where(gap > 0, (y - lo) / gap.clamp(min=1e-12), torch.zeros_like(y))
        return h0, _nearest_is_hi(y, lo, hi)

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        raw = x
        if self.input_scale is not None:
            x = x / self.input_scale
        if self.act_bits is None:
            return x
        # q/k/v (and gate/up) receive the same input tensor and, sharing it, the same CFP smoothing vector: the
        # LO-BCQ encoding of the input is computed once for them (identity + version of the input, equal scales
        # and codebooks), as `LOBCQFormat.quantize_activations` does at inference.
        key = (self.input_scale, self.act_codebooks)
        xq = LOBCQLinearSim._act_memo.get(raw, key)
        if xq is None:
            with torch.no_grad():
                xq = fake_quantize_activations(x.detach(), self.act_codebooks, self.spec)
            LOBCQLinearSim._act_memo.put(raw, key, xq)
        return _ste(xq, x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.quantize_input(x), self.quantized_weight(), self.bias)

    # ---------------------------------------------------------------- freezing
    @torch.no_grad()
    def codes(self) -> LOBCQCodes:
        """The current weight encoding (hard choices, stored scale codes), unpacked."""
        real, aq = self._scales()
        y, lo, hi, lo_i, hi_i = self._neighbours(real)
        up, _ = self._choice(y, lo, hi)
        index = torch.where(up, hi_i, lo_i)[:, : self.in_features].to(torch.uint8)
        if not torch.isfinite(aq).all():
            raise RuntimeError("cbq_hf: non-finite LO-BCQ array scales at freeze time")
        return LOBCQCodes(
            index.cpu(), self.selector.cpu(), e4m3_encode(aq).cpu(), self.tensor_scale.cpu(), float("nan")
        )

    @torch.no_grad()
    def freeze(self) -> dict[str, torch.Tensor]:
        """Packed `CBQLinear` buffers (CPU) of the hard-rounded weight: `LOBCQFormat.pack` of `codes()`."""
        LOBCQLinearSim._act_memo.clear()  # drop the memoised activation (and the input it holds)
        return self.fmt.pack(self.codes(), self.codebooks.cpu(), self.act_codebooks)
