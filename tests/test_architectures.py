"""The architecture matrix: tiny random models of every causal-LM family we support, quantized by RTN inside
`from_pretrained`, saved, reloaded and generated with.

`ARCHITECTURES` is also the source of docs/architectures.md (`tools/gen_architectures_doc.py`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import transformers
from torch import nn
from transformers import AutoModelForCausalLM
from transformers.pytorch_utils import Conv1D

from cbq_hf import CBQConfig
from cbq_hf.modeling import ROUTER_NAMES, find_decoder_blocks
from cbq_hf.nn.experts import CBQExperts, is_fused_experts
from cbq_hf.nn.linear import CBQLinear

VOCAB = 128
#: Every family shares these; a family's own entries add to or override them.
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)
MOE = dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=64)


@dataclass(frozen=True)
class Arch:
    """One family: its transformers config class, the tiny config, and what the docs table says about it."""

    family: str
    config: str
    kwargs: dict = field(default_factory=dict)
    common: bool = True
    moe: str = ""  # how the experts are stored ("" for dense models)
    note: str = ""

    def build(self) -> nn.Module:
        cfg_cls = getattr(transformers, self.config)
        cfg = cfg_cls(**({**COMMON, **self.kwargs} if self.common else self.kwargs))
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)


ARCHITECTURES = [
    Arch("llama", "LlamaConfig"),
    Arch("mistral", "MistralConfig"),
    Arch("qwen2", "Qwen2Config"),
    Arch("qwen3", "Qwen3Config", dict(head_dim=16)),
    Arch("phi3", "Phi3Config", dict(pad_token_id=0), note="fused qkv_proj and gate_up_proj linears"),
    Arch("gemma2", "Gemma2Config", dict(head_dim=16)),
    Arch("gemma3_text", "Gemma3TextConfig", dict(head_dim=16)),
    Arch("olmo2", "Olmo2Config"),
    Arch("granite", "GraniteConfig"),
    Arch("cohere", "CohereConfig"),
    Arch("stablelm", "StableLmConfig"),
    Arch("falcon", "FalconConfig", dict(new_decoder_architecture=True, num_kv_heads=2)),
    Arch(
        "opt",
        "OPTConfig",
        dict(
            vocab_size=VOCAB,
            hidden_size=64,
            ffn_dim=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            word_embed_proj_dim=64,
            max_position_embeddings=64,
        ),
        common=False,
    ),
    Arch("gpt_neox", "GPTNeoXConfig", dict(tie_word_embeddings=False), note="head saved as `embed_out`"),
    Arch(
        "gpt2",
        "GPT2Config",
        dict(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64),
        common=False,
        note="`Conv1D` layers (weight stored [in, out]) become `CBQLinear`",
    ),
    Arch("mixtral", "MixtralConfig", MOE, moe="fused 3-D, saved per expert as w1/w2/w3"),
    Arch(
        "qwen3_moe",
        "Qwen3MoeConfig",
        dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, head_dim=16),
        moe="fused 3-D, saved per expert",
    ),
    Arch(
        "qwen2_moe",
        "Qwen2MoeConfig",
        dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, shared_expert_intermediate_size=64),
        moe="fused 3-D + shared expert (linears) with a float `shared_expert_gate`",
    ),
    Arch("olmoe", "OlmoeConfig", dict(num_experts=4, num_experts_per_tok=2, intermediate_size=64), moe="fused 3-D"),
    Arch("phimoe", "PhimoeConfig", MOE, moe="fused 3-D"),
    Arch("granitemoe", "GraniteMoeConfig", MOE, moe="fused 3-D, saved as input_linear/output_linear"),
    Arch(
        "deepseek_v3",
        "DeepseekV3Config",
        dict(
            n_routed_experts=4,
            n_shared_experts=1,
            num_experts_per_tok=2,
            moe_intermediate_size=64,
            first_k_dense_replace=1,
            num_key_value_heads=4,
            n_group=1,
            topk_group=1,
            kv_lora_rank=32,
            q_lora_rank=32,
            qk_rope_head_dim=16,
            qk_nope_head_dim=16,
            v_head_dim=16,
        ),
        moe="fused 3-D + shared experts (linears); first layer dense; MLA attention",
    ),
    Arch(
        "gpt_oss",
        "GptOssConfig",
        {**MOE, "head_dim": 16, "intermediate_size": 64},
        moe="fused 3-D transposed with biases, interleaved clamped SwiGLU",
    ),
]
IDS = [a.family for a in ARCHITECTURES]


def float_leftovers(model: nn.Module) -> dict[str, str]:
    """Float linears or fused experts left inside the decoder blocks, name -> why it is allowed ("router") or ""."""
    prefix, blocks = find_decoder_blocks(model)
    out = {}
    for i, block in enumerate(blocks):
        has_experts = any(isinstance(m, CBQExperts) or is_fused_experts(m) for m in block.modules())
        for name, m in block.named_modules():
            if isinstance(m, (nn.Linear, Conv1D)) or is_fused_experts(m):
                router = has_experts and bool(ROUTER_NAMES.intersection(name.split(".")))
                out[f"{prefix}.{i}.{name}"] = "router" if router else ""
    return out


def quantize(arch: Arch, folder: Path) -> nn.Module:
    """Save the tiny float model of `arch` to `folder` and load it back through RTN."""
    arch.build().save_pretrained(folder)
    return AutoModelForCausalLM.from_pretrained(folder, quantization_config=CBQConfig(method="rtn", group_size=16))


@pytest.mark.parametrize("arch", ARCHITECTURES, ids=IDS)
def test_rtn_save_reload_generate(arch, tmp_path):
    q = quantize(arch, tmp_path / "fp")
    left = float_leftovers(q)
    assert all(left.values()), f"float modules left in decoder blocks: {[n for n, why in left.items() if not why]}"
    assert any(isinstance(m, CBQLinear) for m in q.modules())
    if arch.moe:
        assert any(isinstance(m, CBQExperts) for m in q.modules())
        assert q.config.quantization_config.run_info["quantized_experts_modules"] > 0

    x = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        logits = q(x).logits
        tokens = q.generate(x, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.isfinite(logits).all()
    q.save_pretrained(tmp_path / "q")
    r = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert [type(m) for m in r.modules()] == [type(m) for m in q.modules()]
    with torch.no_grad():
        assert torch.equal(r(x).logits, logits)
        assert torch.equal(r.generate(x, max_new_tokens=4, do_sample=False, pad_token_id=0), tokens)


@pytest.mark.parametrize(
    "arch", [a for a in ARCHITECTURES if a.family in ("gpt_neox", "mixtral")], ids=lambda a: a.family
)
def test_corrupted_renamed_checkpoint_is_refused(arch, tmp_path):
    """A bit flip in a tensor saved under a converted name (GPT-NeoX's `embed_out`, Mixtral's per-expert packed
    buffers under `block_sparse_moe`) is still caught."""
    from safetensors.torch import load_file, save_file

    from cbq_hf.serialization import CheckpointError

    quantize(arch, tmp_path / "fp").save_pretrained(tmp_path / "q")
    path = tmp_path / "q" / "model.safetensors"
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    name = (
        "embed_out.weight" if arch.family == "gpt_neox" else "model.layers.1.block_sparse_moe.experts.down.2.qweight"
    )
    assert name in tensors
    t = tensors[name]
    t.view(torch.uint8).reshape(-1)[0] ^= 1
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "q")


class _CharTokenizer:
    """Character-level stub tokenizer (vocab 128), enough for CBQ calibration data."""

    bos_token_id = 1

    def __call__(self, text, add_special_tokens=False, return_tensors=None):
        return {"input_ids": [2 + (ord(c) % 126) for c in text]}


@pytest.mark.parametrize(
    "arch", [a for a in ARCHITECTURES if a.family in ("gpt2", "mixtral", "qwen3_moe")], ids=lambda a: a.family
)
def test_cbq_method_quantizes_everything_and_reloads(arch, tmp_path, caplog):
    """method="cbq": linears (GPT-2's Conv1D included) and experts are calibrated (tests/calibration/test_moe.py
    checks the experts' training), with no fallback warning."""
    arch.build().save_pretrained(tmp_path / "fp")
    cfg = CBQConfig(
        method="cbq",
        bits=4,
        group_size=16,
        dataset=["The quick brown fox jumps over the lazy dog. " * 20],
        tokenizer=_CharTokenizer(),
        nsamples=2,
        seqlen=16,
        epochs=1,
        batch_size=2,
    )
    with caplog.at_level("WARNING", logger="cbq_hf.quantizer"):
        q = AutoModelForCausalLM.from_pretrained(tmp_path / "fp", quantization_config=cfg)
    assert not [r.getMessage() for r in caplog.records if r.name.startswith("cbq_hf") and r.levelname == "WARNING"]
    if arch.moe:
        assert q.config.quantization_config.run_info["cbq_calibration"]["experts"]["tokens"]
    assert all(float_leftovers(q).values())
    x = torch.randint(0, VOCAB, (1, 8))
    q.save_pretrained(tmp_path / "q")
    with torch.no_grad():
        assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path / "q")(x).logits, q(x).logits)


_LOAD_FRESH = """
import sys
if sys.argv[2] == "with":
    import cbq_hf
from transformers import AutoModelForCausalLM
AutoModelForCausalLM.from_pretrained(sys.argv[1])
"""


@pytest.mark.parametrize("arch", [a for a in ARCHITECTURES if a.moe], ids=lambda a: a.family)
def test_moe_checkpoint_without_import_is_refused(arch, tmp_path):
    """The experts' load guards (under the fused float names, unfused and fused again by transformers' own key
    conversions) make a loader without `import cbq_hf` refuse the checkpoint instead of building random float
    experts; with the import they are skipped silently. Fresh interpreters keep this process's registration away."""
    import subprocess
    import sys

    quantize(arch, tmp_path / "fp").save_pretrained(tmp_path / "q")

    def load(how: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-c", _LOAD_FRESH, str(tmp_path / "q"), how]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=300)

    res = load("without")
    assert res.returncode != 0
    assert "ignore_mismatched_sizes" in res.stderr
    assert "experts.gate_up_proj" in res.stderr or "experts.up_proj" in res.stderr, res.stderr[-2000:]
    res = load("with")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "UNEXPECTED" not in res.stderr and "MISSING" not in res.stderr, res.stderr[-2000:]


@pytest.mark.parametrize("to", ["compressed-tensors", "gptq"])
def test_moe_export_is_refused_naming_what_is_missing(to, tmp_path):
    from cbq_hf.export import UnsupportedExportError, export_checkpoint

    quantize(ARCHITECTURES[IDS.index("mixtral")], tmp_path / "fp").save_pretrained(tmp_path / "q")
    with pytest.raises(UnsupportedExportError, match="mixture-of-experts.*one quantized module per expert"):
        export_checkpoint(tmp_path / "q", tmp_path / "out", to=to)
    assert not (tmp_path / "out").exists()
