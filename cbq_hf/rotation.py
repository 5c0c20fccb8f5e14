"""Orthogonal Hadamard rotations for activation quantization (QuaRot / SpinQuant style), `CBQConfig(rotation=...)`.

A rotation spreads the few large input channels of a linear over all channels, so per-token activation grids
(int4, int8) lose less. Two kinds, both exact in float arithmetic:

- **Offline** (`rotate_model`, Llama-shaped decoders only): every RMSNorm's weight is folded into the linears that
  read its output (q/k/v, gate/up, the final norm into ``lm_head``) and set to 1; then the residual stream is rotated
  by an orthogonal ``Q = diag(s) H / sqrt(d)`` (``H`` a Hadamard matrix of the hidden size ``d``, ``s`` random signs
  drawn from `CBQConfig.seed`): embedding ``E -> E Q``, every linear reading the residual ``W -> W Q``, every
  linear writing it ``W -> Q^T W`` (bias ``b -> b Q``). An RMSNorm with weight 1 commutes with ``Q`` (it only
  divides by the root mean square, which ``Q`` keeps), so the model computes the same function. A tied
  ``lm_head`` is untied (copied), because the final norm's weight is folded into it and not into the embedding;
  ``config.tie_word_embeddings`` becomes False so the saved checkpoint loads untied. The value / output head
  dimension is rotated too (per head, ``v_proj`` output and ``o_proj`` input by the Hadamard matrix of the head
  size), which needs no run-time work: attention mixes tokens, never channels, within a head.
- **Online** (`hadamard_transform`): the input of every ``mlp.down_proj`` is multiplied by ``R = H / sqrt(n)``
  (``n`` the intermediate size) at run time, and ``W_down -> W_down R`` offline. A float ``nn.Linear`` gets it as a
  forward pre-hook, the calibration stand-ins and `CBQLinear` apply it in their forward (flag ``online_hadamard``
  on float modules, buffer ``input_hadamard`` on `CBQLinear`, saved in the checkpoint).

Hadamard matrices of sizes that are not powers of two: ``H_n = H_p (x) H_{2^a}`` (Kronecker product) with ``H_p`` a
Paley type-I matrix of order ``p = q + 1`` (``q`` a prime with ``q = 3 mod 4``; 12, 20, 24, 44, 48, ...) and
``H_{2^a}`` Sylvester's Walsh-Hadamard matrix, or a product of two Paley factors (e.g. 576 = 12 * 48, 1536 = 12 *
128). The online transform applies the factors one axis at a time, ``O(n (p + 2^a))`` per token instead of
``O(n^2)``.

This module is model surgery used beyond calibration (`nn.linear` applies the online transform at inference, the
quantizer marks the linears of a saved rotated checkpoint before loading it), hence its place next to `modeling`.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import nn

#: Families whose decoders have the layout `rotate_model` folds (pre-norm RMSNorm blocks, SwiGLU MLP, q/k/v/o).
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
#: The decoder-block linears that read / write the residual stream, and the one given the online Hadamard.
_READ_ATTN, _READ_MLP = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj")
_WRITE = ("self_attn.o_proj", "mlp.down_proj")
ONLINE_LINEAR = "mlp.down_proj"


# ------------------------------------------------------------------------------------------------ matrices
def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % d for d in range(2, math.isqrt(q) + 1))


def _paley(q: int) -> torch.Tensor:
    """Paley type-I Hadamard matrix of order q + 1 (q prime, q = 3 mod 4), entries +-1, float64."""
    squares = {(i * i) % q for i in range(1, q)}
    chi = torch.tensor([0.0] + [1.0 if i in squares else -1.0 for i in range(1, q)], dtype=torch.float64)
    idx = torch.arange(q)
    jacobsthal = chi[(idx[None, :] - idx[:, None]) % q]  # antisymmetric since q = 3 mod 4
    s = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    s[0, 1:] = 1.0
    s[1:, 0] = -1.0
    s[1:, 1:] = jacobsthal
    return s + torch.eye(q + 1, dtype=torch.float64)


def _sylvester(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def _paley_orders(limit: int) -> list[int]:
    return [q + 1 for q in range(3, limit) if q % 4 == 3 and _is_prime(q) and q & (q + 1)]  # 2^a: Sylvester


@functools.lru_cache(maxsize=32)
def hadamard_factors(n: int) -> tuple[torch.Tensor, ...]:
    """+-1 Hadamard matrices (float64) whose Kronecker product is a Hadamard matrix of order `n`: Paley
    factors, then one Sylvester factor (see module docstring).

    Raises:
        ValueError: no such construction for `n` (e.g. n not a multiple of 4 other than 1 and 2).
    """
    two = n & -n  # largest power of two dividing n
    rest = n // two
    if rest == 1:
        return (_sylvester(n),)
    for p in _paley_orders(n):
        if n % p:
            continue
        m = n // p
        if m & (m - 1) == 0:
            return (_paley(p - 1), _sylvester(m))
        for p2 in _paley_orders(m):
            if m % p2 == 0 and (m // p2) & (m // p2 - 1) == 0:
                return (_paley(p - 1), _paley(p2 - 1), _sylvester(m // p2))
    raise ValueError(
        f"no Hadamard matrix of order {n} from Sylvester and Paley-I factors (supported: 2^a, and 2^a times one or "
        f"two orders q+1 with q prime, q = 3 mod 4, e.g. 12, 20, 24, 44, 48)"
    )


def hadamard_matrix(n: int) -> torch.Tensor:
    """Orthonormal Hadamard matrix H_n / sqrt(n) [n, n], float64 (the matrix `hadamard_transform` multiplies by)."""
    h = torch.ones(1, 1, dtype=torch.float64)
    for f in hadamard_factors(n):
        h = torch.kron(h, f)
    return h / math.sqrt(n)


def hadamard_transform(x: torch.Tensor) -> torch.Tensor:
    """x @ hadamard_matrix(n) over the last dimension (size n), in float32 (float64 for float64 x), returned in x's
    dtype; one factor at a time (see module docstring)."""
    n = x.shape[-1]
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    factors = _device_factors(n, x.device, work)
    sizes = [f.shape[0] for f in factors]
    y = x.to(work).reshape(*x.shape[:-1], *sizes)
    k = len(sizes)
    with torch.autocast(x.device.type, enabled=False):  # exact in `work`, also inside a bfloat16 autocast
        for axis, f in enumerate(factors):
            y = torch.movedim(torch.movedim(y, -k + axis, -1) @ f, -1, -k + axis)
    return (y.reshape(x.shape) * (1.0 / math.sqrt(n))).to(x.dtype)


@functools.lru_cache(maxsize=64)
def _device_factors(n: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    return tuple(f.to(device=device, dtype=dtype) for f in hadamard_factors(n))


def residual_rotation(d: int, seed: int) -> torch.Tensor:
    """Q = diag(s) H_d / sqrt(d) [d, d] float64, with random signs s from `seed` (a randomized Hadamard rotation)."""
    gen = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (d,), generator=gen).to(torch.float64) * 2 - 1
    return signs[:, None] * hadamard_matrix(d)


# ------------------------------------------------------------------------------------------------ model surgery
def _rotate_input_hook(module: nn.Module, args: tuple) -> tuple:
    return (hadamard_transform(args[0]), *args[1:])


def check_rotatable(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of `model` if `rotate_model` supports it; else a ValueError naming what is missing."""
    from .modeling import find_decoder_blocks

    model_type = getattr(model.config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"CBQConfig(rotation='hadamard') supports Llama-shaped decoders ({', '.join(SUPPORTED_MODEL_TYPES)}); "
            f"{type(model).__name__} (model_type={model_type!r}) is not one: its norms and residual layout are not "
            f"described to the rotation. Use rotation=None for it."
        )
    _, blocks = find_decoder_blocks(model)
    needed = ("input_layernorm", "post_attention_layernorm", *_READ_ATTN, *_READ_MLP, *_WRITE)
    missing = [n for n in needed if not _has(blocks[0], n)]
    base = getattr(model, "model", None)
    if not isinstance(getattr(base, "norm", None), nn.Module):
        missing.append("model.norm")
    if not isinstance(model.get_input_embeddings(), nn.Embedding):
        missing.append("an nn.Embedding input embedding")
    if not isinstance(model.get_output_embeddings(), nn.Linear):
        missing.append("an nn.Linear lm_head")
    if missing:
        raise ValueError(
            f"CBQConfig(rotation='hadamard'): {type(model).__name__} lacks {', '.join(missing)} in its decoder "
            f"layout (mixture-of-experts blocks and quantized modules are not rotated); use rotation=None."
        )
    meta = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if meta:
        raise ValueError(
            f"CBQConfig(rotation='hadamard') rotates every weight in memory; {meta[0]} is offloaded (meta). Load the "
            f"model without a cpu/disk device map, or use rotation=None."
        )
    return blocks


def _has(block: nn.Module, name: str) -> bool:
    try:
        mod = block.get_submodule(name)
    except AttributeError:
        return False
    if name.endswith("layernorm"):
        return getattr(mod, "bias", None) is None and isinstance(getattr(mod, "weight", None), nn.Parameter)
    return type(mod) is nn.Linear


@torch.no_grad()
def _fold_norm(norm: nn.Module, linears: list[nn.Linear]) -> None:
    g = norm.weight.double()
    for lin in linears:
        lin.weight.copy_(lin.weight.double() * g)
    norm.weight.fill_(1.0)


@torch.no_grad()
def _rotate(weight: torch.Tensor, left: torch.Tensor | None = None, right: torch.Tensor | None = None) -> None:
    w = weight.double()
    if left is not None:
        w = left.to(w.device) @ w
    if right is not None:
        w = w @ right.to(w.device)
    weight.copy_(w)


def _untie_head(model: nn.Module) -> None:
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    if head.weight is emb.weight or head.weight.data_ptr() == emb.weight.data_ptr():
        head.weight = nn.Parameter(emb.weight.detach().clone(), requires_grad=emb.weight.requires_grad)
    for cfg in {id(c): c for c in (model.config, getattr(model.config, "get_text_config", lambda: None)())}.values():
        if cfg is not None and hasattr(cfg, "tie_word_embeddings"):
            cfg.tie_word_embeddings = False


@torch.no_grad()
def rotate_model(model: nn.Module, seed: int = 0) -> list[str]:
    """Rotate a float Llama-shaped causal LM in place (module docstring): norms folded, residual rotated by a
    randomized Hadamard Q, values / o_proj inputs rotated per head, online Hadamard before every ``mlp.down_proj``.
    The model computes the same function.

    Returns the names of the linears given the online Hadamard (relative to the model).

    Raises:
        ValueError: the architecture is not supported (the message names what is missing), or weights are offloaded.
    """
    from .modeling import find_decoder_blocks

    blocks = check_rotatable(model)
    prefix, _ = find_decoder_blocks(model)
    _untie_head(model)
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    q = residual_rotation(emb.weight.shape[1], seed)
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    online = []
    for i, block in enumerate(blocks):
        sub = block.get_submodule
        _fold_norm(block.input_layernorm, [sub(n) for n in _READ_ATTN])
        _fold_norm(block.post_attention_layernorm, [sub(n) for n in _READ_MLP])
        for name in (*_READ_ATTN, *_READ_MLP):
            _rotate(sub(name).weight, right=q)
        for name in _WRITE:
            lin = sub(name)
            _rotate(lin.weight, left=q.T)
            if lin.bias is not None:
                lin.bias.copy_(lin.bias.double() @ q.to(lin.bias.device))
        _rotate_values(sub("self_attn.v_proj"), sub("self_attn.o_proj"), head_dim)
        down = sub(ONLINE_LINEAR)
        _rotate(down.weight, right=hadamard_matrix(down.in_features))
        add_online_hadamard(down)
        online.append(f"{prefix}.{i}.{ONLINE_LINEAR}")
    _fold_norm(model.model.norm, [head])
    _rotate(head.weight, right=q)
    _rotate(emb.weight, right=q)
    return online


@torch.no_grad()
def _rotate_values(v_proj: nn.Linear, o_proj: nn.Linear, head_dim: int) -> None:
    """Per-head Hadamard of the value / output head dimension: v -> v (I (x) H), W_o -> W_o (I (x) H). Attention
    mixes tokens within a head, so the heads' outputs carry the same rotation into o_proj, whose input it whitens."""
    h = hadamard_matrix(head_dim)
    v_heads, o_heads = v_proj.out_features // head_dim, o_proj.in_features // head_dim
    _rotate(v_proj.weight, left=torch.block_diag(*[h.T] * v_heads))
    if v_proj.bias is not None:
        v_proj.bias.copy_(v_proj.bias.double() @ torch.block_diag(*[h] * v_heads).to(v_proj.bias.device))
    _rotate(o_proj.weight, right=torch.block_diag(*[h] * o_heads))


def add_online_hadamard(linear: nn.Linear) -> None:
    """Make the float `linear` multiply its input by `hadamard_matrix(in_features)` first (forward pre-hook), and
    mark it (``online_hadamard``) so its stand-in and its `CBQLinear` do the same."""
    if not getattr(linear, "online_hadamard", False):
        linear.register_forward_pre_hook(_rotate_input_hook)
    linear.online_hadamard = True


def mark_online_hadamard(model: nn.Module) -> list[str]:
    """Give every block's ``mlp.down_proj`` of a float skeleton the online Hadamard (`add_online_hadamard`) before a
    rotated checkpoint loads into it: a quantized one is then built with the ``input_hadamard`` buffer, one kept in
    float (modules_to_not_convert) rotates its input like at calibration. Returns their names."""
    from .modeling import find_decoder_blocks

    prefix, blocks = find_decoder_blocks(model)
    names = []
    for i, block in enumerate(blocks):
        if _has(block, ONLINE_LINEAR):
            add_online_hadamard(block.get_submodule(ONLINE_LINEAR))
            names.append(f"{prefix}.{i}.{ONLINE_LINEAR}")
    return names


def apply_rotation(model: nn.Module, config) -> None:
    """Rotate `model` as `config.rotation` asks (None: nothing), once: a model already rotated is left as it is.
    Records the rotated linears' count in `config.run_info` (saved with the checkpoint)."""
    if getattr(config, "rotation", None) is None or getattr(model, "_cbq_rotated", False):
        return
    online = rotate_model(model, seed=config.seed)
    model._cbq_rotated = True
    if isinstance(getattr(config, "run_info", None), dict):
        config.run_info["rotation"] = {"kind": config.rotation, "online_hadamard_linears": len(online)}
