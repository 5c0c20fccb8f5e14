"""LO-BCQ format: block-clustered codebook quantization for W4A4 (Elangovan et al. 2025, arXiv 2502.05376).

A tensor X [R, K] (R = output channels for weights, tokens for activations) is cut along the reduction dim K:

- block arrays of ``array_len`` (La, default 64) values share one 8-bit scale s_a, stored as an FP8 E4M3 bit
  pattern, on top of a float32 scale s_t (per tensor for weights, per token for activations, which are encoded at
  run time and must not depend on the other tokens of the batch);
- blocks of ``block_len`` (Lb, default 8) values each pick one of ``num_codebooks`` (nc, default 16) codebooks (the
  selector, log2(nc) bits);
- every value is a 4-bit index into its block's codebook, a row of 16 signed integers of ``codebook_bits`` (6)
  bits, i.e. in [-cmax, cmax] with cmax = 2**(codebook_bits - 1) - 1 = 31.

Encoding: s_t = max|X| / (cmax * 448) (448 = largest E4M3 value), s_a = E4M3(max_{array}|x| / (cmax * s_t)),
y = x / (s_a * s_t) (so the array maximum lands on +-cmax up to the E4M3 rounding of s_a), then each block takes
the codebook with the smallest squared error on y and each value its nearest entry (see `lobcq_codebooks`).
Decoding: x_hat = C[selector, index] * (s_a * s_t), in float32.

Effective bits per value = 4 + log2(nc) / Lb + 8 / La (4.625 with the defaults), plus a per-layer constant: s_t
(32 bits) and the codebooks (nc * 16 int8, twice with activation quantization: weights and activations each have
their set). When K is not a multiple of La the last array (and maybe the last block) is padded with zeros: padded
values count in no error and are not stored (indices are stored for K values, selectors for ceil(K / Lb)
blocks, scales for ceil(K / La) arrays).

On-disk layout of one quantized linear with weight W [N, K] (all little end first, like the uniform format):

- ``qweight``       uint8 [N, ceil(K / 2)]: 4-bit entry indices, value k in byte k // 2 at bit offset 4 * (k % 2).
- ``selectors``     uint8 [N, ceil(ceil(K / Lb) * log2(nc) / 8)]: codebook id of every block, log2(nc) bits each,
  block j at bit offset j * log2(nc) of the row (absent when nc = 1).
- ``scales``        uint8 [N, ceil(K / La)]: E4M3 bit patterns of the array scales s_a.
- ``tensor_scale``  float32 [1]: s_t of the weight.
- ``codebooks``     int8 [nc, 16]: the weight codebooks (rows sorted ascending).
- ``act_codebooks`` int8 [nc, 16]: the activation codebooks (only with ``act_bits=4``).

Codebooks ("lobcq_codebooks"): "universal" uses one frozen set, shipped in ``lobcq_universal.json`` and designed
offline by ``benchmarks/lobcq_design.py``, for weights and activations of every layer; "per_layer" designs the
weight codebooks of each layer from its own weights (LO-BCQ started from the universal set, kept only when it
lowers the layer's error) and keeps the universal set for activations (no activation data exists at RTN time).
Either way the checkpoint stores the codebooks it uses, so it is self-contained.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .input_memo import LastInputMemo
from .lobcq_codebooks import (
    ENTRIES,
    build_lut,
    design_codebooks,
    encode_blocks,
    max_entry,
    universal_codebooks,
)
from .registry import QuantFormat, register_format
from .uniform import pack_codes, unpack_codes

#: Largest finite FP8 E4M3 value: the array scale codes span [0, E4M3_MAX].
E4M3_MAX = 448.0
#: Smallest per-tensor / per-token scale (an all-zero tensor encodes as zeros).
_TINY = 1e-30
#: Blocks sampled from a layer to design its per-layer codebooks. 16,384 blocks (131k values, ~8k per codebook)
#: design codebooks as good as 65,536 on the demo model's weights (measured: same or lower whole-weight error on
#: the two layers tried) in about 30% of the time (2.4 s vs 8.3 s on a 576x1536 layer, loaded machine).
PER_LAYER_DESIGN_BLOCKS = 1 << 14


# ---------------------------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class LOBCQSpec:
    """Shape of the LO-BCQ format: Lb values per block, La per array, nc codebooks of `codebook_bits` entries."""

    block_len: int = 8
    array_len: int = 64
    num_codebooks: int = 16
    codebook_bits: int = 6

    def __post_init__(self) -> None:
        if self.array_len % self.block_len:
            raise ValueError(f"array_len={self.array_len} must be a multiple of block_len={self.block_len}")
        if self.num_codebooks < 1 or self.num_codebooks & (self.num_codebooks - 1):
            raise ValueError(f"num_codebooks={self.num_codebooks} must be a power of two")

    @property
    def cmax(self) -> int:
        return max_entry(self.codebook_bits)

    @property
    def selector_bits(self) -> int:
        return int(math.log2(self.num_codebooks))

    def num_blocks(self, k: int) -> int:
        return -(-k // self.block_len)

    def num_arrays(self, k: int) -> int:
        return -(-k // self.array_len)

    def padded_len(self, k: int) -> int:
        return self.num_arrays(k) * self.array_len

    def nominal_bits_per_value(self) -> float:
        """4 + log2(nc) / Lb + 8 / La: bits per value of the indices, selectors and array scales."""
        return 4 + self.selector_bits / self.block_len + 8 / self.array_len


# ---------------------------------------------------------------------------------------------- bit packing
def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack codes [N, M] (each < 2**bits, 1 <= bits <= 8) into uint8 [N, ceil(M * bits / 8)], value m at bit
    offset m * bits of its row (the same convention as `uniform.pack_codes`)."""
    if bits in (2, 4, 8):
        return pack_codes(codes.to(torch.uint8), bits)
    n, m = codes.shape
    shifts = torch.arange(bits, dtype=torch.uint8, device=codes.device)
    b = ((codes.to(torch.uint8).unsqueeze(-1) >> shifts) & 1).reshape(n, m * bits)
    b = F.pad(b, (0, (-m * bits) % 8)).view(n, -1, 8).to(torch.int32)
    return (b << torch.arange(8, dtype=torch.int32, device=codes.device)).sum(-1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of `pack_bits`: uint8 [N, count]."""
    if bits in (2, 4, 8):
        return unpack_codes(packed, bits, count)
    n = packed.shape[0]
    b = (packed.unsqueeze(-1) >> torch.arange(8, dtype=torch.uint8, device=packed.device)) & 1
    b = b.reshape(n, -1)[:, : count * bits].reshape(n, count, bits).to(torch.int32)
    return (b << torch.arange(bits, dtype=torch.int32, device=packed.device)).sum(-1).to(torch.uint8)


def packed_len(count: int, bits: int) -> int:
    return (count * bits + 7) // 8


# ---------------------------------------------------------------------------------------------- scales
def e4m3_encode(s: torch.Tensor) -> torch.Tensor:
    """Round non-negative float32 scales to FP8 E4M3 (nearest) and return their bit patterns as uint8."""
    return s.float().clamp(0.0, E4M3_MAX).to(torch.float8_e4m3fn).view(torch.uint8)


def e4m3_decode(codes: torch.Tensor) -> torch.Tensor:
    """Float32 values of E4M3 bit patterns (uint8)."""
    return codes.view(torch.float8_e4m3fn).to(torch.float32)


def _arrays(x: torch.Tensor, array_len: int) -> torch.Tensor:
    """x [R, K] -> float32 [R, A, La], zero-padded."""
    r, k = x.shape
    pad = (-k) % array_len
    xf = x.float()
    if pad:
        xf = F.pad(xf, (0, pad))
    return xf.view(r, -1, array_len)


def scale_arrays(
    x: torch.Tensor, array_len: int, cmax: int, per_row: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scales of X [R, K] and the scaled values.

    Returns:
        y float32 [R, A * La] (zero padded), scale codes uint8 [R, A] (E4M3 bits of s_a) and s_t float32
        ([R, 1] with `per_row`, else [1]).
    """
    xa = _arrays(x, array_len)
    amax = xa.abs().amax(-1)  # [R, A]
    top = amax.amax(-1, keepdim=True) if per_row else amax.amax().reshape(1)
    tensor_scale = (top / (cmax * E4M3_MAX)).clamp(min=_TINY)
    ts = tensor_scale if per_row else tensor_scale.reshape(1, 1)
    codes = e4m3_encode(amax / (cmax * ts))
    real = e4m3_decode(codes) * ts  # [R, A]
    y = torch.where(real.unsqueeze(-1) > 0, xa / real.unsqueeze(-1).clamp(min=_TINY), torch.zeros_like(xa))
    return y.reshape(x.shape[0], -1), codes, tensor_scale


# ---------------------------------------------------------------------------------------------- encode / decode
@dataclass
class LOBCQCodes:
    """An encoded tensor X [R, K], unpacked.

    index uint8 [R, K] entry indices; selector uint8 [R, ceil(K / Lb)] codebook ids; scale_codes uint8 [R, A]
    E4M3 bits of s_a; tensor_scale float32 [1] (per tensor) or [R, 1] (per row); err float32 squared error in
    scaled units, summed over the tensor.
    """

    index: torch.Tensor
    selector: torch.Tensor
    scale_codes: torch.Tensor
    tensor_scale: torch.Tensor
    err: float


def _block_view(y: torch.Tensor, k: int, spec: LOBCQSpec) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scaled values y [R, Kp] -> stored blocks [R * ceil(K/Lb), Lb] and their validity mask (None: no padding)."""
    r = y.shape[0]
    nb = spec.num_blocks(k)
    blocks = y.view(r, -1, spec.block_len)[:, :nb]
    valid = None
    if k % spec.block_len:
        pos = torch.arange(nb * spec.block_len, device=y.device).view(nb, spec.block_len)
        valid = (pos < k).unsqueeze(0).expand(r, nb, spec.block_len).reshape(-1, spec.block_len)
    return blocks.reshape(-1, spec.block_len), valid


def encode(
    x: torch.Tensor,
    codebooks: torch.Tensor,
    spec: LOBCQSpec,
    per_row: bool = False,
    scale_search: int = 0,
    channel_weight: torch.Tensor | None = None,
) -> LOBCQCodes:
    """Encode X [R, K] with `codebooks` [nc, 16] (integer entries, rows sorted ascending).

    scale_search: also try the E4M3 scale codes up to this many steps above and below the max-based one and keep,
    per array, the code with the smallest squared error in X's units (used for weights, which are encoded once;
    ties keep the code nearest the max-based one). 0 = max-based scale only (what activations use).
    channel_weight: optional non-negative [K] weight of each column in the squared error of the scale search and
    of the codebook choice of every block (e.g. the mean square of a linear's input channels, so the error is
    measured where the activations are large); the nearest entry of each value does not depend on it. Only with
    scale_search.
    """
    r, k = x.shape
    y, scale_codes, tensor_scale = scale_arrays(x, spec.array_len, spec.cmax, per_row)
    cb = codebooks.to(x.device)
    if scale_search:
        return _encode_search(x, cb, spec, scale_codes, tensor_scale, per_row, scale_search, channel_weight)
    if channel_weight is not None:
        raise ValueError("channel_weight weights the scale search; pass scale_search >= 1 with it")
    blocks, valid = _block_view(y, k, spec)
    sel, idx, err = encode_blocks(blocks, cb, spec.cmax, valid)
    nb = spec.num_blocks(k)
    index = idx.view(r, nb * spec.block_len)[:, :k].to(torch.uint8)
    return LOBCQCodes(
        index, sel.view(r, nb).to(torch.uint8), scale_codes, tensor_scale, float(err.detach().double().sum())
    )


def _encode_search(
    x: torch.Tensor,
    cb: torch.Tensor,
    spec: LOBCQSpec,
    base_codes: torch.Tensor,
    tensor_scale: torch.Tensor,
    per_row: bool,
    steps: int,
    channel_weight: torch.Tensor | None = None,
) -> LOBCQCodes:
    """`encode` with a per-array search over E4M3 scale codes base - steps .. base + steps (see `encode`)."""
    r, k = x.shape
    nb, na = spec.num_blocks(k), spec.num_arrays(k)
    bpa = spec.array_len // spec.block_len
    xa = _arrays(x, spec.array_len)  # [R, A, La]
    ts = tensor_scale.reshape(-1, 1)
    lut = build_lut(cb, spec.cmax)
    weight = None
    if channel_weight is not None:  # per-value error weights of the stored blocks (padding weighs 0)
        cw = F.pad(channel_weight.float().to(x.device).clamp(min=0), (0, nb * spec.block_len - k))
        weight = cw.view(1, nb, spec.block_len).expand(r, nb, spec.block_len).reshape(-1, spec.block_len)
    best = None
    # Positive E4M3 codes 1..126 are the finite positive values in increasing order; code 0 (an all-zero array)
    # stays 0.
    for delta in sorted(range(-steps, steps + 1), key=lambda d: (abs(d), d)):
        codes = torch.where(base_codes > 0, (base_codes.int() + delta).clamp(1, 126), 0).to(torch.uint8)
        real = e4m3_decode(codes) * ts  # [R, A]
        y = torch.where(real.unsqueeze(-1) > 0, xa / real.unsqueeze(-1).clamp(min=_TINY), torch.zeros_like(xa))
        blocks, valid = _block_view(y.reshape(r, -1), k, spec)
        sel, idx, err = encode_blocks(blocks, cb, spec.cmax, valid if weight is None else weight, lut=lut)
        padded_err = F.pad(err.view(r, nb), (0, na * bpa - nb)).view(r, na, bpa).sum(-1)
        arr_err = padded_err * real.square()  # in X's units
        cand = (codes, sel.view(r, nb), idx.view(r, nb * spec.block_len), arr_err, padded_err)
        if best is None:
            best = list(cand)
            continue
        better = arr_err < best[3]  # [R, A]
        blk = better.repeat_interleave(bpa, dim=1)[:, :nb]
        best[0] = torch.where(better, cand[0], best[0])
        best[1] = torch.where(blk, cand[1], best[1])
        best[2] = torch.where(blk.repeat_interleave(spec.block_len, dim=1), cand[2], best[2])
        best[3] = torch.where(better, cand[3], best[3])
        best[4] = torch.where(better, cand[4], best[4])
    codes, sel, idx, _, scaled_err = best
    return LOBCQCodes(
        idx[:, :k].to(torch.uint8), sel.to(torch.uint8), codes, tensor_scale, float(scaled_err.detach().double().sum())
    )


def decode(
    index: torch.Tensor,
    selector: torch.Tensor,
    scale_codes: torch.Tensor,
    tensor_scale: torch.Tensor,
    codebooks: torch.Tensor,
    spec: LOBCQSpec,
) -> torch.Tensor:
    """X_hat float32 [R, K] = C[selector, index] * e4m3(scale) * tensor_scale (shapes as in `LOBCQCodes`)."""
    r, k = index.shape
    cb = codebooks.float().reshape(-1)
    sel = selector.long().repeat_interleave(spec.block_len, dim=1)[:, :k]
    vals = cb[sel * ENTRIES + index.long()]
    ts = tensor_scale.float().reshape(-1, 1)
    scale = (e4m3_decode(scale_codes) * ts).repeat_interleave(spec.array_len, dim=1)[:, :k]
    return vals * scale


def fake_quantize(
    x: torch.Tensor, codebooks: torch.Tensor, spec: LOBCQSpec, per_row: bool = False, scale_search: int = 0
) -> torch.Tensor:
    """decode(encode(X)) in float32 [R, K]: what LO-BCQ storage (or run-time activation encoding) yields."""
    c = encode(x, codebooks, spec, per_row, scale_search)
    return decode(c.index, c.selector, c.scale_codes, c.tensor_scale, codebooks, spec)


def fake_quantize_activations(x: torch.Tensor, codebooks: torch.Tensor, spec: LOBCQSpec) -> torch.Tensor:
    """Run-time LO-BCQ of activations x [..., K] (per-token s_t), returned in x's dtype."""
    k = x.shape[-1]
    flat = x.reshape(-1, k)
    if flat.shape[0] == 0:
        return x
    return fake_quantize(flat, codebooks, spec, per_row=True).reshape(x.shape).to(x.dtype)


def design_layer_codebooks(
    weight: torch.Tensor,
    spec: LOBCQSpec,
    init: torch.Tensor,
    iters: int,
    max_blocks: int = PER_LAYER_DESIGN_BLOCKS,
    seed: int = 0,
    check: bool = True,
) -> torch.Tensor:
    """Per-layer weight codebooks int8 [nc, 16]: LO-BCQ on (a fixed random sample of) this weight's scaled blocks,
    started from `init`; with `check`, returns `init` when the designed set does not lower the whole weight's
    error (without it the caller compares, e.g. `LOBCQFormat.encode_weight`, which reuses the encodings)."""
    k = weight.shape[1]
    y, _, _ = scale_arrays(weight, spec.array_len, spec.cmax)
    blocks, valid = _block_view(y, k, spec)
    if blocks.shape[0] > max_blocks:
        gen = torch.Generator().manual_seed(seed)
        pick = torch.randperm(blocks.shape[0], generator=gen)[:max_blocks].to(blocks.device)
        sample, vs = blocks[pick], (valid[pick] if valid is not None else None)
    else:
        sample, vs = blocks, valid
    res = design_codebooks(sample, spec.num_codebooks, spec.cmax, iters=iters, init=init.float(), valid=vs)
    designed = res.codebooks.to(torch.int8)
    if not check or torch.equal(designed, init.to(torch.int8)):
        return designed
    old = encode_blocks(blocks, init.float(), spec.cmax, valid)[2].double().sum()
    new = encode_blocks(blocks, designed.float(), spec.cmax, valid)[2].double().sum()
    return designed if new < old else init.to(torch.int8)


# ---------------------------------------------------------------------------------------------- the format
@register_format("lobcq")
class LOBCQFormat(QuantFormat):
    """Block-clustered codebook format (see module docstring). bits = 4; act_bits None (weight-only) or 4."""

    layout_fields = (
        "lobcq_block_len",
        "lobcq_array_len",
        "lobcq_num_codebooks",
        "lobcq_codebook_bits",
        "lobcq_codebooks",
    )

    def __init__(
        self, spec: LOBCQSpec = LOBCQSpec(), act_bits: int | None = 4, codebooks: str = "universal", iters: int = 20
    ) -> None:
        if act_bits not in (None, 4):
            raise ValueError(
                f"LO-BCQ encodes activations with 4-bit codebooks; act_bits must be None or 4, got {act_bits}"
            )
        if codebooks not in ("universal", "per_layer"):
            raise ValueError(f"codebooks must be 'universal' or 'per_layer', got {codebooks!r}")
        self.spec = spec
        self.act_bits = act_bits
        self.codebooks_mode = codebooks
        self.iters = iters
        # Last activation encoded at run time: q/k/v (and gate/up) receive the same input tensor, encoded once.
        self._act_memo = LastInputMemo()

    def stand_in(self, linear, options):
        """`calibration.lobcq_sim.LOBCQLinearSim`: learned array scales and codeword choices."""
        from ..calibration.lobcq_sim import LOBCQLinearSim

        return LOBCQLinearSim(linear, self, options)

    @classmethod
    def from_config(cls, config) -> LOBCQFormat:
        spec = LOBCQSpec(
            config.lobcq_block_len, config.lobcq_array_len, config.lobcq_num_codebooks, config.lobcq_codebook_bits
        )
        return cls(spec, config.act_bits, config.lobcq_codebooks, config.lobcq_iters)

    def universal(self) -> torch.Tensor:
        """The frozen universal codebooks int8 [nc, 16] of this spec."""
        s = self.spec
        return universal_codebooks(s.block_len, s.array_len, s.num_codebooks, s.codebook_bits)

    # ------------------------------------------------------------------ buffers
    def buffer_specs(self, out_features: int, in_features: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        s = self.spec
        specs: dict[str, tuple[tuple[int, ...], torch.dtype]] = {
            "qweight": ((out_features, packed_len(in_features, 4)), torch.uint8),
        }
        if s.selector_bits:
            specs["selectors"] = ((out_features, packed_len(s.num_blocks(in_features), s.selector_bits)), torch.uint8)
        specs["scales"] = ((out_features, s.num_arrays(in_features)), torch.uint8)
        specs["tensor_scale"] = ((1,), torch.float32)
        specs["codebooks"] = ((s.num_codebooks, ENTRIES), torch.int8)
        if self.act_bits is not None:
            specs["act_codebooks"] = ((s.num_codebooks, ENTRIES), torch.int8)
        return specs

    def check_shape(self, out_features: int, in_features: int, name: str = "layer") -> None:
        if in_features < 1 or out_features < 1:
            raise ValueError(f"{name} has an empty weight ({out_features}x{in_features}); nothing to quantize.")

    def pack(
        self, codes: LOBCQCodes, codebooks: torch.Tensor, act_codebooks: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Buffers of one linear from its encoded weight and the codebooks int8 [nc, 16] it was encoded with."""
        if codes.tensor_scale.numel() != 1:
            raise ValueError("a weight is encoded with one per-tensor scale (per_row=False)")
        s = self.spec
        out = {"qweight": pack_bits(codes.index, 4)}
        if s.selector_bits:
            out["selectors"] = pack_bits(codes.selector, s.selector_bits)
        out["scales"] = codes.scale_codes.contiguous()
        out["tensor_scale"] = codes.tensor_scale.float().reshape(1).clone()
        out["codebooks"] = codebooks.to(torch.int8).clone()
        if self.act_bits is not None:
            act = self.universal() if act_codebooks is None else act_codebooks
            out["act_codebooks"] = act.to(torch.int8).clone()
        return out

    def unpack(self, buffers: dict[str, torch.Tensor], in_features: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(entry indices uint8 [N, K], selectors uint8 [N, ceil(K / Lb)]) of stored buffers."""
        s = self.spec
        index = unpack_bits(buffers["qweight"], 4, in_features)
        nb = s.num_blocks(in_features)
        if s.selector_bits:
            sel = unpack_bits(buffers["selectors"], s.selector_bits, nb)
        else:
            sel = torch.zeros(index.shape[0], nb, dtype=torch.uint8, device=index.device)
        return index, sel

    def encode_weight(self, weight: torch.Tensor) -> tuple[LOBCQCodes, torch.Tensor]:
        """(codes, codebooks int8 [nc, 16]) of `weight` [N, K]: the universal set, or with "per_layer" a design on
        a sample of the weight's blocks, kept only when it lowers the whole weight's error. Two encodings of the
        whole weight at most (universal, designed); the winner's codes are returned, not recomputed."""
        w = weight.detach().float()
        uni = self.universal().to(w.device)
        codes = encode(w, uni, self.spec)
        if self.codebooks_mode == "universal":
            return codes, uni
        designed = design_layer_codebooks(w, self.spec, uni, self.iters, check=False)
        if torch.equal(designed, uni):
            return codes, uni
        other = encode(w, designed, self.spec)
        return (other, designed) if other.err < codes.err else (codes, uni)

    def quantize_rtn(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        """Encode `weight` [N, K] with the codebooks (no data-driven reconstruction) and pack it."""
        codes, cb = self.encode_weight(weight)
        return self.pack(codes, cb)

    def dequantize(self, buffers: dict[str, torch.Tensor], in_features: int) -> torch.Tensor:
        index, sel = self.unpack(buffers, in_features)
        return decode(index, sel, buffers["scales"], buffers["tensor_scale"], buffers["codebooks"], self.spec)

    def quantize_activations(self, x: torch.Tensor, buffers: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.act_bits is None:
            return x
        cb = buffers["act_codebooks"]
        if torch.is_grad_enabled() and x.requires_grad:  # the encoding is not differentiable: never reused
            return fake_quantize_activations(x, cb, self.spec)
        out = self._act_memo.get(x, cb)
        if out is None:
            out = fake_quantize_activations(x, cb, self.spec)
            self._act_memo.put(x, cb, out)
        return out

    def bits_per_weight(self, out_features: int, in_features: int) -> float:
        """Stored bits per weight: every buffer (codebooks and s_t included) over N * K values."""
        total = 0
        for shape, dtype in self.buffer_specs(out_features, in_features).values():
            total += math.prod(shape) * torch.empty((), dtype=dtype).element_size() * 8
        return total / (out_features * in_features)
