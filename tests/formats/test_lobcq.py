import math

import pytest
import torch
from helpers import sqnr_db

import cbq_hf
from cbq_hf.formats.lobcq import (
    LOBCQFormat,
    LOBCQSpec,
    decode,
    e4m3_decode,
    encode,
    fake_quantize,
    pack_bits,
    unpack_bits,
)
from cbq_hf.formats.lobcq_codebooks import (
    _shipped_sets,
    build_lut,
    design_codebooks,
    encode_blocks,
    lloyd_max,
    universal_codebooks,
    universal_key,
)

SMALL = LOBCQSpec(block_len=4, array_len=16, num_codebooks=4, codebook_bits=6)
DEFAULT = LOBCQSpec()


def _random_codebooks(nc: int, cmax: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-cmax, cmax + 1, (nc, 16), generator=g).sort(-1).values.to(torch.int8)


# ---------------------------------------------------------------------------------------------- straightforward refs
def _loop_encode(x: torch.Tensor, cb: torch.Tensor, spec: LOBCQSpec, per_row: bool):
    """Plain-loop reference of scaling, codebook choice and decoding of X [R, K]; returns (x_hat, sel, idx)."""
    r, k = x.shape
    cbf = cb.float()
    cmax = spec.cmax
    amax = [
        [
            max(
                (abs(float(x[i, j])) for j in range(a * spec.array_len, min(k, (a + 1) * spec.array_len))), default=0.0
            )
            for a in range(spec.num_arrays(k))
        ]
        for i in range(r)
    ]
    if per_row:
        ts = [max(max(row), 0.0) / (cmax * 448.0) for row in amax]
    else:
        ts = [max(max(row) for row in amax) / (cmax * 448.0)] * r
    out = torch.zeros(r, k)
    sel = torch.zeros(r, spec.num_blocks(k), dtype=torch.long)
    idx = torch.zeros(r, k, dtype=torch.long)
    for i in range(r):
        t = torch.tensor(max(ts[i], 1e-30), dtype=torch.float32)
        for a in range(spec.num_arrays(k)):
            code = (torch.tensor(amax[i][a]) / (cmax * t)).clamp(0, 448).to(torch.float8_e4m3fn)
            real = code.float() * t
            for b in range(a * spec.array_len // spec.block_len, (a + 1) * spec.array_len // spec.block_len):
                cols = [c for c in range(b * spec.block_len, (b + 1) * spec.block_len) if c < k]
                if not cols:
                    continue
                y = [float(x[i, c] / real) if real > 0 else 0.0 for c in cols]
                best = None
                for c_id in range(cb.shape[0]):
                    choice = [int(torch.argmin((torch.tensor(v) - cbf[c_id]).abs())) for v in y]
                    err = sum((v - float(cbf[c_id, e])) ** 2 for v, e in zip(y, choice))
                    if best is None or err < best[0]:
                        best = (err, c_id, choice)
                sel[i, b] = best[1]
                for c, e in zip(cols, best[2]):
                    idx[i, c] = e
                    out[i, c] = cbf[best[1], e] * real
    return out, sel, idx


# ---------------------------------------------------------------------------------------------- codebook math
@pytest.mark.parametrize("bits", range(1, 9), ids=lambda b: f"b{b}")
def test_pack_bits_round_trip(bits):
    codes = torch.randint(0, 2**bits, (5, 13), dtype=torch.uint8)
    packed = pack_bits(codes, bits)
    assert packed.shape == (5, math.ceil(13 * bits / 8))
    assert torch.equal(unpack_bits(packed, bits, 13), codes)


def test_lut_nearest_entry_matches_argmin_including_ties_and_out_of_range():
    cb = torch.tensor([[-31, -20, -20, -3, 0, 1, 2, 4, 5, 9, 12, 13, 20, 25, 30, 31]], dtype=torch.int8)
    lut = build_lut(cb, 31)
    y = torch.cat([torch.linspace(-40, 40, 2001), torch.arange(-64, 65) / 2.0])  # every half-integer boundary
    q = lut.values[0, lut.slots(y)]
    idx = lut.index[0, lut.slots(y)]
    ref = (y[:, None] - cb.float()).abs().argmin(1)  # first minimum = the smaller entry on ties
    assert torch.equal(idx, ref)
    assert torch.equal(q, cb.float()[0, ref])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_encode_blocks_matches_loop_over_codebooks(seed):
    g = torch.Generator().manual_seed(seed)
    y = (torch.randn(50, 8, generator=g) * 12).round(decimals=1)  # rounding creates exact ties
    cb = _random_codebooks(5, 31, seed).float()
    valid = torch.rand(50, 8, generator=g) > 0.2
    sel, idx, err = encode_blocks(y, cb, 31, valid)
    errs = torch.stack([(((y[:, :, None] - cb[c]).abs().min(-1).values ** 2) * valid).sum(1) for c in range(5)], 1)
    assert torch.equal(sel, errs.argmin(1))
    assert torch.allclose(err, errs.min(1).values)
    ref_idx = (y[:, :, None] - cb[sel][:, None, :]).abs().argmin(-1)
    assert torch.equal(idx[valid], ref_idx[valid])


@pytest.mark.parametrize("dist", ["gaussian", "laplace", "student"])
def test_lobcq_iteration_never_increases_mse(dist):
    g = torch.Generator().manual_seed(0)
    x = {
        "gaussian": torch.randn(400, 16, generator=g),
        "laplace": torch.distributions.Laplace(0.0, 1.0).sample((400, 16)),
        "student": torch.distributions.StudentT(3.0).sample((400, 16)),
    }[dist]
    y = x / x.abs().amax(1, keepdim=True) * 31
    y = y.reshape(-1, 4)
    res = design_codebooks(y, 4, 31, iters=15, tol=0.0)
    h = res.mse_history
    assert len(h) >= 2
    assert all(b <= a * (1 + 1e-9) for a, b in zip(h, h[1:])), h
    assert h[-1] < h[0]
    cb = res.codebooks
    assert torch.equal(cb, cb.round()) and torch.equal(cb, cb.sort(-1).values) and cb.abs().max() <= 31
    # recorded MSE is the MSE of encoding with the returned codebooks
    assert math.isclose(float(encode_blocks(y, cb, 31)[2].double().sum()) / y.numel(), h[-1], rel_tol=1e-6)


def test_lobcq_from_a_bad_start_improves_and_stays_monotone():
    y = (torch.randn(2000, 8) * 8).clamp(-31, 31)
    bad = torch.linspace(-31, 31, 16).round().repeat(8, 1)
    res = design_codebooks(y, 8, 31, iters=10, init=bad, tol=0.0)
    h = res.mse_history
    assert all(b <= a * (1 + 1e-9) for a, b in zip(h, h[1:]))
    assert h[-1] < 0.5 * h[0]


def test_lloyd_max_reaches_a_fixed_point_of_centroids():
    v = torch.randn(5000)
    c = lloyd_max(v, torch.linspace(-2, 2, 16), 200)
    cell = (v[:, None] - c).abs().argmin(1)
    for i in range(16):
        if (cell == i).any():
            assert abs(float(v[cell == i].mean()) - float(c[i])) < 1e-4


# ---------------------------------------------------------------------------------------------- encode / decode
@pytest.mark.parametrize("shape", [(3, 16), (2, 37), (4, 70)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("per_row", [False, True], ids=["weight", "act"])
def test_encode_decode_equals_loop_reference(shape, per_row):
    x = torch.randn(*shape) * torch.rand(shape[0], 1) * 3
    x[0, :5] *= 20  # outliers: small arrays elsewhere
    cb = _random_codebooks(SMALL.num_codebooks, SMALL.cmax)
    c = encode(x, cb, SMALL, per_row=per_row)
    got = decode(c.index, c.selector, c.scale_codes, c.tensor_scale, cb, SMALL)
    ref, sel, idx = _loop_encode(x, cb, SMALL, per_row)
    assert torch.equal(c.selector.long(), sel)
    assert torch.equal(c.index.long(), idx)
    assert torch.allclose(got, ref, rtol=1e-6, atol=0)


def test_scale_codes_are_e4m3_and_array_maximum_lands_on_cmax():
    x = torch.randn(8, 128)
    c = encode(x, universal_codebooks(8, 64, 16, 6), DEFAULT)
    s = e4m3_decode(c.scale_codes) * c.tensor_scale
    amax = x.abs().view(8, 2, 64).amax(-1)
    ratio = amax / s / DEFAULT.cmax
    assert bool(((ratio - 1).abs() <= 1 / 16 + 1e-6).all())  # E4M3 keeps 3 mantissa bits
    assert float((e4m3_decode(c.scale_codes)).max()) == 448.0  # the tensor's largest array uses the full range


def test_zero_tensor_encodes_to_zero():
    x = torch.zeros(2, 64)
    assert torch.equal(fake_quantize(x, universal_codebooks(8, 64, 16, 6), DEFAULT), x)


# ---------------------------------------------------------------------------------------------- the format
@pytest.mark.parametrize("mode", ["universal", "per_layer"])
@pytest.mark.parametrize("k", [64, 100, 576], ids=lambda k: f"k{k}")
def test_format_buffers_match_specs_and_dequantize_equals_simulation(mode, k):
    fmt = LOBCQFormat(DEFAULT, act_bits=4, codebooks=mode, iters=3)
    w = torch.randn(24, k) * 0.05
    bufs = fmt.quantize_rtn(w)
    specs = fmt.buffer_specs(24, k)
    assert set(bufs) == set(specs)
    for name, (shape, dtype) in specs.items():
        assert bufs[name].shape == shape and bufs[name].dtype == dtype, name
    wq = fmt.dequantize(bufs, k)
    assert torch.equal(wq, fake_quantize(w, bufs["codebooks"], DEFAULT))
    assert sqnr_db(w, wq) > 18
    if mode == "universal":
        assert torch.equal(bufs["codebooks"], fmt.universal())
    assert torch.equal(bufs["act_codebooks"], fmt.universal())


def test_per_layer_codebooks_never_worse_than_universal_on_their_layer():
    w = torch.distributions.StudentT(4.0).sample((64, 256))
    uni = LOBCQFormat(DEFAULT, None, "universal").quantize_rtn(w)
    per = LOBCQFormat(DEFAULT, None, "per_layer", iters=5).quantize_rtn(w)
    e_uni = (LOBCQFormat(DEFAULT, None).dequantize(uni, 256) - w).pow(2).sum()
    e_per = (LOBCQFormat(DEFAULT, None).dequantize(per, 256) - w).pow(2).sum()
    assert e_per <= e_uni


@pytest.mark.parametrize(
    "spec",
    [DEFAULT, SMALL, LOBCQSpec(8, 64, 8, 6), LOBCQSpec(8, 32, 1, 5)],
    ids=lambda s: f"L{s.block_len}-A{s.array_len}-N{s.num_codebooks}-B{s.codebook_bits}",
)
@pytest.mark.parametrize("act_bits", [None, 4], ids=["w4a16", "w4a4"])
def test_bits_per_value_formula_matches_stored_bytes(spec, act_bits):
    fmt = LOBCQFormat(spec, act_bits=act_bits)
    n, k = 16, 256  # K a multiple of La and of 8 / selector bits: no padding anywhere
    cb = _random_codebooks(spec.num_codebooks, spec.cmax)
    bufs = fmt.pack(encode(torch.randn(n, k), cb, spec), cb, act_codebooks=cb)
    stored_bits = sum(t.numel() * t.element_size() * 8 for t in bufs.values())
    per_layer = 32 + (2 if act_bits else 1) * spec.num_codebooks * 16 * 8  # s_t + codebooks
    assert stored_bits == n * k * spec.nominal_bits_per_value() + per_layer
    assert fmt.bits_per_weight(n, k) == stored_bits / (n * k)
    if spec == DEFAULT:
        assert spec.nominal_bits_per_value() == 4.625


def test_activation_quantization_matches_loop_reference_and_is_per_token():
    fmt = LOBCQFormat(SMALL, act_bits=4)
    cb = _random_codebooks(SMALL.num_codebooks, SMALL.cmax, 3)
    x = torch.randn(2, 3, 37) * 2
    got = fmt.quantize_activations(x, {"act_codebooks": cb})
    ref = _loop_encode(x.reshape(6, 37), cb, SMALL, per_row=True)[0].reshape(2, 3, 37)
    assert got.shape == x.shape and got.dtype == x.dtype
    assert torch.allclose(got, ref, rtol=1e-6, atol=0)
    # per-token: a token's encoding does not depend on the other tokens of the batch
    alone = fmt.quantize_activations(x[1:, 2:].clone(), {"act_codebooks": cb})
    assert torch.equal(alone, got[1:, 2:])


def test_activation_memo_reuses_same_input_and_sees_in_place_changes():
    fmt = LOBCQFormat(DEFAULT, act_bits=4)
    bufs = {"act_codebooks": fmt.universal()}
    x = torch.randn(4, 64)
    a = fmt.quantize_activations(x, bufs)
    assert fmt.quantize_activations(x, bufs) is a
    x.mul_(2)
    b = fmt.quantize_activations(x, bufs)
    assert b is not a and torch.allclose(b, 2 * a)
    other = {"act_codebooks": _random_codebooks(16, 31)}
    assert not torch.equal(fmt.quantize_activations(x, other), b)


def test_activations_under_inference_mode_are_encoded_without_the_memo():
    """Inference tensors have no version counter: encoding them must work (it raised) and see in-place changes."""
    fmt = LOBCQFormat(DEFAULT, act_bits=4)
    bufs = {"act_codebooks": fmt.universal()}
    x = torch.randn(4, 64)
    expected = fmt.quantize_activations(x.clone(), bufs)
    with torch.inference_mode():
        xi = x.clone()
        assert torch.equal(fmt.quantize_activations(xi, bufs), expected)
        xi.mul_(2)
        assert torch.allclose(fmt.quantize_activations(xi, bufs), 2 * expected)


def test_weight_only_leaves_activations_untouched():
    fmt = LOBCQFormat(DEFAULT, act_bits=None)
    x = torch.randn(3, 64)
    assert fmt.quantize_activations(x, {}) is x
    assert "act_codebooks" not in fmt.buffer_specs(8, 64)


@pytest.mark.parametrize("array_len", [64, 32])
def test_shipped_universal_codebooks_are_valid(array_len, caplog):
    """The default spec and the 32-value arrays variant ship designed sets (no Gaussian fallback warning)."""
    sets = _shipped_sets()
    key = universal_key(8, array_len, 16, 6)
    assert key in sets
    with caplog.at_level("WARNING"):
        cb = universal_codebooks(8, array_len, 16, 6)
    assert "designing a set from Gaussian samples" not in caplog.text
    assert torch.equal(cb, torch.tensor(sets[key]["codebooks"], dtype=torch.int8))
    assert cb.shape == (16, 16) and cb.dtype == torch.int8
    assert torch.equal(cb, cb.sort(-1).values) and int(cb.abs().max()) <= 31


def test_config_builds_the_lobcq_format():
    cfg = cbq_hf.CBQConfig(method="rtn", format="lobcq", act_bits=4, lobcq_codebooks="per_layer", lobcq_iters=3)
    from cbq_hf.formats import get_format

    fmt = get_format(cfg)
    assert isinstance(fmt, LOBCQFormat) and fmt.codebooks_mode == "per_layer" and fmt.act_bits == 4
    assert fmt.spec == DEFAULT


# ---------------------------------------------------------------------------------------------- end to end
@pytest.mark.parametrize(
    "mode,act_bits,array_len",
    [("universal", 4, 64), ("per_layer", 4, 64), ("universal", None, 64), ("universal", 4, 32)],
    ids=["universal-w4a4", "per_layer-w4a4", "universal-w4a16", "universal-w4a4-a32"],
)
def test_tiny_llama_quantize_save_reload_generate(tmp_path, llama_dir, mode, act_bits, array_len):
    from transformers import AutoModelForCausalLM

    from cbq_hf.nn.linear import CBQLinear

    cfg = cbq_hf.CBQConfig(
        method="rtn",
        format="lobcq",
        act_bits=act_bits,
        group_size=-1,
        lobcq_codebooks=mode,
        lobcq_iters=3,
        lobcq_array_len=array_len,
    )
    model = AutoModelForCausalLM.from_pretrained(llama_dir, quantization_config=cfg)
    ref = AutoModelForCausalLM.from_pretrained(llama_dir)
    ids = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        logits = model(ids).logits
        fp = ref(ids).logits
    assert sqnr_db(fp, logits) > 10
    q = [m for m in model.modules() if isinstance(m, CBQLinear)]
    assert len(q) == 14 and all(m.fmt.name == "lobcq" for m in q)
    if mode == "per_layer":  # at least one layer got its own codebooks
        assert any(not torch.equal(m.codebooks, q[0].fmt.universal()) for m in q)
    if act_bits is not None:  # the shipped universal set of this spec encodes the activations
        shipped = universal_codebooks(8, array_len, 16, 6)
        assert all(m.fmt.spec.array_len == array_len and torch.equal(m.act_codebooks, shipped) for m in q)
    model.save_pretrained(tmp_path / "q")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    for a, b in zip(q, [m for m in back.modules() if isinstance(m, CBQLinear)]):
        assert torch.equal(a.codebooks, b.codebooks)
    with torch.no_grad():
        assert torch.equal(back(ids).logits, logits)
    out = back.generate(ids[:1, :4], max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 8)
    assert back.config.quantization_config.format == "lobcq"
    assert back.config.quantization_config.lobcq_array_len == array_len
