"""Hadamard rotations (`cbq_hf.rotation`, CBQConfig(rotation="hadamard")): exact matrices, the rotated float model
computes the same function per family, RTN and CBQ calibrate it, save -> reload is identical, refusals."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

from cbq_hf import CBQConfig, CBQLinear
from cbq_hf.rotation import hadamard_matrix, hadamard_transform, rotate_model

SMALL = dict(vocab_size=128, hidden_size=48, intermediate_size=96, num_hidden_layers=2, max_position_embeddings=64)
FAMILY_CONFIGS = {
    "llama": lambda: LlamaConfig(**SMALL, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False),
    "llama-tied": lambda: LlamaConfig(**SMALL, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    "mistral": lambda: MistralConfig(**SMALL, num_attention_heads=4, num_key_value_heads=2),
    "qwen2": lambda: Qwen2Config(**SMALL, num_attention_heads=4, num_key_value_heads=2),  # q/k/v biases
    "qwen3": lambda: Qwen3Config(**SMALL, num_attention_heads=4, num_key_value_heads=2, head_dim=16),  # q/k norms
}


def _model(family: str, seed: int = 0):
    torch.manual_seed(seed)
    m = AutoModelForCausalLM.from_config(FAMILY_CONFIGS[family](), dtype=torch.float32).eval()
    with torch.no_grad():  # norms and biases away from their init values, so folding them is tested
        for name, p in m.named_parameters():
            if "norm" in name:
                p.copy_(torch.rand_like(p) + 0.5)
            elif name.endswith("bias"):
                p.copy_(torch.randn_like(p) * 0.1)
    return m


@pytest.mark.parametrize("n", [1, 2, 4, 12, 20, 96, 576, 1536], ids=lambda n: f"n{n}")
def test_hadamard_matrix_is_orthonormal_and_transform_matches_it(n):
    h = hadamard_matrix(n)
    assert torch.allclose(h @ h.T, torch.eye(n, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(h.abs(), torch.full_like(h, n**-0.5))  # a Hadamard matrix: every entry +-1/sqrt(n)
    x = torch.randn(3, 7, n, dtype=torch.float64)
    assert torch.allclose(hadamard_transform(x), x @ h, atol=1e-12)
    x32 = x.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # stays float32-exact inside calibration's autocast
        y = hadamard_transform(x32)
    assert y.dtype == torch.float32 and torch.allclose(y.double(), x @ h, atol=1e-5)


def test_order_without_construction_is_refused():
    with pytest.raises(ValueError, match="order 36"):
        hadamard_matrix(36)


@pytest.mark.parametrize("family", list(FAMILY_CONFIGS))
def test_rotated_float_model_computes_the_same_function(family):
    m = _model(family)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = m(ids).logits
    online = rotate_model(m, seed=3)
    with torch.no_grad():
        after = m(ids).logits
    assert len(online) == 2 and all(n.endswith("mlp.down_proj") for n in online)
    assert (after - before).abs().max() <= 1e-5 * before.abs().max().clamp(min=1)
    assert torch.equal(m.model.norm.weight, torch.ones_like(m.model.norm.weight))
    assert m.lm_head.weight is not m.model.embed_tokens.weight and m.config.tie_word_embeddings is False
    emb = FAMILY_CONFIGS[family]().tie_word_embeddings
    assert emb is False or m.lm_head.weight.data_ptr() != m.model.embed_tokens.weight.data_ptr()


def test_unsupported_architecture_is_refused_naming_it():
    gpt2 = AutoModelForCausalLM.from_config(GPT2Config(n_layer=1, n_embd=48, n_head=4, vocab_size=128))
    with pytest.raises(ValueError, match="model_type='gpt2'"):
        rotate_model(gpt2)


def test_config_validation():
    assert CBQConfig(rotation="hadamard").loading_signature()["rotation"] == "hadamard"
    assert "rotation" not in CBQConfig().loading_signature()  # checkpoints saved before the field still match
    with pytest.raises(ValueError, match="rotation"):
        CBQConfig(rotation="random")
    with pytest.raises(ValueError, match="format='uniform'"):
        CBQConfig(rotation="hadamard", format="lobcq", bits=4, act_bits=4)


@pytest.fixture
def tied_dir(tmp_path):
    path = tmp_path / "fp"
    _model("llama-tied").save_pretrained(path)
    return str(path)


def test_rtn_rotated_save_reload_identical_logits_and_generate(tied_dir, tmp_path):
    cfg = CBQConfig(method="rtn", bits=4, group_size=16, act_bits=4, rotation="hadamard")
    q = AutoModelForCausalLM.from_pretrained(tied_dir, quantization_config=cfg)
    down = q.model.layers[1].mlp.down_proj
    assert isinstance(down, CBQLinear) and down.input_hadamard is not None
    assert q.model.layers[1].mlp.up_proj.input_hadamard is None
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = q(ids).logits
        gen = q.generate(ids[:1, :4], max_new_tokens=6, do_sample=False)
    q.save_pretrained(tmp_path / "q")
    saved = json.loads((tmp_path / "q" / "config.json").read_text())
    assert saved["tie_word_embeddings"] is False and saved["quantization_config"]["rotation"] == "hadamard"
    r = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert r.model.layers[0].mlp.down_proj.input_hadamard is not None
    with torch.no_grad():
        assert torch.equal(r(ids).logits, before)
        assert torch.equal(r.generate(ids[:1, :4], max_new_tokens=6, do_sample=False), gen)


def test_rotated_checkpoint_with_rotation_removed_from_its_config_is_refused(tied_dir, tmp_path):
    from cbq_hf.serialization import CheckpointError

    cfg = CBQConfig(method="rtn", bits=4, group_size=16, act_bits=8, rotation="hadamard")
    AutoModelForCausalLM.from_pretrained(tied_dir, quantization_config=cfg).save_pretrained(tmp_path / "q")
    path = tmp_path / "q" / "config.json"
    saved = json.loads(path.read_text())
    del saved["quantization_config"]["rotation"]
    path.write_text(json.dumps(saved))
    with pytest.raises(CheckpointError, match="rotation"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "q")


def test_export_refuses_a_rotated_checkpoint(tied_dir, tmp_path):
    from cbq_hf.export import UnsupportedExportError, export_checkpoint

    cfg = CBQConfig(method="rtn", bits=4, group_size=16, rotation="hadamard")
    AutoModelForCausalLM.from_pretrained(tied_dir, quantization_config=cfg).save_pretrained(tmp_path / "q")
    with pytest.raises(UnsupportedExportError, match="rotation='hadamard'"):
        export_checkpoint(tmp_path / "q", tmp_path / "out", to="compressed-tensors")


def test_cbq_trains_stand_ins_on_the_rotated_input(calib_ids):
    """The window loss starts as small on the rotated model as on the plain one: the stand-ins rotate down_proj's
    input like the float block's pre-hook does (without it the start loss is that of a wrong layer)."""
    from cbq_hf.calibration.engine import calibrate

    starts = {}
    for rotation in (None, "hadamard"):
        model = _model("llama")
        kw = dict(bits=8, group_size=16, act_bits=8, nsamples=8, seqlen=32, epochs=1, batch_size=4, use_cfp=False)
        rep = calibrate(model, CBQConfig(method="cbq", rotation=rotation, **kw), calib_ids, progress=False)
        starts[rotation] = max(w["loss_start"] for w in rep["windows"])
        flags = [getattr(b.mlp.down_proj, "input_hadamard", False) is not None for b in model.model.layers]
        assert flags == [rotation is not None] * 2
    assert starts["hadamard"] < 10 * starts[None] + 1e-6
