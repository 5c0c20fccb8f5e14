"""Bad-input sweep: every CBQConfig field with wrong types and out-of-range values, incompatible combinations,
bad calibration data and models without decoder blocks. Each must raise a clear `ValueError` naming the field or
input; nothing else (TypeError, AttributeError, a crash) is acceptable.

The counts of what was tried are printed at the end of the module (``pytest -s tests/test_bad_inputs.py``).
"""

from __future__ import annotations

import collections

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cbq_hf import CBQConfig

COUNTS: collections.Counter = collections.Counter()

# Field -> (strategy of VALID values, type family) used to generate invalid ones.
INT_FIELDS = {
    "bits": {2, 3, 4, 8},
    "nsamples": None,
    "seqlen": None,
    "seed": None,
    "window_size": None,
    "epochs": None,
    "batch_size": None,
    "lora_rank": None,
    "lobcq_block_len": None,
    "lobcq_array_len": None,
    "lobcq_num_codebooks": None,
    "lobcq_codebook_bits": None,
    "lobcq_iters": None,
    "group_size": None,
    "window_overlap": None,
}
FLOAT_FIELDS = [
    "lr",
    "lr_scale",
    "loss_weight_accumulated",
    "loss_weight_homologous",
    "kl_weight",
    "rounding_reg_weight",
    "beta_start",
    "beta_end",
    "cfp_lambda1",
    "cfp_lambda2",
    "cfp_alpha",
]
BOOL_FIELDS = [
    "sym",
    "use_cfp",
    "use_lora_rounding",
    "learn_weight_scales",
    "learn_act_clipping",
    "use_homologous",
    "use_kl",
]
CHOICE_FIELDS = {
    "method": ["rtn", "cbq"],
    "format": ["uniform", "lobcq"],
    "lobcq_codebooks": ["universal", "per_layer"],
    "activation_storage": ["cpu", "disk"],
}

wrong_type = st.one_of(
    st.text(max_size=5),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=2), st.integers(), max_size=1),
    st.just(object()),
    st.complex_numbers(allow_nan=False),
)


def _expect_field_error(field: str, value) -> None:
    COUNTS["config inputs tried"] += 1
    try:
        CBQConfig(**{field: value})
    except ValueError as e:
        assert f"`{field}`" in str(e) or field in str(e), f"error for {field}={value!r} does not name it: {e}"
        COUNTS["clear errors"] += 1
        return
    except Exception as e:  # any other exception type is a crash, not a clear error
        COUNTS["crashes"] += 1
        raise AssertionError(f"{field}={value!r} raised {type(e).__name__}: {e}") from e
    raise AssertionError(f"{field}={value!r} was accepted")


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    field=st.sampled_from(sorted(INT_FIELDS) + FLOAT_FIELDS + BOOL_FIELDS + sorted(CHOICE_FIELDS)), value=wrong_type
)
def test_wrong_types_are_refused(field, value):
    if field in FLOAT_FIELDS and isinstance(value, complex):
        value = value  # complex is not a real number: still invalid
    if field in CHOICE_FIELDS and value in CHOICE_FIELDS[field]:
        return  # a short random text that happens to be a valid choice
    _expect_field_error(field, value)


@pytest.mark.parametrize("value", ["gpu", "", "CPU", "mmap", None, 1, True, ["cpu"], {"disk": 1}])
def test_activation_storage_is_cpu_or_disk(value):
    _expect_field_error("activation_storage", value)


@settings(max_examples=10, deadline=None)
@given(value=st.one_of(st.integers(), st.lists(st.text(max_size=3), max_size=2), st.just(object()), st.booleans()))
def test_checkpoint_dir_must_be_a_path(value):
    _expect_field_error("checkpoint_dir", value)


@settings(max_examples=40, deadline=None)
@given(
    field=st.sampled_from(
        ["nsamples", "seqlen", "window_size", "batch_size", "lora_rank", "lobcq_block_len", "lobcq_iters"]
    ),
    value=st.integers(max_value=0),
)
def test_non_positive_counts_are_refused(field, value):
    if field == "seqlen" and value > 1:
        return
    _expect_field_error(field, value)


@settings(max_examples=30, deadline=None)
@given(value=st.integers(min_value=-1000, max_value=1000).filter(lambda b: b not in (2, 3, 4, 8)))
def test_unknown_bits_are_refused(value):
    _expect_field_error("bits", value)


@settings(max_examples=30, deadline=None)
@given(value=st.integers().filter(lambda a: a not in (4, 8)))
def test_unknown_act_bits_are_refused(value):
    _expect_field_error("act_bits", value)


@settings(max_examples=30, deadline=None)
@given(
    field=st.sampled_from(FLOAT_FIELDS),
    value=st.one_of(
        st.just(float("nan")),
        st.just(float("inf")),
        st.just(-float("inf")),
        st.floats(max_value=-1e-6, allow_nan=False, allow_infinity=False),
    ),
)
def test_non_finite_or_negative_numbers_are_refused(field, value):
    _expect_field_error(field, value)


@settings(max_examples=20, deadline=None)
@given(field=st.sampled_from(sorted(CHOICE_FIELDS)), value=st.text(min_size=1, max_size=8))
def test_unknown_choices_are_refused(field, value):
    if value in CHOICE_FIELDS[field]:
        return
    _expect_field_error(field, value)


@pytest.mark.parametrize(
    "kwargs,names",
    [
        (dict(window_size=2, window_overlap=2), "window_overlap"),
        (dict(window_size=1, window_overlap=3), "window_overlap"),
        (dict(format="lobcq", bits=2), "bits"),
        (dict(format="lobcq", act_bits=8), "act_bits"),
        (dict(lobcq_block_len=8, lobcq_array_len=60), "lobcq_array_len"),
        (dict(lobcq_num_codebooks=12), "lobcq_num_codebooks"),
        (dict(format_version=999), "format_version"),
        (dict(cfp_alpha=2.0), "cfp_alpha"),
    ],
    ids=lambda v: v if isinstance(v, str) else "-".join(f"{k}{w}" for k, w in v.items()),
)
def test_incompatible_combinations_name_the_fields(kwargs, names):
    COUNTS["config inputs tried"] += 1
    with pytest.raises(ValueError, match=names):
        CBQConfig(**kwargs)
    COUNTS["clear errors"] += 1


def test_group_size_larger_than_layer_names_the_layer(tmp_path):
    from helpers import tiny_llama
    from transformers import AutoModelForCausalLM

    tiny_llama().save_pretrained(tmp_path / "fp")
    COUNTS["model inputs tried"] += 1
    with pytest.raises(ValueError, match=r"group_size=512 is larger than the input size 64 of model\.layers\.0"):
        AutoModelForCausalLM.from_pretrained(
            tmp_path / "fp", quantization_config=CBQConfig(method="rtn", group_size=512)
        )
    COUNTS["clear errors"] += 1


@pytest.mark.parametrize(
    "payload,match",
    [
        (b"", "empty"),
        (b"\n\n   \n", "empty"),
        (bytes(range(256)) * 4, "binary"),
        ("caf\u00e9 \u00e0 la cr\u00e8me ".encode("latin-1") * 20, "UTF-8"),
        (b"tiny", "fewer than one sample"),
    ],
    ids=["empty", "whitespace", "binary", "latin1", "too-short"],
)
def test_bad_calibration_text(tmp_path, payload, match):
    from cbq_hf.data import CalibrationDataError, get_calibration_batches

    class Tok:
        bos_token_id = 0

        def __call__(self, text, add_special_tokens=False, return_tensors=None):
            return {"input_ids": [1 + ord(c) % 50 for c in text]}

    p = tmp_path / "calib.txt"
    p.write_bytes(payload)
    COUNTS["data inputs tried"] += 1
    with pytest.raises(CalibrationDataError, match=match):
        get_calibration_batches(str(p), Tok(), nsamples=2, seqlen=64, seed=0)
    COUNTS["clear errors"] += 1


def test_model_without_decoder_blocks():
    from cbq_hf.modeling import NoDecoderBlocksError, find_decoder_blocks

    class NoBlocks(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(4, 4)

    COUNTS["model inputs tried"] += 1
    with pytest.raises(NoDecoderBlocksError, match="NoBlocks has no recognisable decoder blocks"):
        find_decoder_blocks(NoBlocks())
    COUNTS["clear errors"] += 1


def teardown_module(module):
    tried = sum(v for k, v in COUNTS.items() if k.endswith("inputs tried"))
    print(
        f"\nbad-input sweep: {dict(COUNTS)}; inputs tried {tried}, errors clear {COUNTS['clear errors']}, "
        f"crashes {COUNTS['crashes']}"
    )
    assert COUNTS["crashes"] == 0
