"""Window loss: MSE + KL distance, accumulated and homologous terms."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cbq_hf.calibration.loss import distance, window_loss


def test_distance_zero_on_equal_inputs():
    h = torch.randn(2, 5, 16)
    assert float(distance(h, h, 1.0)) == pytest.approx(0.0, abs=1e-6)


def test_distance_is_mse_without_kl():
    a, b = torch.randn(2, 5, 16), torch.randn(2, 5, 16)
    assert float(distance(a, b, 0.0)) == pytest.approx(float(F.mse_loss(a, b)), rel=1e-6)


def test_kl_part_matches_definition():
    a, b = torch.randn(3, 16), torch.randn(3, 16)
    p, q = a.softmax(-1), b.softmax(-1)
    kl = (p * (p.log() - q.log())).sum(-1).mean()
    got = distance(a, b, 2.0) - distance(a, b, 0.0)
    assert float(got) == pytest.approx(2.0 * float(kl), rel=1e-5)
    assert float(kl) > 0


def test_window_loss_terms():
    q, t_fp, t_q = torch.randn(2, 4, 8), torch.randn(2, 4, 8), torch.randn(2, 4, 8)
    acc = distance(q, t_fp, 0.5)
    hom = distance(q, t_q, 0.5)
    assert float(window_loss(q, t_fp, t_q, 1.0, 2.0, 0.5)) == pytest.approx(float(acc + 2 * hom), rel=1e-6)
    assert float(window_loss(q, t_fp, None, 1.0, 2.0, 0.5)) == pytest.approx(float(acc), rel=1e-6)
    assert float(window_loss(q, t_fp, t_q, 1.0, 0.0, 0.5)) == pytest.approx(float(acc), rel=1e-6)


def test_gradient_reaches_quantized_output_only():
    q = torch.randn(2, 4, 8, requires_grad=True)
    t = torch.randn(2, 4, 8)
    window_loss(q, t, t.clone(), 1.0, 1.0, 1.0).backward()
    assert q.grad is not None and q.grad.abs().sum() > 0


def test_token_normalized_distance_weighs_each_token_by_its_relative_error():
    torch.manual_seed(0)
    target = torch.randn(1, 6, 32)
    target[0, 0] *= 1000.0  # one massive token (an attention sink)
    err = 0.1 * torch.randn(1, 6, 32)
    ms = target.pow(2).mean(-1)  # [1, 6]
    rel = err.pow(2).mean(-1) / ms
    want = rel.mean() * ms.flatten().median()
    assert float(distance(target + err, target, 0.0, token_normalized=True)) == pytest.approx(float(want), rel=1e-5)
    # plain MSE: the same absolute error on the massive token counts as much as elsewhere, its relative error is
    # 10^6 times smaller; normalised, moving the error onto it costs almost nothing
    moved = err.clone()
    moved[0, 0] *= 30.0
    plain_ratio = float(distance(target + moved, target, 0.0) / distance(target + err, target, 0.0))
    norm_ratio = float(
        distance(target + moved, target, 0.0, token_normalized=True)
        / distance(target + err, target, 0.0, token_normalized=True)
    )
    assert plain_ratio > 50 and norm_ratio < 1.01


def test_token_normalized_distance_is_mse_for_tokens_of_equal_magnitude():
    target = torch.randn(2, 5, 16)
    target = target / target.pow(2).mean(-1, keepdim=True).sqrt() * 3.0  # every token mean square 9
    q = target + 0.2 * torch.randn(2, 5, 16)
    assert float(distance(q, target, 0.0, token_normalized=True)) == pytest.approx(
        float(F.mse_loss(q, target)), rel=1e-5
    )


def test_token_normalized_distance_survives_an_all_zero_token():
    target = torch.randn(1, 4, 8)
    target[0, 2] = 0.0
    out = distance(target.clone(), target, 0.0, token_normalized=True)
    assert torch.isfinite(out) and float(out) == 0.0
    window = window_loss(target + 0.1, target, target, 1.0, 1.0, 0.0, token_normalized=True)
    assert torch.isfinite(window) and float(window) > 0
