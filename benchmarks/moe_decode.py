"""MoE decode step: float vs W4A16 (RTN, `CBQExperts` + `CBQLinear`) on a tiny Mixtral with realistic expert shapes.

8 experts, top-2, hidden 1024, expert intermediate 4096, 2 decoder layers (attention 8 heads x 128), vocab 1024.
After a 16-token prefill, one decode step is one forward of one new token per sequence with the KV cache. The
float and the quantized model take turns (A, B, A, B, ...) so a slow spell of the shared machine hits both; the
ratio is float median / quantized median from the same run. Quantization is RTN (the kernels do not depend on how
the codes were chosen). Writes benchmarks/results/moe_decode.{json,md} with the machine load (`os.getloadavg`).

    .venv/bin/python -P benchmarks/moe_decode.py [--dtype float32|bfloat16] [--threads 2] [--steps 32] [--rounds 5]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, DynamicCache, MixtralConfig

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cbq_hf import CBQConfig
from cbq_hf.calibration.rtn import quantize_rtn
from cbq_hf.formats import get_format
from cbq_hf.nn.experts import CBQExperts

SHAPE = dict(
    vocab_size=1024,
    hidden_size=1024,
    intermediate_size=4096,
    num_local_experts=8,
    num_experts_per_tok=2,
    num_hidden_layers=2,
    num_attention_heads=8,
    num_key_value_heads=8,
    max_position_embeddings=512,
)


@torch.no_grad()
def decode_times(model, batch: int, steps: int) -> list[float]:
    """Seconds of each of `steps` single-token decode steps after a 16-token prefill."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, SHAPE["vocab_size"], (batch, 16), generator=g)
    cache = DynamicCache()
    out = model(input_ids=ids, past_key_values=cache, use_cache=True)
    nxt = out.logits[:, -1:].argmax(-1)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        out = model(input_ids=nxt, past_key_values=out.past_key_values, use_cache=True)
        times.append(time.perf_counter() - t0)
        nxt = out.logits[:, -1:].argmax(-1)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default="moe_decode")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    fp = AutoModelForCausalLM.from_config(MixtralConfig(**SHAPE), dtype=dtype).eval()
    q = copy.deepcopy(fp)
    cfg = CBQConfig(method="rtn", bits=4, group_size=128)
    quantize_rtn(q, get_format(cfg), progress=False)
    assert sum(isinstance(m, CBQExperts) for m in q.modules()) == SHAPE["num_hidden_layers"]
    load_before = os.getloadavg()[0]
    for m in (fp, q):  # warm-up: kernel builds, repacking, allocator
        decode_times(m, args.batch, 4)
    per = {"float": [], "w4a16": []}
    for _ in range(args.rounds):
        per["float"] += decode_times(fp, args.batch, args.steps)
        per["w4a16"] += decode_times(q, args.batch, args.steps)
    med = {k: statistics.median(v) for k, v in per.items()}
    kernels = sorted({m.last_kernel for m in q.modules() if getattr(m, "last_kernel", None)})
    result = {
        "shape": SHAPE,
        "dtype": args.dtype,
        "batch": args.batch,
        "threads": args.threads,
        "steps_per_round": args.steps,
        "rounds": args.rounds,
        "median_step_ms": {k: round(v * 1e3, 3) for k, v in med.items()},
        "speedup_w4a16_vs_float": round(med["float"] / med["w4a16"], 3),
        "kernels": kernels,
        "loadavg_1min": {"before": round(load_before, 2), "after": round(os.getloadavg()[0], 2)},
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "torch": torch.__version__,
    }
    out = ROOT / "benchmarks" / "results"
    (out / f"{args.out}.json").write_text(json.dumps(result, indent=1) + "\n")
    md = [
        f"# MoE decode step ({args.dtype}, batch {args.batch}, {args.threads} threads)",
        "",
        "Tiny Mixtral: 8 experts, top-2, hidden 1024, expert intermediate 4096, 2 layers, vocab 1024; W4A16 g128 "
        f"(RTN). Median of {args.steps * args.rounds} decode steps per model, models interleaved per round.",
        "",
        "Command: `.venv/bin/python -P benchmarks/moe_decode.py " + " ".join(sys.argv[1:]) + "`",
        "",
        "| model | median step (ms) |",
        "|---|---|",
        f"| float ({args.dtype}) | {result['median_step_ms']['float']} |",
        f"| W4A16 g128 (`CBQExperts`, kernels {', '.join(kernels)}) | {result['median_step_ms']['w4a16']} |",
        "",
        f"Speed-up W4A16 vs float: **{result['speedup_w4a16_vs_float']}x** (same run). "
        f"1-min load average before / after: {result['loadavg_1min']['before']} / {result['loadavg_1min']['after']}.",
    ]
    (out / f"{args.out}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
