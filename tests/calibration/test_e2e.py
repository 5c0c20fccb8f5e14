"""The end-to-end stage: steps and clipping ratios of every packed linear trained on the KL to the float model."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_llama

from cbq_hf.calibration import e2e
from cbq_hf.calibration.engine import calibrate
from cbq_hf.config import CBQConfig
from cbq_hf.nn.linear import CBQLinear


def _cfg(**kw) -> CBQConfig:
    base = dict(method="cbq", bits=3, group_size=32, epochs=1, batch_size=4)
    return CBQConfig(**{**base, **kw})


def _packed(model) -> dict[str, torch.Tensor]:
    return {n: m.scales.clone() for n, m in model.named_modules() if isinstance(m, CBQLinear)}


@pytest.mark.parametrize("act_bits", [None, 8], ids=["w3a16", "w3a8"])
def test_stage_lowers_the_kl_and_changes_only_steps_and_clipping(calib_ids, act_bits):
    without = tiny_llama(layers=2).eval()
    calibrate(without, _cfg(act_bits=act_bits), calib_ids, progress=False)
    model = tiny_llama(layers=2).eval()
    report = calibrate(model, _cfg(act_bits=act_bits, e2e_epochs=3, e2e_lr=1e-2), calib_ids, progress=False)
    stage = report["e2e"]
    assert stage["status"] == "ok" and stage["steps"] == 3 * 2 and stage["linears"] == 14
    assert stage["kl_end"] < stage["kl_start"]
    before, after = _packed(without), _packed(model)
    assert sorted(before) == sorted(after) and any(not torch.equal(before[k], after[k]) for k in before)
    ref = dict(without.named_modules())
    for name, m in model.named_modules():  # codes and zero points are the windows' own
        if isinstance(m, CBQLinear):
            assert torch.equal(m.qweight, ref[name].qweight) and torch.equal(m.zeros, ref[name].zeros)
    assert not any(isinstance(m, e2e.TrainableSteps) for m in model.modules())


def test_stage_that_raises_the_kl_is_reverted(calib_ids, monkeypatch):
    """With a huge learning rate the KL rises; the stage puts every step back as the windows left it."""
    without = tiny_llama(layers=2).eval()
    calibrate(without, _cfg(), calib_ids, progress=False)
    model = tiny_llama(layers=2).eval()
    report = calibrate(model, _cfg(e2e_epochs=2, e2e_lr=10.0), calib_ids, progress=False)
    assert report["e2e"]["status"] == "reverted"
    before, after = _packed(without), _packed(model)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_trainable_steps_compute_the_packed_linear(calib_ids):
    """Before training, the stand-in computes what the packed linear computes (reference path)."""
    from cbq_hf.kernels.reference import linear as reference_linear

    model = tiny_llama(layers=1).eval()
    calibrate(model, _cfg(act_bits=8), calib_ids, progress=False)
    q = next(m for m in model.modules() if isinstance(m, CBQLinear))
    x = torch.randn(5, q.in_features)
    with torch.no_grad():
        torch.testing.assert_close(e2e.TrainableSteps(q)(x), reference_linear(q, x), rtol=1e-5, atol=1e-5)
