"""Coarse-to-fine outlier preprocessing (CFP) of one decoder block, before its window trains.

Detection (`detect_outliers`), on per-channel statistics v (activations: max |x| per input channel; weights:
|w| along a row):
  coarse: candidates are the values above T = Q3 + lambda1 * IQR;
  fine:   with values normalised by their maximum and sorted, the split keeping the k largest candidates as
          outliers maximises  gap_k - lambda2 * var(rest_k), where gap_k = min(outliers) - max(rest) is the
          distance between the two sets at the split.
Uses:
  weights:      the magnitude of the largest non-outlier weight of each row is a truncation threshold offered
                to the step-size initialisation (`rounding.init_qparams`) as one more clip candidate per group:
                the truncation is the starting point only where it lowers the weight error, and the learned
                step sizes take over from there. The float weights are never changed by it.
  activations:  outlier input channels j of the linears that share one input are divided by
                s_j = (max_j / max_normal)^alpha and their weight columns multiplied by s_j (float function
                unchanged). The division is folded into the norm whose output feeds those linears when there
                is one (found by watching which module's output tensor each linear receives, then verified
                numerically on the block); otherwise it stays as the explicit `input_scale` of `CBQLinear`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------ detection
def outlier_counts(
    values: torch.Tensor, lambda1: float, lambda2: float, sorted_desc: torch.Tensor | None = None
) -> torch.Tensor:
    """Number of outliers in each row of `values` [R, M] (non-negative statistics), by coarse-to-fine detection.

    `sorted_desc`: the rows of `values` (as float32) sorted in descending order, when the caller has them.
    Returns int64 [R]; 0 where no value passes the coarse threshold.
    """
    v = values.float()
    r, m = v.shape
    srt = v.sort(dim=1, descending=True).values if sorted_desc is None else sorted_desc
    ascending = srt.flip(1)
    q1 = _quantile_of_sorted(ascending, 0.25)
    q3 = _quantile_of_sorted(ascending, 0.75)
    thr = q3 + lambda1 * (q3 - q1)
    n_cand = (v > thr[:, None]).sum(1)
    kmax = int(n_cand.max()) if r else 0
    if kmax == 0 or m < 2:
        return torch.zeros(r, dtype=torch.long)
    kmax = min(kmax, m - 1)
    srt = srt / srt[:, :1].clamp(min=1e-12)
    cs = srt.cumsum(1)
    cs2 = srt.pow(2).cumsum(1)
    total, total2 = cs[:, -1:], cs2[:, -1:]
    k = torch.arange(1, kmax + 1, dtype=v.dtype)
    gap = srt[:, :kmax] - srt[:, 1 : kmax + 1]  # smallest outlier minus largest remaining value
    n_rest = m - k
    mean_rest = (total - cs[:, :kmax]) / n_rest
    var_rest = ((total2 - cs2[:, :kmax]) / n_rest - mean_rest.pow(2)).clamp(min=0)
    score = gap - lambda2 * var_rest
    score = torch.where(k[None, :] <= n_cand[:, None], score, torch.full_like(score, -float("inf")))
    best = score.argmax(1) + 1
    return torch.where(n_cand > 0, best, torch.zeros_like(best))


def _quantile_of_sorted(ascending: torch.Tensor, q: float) -> torch.Tensor:
    """`torch.quantile(x, q, dim=1)` (linear interpolation) of rows already sorted in ascending order, with the same
    float operations, so the same values (`torch.quantile` would sort each row again)."""
    m = ascending.shape[1]
    rank = torch.tensor(q, dtype=ascending.dtype) * (m - 1)
    below, above = int(rank), int(torch.ceil(rank))
    weight = rank - below
    return torch.lerp(ascending[:, below], ascending[:, above], weight)


def weight_truncation(weight: torch.Tensor, lambda1: float, lambda2: float) -> tuple[torch.Tensor, int]:
    """Per-row truncation threshold of |W| [N] (the largest non-outlier magnitude; the row max when none) and the
    number of outlier weights found."""
    a = weight.detach().float().abs()
    srt = a.sort(dim=1, descending=True).values
    k = outlier_counts(a, lambda1, lambda2, srt)
    thr = srt.gather(1, k.clamp(max=a.shape[1] - 1)[:, None]).squeeze(1)
    return thr, int(k.sum())


def smoothing_scales(act_max: torch.Tensor, lambda1: float, lambda2: float, alpha: float) -> torch.Tensor:
    """Per-input-channel divisors s [K] (1 for normal channels) from max |x| per channel."""
    a = act_max.float().clamp(min=1e-8)
    k = int(outlier_counts(a[None], lambda1, lambda2)[0])
    s = torch.ones_like(a)
    if k == 0 or alpha == 0:
        return s
    order = a.argsort(descending=True)
    outliers, rest = order[:k], order[k:]
    max_normal = a[rest].max()
    s[outliers] = (a[outliers] / max_normal).clamp(min=1.0).pow(alpha)
    return s


#: Migration strengths tried by smooth_alpha="auto" (besides CFP's outlier-only smoothing), and the most output
#: rows of each linear the comparison quantizes (a fixed subset keeps the search cheap on wide layers).
ALPHA_CANDIDATES = (0.3, 0.4, 0.5, 0.6, 0.7)
SEARCH_ROWS = 256


def smoothing_error(weights: list[torch.Tensor], x: torch.Tensor, s: torch.Tensor, fmt) -> float:
    """Output error of linears sharing the input x [T, K] when smoothed by s [K] and quantized by `fmt` (weights
    RTN-encoded, activations quantized at run time as `fmt` does): sum over the linears of
    ||Q_a(x / s) Q_w(W diag(s))^T - x W^T||^2, on at most SEARCH_ROWS output rows of each."""
    xs = x / s
    err = 0.0
    for w in weights:
        w = w[:SEARCH_ROWS].float()
        bufs = fmt.quantize_rtn(w * s[None, :])
        wq = fmt.dequantize(bufs, w.shape[1])
        y = fmt.quantize_activations(xs, bufs).float() @ wq.T
        err += float((y - x @ w.T).pow(2).sum())
    return err


def smoothquant_scales(act_max: torch.Tensor, weight_max: torch.Tensor, alpha: float) -> torch.Tensor:
    """Per-input-channel divisors s [K] of every channel, s_j = max|x_j|^alpha / max|w_j|^(1 - alpha)
    (SmoothQuant): after x_j / s_j and w_j * s_j the ranges are (max|x_j| max|w_j|)^(1-alpha) and
    (max|x_j| max|w_j|)^alpha, equal at alpha = 0.5. Channels that are never active or have all-zero weights keep
    s = 1."""
    a = act_max.float()
    w = weight_max.float()
    s = a.clamp(min=1e-8).pow(alpha) / w.clamp(min=1e-8).pow(1 - alpha)
    dead = (a <= 0) | (w <= 0)
    return torch.where(dead, torch.ones_like(s), s.clamp(min=1e-5, max=1e5))


# ------------------------------------------------------------------------------------------ statistics
@dataclass
class BlockStats:
    """Input statistics of a block's linears gathered over calibration batches.

    act_max / act_sq: per linear (relative name) max |x| and mean x^2 per input channel.
    feeds: per linear, the relative name of the leaf module whose output tensor it receives (None if not found).
    samples: per linear, the first `keep_tokens` rows of its float input (float32, CPU), when asked for.
    gram: per linear, sum of x^T x over its float input tokens [K, K] (float32, on the input's device), when asked
        for (`StatsCollector.hessian`).
    """

    act_max: dict[str, torch.Tensor] = field(default_factory=dict)
    act_sq: dict[str, torch.Tensor] = field(default_factory=dict)
    tokens: dict[str, int] = field(default_factory=dict)
    feeds: dict[str, str | None] = field(default_factory=dict)
    samples: dict[str, torch.Tensor] = field(default_factory=dict)
    gram: dict[str, torch.Tensor] = field(default_factory=dict)


class StatsCollector:
    """Forward hooks on one block: per-channel input statistics of its linears and which module feeds them.

    Use as a context manager around forwards of the block. With `hessian`, it also accumulates each linear's
    X^T X (K x K float32 per linear) for `hessian`.
    """

    def __init__(self, block: nn.Module, linear_names: list[str], keep_tokens: int = 0, hessian: bool = False) -> None:
        self.block = block
        self.names = linear_names
        self.keep_tokens = keep_tokens
        self.keep_gram = hessian
        self.stats = BlockStats()
        self._handles: list = []
        self._outputs: dict[str, torch.Tensor] = {}
        #: this batch's statistics per input tensor: linears that read the same input (q/k/v, gate/up) share them
        self._of_input: dict[tuple, tuple] = {}
        self._first = True

    def __enter__(self) -> StatsCollector:
        for name, mod in self.block.named_modules():
            if name in self.names:
                self._handles.append(mod.register_forward_hook(self._linear_hook(name)))
            elif name and not list(mod.children()) and _is_affine_norm(mod):
                self._handles.append(mod.register_forward_hook(self._norm_hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._outputs.clear()
        self._of_input.clear()

    def end_batch(self) -> None:
        """Call after each batch: feeding relations are learned from the first batch only."""
        self._first = False
        self._outputs.clear()
        self._of_input.clear()

    def _norm_hook(self, name: str):
        def hook(mod, args, out):
            if self._first and isinstance(out, torch.Tensor):
                self._outputs[name] = out  # kept alive for the batch so its storage cannot be reused

        return hook

    def _linear_hook(self, name: str):
        def hook(mod, args, out):
            x = args[0].detach()
            xf = x.float().reshape(-1, x.shape[-1])
            st = self.stats
            key = (x.data_ptr(), tuple(x.shape), x.dtype)
            if key not in self._of_input:
                gram = xf.T @ xf if self.keep_gram else None
                self._of_input[key] = (x, xf.abs().amax(0).cpu(), xf.pow(2).sum(0).cpu(), gram)
            _, amax, sq, gram = self._of_input[key]  # x is kept so that its storage is not reused in the batch
            if name in st.act_max:
                st.act_max[name] = torch.maximum(st.act_max[name], amax)
                st.act_sq[name] += sq
                st.tokens[name] += xf.shape[0]
            else:
                st.act_max[name], st.act_sq[name], st.tokens[name] = amax.clone(), sq.clone(), xf.shape[0]
            have = st.samples[name].shape[0] if name in st.samples else 0
            if have < self.keep_tokens:
                rows = xf[: self.keep_tokens - have].cpu()
                st.samples[name] = torch.cat([st.samples[name], rows]) if have else rows.clone()
            if self.keep_gram:
                st.gram[name] = st.gram[name].add_(gram) if name in st.gram else gram.clone()
            if self._first:
                st.feeds[name] = next(
                    (n for n, o in self._outputs.items() if o.data_ptr() == x.data_ptr() and o.shape == x.shape), None
                )

        return hook

    def mean_square(self, name: str) -> torch.Tensor | None:
        """Mean square of each input channel of linear `name`; None when no token reached it (an expert the
        router never chose)."""
        if name not in self.stats.act_sq:
            return None
        return self.stats.act_sq[name] / max(self.stats.tokens[name], 1)

    def hessian(self, name: str) -> torch.Tensor | None:
        """H = 2 X^T X / n [K, K] of linear `name`'s float input over the n tokens seen (collected with
        hessian=True); None when not collected or no token reached it."""
        if name not in self.stats.gram:
            return None
        return self.stats.gram[name] * (2.0 / max(self.stats.tokens[name], 1))


def _is_affine_norm(mod: nn.Module) -> bool:
    """A leaf with a 1-D `weight` and no linear layer: RMSNorm / LayerNorm style (checked numerically later)."""
    w = getattr(mod, "weight", None)
    return isinstance(w, torch.Tensor) and w.dim() == 1 and not isinstance(mod, (nn.Linear, nn.Embedding))


# ------------------------------------------------------------------------------------------ smoothing
@dataclass
class Smoothing:
    """Result of activation smoothing of one block: per linear, the divisor kept as `input_scale` (None when
    folded into a norm or not smoothed), and what was done (for the report; `outlier_channels` counts every
    channel whose divisor is not 1)."""

    input_scales: dict[str, torch.Tensor | None]
    divisors: dict[str, torch.Tensor]
    folded: list[str]
    explicit: list[str]
    outlier_channels: int
    alphas: dict[str, float | None] = field(default_factory=dict)  # smooth_alpha="auto": choice per input group


@dataclass(frozen=True)
class SmoothingSettings:
    """How a block is smoothed (from the `CBQConfig` fields cfp_lambda1, cfp_lambda2, cfp_alpha, smooth_alpha).

    lambda1, lambda2: CFP's outlier thresholds (`outlier_counts`). alpha: CFP's migration strength for outlier
    channels. smooth_alpha: SmoothQuant migration strength for every channel, "auto" (searched per group among
    CFP and ALPHA_CANDIDATES), or None (CFP's outlier-only smoothing). fmt: the quantization format ("auto" only).
    """

    lambda1: float
    lambda2: float
    alpha: float
    smooth_alpha: float | str | None = None
    fmt: Any = None

    @classmethod
    def from_config(cls, config, fmt=None) -> SmoothingSettings:
        return cls(config.cfp_lambda1, config.cfp_lambda2, config.cfp_alpha, config.smooth_alpha, fmt)


@torch.no_grad()
def smooth_block(
    block: nn.Module, linears: dict[str, nn.Linear], stats: BlockStats, settings: SmoothingSettings, check
) -> Smoothing:
    """Apply activation smoothing to `block` in place (weights of `linears` and, where possible, norms): CFP's
    outlier channels (`smoothing_scales`), or with `settings.smooth_alpha` every channel (`smoothquant_scales`);
    with smooth_alpha="auto", per group of linears sharing an input, whichever of CFP and the ALPHA_CANDIDATES gives
    the smallest quantized output error on the sampled inputs (`smoothing_error`; needs stats.samples).

    Args:
        block: the live decoder block (its linears are still `nn.Linear`).
        linears: relative name -> linear to smooth.
        stats: statistics gathered on the block's float inputs.
        settings: thresholds and migration strength (`SmoothingSettings`).
        check: callable() -> bool that says whether the block still computes its float function; a fold into a
            norm that breaks it is undone and the scale is kept explicit instead.
    """
    groups: dict[str, list[str]] = {}  # linears that share one input (same feeding module) share one vector
    for name in linears:
        groups.setdefault(stats.feeds.get(name) or f"<input of {name}>", []).append(name)
    out = Smoothing(dict.fromkeys(linears), {}, [], [], 0)
    modules = dict(block.named_modules())
    pending: list[tuple[list[str], torch.Tensor]] = []
    # Folds first, one group at a time, each verified while every other group is still untouched.
    for key, names in groups.items():
        s = _group_divisor(key, names, linears, stats, settings, out)
        if bool((s == 1).all()):
            continue
        out.outlier_channels += int((s != 1).sum())
        norm = modules.get(key)
        if norm is not None and _fold_group(norm, [linears[n] for n in names], s, check):
            out.folded += names
            out.divisors.update(dict.fromkeys(names, s))
        else:
            pending.append((names, s))
    # Explicit input scales: exact by construction (CBQLinear divides its input by the same vector).
    for names, s in pending:
        for n in names:
            _scale_columns(linears[n], s)
            out.input_scales[n] = s
            out.divisors[n] = s
        out.explicit += names
    return out


def _group_divisor(
    key: str,
    names: list[str],
    linears: dict[str, nn.Linear],
    stats: BlockStats,
    settings: SmoothingSettings,
    out: Smoothing,
) -> torch.Tensor:
    """The smoothing divisor [K] of the group of linears `names` fed by `key` (the chosen alpha into `out`)."""
    amax = torch.stack([stats.act_max[n] for n in names]).amax(0)
    if settings.smooth_alpha is None:
        return smoothing_scales(amax, settings.lambda1, settings.lambda2, settings.alpha)
    wmax = torch.stack([linears[n].weight.detach().abs().amax(0).float().cpu() for n in names]).amax(0)
    if settings.smooth_alpha != "auto":
        return smoothquant_scales(amax, wmax, settings.smooth_alpha)
    weights = [linears[n].weight.detach().cpu() for n in names]
    s, out.alphas[key] = _search_alpha(amax, wmax, weights, stats.samples[names[0]], settings)
    return s


def _fold_group(norm: nn.Module, group: list[nn.Linear], s: torch.Tensor, check) -> bool:
    """Scale the columns of `group` by `s` and fold 1/s into `norm`; undone (False) if the block's function
    changed."""
    saved = [lin.weight.detach().clone() for lin in group]
    for lin in group:
        _scale_columns(lin, s)
    if _fold_into_norm(norm, s, check):
        return True
    for lin, w in zip(group, saved):
        lin.weight.data.copy_(w)
    return False


def _search_alpha(
    amax: torch.Tensor, wmax: torch.Tensor, weights: list[torch.Tensor], x: torch.Tensor, settings: SmoothingSettings
) -> tuple[torch.Tensor, float | None]:
    """(divisors, chosen alpha; None = CFP's outlier-only smoothing) with the smallest `smoothing_error`."""
    cfp = smoothing_scales(amax, settings.lambda1, settings.lambda2, settings.alpha)
    candidates: list[tuple[float | None, torch.Tensor]] = [(None, cfp)]
    candidates += [(a, smoothquant_scales(amax, wmax, a)) for a in ALPHA_CANDIDATES]
    errs = [smoothing_error(weights, x.float(), s, settings.fmt) for _, s in candidates]
    best = min(range(len(errs)), key=errs.__getitem__)
    return candidates[best][1], candidates[best][0]


def _scale_columns(linear: nn.Linear, s: torch.Tensor) -> None:
    w = linear.weight
    w.data.mul_(s.to(w.device, w.dtype)[None, :])


def _fold_into_norm(norm: nn.Module, s: torch.Tensor, check) -> bool:
    w = norm.weight
    old_w = w.detach().clone()
    bias = getattr(norm, "bias", None)
    old_b = bias.detach().clone() if isinstance(bias, torch.Tensor) else None
    w.data.div_(s.to(w.device, w.dtype))
    if old_b is not None:
        bias.data.div_(s.to(bias.device, bias.dtype))
    if check():
        return True
    w.data.copy_(old_w)
    if old_b is not None:
        bias.data.copy_(old_b)
    logger.debug("CFP: folding into %s changes the block's output; keeping an explicit input scale", type(norm))
    return False
