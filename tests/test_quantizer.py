"""End to end through transformers on tiny random models: quantize, save, reload, generate."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import cbq_hf
from cbq_hf import CBQConfig, CBQLinear


def _rtn(path, **kw):
    kw.setdefault("group_size", 32)
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=CBQConfig(method="rtn", **kw))


@pytest.mark.parametrize(
    "bits,act_bits",
    [(4, None), (2, None), (3, None), (8, None), (4, 8), (4, 4)],
    ids=["w4", "w2", "w3", "w8", "w4a8", "w4a4"],
)
def test_save_load_identical_logits(llama_dir, tmp_path, bits, act_bits):
    q = _rtn(llama_dir, bits=bits, act_bits=act_bits)
    x = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        before = q(x).logits
    q.save_pretrained(tmp_path / "q")
    r = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert isinstance(r.model.layers[1].mlp.down_proj, CBQLinear)
    with torch.no_grad():
        after = r(x).logits
    assert torch.equal(before, after)
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "cbq" and cfg["bits"] == bits and cfg["act_bits"] == act_bits
    assert cfg["modules_to_not_convert"]  # resolved list persisted


def test_every_decoder_linear_is_converted_and_head_embeddings_stay_float(llama_dir):
    q = _rtn(llama_dir)
    converted = [n for n, m in q.named_modules() if isinstance(m, CBQLinear)]
    assert len(converted) == 2 * 7
    assert isinstance(q.lm_head, torch.nn.Linear) and not isinstance(q.lm_head, CBQLinear)
    assert isinstance(q.model.embed_tokens, torch.nn.Embedding)


def test_quantized_output_is_close_to_float(llama_dir):
    fp = AutoModelForCausalLM.from_pretrained(llama_dir)
    q = _rtn(llama_dir, bits=8)
    x = torch.randint(0, 128, (1, 16))
    with torch.no_grad():
        a, b = fp(x).logits, q(x).logits
    assert (a - b).abs().max() < 0.05 * a.abs().max()


def test_modules_to_not_convert(llama_dir, tmp_path):
    q = _rtn(llama_dir, modules_to_not_convert=["mlp.down_proj", "model.layers.0.self_attn.q_proj"])
    assert not isinstance(q.model.layers[0].mlp.down_proj, CBQLinear)
    assert not isinstance(q.model.layers[1].mlp.down_proj, CBQLinear)
    assert not isinstance(q.model.layers[0].self_attn.q_proj, CBQLinear)
    assert isinstance(q.model.layers[1].self_attn.q_proj, CBQLinear)
    q.save_pretrained(tmp_path / "q")
    r = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert not isinstance(r.model.layers[1].mlp.down_proj, CBQLinear)
    x = torch.randint(0, 128, (1, 8))
    with torch.no_grad():
        assert torch.equal(q(x).logits, r(x).logits)


def test_generate_after_reload(llama_dir, tmp_path):
    q = _rtn(llama_dir)
    q.save_pretrained(tmp_path / "q")
    r = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    x = torch.randint(0, 128, (1, 5))
    out_q = q.generate(x, max_new_tokens=8, do_sample=False)
    out_r = r.generate(x, max_new_tokens=8, do_sample=False)
    assert out_r.shape == (1, 13) and torch.equal(out_q, out_r)


def test_save_writes_model_card_and_format_version(llama_dir, tmp_path):
    from safetensors import safe_open

    q = _rtn(llama_dir)
    q.save_pretrained(tmp_path / "q")
    card = (tmp_path / "q" / "README.md").read_text()
    assert "import cbq_hf" in card and "from_pretrained" in card
    with safe_open(str(tmp_path / "q" / "model.safetensors"), "pt") as f:
        assert f.metadata()["cbq_format_version"] == str(cbq_hf.FORMAT_VERSION)


def test_save_refuses_a_folder_holding_files_and_leaves_no_temp_folders(llama_dir, tmp_path):
    from cbq_hf.serialization import FolderNotEmptyError

    out = tmp_path / "q"
    out.mkdir()
    (out / "tokenizer.json").write_text("{}")
    q = _rtn(llama_dir)
    with pytest.raises(FolderNotEmptyError, match="overwrite=True"):
        q.save_pretrained(out)
    assert [p.name for p in out.iterdir()] == ["tokenizer.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fp", "q"]


def test_group_size_larger_than_layer_is_refused(llama_dir):
    with pytest.raises(ValueError, match="larger than the input size"):
        _rtn(llama_dir, group_size=256)


def test_disk_offload_calibrates_with_no_meta_left(llama_dir, tmp_path):
    """Offloaded calibration in depth: tests/calibration/test_offload.py. Here: the quantizer accepts it."""
    q = AutoModelForCausalLM.from_pretrained(
        llama_dir,
        quantization_config=CBQConfig(method="rtn", group_size=32),
        device_map={"": "disk"},
        offload_folder=str(tmp_path / "off"),
    )
    assert isinstance(q.model.layers[0].self_attn.q_proj, CBQLinear)
    assert not any(t.device.type == "meta" for t in q.state_dict().values())


def test_saving_meta_weights_is_refused(llama_dir, tmp_path):
    q = _rtn(llama_dir)
    q.model.norm.to("meta")  # a weight whose values are unknown must never be written
    with pytest.raises(ValueError, match=r"refusing to save model\.norm\.weight.*meta device"):
        q.save_pretrained(tmp_path / "q")
    assert not (tmp_path / "q" / "model.safetensors").exists()


def test_double_import_and_reload_keep_registration():
    import importlib

    from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

    import cbq_hf.registration

    importlib.reload(cbq_hf.registration)
    cbq_hf.registration.register()
    cbq_hf.registration.register()
    assert AUTO_QUANTIZATION_CONFIG_MAPPING["cbq"].__name__ == "CBQConfig"
    assert AUTO_QUANTIZER_MAPPING["cbq"].__name__ == "CBQHfQuantizer"


_LOAD_IN_FRESH_PROCESS = """
import sys, torch
if sys.argv[2] == "with":
    import cbq_hf
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained(sys.argv[1])
with torch.no_grad():
    torch.save(m(torch.load(sys.argv[3])).logits, sys.argv[4])
"""


def test_loading_without_import_raises_and_with_import_gives_the_same_logits(llama_dir, tmp_path):
    """Without `import cbq_hf`, transformers does not know "cbq": the load guard under each quantized linear's
    `weight` name makes its loader refuse the checkpoint instead of building random linears. With the import, a
    fresh interpreter reproduces the saved model's logits exactly. Subprocesses keep this process's registration
    out of the way. The quantized head has a guard too."""
    import subprocess
    import sys

    q = _rtn(llama_dir, lm_head_bits=8)
    q.save_pretrained(tmp_path / "q")
    x = torch.randint(0, 128, (2, 12))
    torch.save(x, tmp_path / "x.pt")
    with torch.no_grad():
        expected = q(x).logits

    def load(how: str) -> subprocess.CompletedProcess:
        args = [str(tmp_path / "q"), how, str(tmp_path / "x.pt"), str(tmp_path / f"{how}.pt")]
        return subprocess.run(
            [sys.executable, "-c", _LOAD_IN_FRESH_PROCESS, *args], capture_output=True, text=True, timeout=120
        )

    res = load("without")
    assert res.returncode != 0
    assert "Unknown quantization type, got cbq" in res.stderr
    assert "ignore_mismatched_sizes" in res.stderr
    assert "down_proj.weight" in res.stderr and "lm_head.weight" in res.stderr
    assert not (tmp_path / "without.pt").exists()
    res = load("with")
    assert res.returncode == 0, res.stderr
    assert "UNEXPECTED" not in res.stderr  # the guards are skipped silently
    assert torch.equal(torch.load(tmp_path / "with.pt"), expected)
