"""`CBQExperts`: the inference module that replaces a fused mixture-of-experts module after quantization.

transformers 5.x stores the experts of most MoE families as 3-D parameters in one module decorated with
`transformers.integrations.moe.use_experts_implementation` (`MixtralExperts`, `Qwen3MoeExperts`, `GptOssExperts`,
...). The decorator records the layout on each instance, and `CBQExperts` reads the same flags:

- ``gate_up_proj`` [E, 2I, H] (``up_proj`` [E, I, H] when ``has_gate`` is False) and ``down_proj`` [E, H, I];
  with ``is_transposed`` the last two dimensions are swapped ([E, H, 2I], [E, I, H], used as ``x @ W[e]``);
- ``gate_up_proj_bias`` [E, 2I] / ``down_proj_bias`` [E, H] with ``has_bias``;
- ``_apply_gate`` (the class's own gating, e.g. gpt-oss's interleaved clamped SwiGLU) or ``act_fn`` without a gate;
- ``post_expert_norm`` after the down projection with ``has_post_expert_norm``.

Every expert's two matrices become one `CBQLinear` each (``gate_up.<e>`` / ``up.<e>`` and ``down.<e>``, stored
[out, in] whatever the float layout was), so each expert is packed per group in the configured format and runs
through the same kernel dispatch (`cbq_hf.kernels.dispatch.linear`) as every other quantized linear. The names differ
from the float ``gate_up_proj``/``down_proj`` on purpose: transformers' checkpoint converters (which unfuse the float
experts on save and fuse them on load) match those names and must leave the packed tensors alone.

The module's forward has the signature of the float experts it replaces: ``(hidden_states [T, H],
top_k_index [T, k], top_k_weights [T, k]) -> [T, H]``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..formats.registry import QuantFormat
from ..kernels import dispatch, reference
from .linear import CBQLinear

#: Attributes `use_experts_implementation` sets on every decorated experts instance.
_LAYOUT_FLAGS = ("has_gate", "has_bias", "is_transposed", "is_concatenated", "has_post_expert_norm")
#: Scalar attributes of the float module that its `_apply_gate` may read (gpt-oss: alpha, limit).
_SCALARS = (int, float, bool, str, type(None))


def is_fused_experts(module: nn.Module) -> bool:
    """True for a module holding all experts of a MoE layer as 3-D parameters (``down_proj`` [E, ., .] and
    ``gate_up_proj`` or ``up_proj``), decorated by transformers or not."""
    down = getattr(module, "down_proj", None)
    up = getattr(module, "gate_up_proj", getattr(module, "up_proj", None))
    return all(isinstance(p, nn.Parameter) and p.dim() == 3 for p in (down, up))


def _up_name(has_gate: bool) -> str:
    return "gate_up_proj" if has_gate else "up_proj"


def expert_weight(experts: nn.Module, param: str, index: int) -> torch.Tensor:
    """Weight [out, in] of expert `index` in the float 3-D parameter `param` of a fused experts module."""
    w = getattr(experts, param)[index]
    return w.t() if experts.is_transposed else w


def check_supported(experts: nn.Module, name: str) -> None:
    """Raise a clear error for fused experts `CBQExperts` cannot reproduce (not decorated by transformers'
    `use_experts_implementation`, or holding parameters beyond the expert matrices, their biases and a norm)."""
    cls = type(experts).__name__
    missing = [f for f in _LAYOUT_FLAGS if not hasattr(experts, f)]
    if missing:
        raise NotImplementedError(
            f"{name} ({cls}) holds fused 3-D expert weights but does not declare its layout through transformers' "
            f"`use_experts_implementation` (missing {missing}), so cbq_hf cannot quantize it. Keep it in float by "
            f"adding {name.rpartition('.')[2]!r} to `modules_to_not_convert`, or open an issue with the model name."
        )
    known = {_up_name(experts.has_gate), "down_proj"}
    if experts.has_bias:
        known |= {f"{_up_name(experts.has_gate)}_bias", "down_proj_bias"}
    own = {n for n, _ in experts.named_parameters(recurse=False)}
    unknown = sorted(own - known)
    if unknown:
        raise NotImplementedError(
            f"{name} ({cls}) has expert parameters {unknown} that cbq_hf does not know how to apply; keep it in "
            f"float through `modules_to_not_convert`."
        )


def expert_layout(experts: nn.Module) -> dict:
    """Constructor arguments of `CBQExperts` (sizes, gating, biases) read from a float fused experts module."""
    up = getattr(experts, _up_name(experts.has_gate))
    num, a, b = up.shape
    hidden, up_out = (a, b) if experts.is_transposed else (b, a)
    return dict(
        num_experts=num,
        hidden_size=hidden,
        intermediate_size=up_out // 2 if experts.has_gate else up_out,
        has_gate=experts.has_gate,
        has_bias=experts.has_bias,
        apply_gate=getattr(type(experts), "_apply_gate", None) if experts.has_gate else None,
        dtype=up.dtype if up.dtype.is_floating_point else None,
    )


def adopt_behaviour(dst: nn.Module, src: nn.Module, skip: tuple[str, ...] = ()) -> None:
    """Give `dst` what the gating and the post-expert norm of `src` read: its float submodules (shared, those named
    in `skip` excepted), its public scalar attributes, `act_fn`, `config` and `has_post_expert_norm`."""
    for key, value in vars(src).items():
        if not key.startswith("_") and isinstance(value, _SCALARS) and key not in vars(dst):
            setattr(dst, key, value)
    for child_name, child in src.named_children():
        if child_name not in skip:
            dst.add_module(child_name, child)
    if not hasattr(dst, "act_fn"):  # a plain function rather than an activation module
        dst.act_fn = getattr(src, "act_fn", None)
    dst.config = getattr(src, "config", None)
    dst.has_post_expert_norm = bool(src.has_post_expert_norm)


def expert_mlp(
    experts: nn.Module, index: int, x: torch.Tensor, linear: Callable[[nn.Module, torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """Expert `index` of `experts` (`CBQExperts` or a module with its layout) on tokens `x`: up projection,
    gating (or activation), down projection, post-expert norm; `linear(module, x)` applies one matrix."""
    h = linear(getattr(experts, experts.up_name)[index], x)
    h = experts._apply_gate_fn(experts, h) if experts.has_gate else experts.act_fn(h)
    h = linear(experts.down[index], h)
    return experts.post_expert_norm(h) if experts.has_post_expert_norm else h


class CBQExperts(nn.Module):
    """Quantized fused experts: one `CBQLinear` per expert and projection, same forward as the float module.

    Build it with `CBQExperts.like(float_experts, fmt)` (empty buffers, for loading a checkpoint) and fill it with
    `load_rtn(float_experts)`, or let transformers load the packed buffers into it.

    Args:
        num_experts: E.
        hidden_size: H (input of the up projection, output of the down projection).
        intermediate_size: I (the up projection gives 2I values with a gate, I without).
        fmt: the storage format of every expert matrix.
        has_gate: gated experts (``gate_up_proj``) or not (``up_proj`` then ``act_fn``).
        has_bias: the float experts have per-expert biases (kept in float on each `CBQLinear`).
        apply_gate: the float class's gating function ``(module, gate_up_out) -> hidden`` (unbound), used when
            `has_gate`; it reads `act_fn` and the scalars copied by `like`.
        dtype: dtype of the biases.
        device: where buffers are allocated ("meta" before loading).
    """

    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        intermediate_size: int,
        fmt: QuantFormat,
        has_gate: bool = True,
        has_bias: bool = False,
        apply_gate: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.fmt = fmt
        self.has_gate = has_gate
        self.has_bias = has_bias
        self.has_post_expert_norm = False
        up_out = 2 * intermediate_size if has_gate else intermediate_size
        fmt.check_shape(up_out, hidden_size, "expert up projection")
        fmt.check_shape(hidden_size, intermediate_size, "expert down projection")

        def linears(n_in: int, n_out: int) -> nn.ModuleList:
            return nn.ModuleList(
                CBQLinear(n_in, n_out, has_bias, fmt, dtype=dtype, device=device) for _ in range(num_experts)
            )

        self.up_name = "gate_up" if has_gate else "up"
        self.add_module(self.up_name, linears(hidden_size, up_out))
        self.down = linears(intermediate_size, hidden_size)
        self._apply_gate_fn = apply_gate

    # ------------------------------------------------------------------ construction
    @classmethod
    def like(
        cls, experts: nn.Module, fmt: QuantFormat, device: torch.device | str | None = None, name: str = "experts"
    ) -> CBQExperts:
        """An empty `CBQExperts` with the shapes and behaviour of the float fused `experts` (which may be on meta).

        Float submodules (`act_fn`, `post_expert_norm`) are shared with `experts`, and its scalar attributes (e.g.
        gpt-oss's `alpha`, `limit`) are copied, so the class's own `_apply_gate` runs unchanged.
        """
        check_supported(experts, name)
        layout = expert_layout(experts)
        q = cls(**layout, fmt=fmt, device=device)
        adopt_behaviour(q, experts)
        return q

    @classmethod
    def from_linears(cls, unfused: nn.Module, fmt: QuantFormat) -> CBQExperts:
        """The `CBQExperts` holding the packed `CBQLinear` lists of `unfused` (a module with this class's layout
        attributes, ``<up_name>``/``down`` lists and behaviour, e.g. `calibration.moe.UnfusedExperts` after
        packing); the lists and float submodules are moved, not copied."""
        ups, downs = getattr(unfused, unfused.up_name), unfused.down
        if not all(isinstance(m, CBQLinear) for m in (*ups, *downs)):
            raise TypeError(f"{type(unfused).__name__}: every expert matrix must be a packed CBQLinear first")
        layout = {k: getattr(unfused, k) for k in ("num_experts", "hidden_size", "intermediate_size", "has_gate")}
        q = cls(**layout, fmt=fmt, has_bias=unfused.has_bias, apply_gate=unfused._apply_gate_fn, device="meta")
        setattr(q, q.up_name, ups)
        q.down = downs
        adopt_behaviour(q, unfused, skip=(q.up_name, "down"))
        return q

    @torch.no_grad()
    def load_rtn(self, experts: nn.Module) -> None:
        """Quantize every expert of the float fused `experts` (same layout as this module) to nearest, in place."""
        up_param = _up_name(self.has_gate)
        for e in range(self.num_experts):
            for lin, param in ((getattr(self, self.up_name)[e], up_param), (self.down[e], "down_proj")):
                bias = getattr(experts, f"{param}_bias")[e] if self.has_bias else None
                lin.load_packed(self.fmt.quantize_rtn(expert_weight(experts, param, e).detach()), bias=bias)

    def expert_linears(self) -> dict[str, CBQLinear]:
        """Relative names -> every packed expert matrix (``gate_up.0``, ..., ``down.<E-1>``)."""
        return {n: m for n, m in self.named_modules() if isinstance(m, CBQLinear)}

    # ------------------------------------------------------------------ forward
    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        """Fast path: the (token, slot) pairs are sorted by expert once; each expert with work runs one GEMM (or
        GEMV for a single token) per projection through the kernel dispatch. Indices >= num_experts (expert-parallel
        sentinels) are skipped, as in the float module."""
        out = torch.zeros_like(hidden_states)
        k = top_k_index.shape[-1]
        flat = top_k_index.reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=self.num_experts)[: self.num_experts].tolist()
        tokens = order // k
        weights = top_k_weights.reshape(-1)[order]
        start = 0
        for e, n in enumerate(counts):
            if n:
                tok = tokens[start : start + n]
                y = expert_mlp(self, e, hidden_states[tok], dispatch.linear) * weights[start : start + n, None]
                out.index_add_(0, tok, y.to(out.dtype))
            start += n
        return out

    def forward_reference(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        """Reference path: every expert in turn, its tokens found by mask as the float eager module does, each
        matrix dequantized and applied in float32 (`cbq_hf.kernels.reference.linear`)."""
        out = torch.zeros_like(hidden_states)
        for e in range(self.num_experts):
            pos, slot = torch.where(top_k_index == e)
            if pos.numel() == 0:
                continue
            y = expert_mlp(self, e, hidden_states[pos], reference.linear) * top_k_weights[pos, slot, None]
            out.index_add_(0, pos, y.to(out.dtype))
        return out

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, hidden_size={self.hidden_size}, "
            f"intermediate_size={self.intermediate_size}, gate={self.has_gate}, bias={self.has_bias}, "
            f"format={self.fmt.name}"
        )
