"""Export a saved `cbq_hf` checkpoint (uniform format) to formats that serving engines load without `cbq_hf`.

Targets
    ``compressed-tensors``: the ``pack-quantized`` format that llm-compressor writes for W4A16 / W8A16 (group or
        per-channel). transformers loads it through its built-in compressed-tensors quantizer; vLLM and SGLang
        serve it with their WNA16 kernels.
    ``gptq``: the GPTQ v1 checkpoint format (``qweight`` / ``qzeros`` / ``scales`` / ``g_idx``, int32 packing,
        zero points stored minus one). Read by transformers (through gptqmodel), vLLM, SGLang, TGI.

Both conversions are exact: the exported integer codes, zero points and scales dequantize to the very same
weights as `CBQLinear` computes (bit for bit in float32; scales are cast to the model dtype only where the target
format stores them in it, see `docs/export.md`). Settings a target cannot represent exactly are refused with an
`UnsupportedExportError` that says why and what to do instead; nothing is written in that case.

The export reads only the checkpoint folder (config.json + safetensors): the model is never loaded, its module
shapes come from an empty model built on the ``meta`` device.

Layouts written (W [N, K] = [out_features, in_features], G groups along K, b bits):

compressed-tensors pack-quantized (per module)
    ``weight_packed``      int32 [N, ceil(K*b/32)]: codes + 2**(b-1) offset, i.e. our unsigned codes, packed along
                           K, element k at bit (k*b) % 32 of word k*b // 32 (little end first).
    ``weight_scale``       model dtype [N, G].
    ``weight_zero_point``  int32 [ceil(N*b/32), G], asymmetric only: unsigned zero points packed along N (dim 0).
    ``weight_shape``       int64 [2] = (N, K).
    dequant: (unpacked - offset - (zp - offset)) * scale = (q - z) * s.

GPTQ v1 (per module)
    ``qweight``  int32 [K*b/32, N]: codes packed along K, 32/b codes per word, little end first.
    ``qzeros``   int32 [G, N*b/32]: (z - 1) packed along N (the v1 off-by-one: loaders add 1 back).
    ``scales``   float16 [G, N].
    ``g_idx``    int32 [K] = k // group_size.
    dequant: (q - (stored_zero + 1)) * s.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .formats.uniform import UniformSpec, unpack_codes

logger = logging.getLogger(__name__)

#: Export targets and the weight bit widths their loaders have kernels for.
TARGETS: dict[str, tuple[int, ...]] = {
    # vLLM CompressedTensorsWNA16 (Marlin / Machete / exllama) supports 4 and 8 bits; transformers'
    # compressed-tensors path would dequantize other widths too, but a serving engine could not run them.
    "compressed-tensors": (4, 8),
    # GPTQ v1 packs 32/b codes per int32 word; 3-bit uses a cross-word layout that we do not write.
    "gptq": (2, 4, 8),
}

#: compressed-tensors version the written config was validated against (see tests/test_export.py).
CT_VERIFIED_VERSION = "0.20.0"

_QUANT_SUFFIXES = ("qweight", "scales", "zeros", "input_scale", "act_clip")
_SKIP_FILES_SUFFIX = (".safetensors", ".safetensors.index.json", ".bin", ".bin.index.json")
_SKIP_FILES = {"config.json", "README.md"}


class ExportError(ValueError):
    """Base class of export failures that are the user's input, not a bug."""


class ExportSourceError(ExportError):
    """The source folder is missing, is not a cbq_hf checkpoint, or is damaged."""


class UnsupportedExportError(ExportError):
    """The checkpoint uses a setting the target format or its engines cannot represent exactly."""


# ---------------------------------------------------------------------------------------------- reading the source
@dataclass
class _Linear:
    name: str
    out_features: int
    in_features: int


@dataclass
class _Source:
    folder: str
    config: dict[str, Any]
    qconfig: Any  # CBQConfig
    files: list[str]
    index: dict[str, Any] | None
    quantized: dict[str, _Linear]
    #: nn.Linear modules that are kept in full precision (output embedding and modules_to_not_convert).
    float_linears: list[str]
    #: Of those, the ones inside decoder blocks (GPTQ loaders cannot skip them).
    float_block_linears: list[str] = field(default_factory=list)
    dtype: torch.dtype = torch.float32


def _read_source(src: str) -> _Source:
    from .config import CBQConfig

    if not os.path.isdir(src):
        raise ExportSourceError(f"checkpoint folder {src!r} does not exist (or is not a folder).")
    cfg_path = os.path.join(src, "config.json")
    if not os.path.isfile(cfg_path):
        raise ExportSourceError(f"{src!r} has no config.json; pass the folder written by cbq_hf's save_pretrained.")
    with open(cfg_path, encoding="utf-8") as f:
        config = json.load(f)
    qc = config.get("quantization_config")
    if not isinstance(qc, dict) or qc.get("quant_method") != "cbq":
        method = qc.get("quant_method") if isinstance(qc, dict) else None
        raise ExportSourceError(
            f"{src!r} is not a cbq_hf checkpoint (quantization_config.quant_method is {method!r}, expected 'cbq'); "
            f"quantize it with cbq_hf first."
        )
    try:
        qconfig = CBQConfig(**qc)
    except ValueError as e:
        raise ExportSourceError(f"{src!r}: invalid quantization_config: {e}") from e
    index_path = os.path.join(src, "model.safetensors.index.json")
    index = None
    if os.path.isfile(index_path):
        with open(index_path, encoding="utf-8") as f:
            index = json.load(f)
        files = sorted({os.path.join(src, v) for v in index["weight_map"].values()})
    else:
        files = [os.path.join(src, "model.safetensors")]
    missing = [p for p in files if not os.path.isfile(p)]
    if missing:
        raise ExportSourceError(f"{src!r}: weight file(s) {[os.path.basename(p) for p in missing]} are missing.")
    dtype = _config_dtype(config)
    return _Source(src, config, qconfig, files, index, {}, [], dtype=dtype)


def _config_dtype(config: dict[str, Any]) -> torch.dtype:
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    dtype = getattr(torch, str(name), None)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float32


def _check_settings(qconfig: Any, to: str) -> None:
    """Refuse settings that `to` cannot carry (before any tensor is read)."""
    if getattr(qconfig, "lm_head_bits", None) is not None:
        raise UnsupportedExportError(
            f"lm_head_bits={qconfig.lm_head_bits} cannot be exported to {to}: the exporter writes the decoder "
            f"linears only and keeps the output head in full precision, but this checkpoint no longer has a float "
            f"head. Re-quantize with lm_head_bits=None to export, or load this checkpoint with `import cbq_hf`."
        )
    if getattr(qconfig, "rotation", None) is not None:
        raise UnsupportedExportError(
            f"rotation={qconfig.rotation!r} cannot be exported to {to}: every mlp.down_proj of this checkpoint "
            f"multiplies its input by a Hadamard matrix at run time (input_hadamard), which {to} has no field or "
            f"kernel for; its layers would compute a different function. Load this checkpoint with `import cbq_hf`, "
            f"or re-quantize with rotation=None to export."
        )
    if qconfig.format != "uniform":
        raise UnsupportedExportError(
            f"format={qconfig.format!r} cannot be exported to {to}: LO-BCQ stores codebook indices with per-block "
            f"codebook selectors and 8-bit array scales, which no compressed-tensors / GPTQ kernel decodes. Load it "
            f"with `import cbq_hf` instead, or re-quantize with format='uniform'."
        )
    if qconfig.act_bits is not None:
        raise UnsupportedExportError(
            f"act_bits={qconfig.act_bits} cannot be exported to {to}: the {to} weight-only (W{qconfig.bits}A16) "
            f"kernels would run the layers with full-precision activations, which is not the model that was "
            f"calibrated (its clipping ratios and reconstruction assume {qconfig.act_bits}-bit activations). "
            f"Re-quantize weight-only (act_bits=None) to export, or serve this checkpoint with cbq_hf."
        )
    allowed = TARGETS[to]
    if qconfig.bits not in allowed:
        hint = {
            "compressed-tensors": "vLLM/SGLang's compressed-tensors WNA16 kernels support 4 and 8 bits only",
            "gptq": "3-bit GPTQ uses a cross-word packing that cbq_hf does not write",
        }[to]
        others = [t for t, bits in TARGETS.items() if t != to and qconfig.bits in bits]
        alt = f"; export to {others[0]} instead" if others else ""
        raise UnsupportedExportError(
            f"bits={qconfig.bits} cannot be exported to {to}: {hint}. Supported: "
            f"{', '.join(map(str, allowed))} bits{alt}, or keep using the checkpoint with cbq_hf."
        )


def _meta_model(src: _Source):
    """Empty model (no memory) with the checkpoint's architecture, to read module shapes and names."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(src.folder)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # shapes only: do not let transformers look for the "cbq" quantizer
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def _discover_modules(src: _Source) -> None:
    from safetensors import safe_open
    from torch import nn

    from .formats import get_format
    from .modeling import NoDecoderBlocksError, find_decoder_blocks
    from .serialization import CheckpointError, verify_checkpoint

    keys: set[str] = set()
    for path in src.files:
        try:
            with safe_open(path, framework="pt") as f:
                keys.update(f.keys())
        except Exception as e:  # safetensors raises its own types for damaged headers
            raise ExportSourceError(f"cannot read {path}: {e}") from e
    qnames = sorted(k[: -len(".qweight")] for k in keys if k.endswith(".qweight"))
    if not qnames:
        raise ExportSourceError(f"{src.folder!r} contains no quantized linears (no '*.qweight' tensors).")
    try:
        model = _meta_model(src)
    except Exception as e:  # unknown architecture, broken config
        raise ExportSourceError(f"cannot build the model described by {src.folder}/config.json: {e}") from e
    _refuse_experts(model, src)
    modules = dict(model.named_modules())
    fmt = get_format(src.qconfig)
    expected: dict[str, tuple[int, ...]] = {}
    for name in qnames:
        lin = modules.get(name)
        if not isinstance(lin, nn.Linear):
            raise ExportSourceError(
                f"quantized tensor {name}.qweight does not belong to a linear layer of "
                f"{type(model).__name__}; the checkpoint and its config.json disagree."
            )
        src.quantized[name] = _Linear(name, lin.out_features, lin.in_features)
        for buf, (shape, _) in fmt.buffer_specs(lin.out_features, lin.in_features).items():
            expected[f"{name}.{buf}"] = shape
    try:
        verify_checkpoint(src.files, expected, src.qconfig.loading_signature())
    except CheckpointError as e:
        raise ExportSourceError(f"{src.folder!r}: {e}") from e
    src.float_linears = [n for n, m in modules.items() if isinstance(m, nn.Linear) and n not in src.quantized]
    try:
        block_prefix, _ = find_decoder_blocks(model)
    except NoDecoderBlocksError:
        block_prefix = None
    if block_prefix is not None:
        src.float_block_linears = [n for n in src.float_linears if n.startswith(block_prefix + ".")]


def _refuse_experts(model, src: _Source) -> None:
    """Refuse mixture-of-experts checkpoints (fused experts quantized into `CBQExperts`), saying what is missing."""
    from .modeling import quantizable_experts

    try:
        experts = quantizable_experts(model, src.qconfig.modules_to_not_convert)
    except ValueError:  # no decoder blocks: not a MoE model either
        return
    if experts:
        raise UnsupportedExportError(
            f"{src.folder!r} is a mixture-of-experts model ({len(experts)} quantized experts modules, first "
            f"{next(iter(experts))}). The export writes dense linears only: the MoE layout that vLLM loads for "
            f"compressed-tensors and GPTQ checkpoints (one quantized module per expert and projection, gate and up "
            f"split, named as the model's original checkpoint names its experts, with the fused-MoE kernels' "
            f"packing) is not written yet. Serve this checkpoint through transformers with `import cbq_hf`, or "
            f"quantize the float model with another tool for vLLM."
        )


def _check_shapes(src: _Source, to: str) -> None:
    """Refuse layer shapes the target cannot hold (ragged groups, unpackable sizes)."""
    spec = UniformSpec(src.qconfig.bits, src.qconfig.group_size, src.qconfig.sym)
    gs = src.qconfig.group_size
    ragged = [lin for lin in src.quantized.values() if gs != -1 and lin.in_features % gs]
    if ragged:
        sizes = sorted({lin.in_features for lin in ragged})
        fits = [g for g in (256, 128, 64, 32, 16) if all(k % g == 0 for k in sizes)]
        suggestion = f"group_size {' or '.join(map(str, fits[:3]))}" if fits else "a group size dividing it"
        raise UnsupportedExportError(
            f"group_size={gs} does not divide the input size {sizes} of {len(ragged)} layer(s) (first: "
            f"{ragged[0].name}); cbq_hf stores a shorter last group there, but {to} requires every group to have "
            f"exactly group_size columns (compressed-tensors raises 'tensor column shape must be divisible by the "
            f"given group_size', the GPTQ kernels require in_features % group_size == 0). Re-quantize with "
            f"{suggestion}, or -1 (one group per output channel)."
        )
    if to == "gptq":
        if src.float_block_linears:
            raise UnsupportedExportError(
                f"{len(src.float_block_linears)} linear(s) inside the decoder blocks are kept in full precision "
                f"(first: {src.float_block_linears[0]}); GPTQ loaders quantize every linear of every block and have "
                f"no per-module ignore list. Export to compressed-tensors instead (it lists them under `ignore`)."
            )
        per_word = 32 // spec.slot_bits
        bad = [lin for lin in src.quantized.values() if lin.in_features % per_word or lin.out_features % per_word]
        if bad:
            raise UnsupportedExportError(
                f"GPTQ packs {per_word} {src.qconfig.bits}-bit values per int32 word along both the input and the "
                f"output dimension; layer {bad[0].name} has shape [out={bad[0].out_features}, "
                f"in={bad[0].in_features}], not multiples of {per_word}. Export to compressed-tensors instead."
            )


# ---------------------------------------------------------------------------------------------- packing helpers
def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """int64 words holding unsigned 32-bit patterns -> int32 with the same bits."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def pack_int32(values: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Pack unsigned `bits`-bit integers densely into int32 words along `dim` (0 or 1) of a 2-D tensor.

    Element i of a line sits at bit (i*bits) % 32 of word (i*bits) // 32, little end first; for 2, 4 and 8 bits this
    is both compressed-tensors' `pack_to_int32` (after its +2**(bits-1) offset) and GPTQ's packing.
    """
    if bits not in (2, 4, 8):
        raise ValueError(f"pack_int32 supports 2, 4 and 8 bits, got {bits}")
    v = values.to(torch.int64)
    if dim == 0:
        v = v.t()
    rows, cols = v.shape
    per_word = 32 // bits
    pad = (-cols) % per_word
    v = torch.nn.functional.pad(v, (0, pad)).view(rows, -1, per_word)
    shifts = torch.arange(per_word, dtype=torch.int64) * bits
    out = _to_int32((v << shifts).sum(-1))
    return out.t().contiguous() if dim == 0 else out.contiguous()


@dataclass
class _Packed:
    codes: torch.Tensor  # uint8 [N, K]
    scales: torch.Tensor  # float16 [N, G]
    zeros: torch.Tensor  # uint8 [N, G]
    bias: torch.Tensor | None


def _convert_compressed_tensors(
    lin: _Linear, p: _Packed, spec: UniformSpec, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    out = {
        "weight_packed": pack_int32(p.codes, spec.bits, dim=1),
        "weight_scale": p.scales.to(dtype),
        "weight_shape": torch.tensor([lin.out_features, lin.in_features], dtype=torch.int64),
    }
    if not spec.sym:
        out["weight_zero_point"] = pack_int32(p.zeros, spec.bits, dim=0)
    return out


def _convert_gptq(lin: _Linear, p: _Packed, spec: UniformSpec) -> dict[str, torch.Tensor]:
    codes, zeros = p.codes, p.zeros
    if not spec.sym and bool((zeros == 0).any()):
        codes, zeros = _shift_zero_groups(lin, codes, zeros, spec)
    k = lin.in_features
    gs = spec.group_len(k)
    return {
        "qweight": pack_int32(codes.t(), spec.bits, dim=0),
        # v1 stores zero - 1; a zero point of 0 (handled above) would wrap to 2**bits - 1 and load as 2**bits.
        "qzeros": pack_int32((zeros.to(torch.int64) - 1).t(), spec.bits, dim=1),
        "scales": p.scales.t().contiguous().to(torch.float16),
        "g_idx": (torch.arange(k, dtype=torch.int32) // gs).to(torch.int32),
    }


def _shift_zero_groups(
    lin: _Linear, codes: torch.Tensor, zeros: torch.Tensor, spec: UniformSpec
) -> tuple[torch.Tensor, torch.Tensor]:
    """Re-express groups with zero point 0 as zero point 1 and codes + 1 (exact when no code is at the top).

    GPTQ v1 stores zero - 1, so a zero point of 0 cannot be stored; (q - 0) * s == ((q + 1) - 1) * s.
    """
    k = lin.in_features
    gs = spec.group_len(k)
    n, g = zeros.shape
    codes_g = codes.view(n, g, gs)
    hit = zeros == 0
    top = codes_g.amax(-1) >= spec.qmax
    blocked = hit & top
    if bool(blocked.any()):
        raise UnsupportedExportError(
            f"{int(blocked.sum())} group(s) of {lin.name} have zero point 0 and use the top code {spec.qmax}: GPTQ v1 "
            f"stores zero points minus one, so zero point 0 cannot be written, and shifting the group would overflow "
            f"its codes. Export to compressed-tensors (it stores zero points exactly), or re-quantize with sym=True."
        )
    codes_g = codes_g + hit.unsqueeze(-1).to(codes.dtype)
    return codes_g.view(n, k), torch.where(hit, torch.ones_like(zeros), zeros)


# ---------------------------------------------------------------------------------------------- configs
def compressed_tensors_config(qconfig: Any, ignore: list[str]) -> dict[str, Any]:
    """The `quantization_config` llm-compressor writes for a WNA16 pack-quantized checkpoint."""
    gs = qconfig.group_size
    weights = {
        "num_bits": qconfig.bits,
        "type": "int",
        "symmetric": qconfig.sym,
        "strategy": "channel" if gs == -1 else "group",
        "group_size": None if gs == -1 else gs,
        "block_structure": None,
        "dynamic": False,
        "actorder": None,
        "observer": "minmax",
        "observer_kwargs": {},
    }
    return {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": weights,
                "input_activations": None,
                "output_activations": None,
                "format": "pack-quantized",
            }
        },
        "ignore": sorted(ignore),
        "kv_cache_scheme": None,
        "sparsity_config": {},
        "transform_config": {},
        "global_compression_ratio": None,
        "version": CT_VERIFIED_VERSION,
    }


def gptq_config(qconfig: Any) -> dict[str, Any]:
    """The `quantization_config` of a GPTQ v1 checkpoint (as AutoGPTQ / gptqmodel / optimum write it)."""
    return {
        "quant_method": "gptq",
        "bits": qconfig.bits,
        "group_size": qconfig.group_size,
        "desc_act": False,
        "sym": qconfig.sym,
        "true_sequential": True,
        "damp_percent": 0.01,
        "checkpoint_format": "gptq",
        "meta": {"quantizer": ["cbq_hf"], "cbq_method": qconfig.method},
    }


# ---------------------------------------------------------------------------------------------- writing
def _read_packed(f, name: str, lin: _Linear, spec: UniformSpec, keys: set[str]) -> _Packed:
    qweight = f.get_tensor(f"{name}.qweight")
    codes = unpack_codes(qweight, spec.slot_bits, lin.in_features)
    if f"{name}.input_scale" in keys:
        s = f.get_tensor(f"{name}.input_scale")
        if not bool((s == 1).all()):
            dev = float((s.float() - 1).abs().max())
            raise UnsupportedExportError(
                f"{name} carries a CFP smoothing scale (input_scale, max |s - 1| = {dev:.3g}) that divides its input "
                f"before the quantized matmul and could not be folded into a preceding norm. Exporting it would "
                f"need W / s per input channel, which breaks the shared per-group step size, so no exact export "
                f"exists. Re-quantize with use_cfp=False and smooth_alpha=None (or on an architecture where every "
                f"smoothing scale folds), or serve this checkpoint with cbq_hf."
            )
    bias = f.get_tensor(f"{name}.bias") if f"{name}.bias" in keys else None
    return _Packed(codes, f.get_tensor(f"{name}.scales"), f.get_tensor(f"{name}.zeros"), bias)


def _convert_file(path: str, src: _Source, to: str) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    from .serialization import GUARD_SUFFIX

    spec = UniformSpec(src.qconfig.bits, src.qconfig.group_size, src.qconfig.sym)
    out: dict[str, torch.Tensor] = {}
    with safe_open(path, framework="pt") as f:
        keys = set(f.keys())
        owned: set[str] = set()
        for name, lin in src.quantized.items():
            if f"{name}.qweight" not in keys:
                continue
            p = _read_packed(f, name, lin, spec, keys)
            owned.update(f"{name}.{s}" for s in _QUANT_SUFFIXES)
            owned.add(f"{name}{GUARD_SUFFIX}")  # the load guard: exported linears carry their own tensors
            if to == "compressed-tensors":
                tensors = _convert_compressed_tensors(lin, p, spec, src.dtype)
            else:
                tensors = _convert_gptq(lin, p, spec)
            out.update({f"{name}.{k}": v for k, v in tensors.items()})
            if p.bias is not None:
                out[f"{name}.bias"] = p.bias
                owned.add(f"{name}.bias")
        for key in sorted(keys - owned):
            out[key] = f.get_tensor(key)
    return out


def _check_destination(src: str, dst: str) -> None:
    a, b = os.path.realpath(src), os.path.realpath(dst)
    if a == b or b.startswith(a + os.sep):
        raise ExportError(f"the export destination {dst!r} must be outside the source checkpoint {src!r}.")
    if os.path.isfile(dst):
        raise PermissionError(f"export destination {dst!r} is a file; give a folder path.")
    probe = os.path.dirname(b)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe) or not os.access(probe, os.W_OK):
        raise PermissionError(f"cannot write the export to {dst!r}: {probe} is not a writable folder.")


_README = """---
library_name: transformers
tags:
- {tag}
- cbq_hf
base_model: {base}
---

# {title}

Exported by `cbq_hf` from a {method} W{bits}A16 checkpoint (group_size {gs}, {sym}) to the **{to}** format.
It loads without `cbq_hf`:

```python
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained("PATH_OR_REPO_ID")  # needs {needs}
```

{serve}
"""


def _readme(src: _Source, to: str) -> str:
    q = src.qconfig
    base = (q.run_info or {}).get("base_model") or "unknown"
    serve = (
        "Serve with vLLM: `vllm serve PATH_OR_REPO_ID` (the compressed-tensors WNA16 kernels are chosen "
        "automatically)."
        if to == "compressed-tensors"
        else "Serve with vLLM: `vllm serve PATH_OR_REPO_ID --quantization gptq` (or gptq_marlin for symmetric)."
    )
    return _README.format(
        tag="compressed-tensors" if to == "compressed-tensors" else "gptq",
        base=base,
        title=f"{os.path.basename(str(base))} W{q.bits}A16 ({to})",
        method=q.method,
        bits=q.bits,
        gs=q.group_size,
        sym="symmetric" if q.sym else "asymmetric",
        to=to,
        needs="`pip install compressed-tensors`" if to == "compressed-tensors" else "`pip install gptqmodel optimum`",
        serve=serve,
    )


def export_checkpoint(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    to: str = "compressed-tensors",
    progress: Callable[[str], None] | None = None,
    overwrite: bool = False,
) -> str:
    """Export the cbq_hf checkpoint in `src` to `dst` in format `to` ("compressed-tensors" or "gptq").

    The destination is written atomically (temporary sibling folder, then renamed into place): after a failure
    it is either absent or unchanged. It must be absent or empty unless `overwrite`, which replaces it whole
    (`cbq_hf.serialization.atomic_save`). Non-weight files of `src` (tokenizer, generation config) are copied.

    Args:
        src: folder written by cbq_hf's `save_pretrained` (uniform format).
        dst: output folder (created; replaced whole only with `overwrite`).
        to: target format.
        progress: optional callback receiving one line per step (the CLI prints them).
        overwrite: replace `dst` when it already holds files.

    Returns:
        The absolute path of `dst`.

    Raises:
        ExportSourceError: `src` is missing, not a cbq_hf checkpoint, or damaged.
        UnsupportedExportError: a setting `to` cannot represent exactly (LO-BCQ, act_bits, bit width, ragged
            groups, CFP input scales, ...).
        FolderNotEmptyError: `dst` holds files and `overwrite` is False (checked before any conversion).
        PermissionError / OSError: `dst` cannot be written.
    """
    from safetensors.torch import save_file

    from .serialization import atomic_save, copy_entry, refuse_existing

    if to not in TARGETS:
        raise ExportError(f"unknown export target {to!r}; choose one of {sorted(TARGETS)}.")
    src, dst = os.fspath(src), os.fspath(dst)
    say = progress or (lambda msg: logger.info(msg))
    source = _read_source(src)
    _check_settings(source.qconfig, to)
    _check_destination(src, dst)
    if not overwrite and os.path.isdir(dst) and os.listdir(dst):
        refuse_existing(os.path.abspath(dst))
    _discover_modules(source)
    _check_shapes(source, to)
    say(f"exporting {len(source.quantized)} quantized linears of {src} to {to}")

    if to == "compressed-tensors":
        ignore = list(source.float_linears)
        qcfg = compressed_tensors_config(source.qconfig, ignore)
        if source.dtype == torch.bfloat16:
            logger.warning(
                "the model dtype is bfloat16: compressed-tensors stores weight_scale in it, so the "
                "float16 scales are rounded to bfloat16 (relative change <= 2**-9)."
            )
    else:
        qcfg = gptq_config(source.qconfig)

    def write(tmp: str) -> None:
        weight_map: dict[str, str] = {}
        total = 0
        for i, path in enumerate(source.files, 1):
            tensors = _convert_file(path, source, to)
            fname = os.path.basename(path)
            save_file(tensors, os.path.join(tmp, fname), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(tensors, fname))
            total += sum(t.numel() * t.element_size() for t in tensors.values())
            say(f"  wrote {fname} ({i}/{len(source.files)})")
        if source.index is not None:
            with open(os.path.join(tmp, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
                json.dump(
                    {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, f, indent=2
                )
        config = dict(source.config)
        config["quantization_config"] = qcfg
        with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, sort_keys=True)
        for entry in os.listdir(src):
            if entry in _SKIP_FILES or entry.endswith(_SKIP_FILES_SUFFIX) or entry.startswith("."):
                continue
            copy_entry(os.path.join(src, entry), tmp)
        with open(os.path.join(tmp, "README.md"), "w", encoding="utf-8") as f:
            f.write(_readme(source, to))

    atomic_save(dst, write, overwrite=overwrite)
    say(f"done: {dst}")
    return os.path.abspath(dst)


# ---------------------------------------------------------------------------------------------- command line
def add_export_parser(sub: Any) -> argparse.ArgumentParser:
    """Add `cbq-hf export CHECKPOINT OUTPUT --to {compressed-tensors,gptq}` to the CLI's subparsers."""
    p = sub.add_parser(
        "export",
        help="convert a saved cbq checkpoint for vLLM / compressed-tensors / GPTQ loaders",
        description="Convert a cbq_hf checkpoint (uniform format, weight-only) to the compressed-tensors "
        "pack-quantized format or the GPTQ v1 format. The conversion is exact; settings a target "
        "cannot represent (LO-BCQ, act_bits, unsupported bit widths, group sizes that do not divide "
        "a layer, CFP input scales) are refused with exit code 2. See docs/export.md.",
    )
    p.add_argument("checkpoint", help="folder written by cbq_hf's save_pretrained / `cbq-hf quantize`")
    p.add_argument(
        "output",
        help="folder to write the export to; it must be absent or empty unless --overwrite (written atomically)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT whole when it already holds files")
    p.add_argument("--to", required=True, choices=sorted(TARGETS), help="target format")
    p.set_defaults(func=_cmd_export)
    return p


def _cmd_export(args: argparse.Namespace) -> int:
    import sys

    from .errors import EXIT_LOAD, EXIT_OK, EXIT_USAGE, EXIT_WRITE, CLIError

    def say(msg: str) -> None:
        print(f"cbq-hf export: {msg}", file=sys.stderr)

    try:
        path = export_checkpoint(args.checkpoint, args.output, to=args.to, progress=say, overwrite=args.overwrite)
    except ExportSourceError as e:
        raise CLIError(str(e), EXIT_LOAD) from e
    except ExportError as e:
        raise CLIError(str(e), EXIT_USAGE) from e
    except OSError as e:
        raise CLIError(f"cannot write {args.output!r}: {e}", EXIT_WRITE) from e
    print(json.dumps({"checkpoint": args.checkpoint, "output": path, "format": args.to}))
    return EXIT_OK
