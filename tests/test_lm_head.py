"""`CBQConfig(lm_head_bits=...)`: the output head quantized weight-only, untied, saved and reloaded."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from cbq_hf import CBQConfig, CBQLinear
from cbq_hf.export import UnsupportedExportError, export_checkpoint
from cbq_hf.lm_head import lm_head_format, output_head


def _tied_llama_dir(path, hidden=160):
    cfg = LlamaConfig(
        vocab_size=96,
        hidden_size=hidden,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    model.save_pretrained(path)
    return str(path), model


@pytest.mark.parametrize("bits", [8, 4])
def test_tied_head_is_quantized_untied_and_reloads_identically(tmp_path, bits):
    src, fp = _tied_llama_dir(tmp_path / "fp")
    q = AutoModelForCausalLM.from_pretrained(
        src, quantization_config=CBQConfig(method="rtn", group_size=32, lm_head_bits=bits)
    )
    assert isinstance(q.lm_head, CBQLinear)
    assert q.lm_head.fmt.spec.bits == bits and q.lm_head.fmt.act_bits is None
    # the input embedding keeps the original float weights
    torch.testing.assert_close(q.model.embed_tokens.weight, fp.model.embed_tokens.weight, rtol=0, atol=0)
    assert q.config.tie_word_embeddings is False
    # the head computes with the RTN weights of the (tied) embedding matrix
    fmt = lm_head_format(bits, 160)
    expected = fmt.dequantize(fmt.quantize_rtn(fp.lm_head.weight.data), 160)
    torch.testing.assert_close(q.lm_head.dequantized_weight(), expected, rtol=0, atol=0)

    x = torch.randint(0, 96, (2, 9))
    with torch.no_grad():
        before = q(x).logits
    q.save_pretrained(tmp_path / "q")
    saved = json.loads((tmp_path / "q" / "config.json").read_text())
    assert saved["tie_word_embeddings"] is False and saved["quantization_config"]["lm_head_bits"] == bits
    r = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert isinstance(r.lm_head, CBQLinear)
    assert r.model.embed_tokens.weight.data_ptr() != 0 and not hasattr(r.lm_head, "weight")
    with torch.no_grad():
        assert torch.equal(r(x).logits, before)
    out = r.generate(x[:1], max_new_tokens=5, do_sample=False)
    assert out.shape == (1, 14)


def test_head_bits_change_the_head_only_and_int8_is_close(tmp_path):
    src, fp = _tied_llama_dir(tmp_path / "fp")
    plain = AutoModelForCausalLM.from_pretrained(src, quantization_config=CBQConfig(method="rtn", group_size=32))
    q8 = AutoModelForCausalLM.from_pretrained(
        src, quantization_config=CBQConfig(method="rtn", group_size=32, lm_head_bits=8)
    )
    assert not isinstance(plain.lm_head, CBQLinear)
    h = torch.randn(3, 160)
    with torch.no_grad():
        ref, test = fp.lm_head(h), q8.lm_head(h)
    rel = float((ref - test).pow(2).mean() / ref.pow(2).mean())
    assert 0 < rel < 1e-3  # int8 groups of 128: changed, but by little


def test_checkpoint_missing_the_head_tensors_is_refused(tmp_path):
    src, _ = _tied_llama_dir(tmp_path / "fp")
    q = AutoModelForCausalLM.from_pretrained(
        src, quantization_config=CBQConfig(method="rtn", group_size=32, lm_head_bits=8)
    )
    q.save_pretrained(tmp_path / "q")
    cfg_path = tmp_path / "q" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["quantization_config"]["lm_head_bits"] = 4  # config and tensors disagree
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="lm_head"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "q")


def test_bad_values_and_models_without_head_are_clear_errors():
    for bad in (2, 16, True, "8"):
        with pytest.raises(ValueError, match="lm_head_bits"):
            CBQConfig(lm_head_bits=bad)
    with pytest.raises(ValueError, match="no output projection"):
        output_head(torch.nn.Sequential(torch.nn.Linear(4, 4)))


def test_export_refuses_a_quantized_head(tmp_path):
    src, _ = _tied_llama_dir(tmp_path / "fp", hidden=128)
    q = AutoModelForCausalLM.from_pretrained(
        src, quantization_config=CBQConfig(method="rtn", group_size=32, lm_head_bits=8)
    )
    q.save_pretrained(tmp_path / "q")
    with pytest.raises(UnsupportedExportError, match="lm_head_bits"):
        export_checkpoint(tmp_path / "q", tmp_path / "ct", to="compressed-tensors")
    assert not (tmp_path / "ct").exists()
