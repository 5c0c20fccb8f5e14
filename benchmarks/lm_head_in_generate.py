"""Time the output head inside `generate()` on the demo model: RTN W4A16 g128 with the fp32 head against the same
model with `lm_head_bits=8`. Forward hooks time every head call; prints the median head call and the mean time per
generated token. A script that prints; it asserts nothing.

    .venv/bin/python benchmarks/lm_head_in_generate.py [--tokens 32] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import AutoModelForCausalLM

import cbq_hf
from cbq_hf.demo import demo_model_path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    src = str(demo_model_path())
    for head_bits in (None, 8):
        extra = {} if head_bits is None else {"lm_head_bits": head_bits}
        cfg = cbq_hf.CBQConfig(method="rtn", bits=4, group_size=128, **extra)
        model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32, quantization_config=cfg).eval()
        times: list[float] = []
        start: dict[str, float] = {}
        model.lm_head.register_forward_pre_hook(lambda mod, a: start.__setitem__("t", time.perf_counter()))
        model.lm_head.register_forward_hook(lambda mod, a, o: times.append(time.perf_counter() - start["t"]))
        ids = torch.randint(0, 1000, (1, 16), generator=torch.Generator().manual_seed(0))
        with torch.inference_mode():
            model.generate(ids, max_new_tokens=4, do_sample=False)  # warm-up: repack, kernel build, float mode
            times.clear()
            t0 = time.perf_counter()
            model.generate(ids, max_new_tokens=args.tokens, min_new_tokens=args.tokens, do_sample=False)
            total = time.perf_counter() - t0
        name = "fp32 head" if head_bits is None else f"int{head_bits} head"
        print(
            f"{name}: {1e3 * total / args.tokens:.1f} ms per token, head call median "
            f"{1e3 * statistics.median(times):.2f} ms"
        )


if __name__ == "__main__":
    main()
