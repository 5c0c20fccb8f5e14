"""Time of one CBQ training step of the demo model's first window (blocks 0-1, W4A16 g128, batch 2 x 256 tokens:
forward of the quantized window, both loss terms, backward, Adam) for each calibration-speed lever alone:

- weight: "composed" (the stand-in's quantized weight and rounding regulariser written as separate torch ops, what
  autograd records op by op) vs "fused" (`rounding._LoRARoundedWeight`: the same in fewer torch ops, the gradient
  written out) vs "cpu-kernels" (`rounding._LoRARoundedWeightCPU`, with the rounding regulariser: one pass of the
  CPU extension's kernels over the weight each way);
- dtype: float32 vs bfloat16 autocast of the window's matrix products (`CBQConfig(calibration_dtype=...)`);
- threads: 1 vs all of the machine's torch threads.

Beside them, the step's lower bound on this machine: its matrix products alone (forward, input gradient and weight
gradient of each of the window's linears, batch x tokens rows) and its attention alone (forward and backward of
`scaled_dot_product_attention` with the model's head shapes), in each dtype and thread count.

A script that prints and writes a table; it asserts nothing. Run it alone on the machine.

    python -P benchmarks/calibration_speed.py --repeats 5
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.lobcq_speed import median_ms
from benchmarks.quality import DATA, load_model
from cbq_hf.calibration import cbq, pipeline, rounding
from cbq_hf.calibration.cbq import has_bf16_matrix_units
from cbq_hf.config import CBQConfig
from cbq_hf.formats.uniform import expand_groups
from cbq_hf.kernels.cpu import build

RESULTS = ROOT / "benchmarks" / "results"
FUSED = (rounding.QuantLinearSim.quantized_weight, rounding.QuantLinearSim.regularizer)
WEIGHTS = ("composed", "fused", "cpu-kernels")


def _composed_weight(self) -> torch.Tensor:
    scale, k = self.scale(), self.in_features
    return (self._codes(scale) - expand_groups(self.zero, k, self.spec)) * expand_groups(scale, k, self.spec)


def _composed_regularizer(self, beta: float) -> torch.Tensor:
    return rounding.rounding_regularizer(self.offsets(), beta)


def _first_window(cfg: CBQConfig):
    """The pipeline, window, targets, stand-ins and optimiser of the demo model's first window."""
    from transformers import AutoTokenizer

    from cbq_hf.data import get_calibration_batches
    from cbq_hf.demo import demo_model_path

    path = demo_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    ids = get_calibration_batches(str(DATA / "wiki.valid.tokens"), tok, cfg.nsamples, cfg.seqlen, cfg.seed)
    pipe = pipeline.BlockPipeline(load_model(path), cfg, ids)
    method = cbq.CBQMethod(cfg)
    method.start(pipe)
    win = pipe.schedule[0]
    new = list(win.blocks)
    for b in new:
        pipe.states[b] = pipeline.BlockState(fp=pipe._onload(b))
    obs = method.observers(pipe, new)
    fp_out, _, first = pipe.run_float(win, pipe.x_fp, obs)
    method.prepare(pipe, new, obs, first)
    targets = cbq.Targets(fp_out, pipe.run_float(win, pipe.x_q, {})[0])
    sims = [s for b in win.blocks for s in pipe.states[b].stand_ins.values()]
    return pipe, win, targets, sims, cbq._optimizer(sims, [], cfg)


def _lower_bound(
    pipe, sims, blocks: int, tokens: int, batch: int, dtype: torch.dtype, repeats: int
) -> tuple[float, float]:
    """(seconds of the window's matrix products alone, seconds of the attention of its `blocks` alone) per step,
    in `dtype`."""
    g = torch.Generator().manual_seed(0)
    mats = []
    for s in sims:
        x = torch.randn(tokens, s.in_features, generator=g).to(dtype)
        w = torch.randn(s.out_features, s.in_features, generator=g).to(dtype)
        mats.append((x, w, torch.randn(tokens, s.out_features, generator=g).to(dtype)))

    def products() -> None:
        for x, w, gy in mats:
            torch.mm(x, w.t()), torch.mm(gy, w), torch.mm(gy.t(), x)

    c = pipe.model.config
    heads, kv = c.num_attention_heads, getattr(c, "num_key_value_heads", c.num_attention_heads)
    dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    seq = tokens // batch
    qkv = [torch.randn(batch, n, seq, dim, generator=g).to(dtype).requires_grad_() for n in (heads, kv, kv)]

    def attention() -> None:
        for _ in range(blocks):
            out = F.scaled_dot_product_attention(*qkv, is_causal=True, enable_gqa=kv != heads)
            out.sum().backward()

    return median_ms(products, repeats) / 1000, median_ms(attention, repeats) / 1000


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5, help="rounds over all variants (median reported)")
    ap.add_argument("--steps", type=int, default=4, help="timed steps per variant and round")
    args = ap.parse_args(argv)
    all_threads = torch.get_num_threads()
    cfg = CBQConfig(method="cbq", bits=4, group_size=128, nsamples=8, seqlen=256, epochs=1, batch_size=2)
    pipe, win, targets, sims, opt = _first_window(cfg)

    def step(dtype: str) -> None:
        c = CBQConfig(**{**cfg.to_dict(), "calibration_dtype": dtype})
        for s in sims:  # as the window loop does: the regulariser's beta known before the forward
            s.regularizer_beta = 2.0
        loss = cbq._batch_loss(win, pipe, targets, 0, c)
        loss = loss + cfg.rounding_reg_weight * torch.stack([s.regularizer(2.0) for s in sims]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    variants = [(w, d, t) for t in sorted({1, all_threads}) for d in ("float32", "bfloat16") for w in WEIGHTS]
    times: dict[tuple, list[float]] = {v: [] for v in variants}
    for _ in range(args.repeats):  # interleaved, so drift in the machine's speed hits every variant alike
        for w, d, t in variants:
            torch.set_num_threads(t)
            fused = w != "composed"
            rounding.USE_CPU_KERNELS = w == "cpu-kernels"
            for sim in sims:  # the kernels' int16 constants are built (or not) with the cached ones
                sim._constants_key = None
            rounding.QuantLinearSim.quantized_weight = FUSED[0] if fused else _composed_weight
            rounding.QuantLinearSim.regularizer = FUSED[1] if fused else _composed_regularizer
            step(d)  # warm-up
            t0 = time.perf_counter()
            for _ in range(args.steps):
                step(d)
            times[(w, d, t)].append((time.perf_counter() - t0) / args.steps)
    rounding.QuantLinearSim.quantized_weight, rounding.QuantLinearSim.regularizer = FUSED
    rounding.USE_CPU_KERNELS = True
    bounds = []
    for t in sorted({1, all_threads}):
        torch.set_num_threads(t)
        for d in ("float32", "bfloat16"):
            tokens = cfg.batch_size * cfg.seqlen
            dt, n = getattr(torch, d), args.repeats * args.steps
            mm, attn = _lower_bound(pipe, sims, len(win.blocks), tokens, cfg.batch_size, dt, n)
            bounds.append(dict(dtype=d, threads=t, products_s=round(mm, 4), attention_s=round(attn, 4)))
    torch.set_num_threads(all_threads)
    base = sorted(times[variants[0]])[len(times[variants[0]]) // 2]
    rows = []
    for v, ts in times.items():
        med = sorted(ts)[len(ts) // 2]
        rows.append(dict(weight=v[0], dtype=v[1], threads=v[2], step_s=round(med, 4), speedup=round(base / med, 2)))
    meta = dict(
        cpu=build.cpu_model() or platform.processor() or platform.machine(),
        bf16_matrix_units=build.bf16_matrix_units() if has_bf16_matrix_units(torch.device("cpu")) else "none",
        torch=torch.__version__,
        window="blocks 0-1 of SmolLM2-135M, W4A16 g128, batch 2 x 256 tokens",
        command="python -P benchmarks/calibration_speed.py " + " ".join(argv or sys.argv[1:]),
        date=time.strftime("%Y-%m-%d %H:%M"),
    )
    (RESULTS / "calibration_speed.json").write_text(
        json.dumps(dict(meta=meta, rows=rows, lower_bound=bounds), indent=1) + "\n"
    )
    lines = [
        f"# Calibration step time ({meta['window']})",
        "",
        f"CPU {meta['cpu']}, bf16 matrix units: {meta['bf16_matrix_units']}, torch {meta['torch']}; median of "
        f"{args.repeats} rounds x {args.steps} steps. `{meta['command']}`",
        "",
        "| weight | dtype | threads | step (s) | vs composed/float32/1 thread |",
        "|---|---|---|---|---|",
        *[
            f"| {r['weight']} | {r['dtype']} | {r['threads']} | {r['step_s']:.3f} | {r['speedup']:.2f}x |"
            for r in rows
        ],
        "",
        "Lower bound of a step on this machine: its matrix products alone and its attention alone (forward and",
        "backward), with random inputs of the same shapes.",
        "",
        "| dtype | threads | matrix products (s) | attention (s) | both (s) |",
        "|---|---|---|---|---|",
        *[
            f"| {b['dtype']} | {b['threads']} | {b['products_s']:.3f} | {b['attention_s']:.3f} | "
            f"{b['products_s'] + b['attention_s']:.3f} |"
            for b in bounds
        ],
        "",
    ]
    (RESULTS / "calibration_speed.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
