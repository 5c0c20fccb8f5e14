"""End-to-end decode speed of the demo model (SmolLM2-135M) in fp32, bf16 and RTN-quantized CBQ formats.

    .venv/bin/python benchmarks/generate.py [--new-tokens 128] [--batches 1 8] [--threads 1]

Greedy `generate()`; tokens/s = batch * new tokens / wall time (prefill included). For W4A16 the greedy output is
compared with the reference path (CBQ_KERNEL=reference). Reports checkpoint size on disk and resident memory.
Writes benchmarks/results/generate.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import cbq_hf  # noqa: E402
from cbq_hf.demo import demo_model_path  # noqa: E402
from cbq_hf.kernels.dispatch import force_kernel  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

CONFIGS = {
    "fp32": None,
    "bf16": None,
    "W4A16 g128": dict(bits=4, group_size=128, act_bits=None),
    "W2A16 g64": dict(bits=2, group_size=64, act_bits=None),
    "W4A8 g128": dict(bits=4, group_size=128, act_bits=8),
}
PROMPT = "The history of the printing press begins"


def dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024
    return float("nan")


def load(name: str, path: str):
    if name == "fp32":
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    if name == "bf16":
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    return AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, quantization_config=cbq_hf.CBQConfig(method="rtn", **CONFIGS[name]))


def run(model, tok, batch: int, new_tokens: int) -> tuple[float, torch.Tensor]:
    enc = tok([PROMPT] * batch, return_tensors="pt")
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=tok.eos_token_id)
    model.generate(**enc, max_new_tokens=4, do_sample=False, pad_token_id=tok.eos_token_id)  # warm-up
    t = time.perf_counter()
    out = model.generate(**enc, **kw)
    return batch * new_tokens / (time.perf_counter() - t), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--batches", nargs="*", type=int, default=[1, 8])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--configs", nargs="*", default=list(CONFIGS))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    path = demo_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    rows = []
    load_before = " ".join(f"{v:.2f}" for v in os.getloadavg())
    with torch.inference_mode():
        for name in args.configs:
            rss0 = rss_mb()
            model = load(name, path).eval()
            rss1 = rss_mb()
            with tempfile.TemporaryDirectory() as tmp:
                model.save_pretrained(tmp)
                size = dir_size(Path(tmp))
            row = {"config": name, "checkpoint_mb": size / 2**20, "rss_delta_mb": rss1 - rss0}
            for b in args.batches:
                tps, out = run(model, tok, b, args.new_tokens)
                row[f"tok_s_b{b}"] = tps
                if name == "W4A16 g128" and b == 1:
                    with force_kernel("reference"):
                        _, ref = run(model, tok, b, args.new_tokens)
                    row["greedy_equals_reference"] = bool(torch.equal(out, ref))
            kernels = {m.last_kernel for m in model.modules() if isinstance(m, cbq_hf.CBQLinear)}
            row["kernels"] = sorted(k for k in kernels if k)
            rows.append(row)
            print(row, flush=True)
            del model
    base = next((r for r in rows if r["config"] == "fp32"), None)
    meta = {"command": "python " + " ".join(sys.argv), "threads": args.threads, "load_before": load_before,
            "load_after": " ".join(f"{v:.2f}" for v in os.getloadavg()), "peak_rss_mb": resource.getrusage(
                resource.RUSAGE_SELF).ru_maxrss / 1024}
    lines = ["# End-to-end generate() speed, SmolLM2-135M", "", f"Command: `{meta['command']}`", "",
             f"{args.threads} thread(s); load average before {load_before}, after {meta['load_after']} "
             "(2 shared cores).", "",
             "| config | " + " | ".join(f"tok/s b{b} | x fp32 b{b}" for b in args.batches)
             + " | checkpoint MB | RSS delta MB | greedy == reference | kernels |",
             "|---" * (5 + 2 * len(args.batches)) + "|"]
    for r in rows:
        cells = []
        for b in args.batches:
            ratio = r[f"tok_s_b{b}"] / base[f"tok_s_b{b}"] if base else float("nan")
            cells += [f"{r[f'tok_s_b{b}']:.1f}", f"{ratio:.2f}"]
        lines.append(f"| {r['config']} | " + " | ".join(cells) + f" | {r['checkpoint_mb']:.1f} | "
                     f"{r['rss_delta_mb']:.0f} | {r.get('greedy_equals_reference', '')} | {', '.join(r['kernels'])} |")
    md = "\n".join(lines) + "\n"
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "generate.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (out / "generate.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
