import json

import pytest

from cbq_hf import CBQConfig


@pytest.mark.parametrize(
    "field,value",
    [
        ("bits", 5),
        ("bits", "4"),
        ("bits", True),
        ("group_size", 0),
        ("group_size", -2),
        ("group_size", 1.5),
        ("sym", "yes"),
        ("act_bits", 16),
        ("act_bits", 2),
        ("method", "gptq"),
        ("format", "nf4"),
        ("nsamples", 0),
        ("seqlen", 1),
        ("seed", -1),
        ("window_size", 0),
        ("epochs", -1),
        ("lr", float("nan")),
        ("lora_rank", 0),
        ("cfp_alpha", 1.5),
        ("beta_end", 0.0),
        ("dataset", []),
        ("dataset", [1, 2]),
        ("dataset", ""),
        ("dataset", 3.0),
        ("modules_to_not_convert", [""]),
        ("lobcq_num_codebooks", 12),
        ("lobcq_codebooks", "global"),
        ("calibration_device", ""),
        ("smooth_alpha", 0.0),
        ("smooth_alpha", 1.0),
        ("smooth_alpha", "0.5"),
        ("smooth_alpha", "best"),
        ("token_normalized_loss", "yes"),
        ("lr_norm", -1e-3),
        ("lr_norm", "1e-3"),
    ],
)
def test_invalid_field_names_the_field(field, value):
    with pytest.raises(ValueError, match=f"`{field}`"):
        CBQConfig(**{field: value})


def test_overlap_must_be_smaller_than_window():
    with pytest.raises(ValueError, match="window_overlap"):
        CBQConfig(window_size=2, window_overlap=2)


def test_lobcq_requires_4_bits_and_a4():
    with pytest.raises(ValueError, match="lobcq"):
        CBQConfig(format="lobcq", bits=2)
    with pytest.raises(ValueError, match="act_bits"):
        CBQConfig(format="lobcq", act_bits=8)


def test_smooth_alpha_needs_activation_quantization_and_calibration():
    with pytest.raises(ValueError, match="act_bits"):
        CBQConfig(smooth_alpha=0.5)
    with pytest.raises(ValueError, match="method='cbq'"):
        CBQConfig(smooth_alpha=0.5, act_bits=4, method="rtn")
    assert CBQConfig(smooth_alpha=0.5, act_bits=4).smooth_alpha == 0.5
    assert CBQConfig(smooth_alpha="auto", act_bits=8).smooth_alpha == "auto"


def test_lr_norm_needs_calibration():
    with pytest.raises(ValueError, match="method='cbq'"):
        CBQConfig(lr_norm=1e-3, method="rtn")
    assert CBQConfig(lr_norm=1e-3).lr_norm == 1e-3 and CBQConfig(method="rtn").lr_norm == 0.0


def test_unknown_field_is_refused():
    with pytest.raises(ValueError, match="unknown field"):
        CBQConfig(bitz=4)


def test_newer_format_version_is_refused():
    with pytest.raises(ValueError, match="upgrade"):
        CBQConfig(format_version=99)


def test_json_round_trip_drops_tokenizer_and_describes_in_memory_data():
    cfg = CBQConfig(
        bits=2,
        group_size=64,
        act_bits=8,
        dataset=["a b c", "d e"],
        tokenizer=object(),
        modules_to_not_convert=["mlp.down_proj"],
    )
    d = cfg.to_dict()
    text = json.dumps(d)  # JSON-safe
    assert "tokenizer" not in d
    assert d["dataset"] == "<2 in-memory texts>"
    back = CBQConfig(**json.loads(text))
    assert back.to_dict() == d
    assert back.quant_method == "cbq"


def test_slot_bits_for_3_bit():
    assert CBQConfig(bits=3).slot_bits == 4
    assert CBQConfig(bits=2).slot_bits == 2
