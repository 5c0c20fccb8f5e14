"""Routing while calibrating MoE experts: every token through every expert vs real routing
(`CBQConfig.moe_calibrate_all_experts`).

Tiny random Mixtral and Qwen3-MoE models (8 experts, top-2, router weights scaled so routing is skewed and some
experts receive few calibration tokens), calibrated by CBQ on random token ids in both modes with the same seed.
Reported per family, mode and seed: the mean final window loss, the relative error of the logits against the float
model on held-out token ids, and the fewest calibration tokens any expert received. Writes
benchmarks/results/moe_routing.{json,md}.

    .venv/bin/python -P benchmarks/moe_routing.py
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cbq_hf import CBQConfig
from cbq_hf.calibration.engine import calibrate

VOCAB = 256
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)
FAMILIES = {
    "mixtral": ("MixtralConfig", dict(num_local_experts=8, num_experts_per_tok=2, intermediate_size=128)),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=128, head_dim=32),
    ),
}
#: Router weights are multiplied by this: peaked routing, as trained routers are, leaves some experts few tokens.
ROUTER_GAIN = 12.0


def build(family: str, seed: int) -> torch.nn.Module:
    cls, kw = FAMILIES[family]
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(getattr(transformers, cls)(**COMMON, **kw), dtype=torch.float32)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate.weight.mul_(ROUTER_GAIN)
    return model.eval()


def run(family: str, seed: int, all_experts: bool, args) -> dict:
    g = torch.Generator().manual_seed(seed)
    calib = torch.randint(0, VOCAB, (args.nsamples, args.seqlen), generator=g)
    held_out = torch.randint(0, VOCAB, (8, args.seqlen), generator=g)
    ref = build(family, seed)
    model = build(family, seed)
    with torch.no_grad():
        want = ref(held_out).logits
    cfg = CBQConfig(
        method="cbq", bits=args.bits, group_size=32, epochs=args.epochs, batch_size=4, seed=seed,
        moe_calibrate_all_experts=all_experts,
    )  # fmt: skip
    t0 = time.perf_counter()
    report = calibrate(model, cfg, calib, progress=False)
    seconds = time.perf_counter() - t0
    with torch.no_grad():
        got = model(held_out).logits
    counts = [c for cs in report["experts"]["tokens"].values() for c in cs]
    return {
        "family": family,
        "seed": seed,
        "routing": report["experts"]["routing"],
        "window_loss_end": statistics.mean(w["loss_end"] for w in report["windows"]),
        "window_loss_start": statistics.mean(w["loss_start"] for w in report["windows"]),
        "heldout_logits_rel_err": float((got - want).norm() / want.norm()),
        "min_expert_tokens": min(counts),
        "rtn_experts": len(report["experts"]["rtn_experts"]),
        "seconds": round(seconds, 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--out", default="moe_routing")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = [run(f, s, a, args) for f in FAMILIES for s in args.seeds for a in (True, False)]
    out = ROOT / "benchmarks" / "results"
    meta = {k: v for k, v in vars(args).items() if k != "out"} | {"router_gain": ROUTER_GAIN}
    (out / f"{args.out}.json").write_text(json.dumps({"settings": meta, "rows": rows}, indent=1) + "\n")
    lines = [
        f"# MoE routing during CBQ calibration (W{args.bits}A16 g32, {args.nsamples}x{args.seqlen} calibration "
        f"tokens, {args.epochs} epochs, seeds {args.seeds})",
        "",
        "Command: `.venv/bin/python -P benchmarks/moe_routing.py`",
        "",
        "| family | routing | mean window loss start -> end | held-out logits rel. err | min tokens/expert |",
        "|---|---|---|---|---|",
    ]
    for f in FAMILIES:
        for mode in ("all_experts", "routed"):
            rs = [r for r in rows if r["family"] == f and r["routing"] == mode]
            ls, le = (statistics.mean(r[k] for r in rs) for k in ("window_loss_start", "window_loss_end"))
            err = statistics.mean(r["heldout_logits_rel_err"] for r in rs)
            lines.append(
                f"| {f} | {mode} | {ls:.4g} -> {le:.4g} | {err:.4f} | {min(r['min_expert_tokens'] for r in rs)} |"
            )
    (out / f"{args.out}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
