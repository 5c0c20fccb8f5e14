"""Named calibration budgets: what a preset sets, what explicit fields override, how it round-trips."""

from __future__ import annotations

import pytest

from cbq_hf.config import CBQConfig
from cbq_hf.presets import DEFAULT_PRESET, PRESETS, estimate_message, estimated_seconds

BUDGET = ("nsamples", "seqlen", "epochs", "batch_size", "calibration_dtype", "e2e_epochs", "e2e_lr")


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_sets_its_fields(name):
    cfg = CBQConfig(preset=name)
    assert {k: getattr(cfg, k) for k in BUDGET} == PRESETS[name]
    assert cfg.preset == name


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_explicit_fields_override_the_preset(name):
    cfg = CBQConfig(preset=name, epochs=7, nsamples=3, e2e_lr=5e-4)
    assert (cfg.epochs, cfg.nsamples, cfg.e2e_lr) == (7, 3, 5e-4)
    assert (cfg.seqlen, cfg.batch_size) == (PRESETS[name]["seqlen"], PRESETS[name]["batch_size"])


def test_no_preset_gives_the_default_budget():
    cfg = CBQConfig()
    assert {k: getattr(cfg, k) for k in BUDGET} == PRESETS[DEFAULT_PRESET] and cfg.preset is None


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_gptq_start_and_end_to_end_stage_are_the_defaults_for_cbq_on_the_uniform_grid(name):
    cfg = CBQConfig(preset=name)
    assert (cfg.rounding_init, cfg.e2e_epochs) == ("gptq", PRESETS[name]["e2e_epochs"]) and cfg.e2e_epochs > 0
    explicit = CBQConfig(preset=name, rounding_init="rtn", e2e_epochs=0)
    assert (explicit.rounding_init, explicit.e2e_epochs) == ("rtn", 0)


@pytest.mark.parametrize(
    "fields", [dict(method="rtn"), dict(format="lobcq", bits=4, act_bits=4, group_size=-1, method="cbq")]
)
def test_where_they_do_not_apply_the_defaults_turn_them_off(fields):
    cfg = CBQConfig(**fields)
    assert (cfg.rounding_init, cfg.e2e_epochs) == ("rtn", 0)
    if fields["method"] == "rtn":  # no rounding to start
        with pytest.raises(ValueError, match="rounding_init='gptq'"):
            CBQConfig(rounding_init="gptq", **fields)
    else:  # LO-BCQ's GPTQ start is opt-in
        assert CBQConfig(rounding_init="gptq", **fields).rounding_init == "gptq"


def test_unknown_preset_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="preset.*'turbo'.*balanced"):
        CBQConfig(preset="turbo")


def test_preset_round_trips_through_the_saved_config():
    cfg = CBQConfig(preset="fast", epochs=3)
    again = CBQConfig.from_dict(cfg.to_dict())
    assert {k: getattr(again, k) for k in (*BUDGET, "preset")} == {k: getattr(cfg, k) for k in (*BUDGET, "preset")}


def test_cpu_presets_train_in_bfloat16_where_the_cpu_has_it_and_an_explicit_dtype_wins():
    assert CBQConfig(preset="fast").calibration_dtype == "auto"
    assert CBQConfig().calibration_dtype == "float32"
    assert CBQConfig(preset="balanced", calibration_dtype="float32").calibration_dtype == "float32"


def test_calibration_dtype_is_validated():
    assert CBQConfig(calibration_dtype="auto").calibration_dtype == "auto"
    with pytest.raises(ValueError, match="calibration_dtype"):
        CBQConfig(calibration_dtype="float16")


def test_estimate_names_the_faster_presets_only():
    msg = estimate_message(CBQConfig(preset="gpu"), seconds_per_window=60, windows_left=29)
    assert "29 min left" in msg and "'fast'" in msg and "'balanced'" in msg and "'gpu'" not in msg
    assert "faster" not in estimate_message(CBQConfig(preset="fast"), seconds_per_window=5, windows_left=2)


def test_estimate_names_the_end_to_end_stage_when_it_runs():
    assert "end-to-end stage (64 full-model steps)" in estimate_message(CBQConfig(preset="balanced"), 5, 2)
    assert "end-to-end" not in estimate_message(CBQConfig(preset="balanced", e2e_epochs=0), 5, 2)


def test_estimate_adds_the_end_to_end_stage_from_the_window_time_when_the_blocks_are_known():
    # balanced: 4 epochs x 16 batches = 64 steps per window -> 1 s per window step; a full-model step runs
    # 30 / 2 = 15 windows' worth of blocks on the same tokens: 64 stage steps x 15 s = 960 s
    config = CBQConfig(preset="balanced")
    assert config.window_size == 2
    msg = estimate_message(config, seconds_per_window=64, windows_left=2, num_blocks=30)
    assert "end-to-end stage (64 full-model steps, ~16 min): ~18 min in all" in msg
    # fast: half the window tokens (64 s) and 16 stage steps of the same size (240 s)
    assert "preset 'fast' ~5 min" in msg
    assert estimated_seconds(config, 64, 2, num_blocks=30) == pytest.approx(128 + 960)
    # without the stage, neither the stage nor its time is counted, for this run or the faster presets
    off = CBQConfig(preset="balanced", e2e_epochs=0)
    assert estimated_seconds(off, 64, 2, num_blocks=30) == pytest.approx(128)
    assert "preset 'fast' ~64 s" in estimate_message(off, 64, 2, num_blocks=30)
