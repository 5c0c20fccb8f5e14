"""Quality benchmark of CBQ on the demo model (SmolLM2-135M): WikiText-2 perplexity of fp32, RTN and CBQ, plus
the CBQ ablations. A script that prints and writes tables; it asserts nothing.

Examples:
    python benchmarks/quality.py --settings w4a16_g128,w2a16_g64
    python benchmarks/quality.py --settings w4a16_g128 --ablations all --methods cbq
    python benchmarks/quality.py --quick --settings w4a16_g128     # smoke run: tiny budget, 4 eval windows

Rows are merged into benchmarks/results/quality.json (keyed by setting, method, variant and budget), and the
markdown tables (benchmarks/results/quality.md, docs/benchmarks_quality.md) are regenerated from all stored
rows, so settings can be run one at a time. A GPTQ row (method "gptq") added to the JSON by another script shows
up in its own column.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import shlex
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cbq_hf.calibration.engine import calibrate
from cbq_hf.calibration.rtn import quantize_rtn
from cbq_hf.config import CBQConfig
from cbq_hf.formats import get_format
from cbq_hf.lm_head import quantize_lm_head
from cbq_hf.rotation import apply_rotation

DATA = ROOT.parent / "shared" / "data" / "wikitext-2"
RESULTS = ROOT / "benchmarks" / "results"
DOC = ROOT / "docs" / "benchmarks_quality.md"

SETTINGS = {
    "w4a16_g128": dict(bits=4, group_size=128, act_bits=None),
    "w3a16_g128": dict(bits=3, group_size=128, act_bits=None),
    "w2a16_g64": dict(bits=2, group_size=64, act_bits=None),
    "w4a8_g128": dict(bits=4, group_size=128, act_bits=8),
    "w4a4_g128": dict(bits=4, group_size=128, act_bits=4),
    # the same W4A16 with the output head quantized too (int8 RTN, CBQConfig(lm_head_bits=8)): what it costs
    "w4a16_g128_head8": dict(bits=4, group_size=128, act_bits=None, lm_head_bits=8),
    # activation-quantized settings on the Hadamard-rotated model (CBQConfig(rotation="hadamard"), cbq_hf/rotation.py)
    "w4a16_g128_rot": dict(bits=4, group_size=128, act_bits=None, rotation="hadamard"),
    "w4a8_g128_rot": dict(bits=4, group_size=128, act_bits=8, rotation="hadamard"),
    "w4a4_g128_rot": dict(bits=4, group_size=128, act_bits=4, rotation="hadamard"),
}
ABLATIONS = {
    "window_size=1": dict(window_size=1, window_overlap=0),
    "no homologous": dict(use_homologous=False),
    "no KL": dict(use_kl=False),
    "no CFP": dict(use_cfp=False),
    "no LoRA-rounding": dict(use_lora_rounding=False),
    "no learnable steps": dict(learn_weight_scales=False, learn_act_clipping=False),
    # not an ablation: an addition for activation-quantized settings (SmoothQuant-style smoothing, searched alpha)
    "smooth_alpha=auto": dict(smooth_alpha="auto"),
    # not an ablation: the window loss with every token weighed by its relative error (attention-sink tokens with
    # massive activations no longer dominate it)
    "token-normalized loss": dict(token_normalized_loss=True),
    # not an ablation: the blocks' norm weights trained with the rounding in every window
    "lr_norm=1e-3": dict(lr_norm=1e-3),
    # not an ablation: the trained window's matrix products in bfloat16 autocast (calibration speed on AMX CPUs)
    "calibration_dtype=bfloat16": dict(calibration_dtype="bfloat16"),
    # not an ablation: the end-to-end stage after the windows (steps and clipping trained on the KL to fp32)
    "e2e_epochs=4": dict(e2e_epochs=4, e2e_lr=1e-3),
    # not an ablation: the rounding starts from GPTQ's error-compensated codes on the same clip-searched grid
    "rounding_init=gptq": dict(rounding_init="gptq"),
    # the two together
    "gptq+e2e_epochs=4": dict(rounding_init="gptq", e2e_epochs=4, e2e_lr=1e-3),
    # the same in bfloat16 autocast (what the CPU presets train in)
    "gptq+e2e_epochs=4+bfloat16": dict(rounding_init="gptq", e2e_epochs=4, e2e_lr=1e-3, calibration_dtype="bfloat16"),
    # a longer or faster end-to-end stage
    "gptq+e2e_epochs=8+bfloat16": dict(rounding_init="gptq", e2e_epochs=8, e2e_lr=1e-3, calibration_dtype="bfloat16"),
    "gptq+e2e_epochs=4+e2e_lr=3e-3+bfloat16": dict(
        rounding_init="gptq", e2e_epochs=4, e2e_lr=3e-3, calibration_dtype="bfloat16"
    ),
    # the `gpu` preset's stage (2 epochs of 128 samples / batch 4 = 64 steps) in bfloat16 autocast: the paper's budget
    # on a CPU with bfloat16 matrix units
    "gptq+e2e_epochs=2+e2e_lr=3e-3+bfloat16": dict(
        rounding_init="gptq", e2e_epochs=2, e2e_lr=3e-3, calibration_dtype="bfloat16"
    ),
    # the same with the norm weights trained in the end-to-end stage too
    "gptq+e2e_epochs=4+bfloat16+e2e_lr_norm=1e-3": dict(
        rounding_init="gptq", e2e_epochs=4, e2e_lr=1e-3, e2e_lr_norm=1e-3, calibration_dtype="bfloat16"
    ),
}
SETTING_ORDER = list(SETTINGS)
#: The "full" CBQ rows of this harness are the cross-block windows alone (RTN start, no end-to-end stage): what the
#: rows measured before GPTQ start and end-to-end stage became the defaults used, so every row keeps its meaning.
#: The defaults (`CBQConfig()` for the uniform grid: GPTQ start, end-to-end stage at lr 3e-3) are the variant
#: DEFAULT_VARIANT; the main table shows the most recent such row per budget, and beside it the most recent row of
#: the previous defaults (the same at lr 1e-3).
WINDOWS_ONLY = dict(rounding_init="rtn", e2e_epochs=0)
DEFAULT_VARIANT = "gptq+e2e_epochs=4+e2e_lr=3e-3+bfloat16"
#: The defaults at the `gpu` preset's budget (128 x 512, 2 epochs, batch 4: 2 stage epochs are its 64 steps) in
#: bfloat16 autocast: shown in the defaults column of that budget.
DEFAULT_VARIANTS = (DEFAULT_VARIANT, "gptq+e2e_epochs=2+e2e_lr=3e-3+bfloat16")
PREVIOUS_DEFAULT_VARIANTS = (
    "gptq+e2e_epochs=4",
    "gptq+e2e_epochs=4+bfloat16",
    # measured before the end-to-end stage ran in the calibration dtype's autocast (W4A16: 31.82 then, 31.87 now)
    "gptq+e2e_epochs=4+bfloat16 (e2e stage in float32)",
)


def load_model(path: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


_THREADS = {"calib": 1, "eval": 2}


def evaluate(model, tok, n_windows: int) -> float:
    from cbq_hf.evaluation import perplexity

    text = (DATA / "wiki.test.raw").read_text(encoding="utf-8")
    torch.set_num_threads(_THREADS["eval"])
    try:
        return perplexity(model, tok, text, n_windows=n_windows, progress=False)
    finally:
        torch.set_num_threads(_THREADS["calib"])


#: Rows measured before LoRA-Rounding floored the codes on the initial grid (rounding.py) carry
#: ``"rounding": "moving-grid"``; they are kept, marked with a dagger, and compared only with each other.
MOVING_GRID_NOTE = (
    "† measured with LoRA-Rounding on the moving grid: codes were floor(W / s) + h on the moving "
    "grid, which made learned step sizes hurt; rows without † use floor(W / s0) + h."
)


def row_key(r: dict) -> str:
    return "|".join(
        str(r.get(k)) for k in ("setting", "method", "variant", "budget", "eval_windows", "proxy", "rounding")
    )


def _budget(r: dict) -> str:
    # rows run with --lr 0.01 --lr-scale 0.001 spelled the default learning rates out in their budget
    budget = r["budget"].replace(" lr0.01 lrs0.001", "")
    return budget + (" †" if r.get("rounding") == "moving-grid" else "")


def load_rows(path: Path) -> list[dict]:
    return json.loads(path.read_text()) if path.exists() else []


def save_rows(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows, indent=1) + "\n")


def fmt_ppl(r: dict | None, fp: float | None) -> str:
    if r is None:
        return "–"
    ratio = f" ({r['ppl'] / fp:.3f})" if fp else ""
    secs = f", {r['seconds']:.0f} s" if r.get("seconds") else ""
    return f"{r['ppl']:.2f}{ratio}{secs}"


def render(rows: list[dict]) -> str:
    """Markdown tables from all stored rows (main table per setting; ablation table)."""
    lines = [
        "# Quality benchmark: CBQ on SmolLM2-135M (WikiText-2)",
        "",
        "Perplexity on WikiText-2 test (protocol of `shared/data/README.md`; 40 windows x 512 tokens unless "
        "the eval column says otherwise), in parentheses the ratio to fp32, then calibration seconds. "
        "Calibration on random segments of `wiki.valid.tokens`, seed 0. Measured on 2 shared CPU cores.",
        "",
    ]
    proxy = [r for r in rows if "proxy" in r["method"]]
    rows = [r for r in rows if "proxy" not in r["method"]]
    by_eval: dict[int, list[dict]] = {}
    for r in rows:
        by_eval.setdefault(r["eval_windows"], []).append(r)
    for ev, rs in sorted(by_eval.items(), reverse=True):
        fp = next((r["ppl"] for r in rs if r["method"] == "fp32"), None)
        lines += [
            f"## Main table (eval windows: {ev})",
            "",
            f"fp32: {fp:.2f}" if fp else "fp32: not measured",
            "",
            "| setting | RTN | GPTQ | CBQ windows only | CBQ GPTQ start + e2e at lr 1e-3 | "
            "CBQ defaults (GPTQ start + e2e at lr 3e-3) | CBQ budget |",
            "|---|---|---|---|---|---|---|",
        ]
        for s in SETTING_ORDER:
            rtn = next((r for r in rs if r["setting"] == s and r["method"] == "rtn"), None)
            gptq = next((r for r in rs if r["setting"] == s and r["method"] == "gptq"), None)
            mine = [r for r in rs if r["setting"] == s and r["method"] == "cbq"]
            cbqs = [r for r in mine if r["variant"] == "full"]
            previous = [r for r in mine if r["variant"] in PREVIOUS_DEFAULT_VARIANTS]
            defaults = [r for r in mine if r["variant"] in DEFAULT_VARIANTS]
            budgets = list(dict.fromkeys(_budget(r) for r in cbqs + previous + defaults))
            if not (rtn or gptq or budgets):
                continue
            for b in budgets or ["–"]:
                c = next((r for r in cbqs if _budget(r) == b), None)
                p, d = (
                    max((r for r in group if _budget(r) == b), key=lambda r: r.get("date", ""), default=None)
                    for group in (previous, defaults)
                )
                lines.append(
                    f"| {s} | {fmt_ppl(rtn, fp)} | {fmt_ppl(gptq, fp)} | {fmt_ppl(c, fp)} | {fmt_ppl(p, fp)} | "
                    f"{fmt_ppl(d, fp)} | {b} |"
                )
        abl = [r for r in rs if r["method"] == "cbq" and r["variant"] != "full"]
        if abl:
            lines += [
                "",
                f"## Ablations (eval windows: {ev})",
                "",
                "| setting | variant | budget | perplexity | vs full CBQ |",
                "|---|---|---|---|---|",
            ]
            for r in sorted(abl, key=lambda r: (SETTING_ORDER.index(r["setting"]), r["variant"])):
                full = next(
                    (
                        f
                        for f in rs
                        if f["setting"] == r["setting"]
                        and f["method"] == "cbq"
                        and f["variant"] == "full"
                        and _budget(f) == _budget(r)
                    ),
                    None,
                )
                delta = f"{r['ppl'] / full['ppl']:.3f}x" if full else "–"
                lines.append(f"| {r['setting']} | {r['variant']} | {_budget(r)} | {fmt_ppl(r, fp)} | {delta} |")
        if any(r.get("rounding") == "moving-grid" for r in rs):
            lines += ["", MOVING_GRID_NOTE]
        lines.append("")
    if proxy:
        lines += [
            "",
            "## Ablation proxy (first K blocks only)",
            "",
            "Relative MSE of the final hidden states of a model cut after its first K decoder blocks, on 8 "
            "held-out segments, against the same float model (lower is better). A cheap stand-in for "
            "perplexity where full-model runs do not fit the CPU budget.",
            "",
            "| setting | method | variant | budget | rel. MSE | seconds |",
            "|---|---|---|---|---|---|",
        ]
        for r in sorted(proxy, key=lambda r: (SETTING_ORDER.index(r["setting"]), r["method"], r["variant"])):
            lines.append(
                f"| {r['setting']} | {r['method']} | {r['variant']} | {_budget(r)} | {r['rel_mse']:.4g} "
                f"| {r.get('seconds', '–')} |"
            )
        if any(r.get("rounding") == "moving-grid" for r in proxy):
            lines += ["", MOVING_GRID_NOTE]
    cmds = sorted({r["command"] for r in rows + proxy if r.get("command")})
    lines += ["", "## Commands", ""] + [f"    {c}" for c in cmds] + [""]
    notes = RESULTS / "quality_notes.md"  # hand-written reading of the numbers, kept beside them
    if notes.exists():
        lines += [notes.read_text().rstrip(), ""]
    return "\n".join(lines)


def _truncated(path: str, k: int):
    model = load_model(path)
    model.model.layers = model.model.layers[:k]
    model.config.num_hidden_layers = k
    return model


@torch.no_grad()
def _hidden(model, ids: torch.Tensor) -> torch.Tensor:
    return model.model(input_ids=ids, use_cache=False).last_hidden_state


def run_proxy(args, path, tok, settings, methods, ablations, budget, record) -> None:
    """Ablation proxy on the first K blocks: relative MSE of the final hidden states on held-out segments."""
    from cbq_hf.data import get_calibration_batches

    ids = get_calibration_batches(str(DATA / "wiki.valid.tokens"), tok, args.nsamples, args.seqlen, 0)
    held = get_calibration_batches(str(DATA / "wiki.valid.tokens"), tok, 8, args.seqlen, 12345)
    ref = _hidden(_truncated(path, args.proxy_blocks), held)

    def rel(model) -> float:
        return float((_hidden(model, held) - ref).pow(2).mean() / ref.pow(2).mean())

    tag = f"proxy{args.proxy_blocks}"
    for s in settings:
        if "rtn" in methods:
            model = _truncated(path, args.proxy_blocks)
            quantize_rtn(model, get_format(CBQConfig(method="rtn", **SETTINGS[s])), progress=False)
            record(dict(setting=s, method=f"rtn-{tag}", variant="full", budget="-", rel_mse=rel(model)))
        for v in (["full"] if "cbq" in methods else []) + ablations:
            extra = {} if v == "full" else dict(ABLATIONS[v])
            if args.lr is not None:
                extra["lr"] = args.lr
            if args.lr_scale is not None:
                extra["lr_scale"] = args.lr_scale
            cfg = CBQConfig(
                method="cbq",
                nsamples=args.nsamples,
                seqlen=args.seqlen,
                epochs=args.epochs,
                batch_size=args.batch_size,
                **SETTINGS[s],
                **{**WINDOWS_ONLY, **extra},
            )
            model = _truncated(path, args.proxy_blocks)
            rep = calibrate(model, cfg, ids, progress=False)
            if cfg.lm_head_bits is not None:
                quantize_lm_head(model, cfg.lm_head_bits)
            record(
                dict(
                    setting=s,
                    method=f"cbq-{tag}",
                    variant=v,
                    budget=budget,
                    rel_mse=rel(model),
                    seconds=rep["seconds"],
                )
            )


def _rows_or_empty(path: Path) -> list[dict]:
    """Rows of a results file of this script; other JSON files in the folder are ignored."""
    try:
        rows = load_rows(path)
    except (OSError, ValueError):
        return []
    ok = isinstance(rows, list) and all(isinstance(r, dict) and "method" in r and "setting" in r for r in rows)
    return rows if ok else []


def _gptq_rows() -> list[dict]:
    """Rows of `benchmarks/gptq_baseline.py` results (one JSON object per setting, full 40-window protocol)."""
    rows = []
    for f in sorted(RESULTS.glob("gptq_*.json")):
        try:
            g = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        m = re.fullmatch(r"(w\d+a\d+)(g-?\d+)", str(g.get("setting", "")))
        if not (isinstance(g, dict) and m and "perplexity" in g):
            continue
        rows.append(
            dict(
                setting=f"{m.group(1)}_{m.group(2)}",
                method="gptq",
                variant="full",
                budget=f"n{g['nsamples']}x{g['seqlen']}",
                ppl=g["perplexity"],
                seconds=g.get("calibration_seconds"),
                eval_windows=40,
                command="python benchmarks/gptq_baseline.py --settings " + g["setting"],
            )
        )
    return rows


def write_doc() -> None:
    """docs/benchmarks_quality.md from every results file in benchmarks/results/ (GPTQ baseline files included)."""
    every = [r for f in sorted(RESULTS.glob("*.json")) for r in _rows_or_empty(f)] + _gptq_rows()
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text(render(every))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--settings", default="w4a16_g128,w2a16_g64", help=f"comma list of {list(SETTINGS)} or 'all'")
    ap.add_argument("--methods", default="fp32,rtn,cbq", help="comma list of fp32, rtn, cbq")
    ap.add_argument("--ablations", default="", help=f"comma list of {list(ABLATIONS)} or 'all' (CBQ only)")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--lr-scale", type=float, default=None)
    ap.add_argument("--eval-windows", type=int, default=40)
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads while calibrating (1 avoids OpenMP barrier stalls on a shared machine)",
    )
    ap.add_argument("--eval-threads", type=int, default=2, help="torch threads while evaluating perplexity")
    ap.add_argument("--quick", action="store_true", help="smoke run: 8 samples x 128 tokens, 1 epoch, 4 windows")
    ap.add_argument(
        "--proxy-blocks",
        type=int,
        default=0,
        help="ablation proxy: keep only the first K decoder blocks and report the relative MSE of the "
        "final hidden states on held-out samples instead of perplexity (0 = off)",
    )
    ap.add_argument("--results", default=str(RESULTS / "quality.json"))
    ap.add_argument("--render-only", action="store_true", help="only regenerate docs/benchmarks_quality.md")
    args = ap.parse_args(argv)
    if args.render_only:
        write_doc()
        return
    if args.quick:
        args.nsamples, args.seqlen, args.epochs, args.eval_windows = 8, 128, 1, 4
    _THREADS.update(calib=args.threads, eval=args.eval_threads)
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    command = "python benchmarks/quality.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))

    from transformers import AutoTokenizer

    from cbq_hf.data import get_calibration_batches
    from cbq_hf.demo import demo_model_path

    path = demo_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    settings = list(SETTINGS) if args.settings == "all" else [s for s in args.settings.split(",") if s]
    methods = [m for m in args.methods.split(",") if m]
    ablations = list(ABLATIONS) if args.ablations == "all" else [a for a in args.ablations.split(",") if a]
    for s in settings:
        if s not in SETTINGS:
            ap.error(f"unknown setting {s!r}; choose from {list(SETTINGS)}")
    for a in ablations:
        if a not in ABLATIONS:
            ap.error(f"unknown ablation {a!r}; choose from {list(ABLATIONS)}")
    budget = f"n{args.nsamples}x{args.seqlen} e{args.epochs}"
    results = Path(args.results)
    rows = load_rows(results)

    def record(row: dict) -> None:
        row.update(eval_windows=args.eval_windows, command=command, date=time.strftime("%Y-%m-%d %H:%M"))
        rows[:] = [r for r in load_rows(results) if row_key(r) != row_key(row)] + [row]
        save_rows(results, rows)
        (results.with_suffix(".md")).write_text(render(rows))
        write_doc()
        logging.info("row: %s", {k: row.get(k) for k in ("setting", "method", "variant", "ppl", "rel_mse", "seconds")})

    if args.proxy_blocks:
        run_proxy(args, path, tok, settings, methods, ablations, budget, record)
        print(render(rows))
        return
    if "fp32" in methods:
        ppl = evaluate(load_model(path), tok, args.eval_windows)
        record(dict(setting="-", method="fp32", variant="full", budget="-", ppl=ppl, seconds=0))
    ids = get_calibration_batches(str(DATA / "wiki.valid.tokens"), tok, args.nsamples, args.seqlen, 0)
    for s in settings:
        if "rtn" in methods:
            model = load_model(path)
            cfg = CBQConfig(method="rtn", **SETTINGS[s])
            t0 = time.perf_counter()
            apply_rotation(model, cfg)  # rotation="hadamard" settings (calibrate() does it for CBQ)
            quantize_rtn(model, get_format(cfg), progress=False)
            if cfg.lm_head_bits is not None:
                quantize_lm_head(model, cfg.lm_head_bits)
            record(
                dict(
                    setting=s,
                    method="rtn",
                    variant="full",
                    budget="-",
                    ppl=evaluate(model, tok, args.eval_windows),
                    seconds=round(time.perf_counter() - t0, 1),
                )
            )
        variants = (["full"] if "cbq" in methods else []) + ablations
        for v in variants:
            extra = {} if v == "full" else ABLATIONS[v]
            if args.lr is not None:
                extra = {**extra, "lr": args.lr}
            if args.lr_scale is not None:
                extra = {**extra, "lr_scale": args.lr_scale}
            cfg = CBQConfig(
                method="cbq",
                nsamples=args.nsamples,
                seqlen=args.seqlen,
                epochs=args.epochs,
                batch_size=args.batch_size,
                **SETTINGS[s],
                **{**WINDOWS_ONLY, **extra},
            )
            model = load_model(path)
            rep = calibrate(model, cfg, ids, progress=False)
            if cfg.lm_head_bits is not None:
                quantize_lm_head(model, cfg.lm_head_bits)
            statuses = [w["status"] for w in rep["windows"]]
            record(
                dict(
                    setting=s,
                    method="cbq",
                    variant=v,
                    budget=budget
                    + (f" lr{args.lr}" if args.lr is not None else "")
                    + (f" lrs{args.lr_scale}" if args.lr_scale is not None else ""),
                    ppl=evaluate(model, tok, args.eval_windows),
                    seconds=rep["seconds"],
                    windows_reverted=statuses.count("reverted"),
                    windows_nan=statuses.count("nan_fallback"),
                    loss_first_window=[rep["windows"][0]["loss_start"], rep["windows"][0]["loss_end"]],
                    loss_last_window=[rep["windows"][-1]["loss_start"], rep["windows"][-1]["loss_end"]],
                )
            )
    print(render(rows))


if __name__ == "__main__":
    main()
