"""Mixture-of-experts during CBQ calibration: fused experts as one `nn.Linear` per expert matrix.

transformers 5.x holds a MoE layer's experts as 3-D parameters in one module (`nn.experts.is_fused_experts`). While
a decoder block is inside its calibration windows, that module is replaced by `UnfusedExperts`: every expert's up
(``gate_up.<e>`` / ``up.<e>``) and down (``down.<e>``) matrix is a plain `nn.Linear` whose weight is a *view* of the
fused parameter, and its forward computes the float experts' function. So the pipeline's machinery handles expert
matrices unchanged, as linears listed in `BlockPipeline.names`: statistics hooks, one trainable stand-in each,
joint training with the window, packing into `CBQLinear`, checkpoints and resume. When the block leaves its last
window the packed lists are assembled into `CBQExperts` (`fuse_block`), the inference module a saved checkpoint
loads into. The swap happens when a block is loaded for its first window (`unfuse_block`), so only the window's
blocks ever hold unfused experts, and the views add no memory beyond the window's float32 copies.

Routing (`CBQConfig.moe_calibrate_all_experts`):

- real routing: each expert runs on the tokens the router sends it, as at inference;
- all experts (llm-compressor's calibration modules do the same): every token runs through every expert, and each
  expert's output is multiplied by the router's weight for that token, 0 where the expert was not chosen. The
  block output is unchanged; what changes is what each expert *sees*: the input statistics that set its starting
  grid (`rounding.init_qparams` weighs the grid search by them) come from every calibration token. The window
  loss only reaches an expert through the tokens routed to it (the others have weight 0), so only the float
  copy's first run (where the statistics are recorded) sends every token everywhere; the trained copy always
  routes, which keeps the cost of this mode to one extra float pass over the experts per block.

The float copy of each block counts, in its first float run, how many calibration tokens the router sends to each
expert (the pipeline reports them under ``report["experts"]``). An expert that received none gets no signal from
the window loss in either mode, so it is packed by round-to-nearest (`QuantFormat.quantize_rtn` of its float
weight) instead of its untrained stand-in.
"""

from __future__ import annotations

import torch
from torch import nn

from ..formats.registry import QuantFormat
from ..modeling import set_module
from ..nn.experts import CBQExperts, adopt_behaviour, check_supported, expert_layout, expert_mlp, is_fused_experts


def _view_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """An `nn.Linear` whose weight [out, in] (and bias) are the given tensors themselves (views, no copy)."""
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    lin.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        lin.bias = nn.Parameter(bias, requires_grad=False)
    return lin


def _call(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return module(x)


class UnfusedExperts(nn.Module):
    """Fused float experts as ``<up_name>.<e>`` / ``down.<e>`` `nn.Linear` views, with the forward signature of
    the module they replace (see module docstring).

    Args:
        experts: a fused experts module decorated by transformers' `use_experts_implementation` (loaded, not meta).
        all_experts: run every token through every expert (router weight 0 where not chosen).
        name: its full name, for error messages.
    """

    #: Read by `modeling` so that the matrices inside are listed as experts, not as ordinary linears.
    is_unfused_experts = True

    def __init__(self, experts: nn.Module, all_experts: bool, name: str = "experts") -> None:
        super().__init__()
        check_supported(experts, name)
        layout = expert_layout(experts)
        self.num_experts, self.has_gate, self.has_bias = layout["num_experts"], experts.has_gate, experts.has_bias
        self.hidden_size, self.intermediate_size = layout["hidden_size"], layout["intermediate_size"]
        self._apply_gate_fn = layout["apply_gate"]
        self.up_name = "gate_up" if self.has_gate else "up"
        self.all_experts = all_experts
        #: Tokens routed to each expert while `counting` (only the float reference copy counts).
        self.routed = torch.zeros(self.num_experts, dtype=torch.long)
        self.counting = False
        for name_, param in ((self.up_name, "gate_up_proj" if self.has_gate else "up_proj"), ("down", "down_proj")):
            w = getattr(experts, param).detach()
            b = getattr(experts, f"{param}_bias").detach() if self.has_bias else None
            views = [w[e].t() if experts.is_transposed else w[e] for e in range(self.num_experts)]
            lins = [_view_linear(v, None if b is None else b[e]) for e, v in enumerate(views)]
            self.add_module(name_, nn.ModuleList(lins))
        adopt_behaviour(self, experts, skip=(self.up_name, "down"))

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        hit = top_k_index.unsqueeze(-1) == torch.arange(self.num_experts, device=top_k_index.device)  # [T, k, E]
        if self.counting:
            self.routed += hit.sum((0, 1)).cpu()
        out = torch.zeros_like(hidden_states)
        for e in range(self.num_experts):
            if self.all_experts:
                w = (top_k_weights * hit[..., e]).sum(-1, keepdim=True)
                out = out + (expert_mlp(self, e, hidden_states, _call) * w).to(out.dtype)
                continue
            pos, slot = torch.where(hit[..., e])
            if pos.numel():
                y = expert_mlp(self, e, hidden_states[pos], _call) * top_k_weights[pos, slot, None]
                out = out.index_add(0, pos, y.to(out.dtype))
        return out


def fused_experts_names(blocks_prefix: str, experts: dict[str, nn.Module], fmt: QuantFormat):
    """Per block index, relative name -> full name of every expert matrix of the fused experts in `experts` (full
    name -> module, as `modeling.quantizable_experts` gives), named as `UnfusedExperts` and `CBQExperts` hold
    them; each matrix's shape is checked against `fmt`."""
    out: dict[int, dict[str, str]] = {}
    for full, mod in experts.items():
        if not is_fused_experts(mod):
            continue
        check_supported(mod, full)
        layout = expert_layout(mod)
        hidden, inter, up = layout["hidden_size"], layout["intermediate_size"], "gate_up" if mod.has_gate else "up"
        fmt.check_shape(2 * inter if mod.has_gate else inter, hidden, f"{full} (expert up projection)")
        fmt.check_shape(hidden, inter, f"{full} (expert down projection)")
        idx, _, rel = full[len(blocks_prefix) + 1 :].partition(".")
        names = out.setdefault(int(idx), {})
        for proj in (up, "down"):
            for e in range(layout["num_experts"]):
                names[f"{rel}.{proj}.{e}"] = f"{full}.{proj}.{e}"
    return out


def unfuse_block(block: nn.Module, experts_rel: list[str], all_experts: bool, block_name: str = "block") -> None:
    """Replace the fused experts modules `experts_rel` (relative names) of `block` by `UnfusedExperts`, in place."""
    for rel in experts_rel:
        mod = block.get_submodule(rel)
        if is_fused_experts(mod):
            set_module(block, rel, UnfusedExperts(mod, all_experts, f"{block_name}.{rel}"))


def unfused_modules(block: nn.Module) -> dict[str, UnfusedExperts]:
    return {n: m for n, m in block.named_modules() if isinstance(m, UnfusedExperts)}


def inside_experts(block: nn.Module, rel: str) -> bool:
    """Whether the linear `rel` of `block` is an expert matrix of an `UnfusedExperts` (never smoothed, packed without
    an input scale)."""
    return any(rel.startswith(n + ".") for n in unfused_modules(block))


def start_counting(fp_block: nn.Module, all_experts: bool) -> None:
    """Before the first float run of a block: make the `UnfusedExperts` of its float reference copy `fp_block` count
    routed tokens from zero, and run every token through every expert if `all_experts`."""
    for m in unfused_modules(fp_block).values():
        m.routed.zero_()
        m.counting, m.all_experts = True, all_experts


def take_counts(fp_block: nn.Module) -> dict[str, list[int]]:
    """Relative name -> tokens routed to each expert since `start_counting`; counting and all-experts routing stop
    (later float runs of the block only produce targets, which routing does not change)."""
    out = {}
    for n, m in unfused_modules(fp_block).items():
        out[n] = m.routed.tolist()
        m.counting = m.all_experts = False
    return out


@torch.no_grad()
def fuse_block(block: nn.Module, fp_block: nn.Module, counts: dict[str, list[int]], fmt: QuantFormat) -> list[str]:
    """Assemble every `UnfusedExperts` of `block` (its matrices packed `CBQLinear`s) into `CBQExperts`, in place.
    Experts that `counts` (relative name -> tokens per expert) shows received no calibration token are packed by
    RTN of their float weight in `fp_block` (the float reference copy; None on resume, where every matrix is
    already restored). Returns the names ``<rel>.<e>`` of the experts packed by RTN."""
    rtn = []
    for rel, mod in unfused_modules(block).items():
        idle = [e for e, n in enumerate(counts.get(rel, ())) if n == 0] if fp_block is not None else []
        for e in idle:
            for proj in (mod.up_name, "down"):
                ref = fp_block.get_submodule(f"{rel}.{proj}.{e}")
                packed = getattr(mod, proj)[e]
                device = next(iter(packed.packed_buffers().values())).device
                packed.load_packed({k: v.to(device) for k, v in fmt.quantize_rtn(ref.weight.float()).items()})
            rtn.append(f"{rel}.{e}")
        if any(lin.input_scale is not None for lin in (*getattr(mod, mod.up_name), *mod.down)):
            raise ValueError(f"cbq_hf: {rel}: an expert matrix was packed with an input scale (never smoothed)")
        set_module(block, rel, CBQExperts.from_linears(mod, fmt))
    return rtn
