"""Uniform integer format: per-group scale and integer zero point, codes packed into bytes.

On-disk layout of one quantized linear with weight W of shape [N, K] (out_features, in_features):

- ``qweight``  uint8 [N, ceil(K * slot / 8)]: codes q in [0, 2**bits - 1], packed along K, little end first
  (value k of a row sits in byte k * slot // 8 at bit offset (k * slot) % 8). slot = bits, except 3-bit values
  that use 4-bit slots. Padding bits at the end of a row are zero.
- ``scales``   float16 [N, G]: step size of each group, G = ceil(K / group_size) (group_size -1: G = 1). When
  group_size does not divide K, the last group of a row is shorter.
- ``zeros``    uint8 [N, G]: integer zero point of each group; symmetric grids store 2**(bits-1).

Dequantization: W_hat[n, k] = (q[n, k] - zeros[n, g(k)]) * scales[n, g(k)], computed in float32. Everything that
produces codes computes them against the float16-rounded scale, so what is stored is exactly what was simulated.

Activations (``act_bits``): dynamic per-token symmetric quantization, step = clip * max|x_t| / (2**(a-1) - 1),
values clamped to [-2**(a-1), 2**(a-1) - 1]; ``act_clip`` is a per-linear ratio in (0, 1].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .registry import QuantFormat, register_format

#: Smallest stored step size: the smallest normal float16, so a constant group never divides by zero.
MIN_SCALE = 2.0**-14


@dataclass(frozen=True)
class UniformSpec:
    """Grid of the uniform format.

    bits: bits per value (2, 3, 4, 8). group_size: input channels per group, -1 = whole row. sym: symmetric grid.
    """

    bits: int
    group_size: int
    sym: bool = False

    @property
    def qmax(self) -> int:
        return 2**self.bits - 1

    @property
    def slot_bits(self) -> int:
        return 4 if self.bits == 3 else self.bits

    def group_len(self, in_features: int) -> int:
        return in_features if self.group_size == -1 else self.group_size

    def num_groups(self, in_features: int) -> int:
        g = self.group_len(in_features)
        return (in_features + g - 1) // g

    def check_shape(self, out_features: int, in_features: int, name: str = "layer") -> None:
        if self.group_size != -1 and self.group_size > in_features:
            raise ValueError(
                f"group_size={self.group_size} is larger than the input size {in_features} of {name}; use a "
                f"group_size <= {in_features}, -1 (one group per output channel), or keep {name} in full precision "
                f"with modules_to_not_convert."
            )


# ---------------------------------------------------------------------------------------------- grouping helpers
def group_index(in_features: int, spec: UniformSpec, device: torch.device | None = None) -> torch.Tensor:
    """Group of every input channel, shape [K] (int64)."""
    return torch.arange(in_features, device=device) // spec.group_len(in_features)


def expand_groups(t: torch.Tensor, in_features: int, spec: UniformSpec) -> torch.Tensor:
    """Repeat per-group values [N, G] to per-channel values [N, K]."""
    return t.index_select(1, group_index(in_features, spec, t.device))


def _pad_to_groups(w: torch.Tensor, spec: UniformSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """View W [N, K] as [N, G, g] (padding the last group with NaN) and return it with a validity mask."""
    n, k = w.shape
    g = spec.group_len(k)
    groups = spec.num_groups(k)
    pad = groups * g - k
    mask = torch.ones(n, groups * g, dtype=torch.bool, device=w.device)
    if pad:
        w = torch.nn.functional.pad(w, (0, pad))
        mask[:, k:] = False
    return w.view(n, groups, g), mask.view(n, groups, g)


# ---------------------------------------------------------------------------------------------- quantization math
def round_scale(scale: torch.Tensor) -> torch.Tensor:
    """Round step sizes to what is stored (float16, at least MIN_SCALE), returned as float32."""
    return scale.clamp(min=MIN_SCALE, max=65504.0).to(torch.float16).to(torch.float32)


def minmax_qparams(
    w: torch.Tensor, spec: UniformSpec, clip: float | torch.Tensor = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest parameters per group: (scales [N, G] float32, stored-exact; zeros [N, G] float32 integers).

    Asymmetric: the group's [min, max] (always including 0) maps onto [0, qmax]. Symmetric: max|w| maps onto
    the largest positive code with the zero point at 2**(bits-1). `clip` shrinks the range (1.0 = none).
    """
    wg, mask = _pad_to_groups(w.float(), spec)
    big = torch.finfo(torch.float32).max
    wmax = torch.where(mask, wg, torch.full_like(wg, -big)).amax(-1).clamp(min=0) * clip
    wmin = torch.where(mask, wg, torch.full_like(wg, big)).amin(-1).clamp(max=0) * clip
    if spec.sym:
        half = 2 ** (spec.bits - 1)
        amax = torch.maximum(wmax, -wmin)
        scale = round_scale(amax / max(half - 1, 1))
        zero = torch.full_like(scale, float(half))
    else:
        scale = round_scale((wmax - wmin) / spec.qmax)
        zero = torch.round(-wmin / scale).clamp(0, spec.qmax)
    return scale, zero


def quantize_codes(w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, spec: UniformSpec) -> torch.Tensor:
    """Round-to-nearest codes of W [N, K] on the given grid, as uint8 [N, K]."""
    k = w.shape[1]
    s = expand_groups(scales.float(), k, spec)
    z = expand_groups(zeros.float(), k, spec)
    return torch.clamp(torch.round(w.float() / s) + z, 0, spec.qmax).to(torch.uint8)


def dequantize_codes(
    codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, spec: UniformSpec
) -> torch.Tensor:
    """W_hat = (q - z) * s in float32, shape [N, K]."""
    k = codes.shape[1]
    s = expand_groups(scales.float(), k, spec)
    z = expand_groups(zeros.float(), k, spec)
    return (codes.float() - z) * s


def fake_quantize_rtn(w: torch.Tensor, spec: UniformSpec) -> torch.Tensor:
    """Simulated round-to-nearest quantization of W (what `CBQLinear` computes after RTN packing)."""
    scales, zeros = minmax_qparams(w, spec)
    return dequantize_codes(quantize_codes(w, scales, zeros, spec), scales, zeros, spec)


# ---------------------------------------------------------------------------------------------- packing
def packed_row_bytes(in_features: int, slot_bits: int) -> int:
    return (in_features * slot_bits + 7) // 8


def pack_codes(codes: torch.Tensor, slot_bits: int) -> torch.Tensor:
    """Pack codes uint8 [N, K] (each < 2**slot_bits) into uint8 [N, ceil(K * slot_bits / 8)]."""
    if slot_bits not in (2, 4, 8):
        raise ValueError(f"slot_bits must be 2, 4 or 8, got {slot_bits}")
    n, k = codes.shape
    if codes.numel() and int(codes.max()) >= 2**slot_bits:
        raise ValueError(f"a code does not fit in {slot_bits} bits")
    per_byte = 8 // slot_bits
    pad = (-k) % per_byte
    c = torch.nn.functional.pad(codes.to(torch.uint8), (0, pad)).view(n, -1, per_byte).to(torch.int32)
    shifts = torch.arange(per_byte, dtype=torch.int32, device=codes.device) * slot_bits
    return (c << shifts).sum(-1).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, slot_bits: int, in_features: int) -> torch.Tensor:
    """Inverse of `pack_codes`: uint8 [N, K]."""
    n = packed.shape[0]
    per_byte = 8 // slot_bits
    shifts = torch.arange(per_byte, dtype=torch.uint8, device=packed.device) * slot_bits
    mask = (1 << slot_bits) - 1
    codes = (packed.unsqueeze(-1) >> shifts) & mask
    return codes.reshape(n, -1)[:, :in_features]


# ---------------------------------------------------------------------------------------------- activations
def activation_codes(
    x: torch.Tensor, act_bits: int, clip: torch.Tensor | float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token symmetric quantization of x [..., K]: (integer codes as float32 [..., K], steps float32
    [..., 1]). Kernels with integer activations take their codes from here, so they are the simulated ones."""
    qmax = 2 ** (act_bits - 1) - 1
    xf = x.float()
    step = (xf.abs().amax(-1, keepdim=True) * clip / qmax).clamp(min=1e-8)
    return torch.clamp(torch.round(xf / step), -qmax - 1, qmax), step


def fake_quantize_activations(x: torch.Tensor, act_bits: int, clip: torch.Tensor | float = 1.0) -> torch.Tensor:
    """Dynamic per-token symmetric quantization of x [..., K], returned dequantized in x's dtype."""
    codes, step = activation_codes(x, act_bits, clip)
    return (codes * step).to(x.dtype)


# ---------------------------------------------------------------------------------------------- the format
def pack_uniform(
    codes: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    spec: UniformSpec,
    act_bits: int | None,
    act_clip: torch.Tensor | float | None = None,
) -> dict[str, torch.Tensor]:
    """Buffers of one linear from its codes uint8 [N, K], scales [N, G], zeros [N, G] and (with `act_bits`) the
    activation clipping ratio (1.0 when None)."""
    out = {
        "qweight": pack_codes(codes, spec.slot_bits),
        "scales": scales.to(torch.float16),
        "zeros": zeros.round().to(torch.uint8),
    }
    if act_bits is not None:
        clip = 1.0 if act_clip is None else act_clip
        out["act_clip"] = torch.as_tensor(clip, dtype=torch.float32).reshape(1).clone()
    return out


@register_format("uniform")
class UniformFormat(QuantFormat):
    """Integer grid with per-group float16 scales and uint8 zero points (see module docstring)."""

    def __init__(self, bits: int, group_size: int, sym: bool = False, act_bits: int | None = None) -> None:
        self.spec = UniformSpec(bits, group_size, sym)
        self.act_bits = act_bits

    @classmethod
    def from_config(cls, config) -> UniformFormat:
        return cls(config.bits, config.group_size, config.sym, config.act_bits)

    def buffer_specs(self, out_features: int, in_features: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        g = self.spec.num_groups(in_features)
        specs = {
            "qweight": ((out_features, packed_row_bytes(in_features, self.spec.slot_bits)), torch.uint8),
            "scales": ((out_features, g), torch.float16),
            "zeros": ((out_features, g), torch.uint8),
        }
        if self.act_bits is not None:
            specs["act_clip"] = ((1,), torch.float32)
        return specs

    def check_shape(self, out_features: int, in_features: int, name: str = "layer") -> None:
        self.spec.check_shape(out_features, in_features, name)

    def pack(
        self,
        codes: torch.Tensor,
        scales: torch.Tensor,
        zeros: torch.Tensor,
        act_clip: torch.Tensor | float | None = None,
    ) -> dict[str, torch.Tensor]:
        """Buffers of one linear from its codes uint8 [N, K], scales [N, G] and zeros [N, G]."""
        return pack_uniform(codes, scales, zeros, self.spec, self.act_bits, act_clip)

    def stand_in(self, linear, options):
        """`calibration.rounding.QuantLinearSim`: learned steps, LoRA-Rounding, learned activation clipping."""
        from ..calibration.rounding import QuantLinearSim

        return QuantLinearSim(linear, self.spec, self.act_bits, options=options)

    def quantize_rtn(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        scales, zeros = minmax_qparams(weight, self.spec)
        return self.pack(quantize_codes(weight, scales, zeros, self.spec), scales, zeros)

    def dequantize(self, buffers: dict[str, torch.Tensor], in_features: int) -> torch.Tensor:
        codes = unpack_codes(buffers["qweight"], self.spec.slot_bits, in_features)
        return dequantize_codes(codes, buffers["scales"], buffers["zeros"], self.spec)

    def quantize_activations(self, x: torch.Tensor, buffers: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.act_bits is None:
            return x
        return fake_quantize_activations(x, self.act_bits, buffers["act_clip"])

    def bits_per_weight(self, out_features: int, in_features: int) -> float:
        g = self.spec.num_groups(in_features)
        total = out_features * packed_row_bytes(in_features, self.spec.slot_bits) * 8 + out_features * g * (16 + 8)
        return total / (out_features * in_features)
