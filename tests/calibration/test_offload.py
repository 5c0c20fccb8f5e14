"""Calibration of accelerate-dispatched models: blocks offloaded to "disk" and kept on "cpu" by a device map.

The reference is the same calibration (same seed, same data) of the same checkpoint loaded without a device map.
Everything runs on the CPU in float32 and the offloaded weights are read back from the fp32 safetensors file
unchanged, so the two runs execute the same operations on the same values in the same order: the logits are
compared for *bit equality* (`torch.equal`), not with a tolerance.
"""

from __future__ import annotations

import logging

import pytest
import torch
from calib_helpers import CharTokenizer
from helpers import tiny_llama
from torch import nn
from transformers import AutoModelForCausalLM

import cbq_hf
from cbq_hf import CBQLinear
from cbq_hf.calibration.engine import calibrate
from cbq_hf.calibration.offload import OnloadHook, input_device, is_dispatched

#: Blocks 1 and 2 on disk, 0 and 3 on "cpu"; embeddings and lm head on disk too (capture must run through hooks).
MIXED_MAP = {
    "model.embed_tokens": "disk",
    "model.layers.0": "cpu",
    "model.layers.1": "disk",
    "model.layers.2": "disk",
    "model.layers.3": "cpu",
    "model.norm": "cpu",
    "model.rotary_emb": "cpu",
    "lm_head": "disk",
}
TEXT = ["The quick brown fox jumps over the lazy dog. " * 20, "Pack my box with five dozen liquor jugs. " * 20]


def _cfg(method: str) -> cbq_hf.CBQConfig:
    return cbq_hf.CBQConfig(
        method=method,
        bits=4,
        group_size=32,
        tokenizer=CharTokenizer(),
        dataset=TEXT,
        nsamples=4,
        seqlen=32,
        epochs=1,
        calibration_device="cpu",
        seed=0,
        e2e_epochs=0,  # the end-to-end stage runs the whole model on one device: skipped for dispatched models
    )


@pytest.fixture(scope="module")
def fp_dir(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("offload") / "fp"
    tiny_llama(layers=4).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(3))


def _logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture(scope="module")
def in_memory(fp_dir, ids) -> dict[str, torch.Tensor]:
    """Logits of each method calibrated without any device map (the reference)."""
    return {
        m: _logits(AutoModelForCausalLM.from_pretrained(fp_dir, quantization_config=_cfg(m)), ids)
        for m in ("rtn", "cbq")
    }


@pytest.mark.parametrize("method", ["rtn", "cbq"])
def test_disk_and_cpu_offload_calibrates_bit_identically_and_saves(method, fp_dir, ids, in_memory, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="cbq_hf.calibration.offload"):
        q = AutoModelForCausalLM.from_pretrained(
            fp_dir, device_map=MIXED_MAP, offload_folder=str(tmp_path / "off"), quantization_config=_cfg(method)
        )
    # the offload path really ran: two blocks had meta weights loaded from disk
    assert "2 of 4 decoder blocks offloaded" in caplog.text
    assert [n for n, t in q.state_dict().items() if t.device.type == "meta"] == []
    assert "disk" not in q.hf_device_map.values()
    assert all(isinstance(q.model.layers[i].mlp.down_proj, CBQLinear) for i in range(4))
    assert all(hasattr(q.model.layers[i], "_hf_hook") for i in range(4))  # still runs through accelerate hooks
    assert torch.equal(_logits(q, ids), in_memory[method])
    assert q.generate(ids[:1], max_new_tokens=3, do_sample=False).shape == (1, 15)
    q.save_pretrained(tmp_path / "q")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert torch.equal(_logits(reloaded, ids), in_memory[method])


def test_device_map_auto_with_max_memory_spills_to_disk_and_calibrates(fp_dir, ids, in_memory, tmp_path):
    kwargs = {"device_map": "auto", "max_memory": {"cpu": "300KB"}, "offload_folder": str(tmp_path / "off")}
    plain = AutoModelForCausalLM.from_pretrained(fp_dir, **kwargs)
    placed = set(plain.hf_device_map.values())
    assert placed == {"cpu", "disk"}, plain.hf_device_map  # the budget really forces blocks onto disk
    q = AutoModelForCausalLM.from_pretrained(fp_dir, quantization_config=_cfg("cbq"), **kwargs)
    assert not any(t.device.type == "meta" for t in q.state_dict().values())
    assert torch.equal(_logits(q, ids), in_memory["cbq"])


def test_whole_model_on_disk(fp_dir, ids, in_memory, tmp_path):
    q = AutoModelForCausalLM.from_pretrained(
        fp_dir, device_map={"": "disk"}, offload_folder=str(tmp_path / "off"), quantization_config=_cfg("rtn")
    )
    assert not any(t.device.type == "meta" for t in q.state_dict().values())
    assert torch.equal(_logits(q, ids), in_memory["rtn"])


def test_tied_embeddings_offloaded_stay_tied(tmp_path):
    from transformers import LlamaConfig

    cfg = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "fp")
    q = AutoModelForCausalLM.from_pretrained(
        tmp_path / "fp", device_map={"": "disk"}, offload_folder=str(tmp_path / "off"), quantization_config=_cfg("rtn")
    )
    assert q.lm_head.weight is q.model.embed_tokens.weight
    assert q.lm_head.weight.device.type == "cpu"


def test_meta_weights_without_offload_hook_are_refused(calib_ids):
    """A model offloaded by something other than accelerate (meta weights, no hook): clear error, not garbage."""
    model = tiny_llama(layers=2).eval()
    model.model.layers[1].mlp.to("meta")
    assert not is_dispatched(model)
    with pytest.raises(ValueError, match=r"model\.layers\.1 has weights on the meta device.*device_map"):
        calibrate(model, _cfg("cbq"), calib_ids, progress=False)


def test_input_device_is_the_embeddings_execution_device(fp_dir, tmp_path):
    plain = tiny_llama(layers=2)
    assert input_device(plain) == torch.device("cpu")
    disp = AutoModelForCausalLM.from_pretrained(fp_dir, device_map=MIXED_MAP, offload_folder=str(tmp_path / "o"))
    assert disp.model.embed_tokens.weight.device.type == "meta"  # a naive next(parameters()).device would be meta
    assert input_device(disp) == torch.device("cpu")


class _Recording(nn.Module):
    """No parameters; records every `.to(device)` call so the hook's moves can be checked without a GPU."""

    def __init__(self) -> None:
        super().__init__()
        self.moves: list[str] = []

    def to(self, device):  # type: ignore[override]
        self.moves.append(str(device))
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.moves.append(f"forward on {x.device}")
        return x * 2


def test_onload_hook_moves_block_to_execution_device_for_forward_and_back():
    from accelerate.hooks import add_hook_to_module

    mod = _Recording()
    add_hook_to_module(mod, OnloadHook(torch.device("meta"), torch.device("cpu")))
    out = mod(torch.ones(3))
    assert mod.moves == ["cpu", "meta", "forward on meta", "cpu"]  # init: home; forward: exec then home
    assert out.device.type == "meta"  # inputs were sent to the execution device


def test_resume_from_checkpoint_with_offload_rebuilds_hooked_blocks(fp_dir, ids, in_memory, tmp_path, caplog):
    """A rerun that resumes from the saved state restores the frozen blocks into the offloaded model: they are
    loaded, hooked again where accelerate ran them, and give the same logits."""

    def load():
        cfg = _cfg("cbq")
        cfg.checkpoint_dir = str(tmp_path / "ck")
        return AutoModelForCausalLM.from_pretrained(
            fp_dir, device_map=MIXED_MAP, offload_folder=str(tmp_path / "off"), quantization_config=cfg
        )

    load()
    with caplog.at_level(logging.INFO, logger="cbq_hf.calibration"):
        resumed = load()
    assert "resuming calibration" in caplog.text  # the second run really took the resume path
    assert [n for n, t in resumed.state_dict().items() if t.device.type == "meta"] == []
    assert all(hasattr(b, "_hf_hook") for b in resumed.model.layers)
    assert torch.equal(_logits(resumed, ids), in_memory["cbq"])
