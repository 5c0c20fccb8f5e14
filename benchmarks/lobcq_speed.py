"""Time of the LO-BCQ forward paths (reference; the CPU kernels `cpu_lobcq` and `cpu_lobcq_dequant`) against a
float nn.Linear, on the demo model's MLP shapes, for several token counts (decode ... prefill). Median of --reps
calls; each quantized call includes the run-time encoding of its activations (W4A4).

    .venv/bin/python benchmarks/lobcq_speed.py [--tokens 1 8 16 64 513] [--shapes 1536x576 576x1536] [--threads 1]
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
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--tokens", type=int, nargs="*", default=[1, 8, 16, 64, 513])
    ap.add_argument("--shapes", nargs="*", default=["1536x576", "576x1536"], help="N x K of the linear")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-reference", action="store_true", help="skip the (slow) reference rows")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    paths = ([] if args.no_reference else ["reference"]) + ["cpu_lobcq", "cpu_lobcq_dequant"]
    print(
        "| N x K | tokens | fp32 nn.Linear ms | "
        + " | ".join(f"W4A{a or 16} {p} ms" for a in (None, 4) for p in paths)
        + " |"
    )
    print("|---" * (3 + 2 * len(paths)) + "|")
    for shape in args.shapes:
        n, k = map(int, shape.split("x"))
        w = torch.randn(n, k) * 0.02
        lin = torch.nn.Linear(k, n, bias=False)
        lin.weight.copy_(w)
        mods = []
        for act_bits in (None, 4):
            fmt = LOBCQFormat(LOBCQSpec(), act_bits=act_bits)
            q = CBQLinear(k, n, False, fmt)
            q.load_packed(fmt.quantize_rtn(w))
            mods.append((fmt, q))
        for tokens in args.tokens:
            x = torch.randn(1, tokens, k)
            cells = [f"{median_ms(lambda: lin(x), args.reps):.3f}"]
            for fmt, q in mods:
                for path in paths:
                    with force_kernel(path):
                        # a fresh activation encoding per call, as each layer's input is new in a real forward
                        cells.append(f"{median_ms(lambda: (fmt.__setattr__('_act_memo', None), q(x)), args.reps):.3f}")
            print(f"| {n}x{k} | {tokens} | " + " | ".join(cells) + " |", flush=True)
    encode_table(args.tokens, sorted({int(s.split("x")[1]) for s in args.shapes}), args.reps)


def encode_table(token_counts: list[int], widths: list[int], reps: int) -> None:
    """Run-time activation encoding alone: the C++ op against the format's PyTorch encoder (bit-identical)."""
    from cbq_hf.formats.lobcq import e4m3_decode, fake_quantize_activations
    from cbq_hf.formats.lobcq_codebooks import build_lut
    from cbq_hf.kernels.cpu import build

    spec, cb = LOBCQSpec(), LOBCQFormat().universal()
    lut = build_lut(cb, spec.cmax)
    e4m3 = e4m3_decode(torch.arange(256, dtype=torch.uint8))
    args = (
        lut.values.float().contiguous(),
        lut.index.to(torch.uint8).contiguous(),
        cb.float().contiguous(),
        e4m3,
        spec.block_len,
        spec.array_len,
        spec.cmax,
    )
    ops = build.load()
    print("\n| K | tokens | encode C++ (lobcq_encode_act) ms | encode PyTorch (fake_quantize_activations) ms |")
    print("|---|---|---|---|")
    for k in widths:
        for tokens in token_counts:
            x = torch.randn(tokens, k)
            print(
                f"| {k} | {tokens} | {median_ms(lambda: ops.lobcq_encode_act(x, *args), reps * 20):.4f} | "
                f"{median_ms(lambda: fake_quantize_activations(x, cb, spec), reps):.4f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
