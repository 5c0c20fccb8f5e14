"""GPTQ baseline rows for the quality table (our own faithful reimplementation, see baselines/gptq.py).

    python benchmarks/gptq_baseline.py [--settings w4a16g128 w3a16g128 w2a16g64 w4a8g128 w4a4g128]
        [--nsamples 32] [--seqlen 512]

Calibrates on WikiText-2 validation (random segments, BOS first, seed 0), evaluates with the fixed protocol
(WikiText-2 test, 40 windows of 512 tokens, BOS each). Activation settings quantize every decoder linear's input
per token (symmetric), as cbq_hf does. Writes benchmarks/results/gptq_<setting>.json.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.baselines.gptq import gptq_model
from cbq_hf.data import get_calibration_batches
from cbq_hf.demo import demo_model_path
from cbq_hf.evaluation import perplexity
from cbq_hf.formats.uniform import UniformSpec, fake_quantize_activations
from cbq_hf.locations import wikitext2_file
from cbq_hf.modeling import quantizable_linears


def parse(setting: str) -> tuple[int, int | None, int]:
    m = re.fullmatch(r"w(\d)a(\d+)g(-?\d+)", setting)
    if not m:
        raise SystemExit(f"bad setting {setting!r}; expected like w4a16g128")
    a = int(m.group(2))
    return int(m.group(1)), (None if a == 16 else a), int(m.group(3))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--settings", nargs="+", default=["w4a16g128", "w3a16g128", "w2a16g64", "w4a8g128", "w4a4g128"])
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = demo_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    text = wikitext2_file("test").read_text(encoding="utf-8")
    ids = get_calibration_batches("wikitext2", tok, args.nsamples, args.seqlen, seed=0)
    out_dir = ROOT / "benchmarks" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    for setting in args.settings:
        bits, act_bits, group = parse(setting)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        start = time.perf_counter()
        with torch.no_grad():
            gptq_model(model, ids, UniformSpec(bits, group, False))
        seconds = time.perf_counter() - start
        if act_bits is not None:
            for lin in quantizable_linears(model).values():
                lin.register_forward_pre_hook(lambda _m, a, ab=act_bits: (fake_quantize_activations(a[0], ab),))
        ppl = perplexity(model, tok, text)
        row = {
            "method": "GPTQ (own reimplementation)",
            "setting": setting,
            "perplexity": round(ppl, 4),
            "calibration_seconds": round(seconds, 1),
            "nsamples": args.nsamples,
            "seqlen": args.seqlen,
            "damp": 0.01,
            "desc_act": False,
            "sym": False,
            "true_sequential": True,
        }
        print(json.dumps(row), flush=True)
        (out_dir / f"gptq_{setting}.json").write_text(json.dumps(row, indent=2))


if __name__ == "__main__":
    main()
