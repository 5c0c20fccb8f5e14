"""LO-BCQ quality on the demo model (SmolLM2-135M) beside uniform RTN: WikiText-2 test perplexity, 40 x 512 tokens.

Rows (select with --rows, comma separated): fp32, uniform-w4a4-g128, uniform-w4a8-g128, lobcq-w4a16-universal,
lobcq-w4a4-universal, lobcq-w4a4-per_layer, and with CBQ calibration (on WikiText-2 validation text)
uniform-w4a4-g128-cbq, lobcq-w4a4-universal-cbq, lobcq-w4a4-per_layer-cbq, lobcq-w4a16-universal-cbq, and
lobcq-w4a4-universal-cbq-n8x256 (the main quality table's calibration budget instead of 4 x 128) and
lobcq-w4a4-universal-cbq-n16x256 (twice that many calibration samples), lobcq-w4a4-universal-cbq-n8x256-sq05 / -sq065
(the n8x256 row with SmoothQuant-style smoothing of every input channel, smooth_alpha 0.5 / 0.65) and -sqauto
(smooth_alpha="auto": searched per input group), and that row with 4 epochs (-n8x256e4-sqauto) or lr 3e-2 / 5e-2
(-n8x256lr3-sqauto / -n8x256lr5-sqauto), the lr 3e-2 row with seeds 1 and 2 (-seed1 / -seed2), with 16 x 256
calibration tokens (-n16x256lr3-sqauto[-seedN]; 32 x 256: -n32x256lr3-sqauto) and with the token-normalised window
loss (-n8x256lr3-sqauto-tn[-seedN]) or the blocks' norm weights trained with lr_norm 1e-3 / 3e-3
(-n8x256lr3-sqauto-ln1[-seedN] / -ln3[-seedN]), with windows of 3 (4) blocks overlapping by 2 (3)
(-n8x256lr3-sqauto-w3[-seedN] / -w4[-seedN]), the 3-block row from the GPTQ start (-n8x256lr3-sqauto-w3-gptq[-seedN])
or an array-scale learning rate of 1e-2 (-n8x256lr3-sqauto-ls2); block
arrays of 32 values (lobcq-w4a4-universal-a32 RTN, -n8x256lr3-sqauto-w3-a32[-seedN] CBQ, and with the default 2-block
windows -n8x256lr3-sqauto-w2-a32[-seedN]). Results accumulate in benchmarks/results/<--results>.json (default
lobcq_quality; a row already there with the same
number of windows is skipped unless --redo) and are rendered to <--results>.md; keep runs with different --windows
in different files, since the table compares every row with the fp32 row of the same file. --save DIR keeps each
quantized model (save_pretrained) in DIR/<row> for later evaluation or generation.

    .venv/bin/python benchmarks/lobcq_quality.py
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TEST = ROOT.parent / "shared" / "data" / "wikitext-2" / "wiki.test.raw"
RESULTS = ROOT / "benchmarks" / "results"

#: Calibration of the "-cbq" rows: WikiText-2 *validation* text (never the test split), 4 x 128 tokens, 2 epochs of
#: 2 batches (smaller than quality.py's 8 x 128: LO-BCQ calibration on the shared, saturated 2-core CPU took over
#: 2 min per window at 8 x 128).
VALID = ROOT.parent / "shared" / "data" / "wikitext-2" / "wiki.valid.tokens"
CBQ_BUDGET = dict(nsamples=4, seqlen=128, epochs=2, batch_size=2, lr=1e-2, lr_scale=1e-3)
#: The budget of the main quality table (benchmarks/quality.py rows "n8x256 e2").
CBQ_BUDGET_MAIN = dict(nsamples=8, seqlen=256, epochs=2, batch_size=2, lr=1e-2, lr_scale=1e-3)


def _sqauto(lr: float = 3e-2, **fields) -> dict:
    """A CBQ row on universal LO-BCQ W4A4 with smooth_alpha="auto" at the main budget and rounding learning rate
    `lr`; `fields` add to it or override the budget's."""
    return dict(
        method="cbq",
        format="lobcq",
        act_bits=4,
        lobcq_codebooks="universal",
        smooth_alpha="auto",
        **{**CBQ_BUDGET_MAIN, "lr": lr, **fields},
    )


def _seed(seed: int) -> str:
    """Row-name suffix of a seed (none for seed 0)."""
    return f"-seed{seed}" if seed else ""


ROWS: dict[str, dict | None] = {
    "fp32": None,
    "uniform-w4a4-g128": dict(method="rtn", bits=4, group_size=128, act_bits=4),
    "uniform-w4a8-g128": dict(method="rtn", bits=4, group_size=128, act_bits=8),
    "lobcq-w4a16-universal": dict(method="rtn", format="lobcq", act_bits=None, lobcq_codebooks="universal"),
    "lobcq-w4a4-universal": dict(method="rtn", format="lobcq", act_bits=4, lobcq_codebooks="universal"),
    "lobcq-w4a4-per_layer": dict(method="rtn", format="lobcq", act_bits=4, lobcq_codebooks="per_layer"),
    # CBQ calibration (CBQ_BUDGET)
    "uniform-w4a4-g128-cbq": dict(method="cbq", bits=4, group_size=128, act_bits=4, **CBQ_BUDGET),
    "lobcq-w4a4-universal-cbq": dict(
        method="cbq", format="lobcq", act_bits=4, lobcq_codebooks="universal", **CBQ_BUDGET
    ),
    "lobcq-w4a4-per_layer-cbq": dict(
        method="cbq", format="lobcq", act_bits=4, lobcq_codebooks="per_layer", **CBQ_BUDGET
    ),
    "lobcq-w4a16-universal-cbq": dict(
        method="cbq", format="lobcq", act_bits=None, lobcq_codebooks="universal", **CBQ_BUDGET
    ),
    "lobcq-w4a4-universal-cbq-n8x256": dict(
        method="cbq", format="lobcq", act_bits=4, lobcq_codebooks="universal", **CBQ_BUDGET_MAIN
    ),
    "lobcq-w4a4-universal-cbq-n16x256": dict(
        method="cbq", format="lobcq", act_bits=4, lobcq_codebooks="universal", **{**CBQ_BUDGET_MAIN, "nsamples": 16}
    ),
    # SmoothQuant-style smoothing of every input channel (smooth_alpha) before CBQ calibration
    "lobcq-w4a4-universal-cbq-n8x256-sq05": dict(
        method="cbq", format="lobcq", act_bits=4, lobcq_codebooks="universal", smooth_alpha=0.5, **CBQ_BUDGET_MAIN
    ),
    "lobcq-w4a4-universal-cbq-n8x256-sq065": dict(
        method="cbq", format="lobcq", act_bits=4, lobcq_codebooks="universal", smooth_alpha=0.65, **CBQ_BUDGET_MAIN
    ),
    "lobcq-w4a4-universal-cbq-n8x256-sqauto": _sqauto(lr=1e-2),
    # the same with 4 epochs, or with a 3x / 5x larger rounding learning rate
    "lobcq-w4a4-universal-cbq-n8x256e4-sqauto": _sqauto(lr=1e-2, epochs=4),
    "lobcq-w4a4-universal-cbq-n8x256lr3-sqauto": _sqauto(),
    # the lr 3e-2 row with other seeds (other calibration samples and LoRA initialisations): run-to-run spread
    "lobcq-w4a4-universal-cbq-n8x256lr3-sqauto-seed1": _sqauto(seed=1),
    "lobcq-w4a4-universal-cbq-n8x256lr3-sqauto-seed2": _sqauto(seed=2),
    # the lr 3e-2 smoothed row with twice the calibration text (16 x 256 tokens), four seeds
    **{
        f"lobcq-w4a4-universal-cbq-n16x256lr3-sqauto{_seed(seed)}": _sqauto(seed=seed, nsamples=16)
        for seed in (0, 1, 2, 3)
    },
    # ... and with 32 x 256
    "lobcq-w4a4-universal-cbq-n32x256lr3-sqauto": _sqauto(nsamples=32),
    # the lr 3e-2 smoothed row with the token-normalised window loss (massive attention-sink tokens no longer
    # dominate it), three seeds
    **{
        f"lobcq-w4a4-universal-cbq-n8x256lr3-sqauto-tn{_seed(seed)}": _sqauto(seed=seed, token_normalized_loss=True)
        for seed in (0, 1, 2)
    },
    # the lr 3e-2 smoothed row with the blocks' norm weights trained in the windows (lr_norm 1e-3 / 3e-3)
    **{
        f"lobcq-w4a4-universal-cbq-n8x256lr3-sqauto-ln{tag}{_seed(seed)}": _sqauto(seed=seed, lr_norm=lr_norm)
        for tag, lr_norm in (("1", 1e-3), ("3", 3e-3))
        for seed in (0, 1, 2, 3)
    },
    # the lr 3e-2 smoothed row with windows of 3 blocks overlapping by 2, or array-scale learning rate 1e-2
    **{
        f"lobcq-w4a4-universal-cbq-n8x256lr3-sqauto-w{ws}{_seed(seed)}": _sqauto(
            seed=seed, window_size=ws, window_overlap=ws - 1
        )
        for ws in (3, 4)
        for seed in (0, 1, 2, 3)
    },
    # the 3-block windows' row started from GPTQ on the starting encoding (rounding_init="gptq"), four seeds
    **{
        f"lobcq-w4a4-universal-cbq-n8x256lr3-sqauto-w3-gptq{_seed(seed)}": _sqauto(
            seed=seed, window_size=3, window_overlap=2, rounding_init="gptq"
        )
        for seed in (0, 1, 2, 3)
    },
    "lobcq-w4a4-universal-cbq-n8x256lr3-sqauto-ls2": _sqauto(lr_scale=1e-2),
    # block arrays of 32 values instead of 64 (one E4M3 scale per 32 values: 4.75 bits per value instead of 4.625),
    # RTN and the best CBQ configuration (3-block windows), with the universal set designed for that spec
    "lobcq-w4a4-universal-a32": dict(
        method="rtn", format="lobcq", act_bits=4, lobcq_codebooks="universal", lobcq_array_len=32
    ),
    **{
        f"lobcq-w4a4-universal-cbq-n8x256lr3-sqauto-w{ws}-a32{_seed(seed)}": _sqauto(
            seed=seed, lobcq_array_len=32, window_size=ws, window_overlap=ws - 1
        )
        for ws in (2, 3)
        for seed in (0, 1, 2, 3)
    },
    "lobcq-w4a4-universal-cbq-n8x256lr5-sqauto": _sqauto(lr=5e-2),
}


def run_row(name: str, path: str, text: str, windows: int, save: Path | None = None) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import cbq_hf
    from cbq_hf.evaluation import perplexity

    tok = AutoTokenizer.from_pretrained(path)
    kwargs = ROWS[name]
    t = time.perf_counter()
    if kwargs is None:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    else:
        extra = {}
        if kwargs.get("method") == "cbq":
            extra = dict(dataset=[VALID.read_text(encoding="utf-8")], tokenizer=tok)
        cfg = cbq_hf.CBQConfig(**{"group_size": -1, **kwargs, **extra})
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, quantization_config=cfg)
    quant_s = time.perf_counter() - t
    if save is not None and kwargs is not None:
        model.save_pretrained(save / name)
        tok.save_pretrained(save / name)
    model.eval()
    t = time.perf_counter()
    ppl = perplexity(model, tok, text, n_windows=windows, progress=False)
    eval_s = time.perf_counter() - t
    info = getattr(getattr(model.config, "quantization_config", None), "run_info", {}) or {}
    return {
        "row": name,
        "config": kwargs,
        "ppl": round(ppl, 3),
        "bits_per_weight": info.get("bits_per_weight"),
        "quantize_s": round(quant_s, 1),
        "eval_s": round(eval_s, 1),
        "windows": windows,
        "threads": torch.get_num_threads(),
        "cbq": info.get("cbq_calibration"),
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }


def render(results: dict[str, dict]) -> str:
    fp = results.get("fp32", {}).get("ppl")
    lines = [
        "| row | W / A | bits per weight | WikiText-2 ppl | vs fp32 | quantize s | eval s |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in ROWS:
        r = results.get(name)
        if r is None:
            continue
        cfg = r["config"] or {}
        wa = "fp32" if not cfg else f"W4 / A{cfg.get('act_bits') or 16}"
        rel = f"{100 * (r['ppl'] / fp - 1):+.1f}%" if fp else ""
        bpw = "32" if not cfg else f"{r['bits_per_weight']:.3f}"
        lines.append(f"| {name} | {wa} | {bpw} | {r['ppl']:.2f} | {rel} | {r['quantize_s']} | {r['eval_s']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--redo", action="store_true")
    ap.add_argument("--results", default="lobcq_quality", help="results file stem under benchmarks/results")
    ap.add_argument("--save", type=Path, default=None, help="directory to save each quantized model in")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from cbq_hf.demo import demo_model_path

    path = demo_model_path()
    text = TEST.read_text(encoding="utf-8")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"{args.results}.json"
    results = json.loads(out.read_text()) if out.is_file() else {}
    for name in args.rows.split(","):
        if name not in ROWS:
            raise SystemExit(f"unknown row {name!r}; rows: {list(ROWS)}")
        if name in results and not args.redo and results[name]["windows"] == args.windows:
            continue
        r = run_row(name, path, text, args.windows, args.save)
        logging.info("%s", r)
        results = json.loads(out.read_text()) if out.is_file() else {}  # other runs may have added rows
        results[name] = r
        out.write_text(json.dumps(results, indent=1) + "\n")
        (RESULTS / f"{args.results}.md").write_text(render(results))
    print(render(results))


if __name__ == "__main__":
    main()
