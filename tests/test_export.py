"""Export to compressed-tensors (pack-quantized) and GPTQ v1: round trips, refusals, atomic writes, CLI.

What is checked against what:
- compressed-tensors: the export is loaded by transformers' built-in compressed-tensors quantizer with the real
  `compressed-tensors` package, in a subprocess that never imports cbq_hf, and its logits are compared with the
  cbq_hf model's. The packed tensors are also compared bit for bit with what compressed-tensors' own
  `PackedQuantizationCompressor.compress` produces from the same weights, scales and zero points.
- GPTQ: no GPTQ loader installs on this CPU-only setup without CUDA builds (gptqmodel), so the export is decoded
  by an independent dequantizer written here from the GPTQ v1 spec and compared exactly with cbq_hf's weights.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import compressed_tensors  # noqa: F401  (in the `test` extra: a missing install must fail, not skip)
import pytest
import torch
from helpers import tiny_llama
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import cbq_hf
from cbq_hf.cli import EXIT_LOAD, EXIT_OK, EXIT_USAGE, EXIT_WRITE, main
from cbq_hf.export import (
    ExportSourceError,
    UnsupportedExportError,
    export_checkpoint,
)
from cbq_hf.nn.linear import CBQLinear
from cbq_hf.serialization import FolderNotEmptyError

IDS = torch.tensor([[1, 5, 9, 17, 33, 64, 100, 127, 3, 42, 77, 8, 15, 16, 23, 99]])
ATOL = RTOL = 1e-4  # logits of the export vs cbq_hf: same weights, only the matmul's summation order may differ


# ---------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("export")


@pytest.fixture(scope="module")
def fp_dir(workdir) -> str:
    model = tiny_llama()
    with torch.no_grad():  # a group of zeros: zero point 0, which GPTQ v1 cannot store as is
        model.model.layers[0].self_attn.q_proj.weight[0, :32] = 0.0
    path = workdir / "fp"
    model.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def fp_bias_dir(workdir) -> str:
    """Tiny Llama with q/k/v/o biases and tied embeddings: both must pass through the export unchanged."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        attention_bias=True,
    )
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.bias.normal_(0, 0.1)
    path = workdir / "fp_bias"
    model.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def fp_positive_dir(workdir) -> str:
    model = tiny_llama()
    with torch.no_grad():  # an all-positive group: zero point 0 AND the top code, not storable in GPTQ v1
        w = model.model.layers[1].self_attn.q_proj.weight
        w[0, :32] = w[0, :32].abs()
    path = workdir / "fp_positive"
    model.save_pretrained(path)
    return str(path)


_CACHE: dict[str, str] = {}


def quantized(fp_dir: str, workdir: Path, **cfg) -> str:
    """Folder of an RTN-quantized, saved cbq checkpoint (built once per setting)."""
    from transformers import AutoModelForCausalLM

    key = repr((fp_dir, sorted(cfg.items())))
    if key not in _CACHE:
        out = workdir / f"q{len(_CACHE)}"
        model = AutoModelForCausalLM.from_pretrained(fp_dir, quantization_config=cbq_hf.CBQConfig(method="rtn", **cfg))
        model.save_pretrained(out)
        _CACHE[key] = str(out)
    return _CACHE[key]


@functools.cache
def cbq_logits(path: str) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():
        return model(IDS).logits


@functools.cache
def cbq_weights(path: str) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path)
    return {n: m.dequantized_weight() for n, m in model.named_modules() if isinstance(m, CBQLinear)}


# ---------------------------------------------------------------------------------------------- compressed-tensors
CT_CASES = [  # (id, bits, sym, modules_to_not_convert, model with biases and tied embeddings)
    ("w4_g32_asym", 4, False, None, False),
    ("w4_g32_sym", 4, True, None, False),
    ("w8_g32_asym", 8, False, None, False),
    ("w8_g32_sym", 8, True, None, False),
    ("w4_g32_sym_skip_down", 4, True, ["mlp.down_proj"], False),
    ("w4_g32_asym_bias_tied", 4, False, None, True),
]

_LOADER = textwrap.dedent("""
    import json, sys, torch
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig
    jobs = json.loads(sys.argv[1])
    ids = torch.tensor(json.loads(sys.argv[2]))
    for job in jobs:
        kw = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if job["dequantize"] else {}
        model = AutoModelForCausalLM.from_pretrained(job["path"], **kw)
        packed = hasattr(model.model.layers[0].self_attn.q_proj, "weight_packed")  # before the first forward
        with torch.no_grad():
            logits = model(ids).logits
        torch.save({"logits": logits, "has_packed": packed}, job["out"])
    assert "cbq_hf" not in sys.modules, "the compressed-tensors loader must not need cbq_hf"
""")


@pytest.fixture(scope="module")
def ct_loaded(fp_dir, fp_bias_dir, workdir) -> dict[tuple[str, bool], dict]:
    """Export every CT case, then load all exports in ONE subprocess without cbq_hf (default and dequantize=True).

    Asymmetric exports are loaded with `dequantize=True` only: transformers 5.24 + compressed-tensors 0.20 build
    the compressed (default) layout on the meta device with an unpacked zero-point placeholder, so any asymmetric
    pack-quantized checkpoint (llm-compressor's own included; vllm-project/llm-compressor#1618) fails its size
    check there. The packed zero point we write is what compressed-tensors' compressor writes (checked below).
    """
    jobs = []
    for case, bits, sym, skip, bias in CT_CASES:
        src = quantized(
            fp_bias_dir if bias else fp_dir, workdir, bits=bits, group_size=32, sym=sym, modules_to_not_convert=skip
        )
        dst = workdir / f"ct_{case}"
        export_checkpoint(src, dst, to="compressed-tensors")
        for deq in (False, True) if sym else (True,):
            jobs.append({"case": case, "path": str(dst), "dequantize": deq, "out": str(workdir / f"{case}_{deq}.pt")})
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": ""}
    res = subprocess.run(
        [sys.executable, "-c", _LOADER, json.dumps(jobs), json.dumps(IDS.tolist())],
        capture_output=True,
        text=True,
        env=env,
        cwd=str(workdir),
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-4000:]
    return {(j["case"], j["dequantize"]): torch.load(j["out"]) for j in jobs}


@pytest.mark.parametrize("case,bits,sym,skip,bias", CT_CASES, ids=[c[0] for c in CT_CASES])
def test_compressed_tensors_logits_match_cbq(ct_loaded, fp_dir, fp_bias_dir, workdir, case, bits, sym, skip, bias):
    src = quantized(
        fp_bias_dir if bias else fp_dir, workdir, bits=bits, group_size=32, sym=sym, modules_to_not_convert=skip
    )
    ref = cbq_logits(src)
    loaded = [(deq, v) for (c, deq), v in ct_loaded.items() if c == case]
    assert loaded
    for deq, v in loaded:
        torch.testing.assert_close(v["logits"], ref, atol=ATOL, rtol=RTOL, msg=f"dequantize={deq}")
        if not deq:
            assert v["has_packed"], "the default load should keep the compressed (weight_packed) layout"


REF_CASES = [(4, False, 32), (4, True, 32), (8, False, 32), (8, True, 32), (4, False, -1), (8, True, -1)]


@pytest.mark.parametrize(
    "bits,sym,gs",
    REF_CASES,
    ids=[f"w{b}_{'g' + str(g) if g > 0 else 'per_channel'}_{'sym' if s else 'asym'}" for b, s, g in REF_CASES],
)
def test_compressed_tensors_tensors_match_reference_compressor(fp_dir, workdir, bits, sym, gs):
    """Our packed tensors == compressed-tensors' own compressor applied to the same weight and qparams."""
    from compressed_tensors.compressors.pack_quantized import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    src = quantized(fp_dir, workdir, bits=bits, group_size=gs, sym=sym)
    dst = workdir / f"ctref_{bits}_{sym}_{gs}"
    export_checkpoint(src, dst, to="compressed-tensors")
    ours = load_file(str(dst / "model.safetensors"))
    raw = load_file(str(Path(src) / "model.safetensors"))
    weights = cbq_weights(src)
    strategy = {"strategy": "group", "group_size": gs} if gs > 0 else {"strategy": "channel"}
    scheme = QuantizationScheme(
        targets=["Linear"], weights=QuantizationArgs(num_bits=bits, symmetric=sym, type="int", **strategy)
    )
    qc = json.loads((dst / "config.json").read_text())["quantization_config"]["config_groups"]["group_0"]["weights"]
    assert (qc["strategy"], qc["group_size"]) == (strategy["strategy"], strategy.get("group_size"))
    offset = 2 ** (bits - 1)
    assert len(weights) == 14
    for name, w in weights.items():
        sd = {"weight": w, "weight_scale": raw[f"{name}.scales"].float()}
        if not sym:
            sd["weight_zero_point"] = (raw[f"{name}.zeros"].to(torch.int16) - offset).to(torch.int8)
        ref = PackedQuantizationCompressor.compress(sd, scheme)
        assert torch.equal(ours[f"{name}.weight_packed"], ref["weight_packed"]), name
        assert torch.equal(ours[f"{name}.weight_shape"], ref["weight_shape"]), name
        assert torch.equal(ours[f"{name}.weight_scale"], ref["weight_scale"]), name
        if sym:
            assert f"{name}.weight_zero_point" not in ours
        else:
            assert torch.equal(ours[f"{name}.weight_zero_point"], ref["weight_zero_point"]), name
        assert f"{name}.qweight" not in ours and f"{name}.weight" not in ours


def test_compressed_tensors_config_is_valid(fp_dir, workdir):
    from compressed_tensors.quantization import QuantizationConfig

    src = quantized(fp_dir, workdir, bits=4, group_size=32, sym=True, modules_to_not_convert=["mlp.down_proj"])
    dst = workdir / "ct_cfg"
    export_checkpoint(src, dst, to="compressed-tensors")
    qc = json.loads((dst / "config.json").read_text())["quantization_config"]
    parsed = QuantizationConfig.model_validate(qc)
    assert parsed.format == "pack-quantized" and parsed.quant_method == "compressed-tensors"
    w = parsed.config_groups["group_0"].weights
    assert (w.num_bits, w.group_size, w.symmetric, w.strategy) == (4, 32, True, "group")
    assert qc["ignore"] == ["lm_head", "model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    readme = (dst / "README.md").read_text()
    assert "import cbq_hf" not in readme and "compressed-tensors" in readme


# ---------------------------------------------------------------------------------------------- GPTQ
def gptq_dequantize(folder: Path, name: str, bits: int) -> torch.Tensor:
    """Independent GPTQ v1 decoder (from the format spec, not from cbq_hf.export): W [N, K] float32."""
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        qweight, qzeros = f.get_tensor(f"{name}.qweight"), f.get_tensor(f"{name}.qzeros")
        scales, g_idx = f.get_tensor(f"{name}.scales"), f.get_tensor(f"{name}.g_idx")
    assert qweight.dtype == qzeros.dtype == g_idx.dtype == torch.int32 and scales.dtype == torch.float16
    mask = 2**bits - 1
    shifts = torch.arange(0, 32, bits, dtype=torch.int32)
    # qweight [K/per, N]: row r holds input channels r*per .. r*per+per-1, lowest bits first.
    w = (qweight.unsqueeze(1) >> shifts.view(1, -1, 1)) & mask  # [K/per, per, N]
    w = w.reshape(-1, qweight.shape[1])  # [K, N]
    # qzeros [G, N/per]: column c holds output channels c*per .., lowest bits first; v1 stores zero - 1.
    z = ((qzeros.unsqueeze(2) >> shifts.view(1, 1, -1)) & mask).reshape(qzeros.shape[0], -1) + 1  # [G, N]
    gi = g_idx.long()
    return ((w.float() - z[gi].float()) * scales[gi].float()).t()


GPTQ_CASES = [
    (4, False, 32),
    (4, True, 32),
    (8, False, 32),
    (8, True, 32),
    (2, False, 32),
    (2, True, 32),
    (4, False, -1),
]


@pytest.mark.parametrize(
    "bits,sym,gs",
    GPTQ_CASES,
    ids=[f"w{b}_{'g' + str(g) if g > 0 else 'per_channel'}_{'sym' if s else 'asym'}" for b, s, g in GPTQ_CASES],
)
def test_gptq_export_decodes_to_cbq_weights_exactly(fp_dir, workdir, bits, sym, gs):
    src = quantized(fp_dir, workdir, bits=bits, group_size=gs, sym=sym)
    dst = workdir / f"gptq_{bits}_{sym}_{gs}"
    export_checkpoint(src, dst, to="gptq")
    cfg = json.loads((dst / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "gptq" and cfg["checkpoint_format"] == "gptq"
    assert (cfg["bits"], cfg["group_size"], cfg["sym"], cfg["desc_act"]) == (bits, gs, sym, False)
    weights = cbq_weights(src)
    for name, w in weights.items():
        assert torch.equal(gptq_dequantize(dst, name, bits), w), name
    with safe_open(str(dst / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        k = f.get_tensor("model.layers.0.mlp.down_proj.g_idx")
        assert f.get_tensor("model.layers.0.mlp.down_proj.qweight").shape == (96 * bits // 32, 64)
    assert torch.equal(k, torch.arange(96, dtype=torch.int32) // (gs if gs > 0 else 96))
    assert "lm_head.weight" in keys and not any(key.endswith((".zeros", ".weight_packed")) for key in keys)
    assert not {f"{name}.weight" for name in weights} & keys  # the load guards stay behind


def test_gptq_export_keeps_biases_and_tied_head(fp_bias_dir, workdir):
    src = quantized(fp_bias_dir, workdir, bits=4, group_size=32, sym=True)
    dst = workdir / "gptq_bias"
    export_checkpoint(src, dst, to="gptq")
    ours, raw = load_file(str(dst / "model.safetensors")), load_file(str(Path(src) / "model.safetensors"))
    biases = [k for k in raw if k.endswith(".bias")]
    assert len(biases) == 8 and all(torch.equal(ours[k], raw[k]) for k in biases)
    assert "lm_head.weight" not in ours and "model.embed_tokens.weight" in ours  # tied, as in the source
    for name, w in cbq_weights(src).items():
        assert torch.equal(gptq_dequantize(dst, name, 4), w), name


def test_gptq_zero_point_zero_group_is_shifted_exactly(fp_dir, workdir):
    """A group of zeros has zero point 0, which v1 cannot store; it is re-expressed as (q + 1) - 1, exactly."""
    src = quantized(fp_dir, workdir, bits=4, group_size=32, sym=False)
    raw = load_file(str(Path(src) / "model.safetensors"))
    assert int(raw["model.layers.0.self_attn.q_proj.zeros"][0, 0]) == 0
    dst = workdir / "gptq_shift"
    export_checkpoint(src, dst, to="gptq")
    w = cbq_weights(src)["model.layers.0.self_attn.q_proj"]
    assert torch.equal(gptq_dequantize(dst, "model.layers.0.self_attn.q_proj", 4), w)


def test_gptq_zero_point_zero_with_top_code_is_refused(fp_positive_dir, workdir):
    src = quantized(fp_positive_dir, workdir, bits=4, group_size=32, sym=False)
    dst = workdir / "gptq_positive"
    with pytest.raises(UnsupportedExportError, match="zero point 0 and use the top code 15.*compressed-tensors"):
        export_checkpoint(src, dst, to="gptq")
    _no_output(dst)
    export_checkpoint(src, workdir / "ct_positive", to="compressed-tensors")  # stores zero points exactly


# ---------------------------------------------------------------------------------------------- refusals
def _no_output(dst: Path) -> None:
    assert not dst.exists()
    assert not [p for p in dst.parent.iterdir() if p.name.startswith(f".{dst.name}.")], "temporary folder left"


@pytest.mark.parametrize(
    "to,cfg,message",
    [
        ("compressed-tensors", dict(bits=2, group_size=32), "bits=2 cannot be exported to compressed-tensors"),
        ("compressed-tensors", dict(bits=3, group_size=32), "bits=3 cannot be exported to compressed-tensors"),
        ("gptq", dict(bits=3, group_size=32), "bits=3 cannot be exported to gptq"),
        ("compressed-tensors", dict(bits=4, group_size=32, act_bits=8), "act_bits=8"),
        ("gptq", dict(bits=4, group_size=32, act_bits=8), "weight-only"),
        ("compressed-tensors", dict(bits=4, group_size=64), "group_size=64 does not divide"),
        ("gptq", dict(bits=4, group_size=64), "group_size 32"),
        ("gptq", dict(bits=4, group_size=32, modules_to_not_convert=["mlp.down_proj"]), "kept in full precision"),
    ],
    ids=["ct-w2", "ct-w3", "gptq-w3", "ct-act8", "gptq-act8", "ct-ragged-g64", "gptq-ragged-g64", "gptq-skipped"],
)
def test_unsupported_settings_are_refused(fp_dir, workdir, to, cfg, message):
    src = quantized(fp_dir, workdir, **cfg)
    dst = workdir / f"refused_{to}"
    with pytest.raises(UnsupportedExportError, match=message):
        export_checkpoint(src, dst, to=to)
    _no_output(dst)


def test_lobcq_is_refused(fp_dir, workdir, tmp_path):
    # The refusal is decided from the config alone, before any tensor is read.
    src = Path(quantized(fp_dir, workdir, bits=4, group_size=32))
    fake = tmp_path / "lobcq"
    fake.mkdir()
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"]["format"] = "lobcq"
    (fake / "config.json").write_text(json.dumps(cfg))
    (fake / "model.safetensors").write_bytes((src / "model.safetensors").read_bytes())
    for to in ("compressed-tensors", "gptq"):
        with pytest.raises(UnsupportedExportError, match="LO-BCQ"):
            export_checkpoint(fake, tmp_path / "out", to=to)
    _no_output(tmp_path / "out")


def _with_input_scales(src: str, dst: Path, scale_for: dict[str, torch.Tensor]) -> None:
    """Copy of a checkpoint with `input_scale` tensors added (checksums updated like cbq_hf's save does)."""
    from cbq_hf.serialization import META_CHECKSUMS, checksum_metadata

    shutil.copytree(src, dst)
    with safe_open(str(dst / "model.safetensors"), framework="pt") as f:
        meta = f.metadata()
    sd = load_file(str(dst / "model.safetensors"))
    sd.update({f"{n}.input_scale": s for n, s in scale_for.items()})
    meta[META_CHECKSUMS] = checksum_metadata(sd)
    save_file(sd, str(dst / "model.safetensors"), metadata=meta)


def test_input_scale_all_ones_is_dropped_nontrivial_is_refused(fp_dir, workdir, tmp_path):
    src = quantized(fp_dir, workdir, bits=4, group_size=32, sym=True)
    ones = tmp_path / "ones"
    _with_input_scales(
        src, ones, {"model.layers.0.mlp.down_proj": torch.ones(96), "model.layers.1.self_attn.q_proj": torch.ones(64)}
    )
    out = export_checkpoint(ones, tmp_path / "ones_ct", to="compressed-tensors")
    with safe_open(os.path.join(out, "model.safetensors"), framework="pt") as f:
        assert not any(k.endswith("input_scale") for k in f.keys())  # noqa: SIM118 (safe_open)
    smooth = tmp_path / "smooth"
    scale = torch.ones(96)
    scale[3] = 1.7
    _with_input_scales(src, smooth, {"model.layers.0.mlp.down_proj": scale})
    for to in ("compressed-tensors", "gptq"):
        with pytest.raises(UnsupportedExportError, match="input_scale.*use_cfp=False"):
            export_checkpoint(smooth, tmp_path / "smooth_out", to=to)
    _no_output(tmp_path / "smooth_out")


def test_bad_sources(fp_dir, workdir, tmp_path):
    with pytest.raises(ExportSourceError, match="does not exist"):
        export_checkpoint(tmp_path / "missing", tmp_path / "out")
    with pytest.raises(ExportSourceError, match="not a cbq_hf checkpoint"):
        export_checkpoint(fp_dir, tmp_path / "out")
    src = quantized(fp_dir, workdir, bits=4, group_size=32, sym=True)
    broken = tmp_path / "broken"
    shutil.copytree(src, broken)
    data = bytearray((broken / "model.safetensors").read_bytes())
    data[-10] ^= 0xFF  # flip bits in the last tensor's data
    (broken / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(ExportSourceError, match="checksum mismatch"):
        export_checkpoint(broken, tmp_path / "out")
    _no_output(tmp_path / "out")


def test_unwritable_destination_and_no_half_written_output(fp_dir, workdir, tmp_path, monkeypatch):
    import cbq_hf.export as export_mod

    src = quantized(fp_dir, workdir, bits=4, group_size=32, sym=True)
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(PermissionError, match="not a writable folder"):
        export_checkpoint(src, blocker / "out")
    # A failure in the middle of writing leaves an existing destination untouched and no temporary folder.
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "keep.txt").write_text("old")
    monkeypatch.setattr(export_mod, "_convert_file", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(FolderNotEmptyError, match="keep.txt"):  # refused before any conversion
        export_checkpoint(src, dst)
    with pytest.raises(OSError, match="disk full"):
        export_checkpoint(src, dst, overwrite=True)
    assert sorted(os.listdir(dst)) == ["keep.txt"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".dst.")] == []
    with pytest.raises(export_mod.ExportError, match="outside the source"):
        export_checkpoint(src, Path(src) / "sub")


# ---------------------------------------------------------------------------------------------- CLI
def test_cli_export_happy_path(fp_dir, workdir, tmp_path, capsys):
    src = quantized(fp_dir, workdir, bits=4, group_size=32, sym=False)
    out = tmp_path / "cli_gptq"
    assert main(["export", src, str(out), "--to", "gptq"]) == EXIT_OK
    captured = capsys.readouterr()
    assert json.loads(captured.out.strip().splitlines()[-1])["format"] == "gptq"
    assert "exporting 14 quantized linears" in captured.err
    assert (out / "model.safetensors").exists() and (out / "config.json").exists()


def test_cli_export_errors(fp_dir, workdir, tmp_path, capsys):
    src = quantized(fp_dir, workdir, bits=2, group_size=32)
    assert main(["export", src, str(tmp_path / "o"), "--to", "compressed-tensors"]) == EXIT_USAGE
    assert "4 and 8 bits" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "nope"), str(tmp_path / "o"), "--to", "gptq"]) == EXIT_LOAD
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "f").write_text("x")
    good = quantized(fp_dir, workdir, bits=4, group_size=32, sym=True)
    assert main(["export", good, str(tmp_path / "f" / "o"), "--to", "gptq"]) == EXIT_WRITE
    assert "not a writable folder" in capsys.readouterr().err
    _no_output(tmp_path / "o")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "mine.txt").write_text("x")
    assert main(["export", good, str(tmp_path / "full"), "--to", "gptq"]) == EXIT_WRITE
    assert "--overwrite" in capsys.readouterr().err
    assert main(["export", good, str(tmp_path / "full"), "--to", "gptq", "--overwrite"]) == 0
    assert not (tmp_path / "full" / "mine.txt").exists() and (tmp_path / "full" / "model.safetensors").is_file()
    with pytest.raises(SystemExit):
        main(["export", good, str(tmp_path / "o"), "--to", "awq"])
    with pytest.raises(SystemExit) as e:
        main(["export", "--help"])
    assert e.value.code == 0
    assert "compressed-tensors" in capsys.readouterr().out


def test_export_does_not_import_the_cli():
    """Layering: export.py takes its exit codes from cbq_hf.errors, below both it and cli.py."""
    import ast

    import cbq_hf.export

    tree = ast.parse(Path(cbq_hf.export.__file__).read_text(encoding="utf-8"))
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert "errors" in imported and not imported & {"cli", "cbq_hf.cli"}
