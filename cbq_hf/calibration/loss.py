"""Reconstruction loss of a window: accumulated and homologous terms, each MSE + KL over the hidden dimension."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def distance(h1: torch.Tensor, h2: torch.Tensor, kl_weight: float, token_normalized: bool = False) -> torch.Tensor:
    """E(h1, h2) = mean squared error + kl_weight * KL(softmax(h1) || softmax(h2)).

    The MSE is the mean over all elements; the KL is taken over the last (hidden) dimension and averaged over
    tokens, so neither depends on batch size or sequence length. `h1` is the quantized output, `h2` the target.
    With `token_normalized`, each token's squared error is divided by the token's mean square in `h2` and the mean
    multiplied by the median of those mean squares over the batch's tokens: every token weighs by its relative
    error, and for tokens of equal magnitude the value equals the plain MSE.
    """
    diff2 = (h1.float() - h2.float()).pow(2)
    if token_normalized:
        ms = h2.detach().float().pow(2).mean(-1, keepdim=True)
        typical = ms.flatten().median()
        out = (diff2 / ms.clamp_min(torch.finfo(torch.float32).tiny)).mean() * typical
    else:
        out = diff2.mean()
    if kl_weight > 0:
        log_p = F.log_softmax(h1.float(), dim=-1)
        log_q = F.log_softmax(h2.float(), dim=-1)
        kl = F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1).mean()
        out = out + kl_weight * kl
    return out


def window_loss(
    q_out: torch.Tensor,
    fp_on_fp: torch.Tensor,
    fp_on_q: torch.Tensor | None,
    weight_accumulated: float,
    weight_homologous: float,
    kl_weight: float,
    token_normalized: bool = False,
) -> torch.Tensor:
    """Loss of a window.

    Args:
        q_out: quantized window on the quantized stream X_q.
        fp_on_fp: full-precision window on the full-precision stream X_fp (accumulated term: corrects the error
            accumulated by the blocks already frozen).
        fp_on_q: full-precision window on X_q (homologous term: the window's own error), None to leave it out.
        weight_accumulated, weight_homologous: weights of the two terms; kl_weight: weight of the KL part.
        token_normalized: weigh every token by its relative error (see `distance`).
    """
    loss = weight_accumulated * distance(q_out, fp_on_fp, kl_weight, token_normalized)
    if fp_on_q is not None and weight_homologous > 0:
        loss = loss + weight_homologous * distance(q_out, fp_on_q, kl_weight, token_normalized)
    return loss
