"""The side-by-side table at the end of examples/demo_end_to_end.sh (reads the JSON files the job wrote).

python examples/demo_summary.py OUTDIR TAG PRESET SECONDS
"""

import json
import sys
from pathlib import Path

outdir, tag, preset, seconds = Path(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])


def load(name: str) -> dict:
    return json.loads((outdir / name).read_text(encoding="utf-8"))


fp32 = load("fp32_eval.json")
rows = [("fp32", fp32["perplexity"], "1.000", fp32.get("base_size_mb"), "32", "-")]
for method in ("rtn", "cbq"):
    ev, q = load(f"{method}-eval.json"), load(f"{method}-quantize.json")
    label = f"{method.upper()} {tag}" + (f" ({preset})" if method == "cbq" else "")
    ratio = f"{ev['perplexity'] / fp32['perplexity']:.3f}"
    bits = f"{q['bits_per_weight']:.2f}" if q.get("bits_per_weight") else "-"
    rows.append((label, ev["perplexity"], ratio, q.get("size_mb"), bits, f"{q['quantize_seconds']:.0f}"))
    rows[0] = rows[0][:3] + (rows[0][3] or q.get("base_size_mb"),) + rows[0][4:]
head = ("model", "perplexity", "x fp32", "checkpoint MB", "bits/weight", "quantize s")
table = [head, *[tuple("-" if v is None else str(v) for v in r) for r in rows]]
widths = [max(len(r[i]) for r in table) for i in range(len(head))]
print(f"\n== results ({fp32['windows']} windows of {fp32['seqlen']} tokens, text: {fp32['text_source']})")
for r in table:
    print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
print(f"main job: {seconds // 60} min {seconds % 60} s")
