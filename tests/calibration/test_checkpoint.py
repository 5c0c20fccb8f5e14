"""Calibration checkpoint folder: no pickles, readable config, refusal to resume another run, damaged files caught,
and bit-identical in-process resume for a model with biases and activation quantization (streams on disk).
The kill-and-resume test with real processes is test_resume_kill.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from calib_helpers import tiny_qwen2
from helpers import tiny_llama
from safetensors.torch import load_file

from cbq_hf.calibration import cbq
from cbq_hf.calibration.checkpoint import CheckpointError, CheckpointMismatchError
from cbq_hf.calibration.engine import calibrate
from cbq_hf.config import CBQConfig


def _cfg(**kw) -> CBQConfig:
    base = dict(method="cbq", bits=2, group_size=32, epochs=1, batch_size=4, lr=1e-2, lr_scale=1e-3)
    return CBQConfig(**{**base, **kw})


class _Interrupted(RuntimeError):
    pass


def _interrupt_at(monkeypatch, window: int) -> None:
    real = cbq._train_window

    def train(win, *args, **kwargs):
        if win.index == window:
            raise _Interrupted(f"interrupted at window {window}")
        return real(win, *args, **kwargs)

    monkeypatch.setattr(cbq, "_train_window", train)


def _partial(monkeypatch, ckpt: Path, ids: torch.Tensor, layers: int = 3, **kw) -> None:
    """A checkpoint folder of a run interrupted in its second window (first window committed)."""
    with monkeypatch.context() as m:
        _interrupt_at(m, 1)
        with pytest.raises(_Interrupted):
            calibrate(tiny_llama(layers=layers).eval(), _cfg(checkpoint_dir=str(ckpt), **kw), ids, progress=False)
    assert json.loads((ckpt / "state.json").read_text())["next_window"] == 1


def _bits(sd: dict[str, torch.Tensor]) -> dict[str, bytes]:
    return {k: v.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() for k, v in sd.items()}


def test_checkpoint_folder_has_no_pickle_and_a_readable_config(monkeypatch, tmp_path, calib_ids):
    ckpt = tmp_path / "ckpt"
    _partial(monkeypatch, ckpt, calib_ids, lr=0.02)
    files = sorted(p.name for p in ckpt.iterdir() if p.is_file())
    assert files == [
        "block_0.safetensors",
        "run.json",
        "state.json",
        "window_0.safetensors",
        "window_0.x_fp.bin",
        "window_0.x_q.bin",
    ]
    for name in files:
        head = (ckpt / name).read_bytes()[:2]
        assert head not in (b"\x80\x02", b"\x80\x04", b"\x80\x05", b"PK"), f"{name} looks like a pickle/torch.save"
    run = json.loads((ckpt / "run.json").read_text())
    assert run["config"]["lr"] == 0.02 and run["config"]["checkpoint_dir"] == str(ckpt)
    state = json.loads((ckpt / "state.json").read_text())
    assert state["inflight_blocks"] == [1] and len(state["windows"]) == 1
    window = load_file(str(ckpt / "window_0.safetensors"))
    assert "gen_state" in window and any(k.startswith("1/") and k.endswith(".a1") for k in window)
    frozen = load_file(str(ckpt / "block_0.safetensors"))
    assert all(not k.endswith(".weight") or "norm" in k for k in frozen)  # linears packed, only norms in float
    n, s, h = state["stream_shape"]
    assert (n, s) == tuple(calib_ids.shape) and (ckpt / "window_0.x_q.bin").stat().st_size == n * s * h * 4


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(kw=dict(lr=0.05)), r"config field `lr`: 0\.01 in the checkpoint, 0\.05 now"),
        (dict(kw=dict(bits=4)), r"config field `bits`"),
        (dict(model_seed=1), r"the model \(architecture, tensor shapes or weights\)"),
        (dict(other_ids=True), r"the calibration tokens"),
    ],
    ids=["lr", "bits", "model", "data"],
)
def test_other_run_refuses_to_resume_and_leaves_the_folder(monkeypatch, tmp_path, calib_ids, change, match):
    ckpt = tmp_path / "ckpt"
    _partial(monkeypatch, ckpt, calib_ids)
    before = {p.name: p.read_bytes() for p in ckpt.iterdir() if p.is_file()}
    ids = calib_ids.flip(0) if change.get("other_ids") else calib_ids
    model = tiny_llama(layers=3, seed=change.get("model_seed", 0)).eval()
    with pytest.raises(CheckpointMismatchError, match=match) as e:
        calibrate(model, _cfg(checkpoint_dir=str(ckpt), **change.get("kw", {})), ids, progress=False)
    assert "delete the folder or choose another checkpoint_dir" in str(e.value)
    assert {p.name: p.read_bytes() for p in ckpt.iterdir() if p.is_file()} == before


def test_settings_that_do_not_change_the_result_still_resume(monkeypatch, tmp_path, calib_ids):
    ckpt = tmp_path / "ckpt"
    _partial(monkeypatch, ckpt, calib_ids)
    rep = calibrate(
        tiny_llama(layers=3).eval(),
        _cfg(checkpoint_dir=str(ckpt), activation_storage="disk", calibration_device="cpu"),
        calib_ids,
        progress=False,
    )
    assert rep["resumed_from_window"] == 1


@pytest.mark.parametrize(
    "damage,match",
    [
        ("flip x_q", "damaged"),
        ("truncate x_fp", "missing or damaged"),
        ("delete block", "missing or unreadable"),
        ("flip window", "damaged"),
        ("truncate state.json", "cannot be read"),
    ],
)
def test_damaged_checkpoint_is_refused(monkeypatch, tmp_path, calib_ids, damage, match):
    ckpt = tmp_path / "ckpt"
    _partial(monkeypatch, ckpt, calib_ids)
    target = {
        "flip x_q": "window_0.x_q.bin",
        "truncate x_fp": "window_0.x_fp.bin",
        "delete block": "block_0.safetensors",
        "flip window": "window_0.safetensors",
        "truncate state.json": "state.json",
    }[damage]
    p = ckpt / target
    data = bytearray(p.read_bytes())
    if damage.startswith("flip"):
        data[len(data) // 2] ^= 0x10
        p.write_bytes(bytes(data))
    elif damage.startswith("truncate"):
        p.write_bytes(bytes(data[: len(data) // 2]))
    else:
        p.unlink()
    with pytest.raises(CheckpointError, match=match):
        calibrate(tiny_llama(layers=3).eval(), _cfg(checkpoint_dir=str(ckpt)), calib_ids, progress=False)


def test_resume_bit_identical_with_biases_act_quant_and_disk_streams(monkeypatch, tmp_path, calib_ids):
    """Qwen2 (q/k/v biases), W2A8 (learned activation clipping, explicit CFP input scales), streams on disk."""
    kw = dict(act_bits=8, activation_storage="disk")
    full = tiny_qwen2(layers=4)
    calibrate(full, _cfg(**kw), calib_ids, progress=False)
    ckpt = tmp_path / "ckpt"
    with monkeypatch.context() as m:
        _interrupt_at(m, 2)
        with pytest.raises(_Interrupted):
            calibrate(tiny_qwen2(layers=4), _cfg(checkpoint_dir=str(ckpt), **kw), calib_ids, progress=False)
    resumed = tiny_qwen2(layers=4)
    rep = calibrate(resumed, _cfg(checkpoint_dir=str(ckpt), **kw), calib_ids, progress=False)
    assert rep["resumed_from_window"] == 2
    ref, got = _bits(full.state_dict()), _bits(resumed.state_dict())
    assert sorted(got) == sorted(ref)
    assert [k for k in ref if ref[k] != got[k]] == []


def test_finished_run_reloads_without_training(monkeypatch, tmp_path, calib_ids):
    """Rerunning a finished calibration restores every block from the folder and trains nothing."""
    ckpt = tmp_path / "ckpt"
    first = tiny_llama(layers=3).eval()
    calibrate(first, _cfg(checkpoint_dir=str(ckpt)), calib_ids, progress=False)
    calls = []
    real = cbq._train_window
    monkeypatch.setattr(cbq, "_train_window", lambda win, *a, **k: calls.append(win.index) or real(win, *a, **k))
    again = tiny_llama(layers=3).eval()
    rep = calibrate(again, _cfg(checkpoint_dir=str(ckpt)), calib_ids, progress=False)
    assert calls == [] and rep["resumed_from_window"] == 2
    ref, got = _bits(first.state_dict()), _bits(again.state_dict())
    assert [k for k in ref if ref.get(k) != got.get(k)] == [] and sorted(ref) == sorted(got)


def test_resume_bit_identical_lobcq(monkeypatch, tmp_path, calib_ids):
    """The LO-BCQ calibration (format="lobcq", W4A4) resumes bit for bit too (its sims are rebuilt by type)."""
    kw = dict(format="lobcq", bits=4, act_bits=4, group_size=-1)
    full = tiny_llama(layers=3).eval()
    calibrate(full, _cfg(**kw), calib_ids, progress=False)
    ckpt = tmp_path / "ckpt"
    with monkeypatch.context() as m:
        _interrupt_at(m, 1)
        with pytest.raises(_Interrupted):
            calibrate(tiny_llama(layers=3).eval(), _cfg(checkpoint_dir=str(ckpt), **kw), calib_ids, progress=False)
    resumed = tiny_llama(layers=3).eval()
    assert (
        calibrate(resumed, _cfg(checkpoint_dir=str(ckpt), **kw), calib_ids, progress=False)["resumed_from_window"] == 1
    )
    ref, got = _bits(full.state_dict()), _bits(resumed.state_dict())
    assert sorted(got) == sorted(ref) and [k for k in ref if ref[k] != got[k]] == []


def test_identity_leaves_out_unset_fields_added_later(calib_ids):
    """A checkpoint written before `smooth_alpha` existed has no such key; with the field at its default the
    identity must still match (and must not once it is set)."""
    from cbq_hf.calibration.checkpoint import run_identity

    model = tiny_llama(layers=2)
    plain = run_identity(CBQConfig(act_bits=4), calib_ids, model, 2)
    assert "smooth_alpha" not in plain["config"]
    smoothed = run_identity(CBQConfig(act_bits=4, smooth_alpha=0.5), calib_ids, model, 2)
    assert smoothed["config"]["smooth_alpha"] == 0.5 and smoothed != plain
    assert "token_normalized_loss" not in plain["config"]
    normalized = run_identity(CBQConfig(act_bits=4, token_normalized_loss=True), calib_ids, model, 2)
    assert normalized["config"]["token_normalized_loss"] is True and normalized != plain
