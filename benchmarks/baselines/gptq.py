"""GPTQ baseline, our own faithful reimplementation (Frantar et al. 2023), labelled as such in every table.

gptqmodel needs a special install on these machines (see ../shared/PEERS.md); this file follows the reference
algorithm (`gptq.py` of IST-DASLab/gptq): per block, accumulate H = 2/n X^T X for every linear from the block's
inputs, quantize columns left to right with the inverse-Hessian error feedback (lazy batch updates of 128
columns), group-wise min-max parameters computed from the *updated* weights when a group starts, dampening
`damp * mean(diag(H))`, no activation ordering (desc_act=False), asymmetric grid, same uniform grid and ragged
last group as cbq_hf. Layers are quantized "true-sequentially" in block order (attention first, then MLP), each
from the block inputs produced by the already-quantized previous blocks.

The result is a float model whose decoder linears hold GPTQ-dequantized weights (what we evaluate).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from cbq_hf.formats.uniform import UniformSpec, minmax_qparams


def gptq_quantize_weight(
    w: torch.Tensor, h: torch.Tensor, spec: UniformSpec, damp: float = 0.01, blocksize: int = 128
) -> torch.Tensor:
    """GPTQ-quantized (dequantized) copy of W [N, K] given the Hessian H [K, K]."""
    w = w.clone().float()
    n, k = w.shape
    h = h.clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    h += torch.eye(k) * damp * torch.mean(torch.diag(h))
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    q = torch.zeros_like(w)
    g = spec.group_len(k)
    scale = zero = None
    for i1 in range(0, k, blocksize):
        i2 = min(i1 + blocksize, k)
        w1 = w[:, i1:i2].clone()
        q1 = torch.zeros_like(w1)
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if col % g == 0:
                gend = min(col + g, k)
                grp = torch.cat([w1[:, i:], w[:, i2:]], dim=1)[:, : gend - col]
                s, z = minmax_qparams(grp, UniformSpec(spec.bits, -1, spec.sym))
                scale, zero = s[:, 0], z[:, 0]
            wc = w1[:, i]
            qc = (torch.clamp(torch.round(wc / scale) + zero, 0, spec.qmax) - zero) * scale
            q1[:, i] = qc
            e = (wc - qc) / hinv1[i, i]
            w1[:, i:] -= e.unsqueeze(1) @ hinv1[i, i:].unsqueeze(0)
            err1[:, i] = e
        q[:, i1:i2] = q1
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return q


@torch.no_grad()
def gptq_model(
    model: nn.Module,
    input_ids: torch.Tensor,
    spec: UniformSpec,
    damp: float = 0.01,
    batch_size: int = 4,
    progress: bool = True,
) -> nn.Module:
    """Quantize every decoder linear of `model` in place with GPTQ, calibrating on `input_ids` [n, seqlen]."""
    from tqdm.auto import tqdm

    from cbq_hf.calibration.capture import capture_block_inputs
    from cbq_hf.modeling import block_linears, find_decoder_blocks

    _, blocks = find_decoder_blocks(model)
    inputs = capture_block_inputs(model, input_ids, batch_size)
    xs = [inputs.hidden[a:b] for a, b in inputs.batches]

    for index, block in enumerate(tqdm(blocks, desc="GPTQ blocks", disable=not progress)):
        linears = block_linears(block)
        # true-sequential groups: linears that read the same input are quantized together
        order = [
            ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
            ["self_attn.o_proj"],
            ["mlp.gate_proj", "mlp.up_proj"],
            ["mlp.down_proj"],
        ]
        known = {n for grp in order for n in grp}
        order += [[n] for n in linears if n not in known]
        for grp in order:
            grp = [n for n in grp if n in linears]
            if not grp:
                continue
            hs = {n: torch.zeros(linears[n].in_features, linears[n].in_features) for n in grp}
            counts = dict.fromkeys(grp, 0)

            def make_hook(name):
                def hook(_m, inp, _out):
                    x = inp[0].reshape(-1, inp[0].shape[-1]).float()
                    t = x.shape[0]
                    hs[name] *= counts[name] / (counts[name] + t)
                    counts[name] += t
                    x = math.sqrt(2 / counts[name]) * x
                    hs[name] += x.t() @ x

                return hook

            handles = [linears[n].register_forward_hook(make_hook(n)) for n in grp]
            for b, x in enumerate(xs):
                inputs.call_block(block, index, b, x)
            for h in handles:
                h.remove()
            for n in grp:
                lin = linears[n]
                lin.weight.data = gptq_quantize_weight(lin.weight.data, hs[n], spec, damp).to(lin.weight.dtype)
        xs = [inputs.call_block(block, index, b, x) for b, x in enumerate(xs)]
    return model
