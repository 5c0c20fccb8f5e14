"""The CBQ engine end to end on tiny random models: packing, loss, determinism, errors, NaN fallback, reload."""

from __future__ import annotations

import warnings

import pytest
import torch
from calib_helpers import CharTokenizer
from transformers import AutoModelForCausalLM

import cbq_hf  # noqa: F401  (registers "cbq" with transformers)
from cbq_hf.calibration import cbq
from cbq_hf.calibration.engine import calibrate
from cbq_hf.calibration.rtn import quantize_rtn
from cbq_hf.config import CBQConfig
from cbq_hf.formats import get_format
from cbq_hf.modeling import NoDecoderBlocksError, quantizable_linears
from cbq_hf.nn.linear import CBQLinear


def _cfg(**kw) -> CBQConfig:
    base = dict(method="cbq", bits=2, group_size=32, epochs=2, batch_size=4, lr=1e-2, lr_scale=1e-3)
    return CBQConfig(**{**base, **kw})


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _rel_err(a, b):
    return float((a - b).pow(2).mean() / b.pow(2).mean())


def test_every_linear_packed(family, calib_ids):
    model = family(layers=3)
    names = list(quantizable_linears(model))
    rep = calibrate(model, _cfg(act_bits=8), calib_ids, progress=False)
    mods = dict(model.named_modules())
    assert all(isinstance(mods[n], CBQLinear) for n in names)
    assert all(mods[n].input_scale is not None for n in names)  # use_cfp: explicit scale buffer everywhere
    assert [w["blocks"] for w in rep["windows"]] == [[0, 1], [1, 2]]
    for w in rep["windows"]:
        assert w["loss_end"] <= w["loss_start"] and w["seconds"] >= 0 and w["status"] in ("ok", "reverted")
    assert torch.isfinite(_logits(model, calib_ids)).all()


def test_float_blocks_shared_by_two_windows_run_once_on_x_fp(calib_ids, monkeypatch):
    """Each window after the first starts its float run on X_fp at the previous window's float output (the block the
    two windows share ran there already), and the result is the same as recomputing it."""
    from helpers import tiny_llama

    from cbq_hf.calibration import pipeline

    def run(cache: bool):
        starts = []
        original = pipeline.BlockPipeline.run_float

        def run_float(self, win, x, observers, first=None):
            if observers or first is not None:  # the X_fp run (the homologous X_q run passes neither)
                if not cache:
                    first, x = None, self.x_fp
                starts.append((win.start, win.start if first is None else first))
            return original(self, win, x, observers, first)

        monkeypatch.setattr(pipeline.BlockPipeline, "run_float", run_float)
        torch.manual_seed(0)
        model = tiny_llama(layers=4)
        calibrate(model, _cfg(), calib_ids, progress=False)
        return starts, _logits(model, calib_ids)

    starts, logits = run(True)
    assert starts == [(0, 0), (1, 2), (2, 3)]
    recomputed_starts, recomputed = run(False)
    assert recomputed_starts == [(0, 0), (1, 1), (2, 2)]
    assert torch.equal(logits, recomputed)


def test_training_lowers_window_loss(family, calib_ids):
    rep = calibrate(family(layers=2), _cfg(epochs=4), calib_ids, progress=False)
    w = rep["windows"][0]
    assert w["status"] == "ok" and w["steps"] == 8
    assert w["loss_end"] < w["loss_start"]


@pytest.mark.parametrize("bits,group", [(2, 32), (3, 32), (4, 64)], ids=["w2-g32", "w3-g32", "w4-g64"])
def test_zero_epochs_not_worse_than_rtn(bits, group, calib_ids):
    """Before any training (epochs=0) CBQ's initial grid is at least as good as RTN on the model output."""
    from helpers import tiny_llama

    ref_model = tiny_llama(layers=2).eval()
    ref = _logits(ref_model, calib_ids)
    rtn = tiny_llama(layers=2).eval()
    quantize_rtn(rtn, get_format(_cfg(bits=bits, group_size=group)), progress=False)
    cbq = tiny_llama(layers=2).eval()
    calibrate(cbq, _cfg(bits=bits, group_size=group, epochs=0), calib_ids, progress=False)
    assert _rel_err(_logits(cbq, calib_ids), ref) <= _rel_err(_logits(rtn, calib_ids), ref)


def test_deterministic_for_a_seed(calib_ids):
    from helpers import tiny_llama

    outs = []
    for _ in range(2):
        m = tiny_llama(layers=2).eval()
        calibrate(m, _cfg(epochs=1), calib_ids, progress=False)
        outs.append(_logits(m, calib_ids))
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)


def test_nan_loss_falls_back_to_window_start(monkeypatch, calib_ids):
    from helpers import tiny_llama

    start = tiny_llama(layers=3).eval()
    calibrate(start, _cfg(epochs=0), calib_ids, progress=False)
    real = cbq.window_loss

    def poisoned(*args, **kwargs):  # NaN during training steps only (the start/end evaluations run without grad)
        out = real(*args, **kwargs)
        return out * float("nan") if torch.is_grad_enabled() else out

    monkeypatch.setattr(cbq, "window_loss", poisoned)
    model = tiny_llama(layers=3).eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rep = calibrate(model, _cfg(epochs=2), calib_ids, progress=False)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert any("window 1/2" in m for m in messages) and any("window 2/2" in m for m in messages)
    assert [w["status"] for w in rep["windows"]] == ["nan_fallback", "nan_fallback"]
    for m in model.modules():
        if isinstance(m, CBQLinear):
            assert torch.isfinite(m.scales.float()).all() and torch.isfinite(m.input_scale).all()
    # falling back means exactly the untrained starting point
    torch.testing.assert_close(_logits(model, calib_ids), _logits(start, calib_ids), rtol=0, atol=0)


@pytest.mark.parametrize(
    "switch,value", [("use_homologous", False), ("use_kl", False), ("token_normalized_loss", True)]
)
def test_loss_switches(monkeypatch, switch, value, calib_ids):
    from helpers import tiny_llama

    seen = []
    real = cbq.window_loss

    def spy(q, fp_fp, fp_q, wa, wh, kl, token_normalized):
        seen.append((fp_q is None, kl, token_normalized))
        return real(q, fp_fp, fp_q, wa, wh, kl, token_normalized)

    monkeypatch.setattr(cbq, "window_loss", spy)
    calibrate(tiny_llama(layers=2).eval(), _cfg(epochs=1, **{switch: value}), calib_ids, progress=False)
    assert seen
    if switch == "use_homologous":
        assert all(no_hom for no_hom, _, _ in seen)
    elif switch == "use_kl":
        assert all(kl == 0 for _, kl, _ in seen)
    else:
        assert all(norm is True for _, _, norm in seen)
    if switch != "token_normalized_loss":
        assert all(norm is False for _, _, norm in seen)


def test_no_cfp_leaves_norms_and_scales_alone(calib_ids):
    from helpers import tiny_llama

    model = tiny_llama(layers=2).eval()
    norm_before = model.model.layers[0].input_layernorm.weight.detach().clone()
    rep = calibrate(model, _cfg(epochs=0, use_cfp=False), calib_ids, progress=False)
    assert rep["cfp"]["outlier_channels"] == 0 and rep["cfp"]["truncation_outlier_weights"] == 0
    assert torch.equal(model.model.layers[0].input_layernorm.weight, norm_before)
    assert all(m.input_scale is None for m in model.modules() if isinstance(m, CBQLinear))


@pytest.mark.parametrize("fmt", ["uniform", "lobcq"])
def test_smooth_alpha_smooths_every_channel_and_keeps_the_float_function(calib_ids, fmt):
    """smooth_alpha (with use_cfp off, so the smoothing is all SmoothQuant's): every channel of the norm-fed
    linears is smoothed and folded into the norms, the others keep explicit input scales, and the quantized
    model stays close to the float one (a fold that changed the float function would not)."""
    from helpers import tiny_llama

    kw = dict(format="lobcq", bits=4, act_bits=4, group_size=-1) if fmt == "lobcq" else dict(bits=4, act_bits=8)
    model = tiny_llama(layers=2).eval()
    fp_logits = _logits(model, calib_ids)
    norm_before = model.model.layers[0].input_layernorm.weight.detach().clone()
    rep = calibrate(model, _cfg(epochs=0, use_cfp=False, smooth_alpha=0.5, **kw), calib_ids, progress=False)
    hidden = norm_before.numel()
    assert rep["cfp"]["outlier_channels"] > 2 * 2 * hidden  # every channel of both norms of both blocks (at least)
    assert rep["cfp"]["folded_linears"] == 2 * 5  # q, k, v, gate, up of each block
    layer = model.model.layers[0]
    assert not torch.allclose(layer.input_layernorm.weight, norm_before)
    assert layer.self_attn.q_proj.input_scale is None or bool((layer.self_attn.q_proj.input_scale == 1).all())
    for lin in (layer.self_attn.o_proj, layer.mlp.down_proj):
        assert lin.input_scale is not None and bool((lin.input_scale != 1).all())
    # quantized, the smoothed model stays close to the float one (a broken fold would not)
    assert _rel_err(_logits(model, calib_ids), fp_logits) < 0.05


def test_smooth_alpha_auto_reports_its_choices(calib_ids):
    from helpers import tiny_llama

    model = tiny_llama(layers=2).eval()
    rep = calibrate(model, _cfg(epochs=0, bits=4, act_bits=4, smooth_alpha="auto"), calib_ids, progress=False)
    chosen = rep["cfp"]["smooth_alpha_chosen"]
    assert sum(chosen.values()) == 2 * 4  # per block: q/k/v, o, gate/up, down
    assert set(chosen) <= {"cfp", "0.3", "0.4", "0.5", "0.6", "0.7"}


def test_errors():
    with pytest.raises(NoDecoderBlocksError):
        calibrate(torch.nn.Sequential(torch.nn.Linear(4, 4)), _cfg(), torch.zeros(1, 4, dtype=torch.long))


TEXT = "The quick brown fox jumps over the lazy dog. " * 40


def test_save_and_reload_through_transformers(tmp_path, llama_dir):
    cfg = CBQConfig(
        method="cbq",
        bits=4,
        group_size=32,
        act_bits=8,
        dataset=[TEXT],
        tokenizer=CharTokenizer(),
        nsamples=4,
        seqlen=32,
        epochs=1,
        batch_size=2,
    )
    model = AutoModelForCausalLM.from_pretrained(llama_dir, quantization_config=cfg)
    assert any(isinstance(m, CBQLinear) for m in model.modules())
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(3))
    before = _logits(model, ids)
    model.save_pretrained(tmp_path / "q")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    torch.testing.assert_close(_logits(again, ids), before, rtol=0, atol=0)
    assert again.generate(ids[:1, :4], max_new_tokens=3, do_sample=False).shape == (1, 7)


def test_calibration_text_shorter_than_one_sample(llama_dir):
    from cbq_hf.data import CalibrationDataError

    cfg = CBQConfig(method="cbq", dataset=["too short"], tokenizer=CharTokenizer(), nsamples=2, seqlen=64)
    with pytest.raises(CalibrationDataError, match="fewer than one sample"):
        AutoModelForCausalLM.from_pretrained(llama_dir, quantization_config=cfg)


class _Interrupted(RuntimeError):
    pass


def test_resume_after_interruption(monkeypatch, tmp_path, calib_ids):
    """A finished window is never recomputed, and the resumed result equals an uninterrupted run."""
    from helpers import tiny_llama

    full = tiny_llama(layers=4).eval()
    calibrate(full, _cfg(epochs=1), calib_ids, progress=False)
    real = cbq._train_window
    calls = []

    def interrupt_at_window_3(win, *args, **kwargs):
        calls.append(win.index)
        if win.index == 2 and len(calls) == 3:
            raise _Interrupted("simulated interruption")
        return real(win, *args, **kwargs)

    monkeypatch.setattr(cbq, "_train_window", interrupt_at_window_3)
    cfg = _cfg(epochs=1, checkpoint_dir=str(tmp_path / "ckpt"))
    with pytest.raises(_Interrupted):
        calibrate(tiny_llama(layers=4).eval(), cfg, calib_ids, progress=False)
    assert calls == [0, 1, 2]
    resumed = tiny_llama(layers=4).eval()
    rep = calibrate(resumed, cfg, calib_ids, progress=False)
    assert calls[3:] == [2] and rep["resumed_from_window"] == 2 and len(rep["windows"]) == 3
    torch.testing.assert_close(_logits(resumed, calib_ids), _logits(full, calib_ids), rtol=0, atol=0)


def _norm_weights(model) -> list[torch.Tensor]:
    return [p.detach().clone() for n, p in model.named_parameters() if n.endswith("layernorm.weight")]


def test_lr_norm_trains_the_norm_weights(calib_ids):
    from helpers import tiny_llama

    fixed = tiny_llama(layers=2).eval()
    calibrate(fixed, _cfg(epochs=2, use_cfp=False), calib_ids, progress=False)
    trained = tiny_llama(layers=2).eval()
    rep = calibrate(trained, _cfg(epochs=2, use_cfp=False, lr_norm=1e-2), calib_ids, progress=False)
    assert rep["windows"][0]["status"] == "ok"
    before = _norm_weights(fixed)  # no CFP, no lr_norm: the norms are the float model's
    assert all(torch.equal(a, b) for a, b in zip(before, _norm_weights(tiny_llama(layers=2))))
    moved = [float((a - b).abs().max()) for a, b in zip(_norm_weights(trained), before)]
    assert all(m > 0 for m in moved), moved
    assert not any(p.requires_grad for p in trained.model.layers.parameters())  # trainable only in the windows
    assert torch.isfinite(_logits(trained, calib_ids)).all()


def test_lr_norm_reverted_window_restores_the_norms(monkeypatch, calib_ids):
    """A window whose loss rises is put back at its start: the norm weights too."""
    from helpers import tiny_llama

    real = cbq.window_loss
    calls = {"eval": 0}

    def rising(*args, **kwargs):  # the end-of-window evaluation reports a worse loss than the start
        out = real(*args, **kwargs)
        if not torch.is_grad_enabled():
            calls["eval"] += 1
            return out * (1.0 + calls["eval"])
        return out

    monkeypatch.setattr(cbq, "window_loss", rising)
    model = tiny_llama(layers=2).eval()
    rep = calibrate(model, _cfg(epochs=2, use_cfp=False, lr_norm=1e-1), calib_ids, progress=False)
    assert rep["windows"][0]["status"] == "reverted"
    assert all(torch.equal(a, b) for a, b in zip(_norm_weights(model), _norm_weights(tiny_llama(layers=2))))


def test_bfloat16_calibration_trains_and_stays_close(calib_ids):
    """calibration_dtype="bfloat16" runs the trained window's products in bfloat16 autocast: every window trains
    with finite losses, and the result stays close to the float32 calibration's."""
    from helpers import tiny_llama

    ref_model, bf_model = tiny_llama(layers=2).eval(), tiny_llama(layers=2).eval()
    ref = calibrate(ref_model, _cfg(epochs=2), calib_ids, progress=False)
    rep = calibrate(bf_model, _cfg(epochs=2, calibration_dtype="bfloat16"), calib_ids, progress=False)
    assert all(w["steps"] > 0 and w["status"] in ("ok", "reverted") for w in rep["windows"])
    for a, b in zip(rep["windows"], ref["windows"]):
        assert abs(a["loss_end"] - b["loss_end"]) <= 0.25 * b["loss_start"]
    out, want = _logits(bf_model, calib_ids), _logits(ref_model, calib_ids)
    assert _rel_err(out, want) < 0.05
