"""Time of the LO-BCQ reference forward (no fast kernel exists yet) against a float nn.Linear, one linear of the
demo model's MLP shape, 513 tokens. Median of --reps runs; CPU timings on a shared machine are indicative only.

    .venv/bin/python benchmarks/lobcq_speed.py
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from cbq_hf.formats.lobcq import LOBCQFormat, LOBCQSpec
from cbq_hf.kernels.dispatch import force_kernel
from cbq_hf.nn.linear import CBQLinear


def median_ms(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=513)
    args = ap.parse_args()
    n, k = 1536, 576
    w = torch.randn(n, k) * 0.02
    x = torch.randn(1, args.tokens, k)
    lin = torch.nn.Linear(k, n, bias=False)
    lin.weight.copy_(w)
    rows = [("fp32 nn.Linear", median_ms(lambda: lin(x), args.reps))]
    for act_bits in (None, 4):
        fmt = LOBCQFormat(LOBCQSpec(), act_bits=act_bits)
        q = CBQLinear(k, n, False, fmt)
        q.load_packed(fmt.quantize_rtn(w))
        with force_kernel("reference"):
            rows.append((f"LO-BCQ W4A{act_bits or 16} reference (decode W + F.linear)",
                         median_ms(lambda: (fmt.__setattr__("_act_memo", None), q(x)), args.reps)))
        rows.append((f"  of which weight decode", median_ms(lambda: q.dequantized_weight(), args.reps)))
        if act_bits:
            bufs = q.packed_buffers()
            rows.append((f"  of which activation encode ({args.tokens}x{k})",
                         median_ms(lambda: (fmt.__setattr__("_act_memo", None), fmt.quantize_activations(x, bufs)),
                                   args.reps)))
    print(f"| path ({n}x{k}, {args.tokens} tokens, {torch.get_num_threads()} threads) | ms |\n|---|---|")
    for name, ms in rows:
        print(f"| {name} | {ms:.1f} |")


if __name__ == "__main__":
    main()
