"""A third storage format, written here as a user would (one class, one `@register_format` line), calibrates with
CBQ, saves and reloads without any change to the engine, checkpoint, CLI or config code."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from calib_helpers import CharTokenizer
from torch import nn
from transformers import AutoModelForCausalLM

import cbq_hf  # noqa: F401  (registers "cbq" with transformers)
from cbq_hf.calibration.engine import calibrate
from cbq_hf.config import CBQConfig
from cbq_hf.formats import registered_formats
from cbq_hf.formats.registry import QuantFormat, register_format
from cbq_hf.formats.stand_in import QuantStandIn, StandInOptions
from cbq_hf.nn.linear import CBQLinear

NAME = "toy_rowwise_int8"


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.round(x) - x).detach()


class ToyStandIn(QuantStandIn):
    """Per-row symmetric int8 weights with one learnable step per row (LSQ-style straight-through rounding)."""

    def __init__(self, linear: nn.Linear, options: StandInOptions) -> None:
        super().__init__()
        w = linear.weight.detach().float().clone()
        self.out_features, self.in_features = w.shape
        self.register_buffer("weight", w)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float().clone())
        self.input_scale = options.input_scale
        step = (w.abs().amax(1, keepdim=True) / 127).clamp(min=1e-8)
        self.log_step = nn.Parameter(step.log())

    def step(self) -> torch.Tensor:
        s = self.log_step.exp()
        return s + (s.half().float() - s).detach()  # what is stored is what trains

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_scale is not None:
            x = x / self.input_scale.to(x.device)
        s = self.step()
        return F.linear(x, torch.clamp(_round_ste(self.weight / s), -128, 127) * s, self.bias)

    @torch.no_grad()
    def freeze(self) -> dict[str, torch.Tensor]:
        s = self.step()
        q = torch.clamp(torch.round(self.weight / s), -128, 127).to(torch.int8)
        return {"qweight": q.cpu(), "scales": s.half().cpu()}


@register_format(NAME)
class ToyRowwiseFormat(QuantFormat):
    """int8 per row: qweight int8 [N, K], scales float16 [N, 1]; W_hat = qweight * scales."""

    act_bits = None

    @classmethod
    def from_config(cls, config) -> ToyRowwiseFormat:
        return cls()

    def buffer_specs(self, out_features: int, in_features: int) -> dict:
        return {"qweight": ((out_features, in_features), torch.int8), "scales": ((out_features, 1), torch.float16)}

    def dequantize(self, buffers: dict[str, torch.Tensor], in_features: int) -> torch.Tensor:
        return buffers["qweight"].float() * buffers["scales"].float()

    def quantize_activations(self, x: torch.Tensor, buffers: dict[str, torch.Tensor]) -> torch.Tensor:
        return x

    def quantize_rtn(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        s = (weight.float().abs().amax(1, keepdim=True) / 127).clamp(min=1e-8).half()
        q = torch.clamp(torch.round(weight.float() / s.float()), -128, 127).to(torch.int8)
        return {"qweight": q, "scales": s}

    def bits_per_weight(self, out_features: int, in_features: int) -> float:
        return 8 + 16 / in_features

    def stand_in(self, linear: nn.Module, options: StandInOptions) -> QuantStandIn:
        return ToyStandIn(linear, options)


TEXT = "The quick brown fox jumps over the lazy dog. " * 40


def _cfg(**kw) -> CBQConfig:
    base = dict(method="cbq", format=NAME, bits=8, group_size=-1, dataset=[TEXT], tokenizer=CharTokenizer())
    return CBQConfig(**{**base, "nsamples": 4, "seqlen": 32, "epochs": 2, "batch_size": 2, **kw})


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_registered_everywhere():
    assert NAME in registered_formats()
    assert _cfg().format == NAME  # config validation asks the registry
    with pytest.raises(ValueError, match="allowed"):
        _cfg(format="no_such_format")


@pytest.mark.parametrize("use_cfp", [False, True], ids=["plain", "cfp"])
def test_third_format_calibrates_saves_and_reloads(tmp_path, llama_dir, use_cfp):
    model = AutoModelForCausalLM.from_pretrained(llama_dir, quantization_config=_cfg(use_cfp=use_cfp))
    quantized = [m for m in model.modules() if isinstance(m, CBQLinear)]
    assert quantized and all(isinstance(m.fmt, ToyRowwiseFormat) for m in quantized)
    assert all(m.qweight.dtype == torch.int8 and m.scales.shape == (m.out_features, 1) for m in quantized)
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(3))
    before = _logits(model, ids)
    model.save_pretrained(tmp_path / "q")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    torch.testing.assert_close(_logits(again, ids), before, rtol=0, atol=0)


def test_third_format_training_lowers_the_window_loss(calib_ids):
    from helpers import tiny_llama

    report = calibrate(tiny_llama(layers=2).eval(), _cfg(lr_scale=1e-2, epochs=4), calib_ids, progress=False)
    assert report["windows"] and all(w["status"] == "ok" for w in report["windows"])
    assert all(w["steps"] > 0 for w in report["windows"])
    assert any(w["loss_end"] < w["loss_start"] for w in report["windows"])


def test_third_format_resumes_from_its_checkpoint(tmp_path, calib_ids):
    """A rerun with the same checkpoint folder restores every block of the finished run (the checkpoint code
    rebuilds the format's modules without knowing it)."""
    from helpers import tiny_llama

    cfg = _cfg(checkpoint_dir=str(tmp_path / "ckpt"))
    first = tiny_llama(layers=3).eval()
    calibrate(first, cfg, calib_ids, progress=False)
    again = tiny_llama(layers=3).eval()
    report = calibrate(again, _cfg(checkpoint_dir=str(tmp_path / "ckpt")), calib_ids, progress=False)
    assert report["resumed_from_window"] == len(report["windows"])
    ref, got = first.state_dict(), again.state_dict()
    assert sorted(ref) == sorted(got) and all(torch.equal(ref[k], got[k]) for k in ref)
