"""Codebook math of LO-BCQ (Elangovan et al. 2025, arXiv 2502.05376): block encoding and codebook design.

Everything here works on *scaled* values: a block array has already been divided by its scale so that its
largest magnitude sits at ``cmax = 2**(codebook_bits - 1) - 1`` (31 for 6-bit entries). A codebook is a row of
``ENTRIES = 16`` signed integers in ``[-cmax, cmax]``, sorted ascending (4-bit indices address it). A block of
``block_len`` values is encoded with ONE codebook: every value takes its nearest entry (ties go to the smaller
entry), and the block takes the codebook with the smallest squared error (ties go to the smaller codebook id).

Nearest-entry search uses a lookup table: entries are integers, so every decision boundary between two entries is
a multiple of 1/2, and all values in ``((j - 1) / 2, j / 2]`` share one nearest entry. ``ceil(2 * y)`` is the table
slot of ``y``; one gather gives the quantized value of every value under every codebook at once.

Design (LO-BCQ): start from ``num_codebooks`` initial codebooks, then repeat (i) assign every block to its
minimum-error codebook, (ii) redesign each cluster's codebook with Lloyd-Max on the values of its blocks and round
the entries to integers; a redesigned codebook replaces the old one only if it lowers that cluster's error, so the
total squared error never increases. A codebook that no block uses is re-seeded from the worst-encoded blocks
(this cannot raise the error either). Stop when it falls by less than ``tol`` (relative) or after ``iters`` rounds.
"""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass
from importlib import resources

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

#: Entries per codebook (4-bit indices).
ENTRIES = 16
#: Blocks per chunk in the vectorised encoder (bounds the temporary [num_codebooks, chunk, block_len] tensor).
_CHUNK_VALUES = 1 << 22
#: Shipped universal codebooks (see benchmarks/lobcq_design.py).
UNIVERSAL_FILE = "lobcq_universal.json"


def max_entry(codebook_bits: int) -> int:
    """Largest codebook entry magnitude, ``2**(codebook_bits - 1) - 1`` (entries are symmetric signed ints)."""
    return 2 ** (codebook_bits - 1) - 1


# ---------------------------------------------------------------------------------------------- lookup tables
@dataclass(frozen=True)
class CodebookLUT:
    """Nearest-entry table of a set of integer codebooks.

    values: float32 [nc, S], quantized value of table slot s under each codebook.
    index: int64 [nc, S], entry index (0..15) of that value. S = 4 * (cmax + 1) + 1 slots cover
    y in [-(cmax + 1), cmax + 1]; values beyond take the outermost slot (whose nearest entry is the extreme one).
    """

    values: torch.Tensor
    index: torch.Tensor
    cmax: int

    @property
    def half_range(self) -> int:
        return 2 * (self.cmax + 1)

    def slots(self, y: torch.Tensor) -> torch.Tensor:
        """Table slot (int64, same shape) of scaled values y: ceil(2y) clamped, shifted to start at 0."""
        h = self.half_range
        return torch.ceil(2.0 * y).clamp_(-h, h).long().add_(h)


def build_lut(codebooks: torch.Tensor, cmax: int) -> CodebookLUT:
    """Lookup table of integer codebooks [nc, 16] (any int or float dtype holding integers, sorted ascending)."""
    cb = codebooks.detach().float().cpu()
    h = 2 * (cmax + 1)
    # Interior point of every slot: ((j - 1)/2, j/2] -> j/2 - 1/4. No two distinct integers are equidistant from it,
    # so argmin is unambiguous except for duplicate entries (first one wins, which is the smaller index).
    rep = torch.arange(-h, h + 1, dtype=torch.float32) / 2 - 0.25
    dist = (rep[None, :, None] - cb[:, None, :]).abs()  # [nc, S, 16]
    index = dist.argmin(-1)
    values = torch.gather(cb, 1, index)
    dev = codebooks.device
    return CodebookLUT(values.to(dev), index.to(dev), cmax)


# ---------------------------------------------------------------------------------------------- block encoding
def encode_blocks(
    y: torch.Tensor,
    codebooks: torch.Tensor,
    cmax: int,
    valid: torch.Tensor | None = None,
    lut: CodebookLUT | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Encode scaled blocks with the best codebook each.

    Args:
        y: float32 [B, L] scaled values (B blocks of L values).
        codebooks: [nc, 16] integer entries, each row sorted ascending.
        cmax: largest entry magnitude (sets the table range).
        valid: optional bool [B, L]; False marks padding that neither counts in the error nor matters. A float
            [B, L] tensor of non-negative weights is also accepted: the codebook choice then minimises the weighted
            squared error (the nearest entry of each value does not depend on it).
        lut: a prebuilt table of `codebooks` (built when None).

    Returns:
        selector int64 [B], entry index int64 [B, L], squared error float32 [B] of each block.
    """
    lut = lut or build_lut(codebooks, cmax)
    b, length = y.shape
    nc = lut.values.shape[0]
    sel = torch.empty(b, dtype=torch.long, device=y.device)
    idx = torch.empty(b, length, dtype=torch.long, device=y.device)
    err = torch.empty(b, dtype=torch.float32, device=y.device)
    table = lut.values.t().contiguous()  # [S, nc]: one row of candidate values per slot
    step = max(1, _CHUNK_VALUES // max(1, nc * length))
    for s in range(0, b, step):
        ys = y[s : s + step]
        slots = lut.slots(ys)  # [b', L]
        e = F.embedding(slots, table)  # [b', L, nc] quantized value under every codebook
        e.sub_(ys.unsqueeze(-1)).square_()
        if valid is not None:
            e.mul_(valid[s : s + step].unsqueeze(-1))
        # [b', nc]: summed value by value, left to right. A reduction (`e.sum(1)`) adds in another order, and where
        # two codebooks' errors differ by a rounding that flips the choice; the C++ activation encoder sums in this
        # order, so both pick the same codebook (found on a real 513-token window: one block of 1.2M differed).
        e = _sum_in_order(e)
        best_err, best = e.min(1)  # first minimum: ties go to the smaller codebook id
        sel[s : s + step] = best
        err[s : s + step] = best_err
        idx[s : s + step] = lut.index[best.unsqueeze(1), slots]
    return sel, idx, err


def _sum_in_order(e: torch.Tensor) -> torch.Tensor:
    """e [B, L, nc] summed over L as ((e_0 + e_1) + e_2) + ..., in float32."""
    acc = e[:, 0].clone()
    for j in range(1, e.shape[1]):
        acc.add_(e[:, j])
    return acc


def block_errors(
    y: torch.Tensor, codebook: torch.Tensor, cmax: int, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """Squared error float32 [B] of every block of y [B, L] encoded with the single codebook [16]."""
    return encode_blocks(y, codebook.reshape(1, -1), cmax, valid)[2]


# ---------------------------------------------------------------------------------------------- Lloyd-Max
def lloyd_max(values: torch.Tensor, init: torch.Tensor, steps: int) -> torch.Tensor:
    """Scalar Lloyd-Max quantizer: refine `init` [E] (float) on `values` [M] for `steps` rounds; returns [E] sorted.

    Exact 1-D Lloyd: values are sorted once; each round finds the cells with `searchsorted` on the midpoints and
    moves every entry to the mean of its cell (empty cells keep their entry).
    """
    v, _ = values.float().flatten().sort()
    csum = torch.cat([v.new_zeros(1), v.double().cumsum(0)])
    c = init.float().sort().values.clone()
    if v.numel() == 0:
        return c
    for _ in range(steps):
        mids = (c[1:] + c[:-1]) / 2
        # cell i holds v in (mids[i-1], mids[i]]
        edges = torch.cat(
            [
                v.new_zeros(1, dtype=torch.long),
                torch.searchsorted(v, mids, right=True),
                torch.full((1,), v.numel(), dtype=torch.long),
            ]
        )
        counts = edges[1:] - edges[:-1]
        sums = csum[edges[1:]] - csum[edges[:-1]]
        new = torch.where(counts > 0, (sums / counts.clamp(min=1)).float(), c)
        new = new.sort().values
        if torch.equal(new, c):
            break
        c = new
    return c


def quantile_codebook(values: torch.Tensor, entries: int = ENTRIES) -> torch.Tensor:
    """[entries] float starting codebook at the (i + 1/2)/entries quantiles of values [M]."""
    v = values.float().flatten()
    if v.numel() == 0:
        return torch.linspace(-1, 1, entries)
    q = (torch.arange(entries, dtype=torch.float32) + 0.5) / entries
    if v.numel() > 1 << 20:  # torch.quantile has an input-size limit; a strided sample is plenty
        v = v.sort().values[:: v.numel() // (1 << 20) + 1]
    return torch.quantile(v, q.to(v.device))


def integer_codebook(c: torch.Tensor, cmax: int) -> torch.Tensor:
    """Round float entries to integers in [-cmax, cmax], sorted ascending (float32 [E])."""
    return c.round().clamp(-cmax, cmax).sort().values


# ---------------------------------------------------------------------------------------------- LO-BCQ design
@dataclass
class DesignResult:
    """Output of `design_codebooks`.

    codebooks: float32 [nc, 16] integer-valued entries, rows sorted ascending. mse_history: mean squared error per
    value (in scaled units) before the first round and after each round; never increasing.
    """

    codebooks: torch.Tensor
    mse_history: list[float]


def initial_codebooks(
    y: torch.Tensor, num_codebooks: int, cmax: int, lloyd_steps: int = 10, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """Starting codebooks float32 [nc, 16]: blocks y [B, L] sorted by their mean |value| and cut into nc equal
    groups; each group's codebook is Lloyd-Max on its values (narrow codebooks for quiet blocks, wide ones for
    blocks that hold the array maximum)."""
    energy = (y.abs() * valid).sum(1) / valid.sum(1).clamp(min=1) if valid is not None else y.abs().mean(1)
    order = energy.argsort()
    groups = order.tensor_split(num_codebooks)
    out = []
    for g in groups:
        vals = y[g][valid[g]] if valid is not None else y[g].flatten()
        if vals.numel() == 0:
            vals = y.flatten()
        out.append(integer_codebook(lloyd_max(vals, quantile_codebook(vals), lloyd_steps), cmax))
    return torch.stack(out)


@torch.no_grad()
def design_codebooks(
    y: torch.Tensor,
    num_codebooks: int,
    cmax: int,
    iters: int = 20,
    init: torch.Tensor | None = None,
    lloyd_steps: int = 5,
    tol: float = 1e-4,
    valid: torch.Tensor | None = None,
) -> DesignResult:
    """LO-BCQ codebook design on scaled blocks y [B, L] (see module docstring).

    Args:
        y: float32 [B, L] scaled blocks (values roughly in [-cmax, cmax]).
        num_codebooks: codebooks to design (nc).
        cmax: largest entry magnitude; entries are integers in [-cmax, cmax].
        iters: maximum assignment / redesign rounds.
        init: starting codebooks [nc, 16] (integer-valued, sorted); `initial_codebooks` when None.
        lloyd_steps: Lloyd-Max rounds per cluster and LO-BCQ round.
        tol: stop when the mean squared error falls by less than this fraction.
        valid: optional bool [B, L] marking real (non-padding) values.

    Returns:
        `DesignResult` with the codebooks and the per-round MSE (non-increasing).
    """
    y = y.float()
    count = float(valid.sum()) if valid is not None else float(y.numel())
    count = max(count, 1.0)
    cb = (
        init.float().sort(-1).values.clone()
        if init is not None
        else initial_codebooks(y, num_codebooks, cmax, valid=valid)
    )
    sel, _, err = encode_blocks(y, cb, cmax, valid)
    history = [float(err.double().sum()) / count]
    for it in range(iters):
        new_cb = cb.clone()
        reseeded = _reseed_empty(y, valid, sel, err, new_cb, cmax, lloyd_steps)
        # Members of every cluster from one stable sort of the selectors (not one scan per codebook).
        clusters = sel.argsort(stable=True).split(torch.bincount(sel, minlength=cb.shape[0]).tolist())
        for c, members in enumerate(clusters):
            if members.numel() == 0:
                continue
            yc = y[members]
            vc = valid[members] if valid is not None else None
            vals = yc[vc] if vc is not None else yc.flatten()
            cand = integer_codebook(lloyd_max(vals, cb[c], lloyd_steps), cmax)
            if torch.equal(cand, cb[c]):
                continue
            old = err[members].double().sum()
            new = block_errors(yc, cand, cmax, vc).double().sum()
            if new < old:  # accept only improvements: the total error can never increase
                new_cb[c] = cand
        sel, _, err = encode_blocks(y, new_cb, cmax, valid)
        mse = float(err.double().sum()) / count
        logger.debug("LO-BCQ round %d/%d: mse %.6g", it + 1, iters, mse)
        cb = new_cb
        prev = history[-1]
        history.append(mse)
        if prev - mse <= tol * prev and not reseeded:
            break
    return DesignResult(cb, history)


def _reseed_empty(
    y: torch.Tensor,
    valid: torch.Tensor | None,
    sel: torch.Tensor,
    err: torch.Tensor,
    cb: torch.Tensor,
    cmax: int,
    lloyd_steps: int,
) -> bool:
    """Give every codebook that no block uses (empty cluster, or a duplicate that loses its ties) a new start, in
    place: Lloyd-Max on a slice of the worst-encoded blocks (the j-th empty codebook takes the j-th slice of
    blocks by decreasing error). An unused codebook changes no block's error, so the total cannot increase.
    Returns whether any codebook was replaced."""
    used = torch.bincount(sel, minlength=cb.shape[0]) > 0
    empty = (~used).nonzero().squeeze(1).tolist()
    if not empty:
        return False
    order = err.argsort(descending=True)
    m = max(1, y.shape[0] // (4 * cb.shape[0]))
    changed = False
    for j, c in enumerate(empty):
        pick = order[j * m : (j + 1) * m]
        if pick.numel() == 0:
            break
        vals = y[pick][valid[pick]] if valid is not None else y[pick].flatten()
        if vals.numel() == 0:
            continue
        cand = integer_codebook(lloyd_max(vals, quantile_codebook(vals), lloyd_steps), cmax)
        if not torch.equal(cand, cb[c]):
            cb[c] = cand
            changed = True
    return changed


# ---------------------------------------------------------------------------------------------- universal sets
def universal_key(block_len: int, array_len: int, num_codebooks: int, codebook_bits: int) -> str:
    """Key of a universal codebook set in `lobcq_universal.json`, e.g. ``"L8-A64-N16-B6"``."""
    return f"L{block_len}-A{array_len}-N{num_codebooks}-B{codebook_bits}"


def _shipped_sets() -> dict:
    try:
        text = resources.files(__package__).joinpath(UNIVERSAL_FILE).read_text(encoding="utf-8")
    except FileNotFoundError:  # pragma: no cover - broken install
        return {}
    return json.loads(text).get("sets", {})


@functools.cache
def _universal_cached(block_len: int, array_len: int, num_codebooks: int, codebook_bits: int) -> torch.Tensor:
    key = universal_key(block_len, array_len, num_codebooks, codebook_bits)
    sets = _shipped_sets()
    if key in sets:
        return torch.tensor(sets[key]["codebooks"], dtype=torch.int8)
    # No shipped set for these settings: design one from Gaussian samples with a fixed seed (deterministic and
    # data-free, a few seconds). Shipped sets are designed from real weights and activations and are better.
    logger.warning("no shipped LO-BCQ universal codebooks for %s; designing a set from Gaussian samples", key)
    return gaussian_universal(block_len, array_len, num_codebooks, codebook_bits)


def universal_codebooks(block_len: int, array_len: int, num_codebooks: int, codebook_bits: int) -> torch.Tensor:
    """The frozen universal codebooks int8 [nc, 16] for these settings (shipped, or Gaussian-designed)."""
    return _universal_cached(block_len, array_len, num_codebooks, codebook_bits).clone()


def gaussian_universal(
    block_len: int,
    array_len: int,
    num_codebooks: int,
    codebook_bits: int,
    arrays: int = 8192,
    seed: int = 0,
    iters: int = 20,
) -> torch.Tensor:
    """Codebooks int8 [nc, 16] designed on scaled Gaussian block arrays (the data-free fallback)."""
    from .lobcq import scale_arrays  # local import: lobcq imports this module

    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(arrays, array_len, generator=gen)
    cmax = max_entry(codebook_bits)
    y = scale_arrays(x.reshape(1, -1), array_len, cmax)[0].reshape(-1, block_len)
    res = design_codebooks(y, num_codebooks, cmax, iters=iters)
    return res.codebooks.to(torch.int8)
