"""End-to-end decode speed of the demo model (SmolLM2-135M) in fp32, bf16 and RTN-quantized CBQ formats.

    .venv/bin/python benchmarks/generate.py [--new-tokens 128] [--batches 1 8] [--threads 1] [--rounds 3]

Greedy `generate()`; tokens/s = batch * new tokens / wall time (prefill included), the median of --repeats timed calls
(default 3; single calls vary by ~20% on the shared VMs). For the weight-only configs (W4A16, W2A16) the greedy output
is compared with the reference path (CBQ_KERNEL=reference). "+ int8 head" also quantizes the output head
(`CBQConfig(lm_head_bits=8)`; the other configs keep it fp32, as the quality tables do). Reports checkpoint size on
disk and resident memory. Every config runs in its own process (clean resident-memory numbers); a quantized config is
first quantized (RTN) and saved by a separate process, then the timed process loads the saved checkpoint, as a
deployment would. RSS load = resident memory added by `from_pretrained`; RSS run = added by the end of the runs
(includes the kernels' repacked weights and workspaces). --rounds R runs the configs in turn R times and reports the
median of the per-round ratios to fp32 (a slow spell of the shared machine then hits every config alike). Writes
benchmarks/results/generate.{json,md}.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from transformers import AutoModelForCausalLM, AutoTokenizer

import cbq_hf
from cbq_hf.demo import demo_model_path
from cbq_hf.kernels.cpu import paths as cpu_paths
from cbq_hf.kernels.dispatch import force_kernel

CONFIGS = {
    "fp32": None,
    "bf16": None,
    "W4A16 g128": dict(bits=4, group_size=128, act_bits=None),
    "W4A16 g128 + int8 head": dict(bits=4, group_size=128, act_bits=None, lm_head_bits=8),
    "W2A16 g64": dict(bits=2, group_size=64, act_bits=None),
    "W4A8 g128": dict(bits=4, group_size=128, act_bits=8),
    # LO-BCQ (universal codebooks, RTN): weight-only, and W4A4 with activations encoded at run time
    "LO-BCQ W4A16": dict(bits=4, format="lobcq", act_bits=None),
    "LO-BCQ W4A4": dict(bits=4, format="lobcq", act_bits=4),
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
    """fp32 / bf16 from the demo model, a quantized config from its saved checkpoint directory `path`."""
    if name == "fp32":
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    if name == "bf16":
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def prepare(name: str, src: str, dst: str) -> None:
    """Quantize the demo model with RTN in config `name` and save it to `dst`."""
    model = AutoModelForCausalLM.from_pretrained(
        src, dtype=torch.float32, quantization_config=cbq_hf.CBQConfig(method="rtn", **CONFIGS[name])
    )
    model.save_pretrained(dst)
    AutoTokenizer.from_pretrained(src).save_pretrained(dst)


def run(model, tok, batch: int, new_tokens: int, repeats: int = 1) -> tuple[list[float], torch.Tensor]:
    """tokens/s of `repeats` timed generate() calls (after a short warm-up) and the last call's output ids."""
    enc = tok([PROMPT] * batch, return_tensors="pt")
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=tok.eos_token_id)
    model.generate(**enc, max_new_tokens=4, do_sample=False, pad_token_id=tok.eos_token_id)  # warm-up
    rates = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = model.generate(**enc, **kw)
        rates.append(batch * new_tokens / (time.perf_counter() - t))
    return rates, out


def worker(
    name: str, path: str, batches: list[int], new_tokens: int, threads: int, ref_tokens: int, repeats: int = 1
) -> dict:
    """Load one config, time it, and return its result row (runs in a fresh process)."""
    torch.set_num_threads(threads)
    tok = AutoTokenizer.from_pretrained(path)
    with torch.inference_mode():
        gc.collect()
        rss0 = rss_mb()
        model = load(name, path).eval()
        rss1 = rss_mb()
        if name in ("fp32", "bf16"):
            with tempfile.TemporaryDirectory() as tmp:
                model.save_pretrained(tmp)
                size = dir_size(Path(tmp))
        else:
            size = sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))
        row = {"config": name, "checkpoint_mb": size / 2**20, "rss_load_mb": rss1 - rss0}
        kernels: set[str] = set()
        for b in batches:
            rates, out = run(model, tok, b, new_tokens, repeats)
            row[f"tok_s_b{b}"] = statistics.median(rates)
            row[f"tok_s_b{b}_runs"] = rates
            kernels |= {m.last_kernel for m in model.modules() if isinstance(m, cbq_hf.CBQLinear) and m.last_kernel}
            if name.startswith(("W4A16", "W2A16")) and b == 1 and ref_tokens > 0:
                # the reference path is ~30x slower than the kernels: compare the first `ref_tokens` greedy tokens
                with force_kernel("reference"):
                    _, ref = run(model, tok, b, ref_tokens)
                row["greedy_equals_reference"] = bool(torch.equal(out[:, : ref.shape[1]], ref))
                row["reference_tokens"] = ref_tokens
        row["rss_run_mb"] = rss_mb() - rss0
        row["kernels"] = sorted(kernels)  # paths of the timed runs' last step (not the reference comparison)
        row["repacked_mb"] = (
            sum(cpu_paths.repacked_bytes(m) for m in model.modules() if isinstance(m, cbq_hf.CBQLinear)) / 2**20
        )
    return row


def merge_rounds(runs: list[dict], fp32_runs: list[dict | None], batches: list[int]) -> dict:
    """One config's row over the rounds: the first round's row (memory, greedy check), tok/s = median of every timed
    call, and per batch the ratio to fp32 of each round (``x_fp32_b{b}_rounds``) with its median (``x_fp32_b{b}``)."""
    row = dict(runs[0])
    row["rounds"] = len(runs)
    for b in batches:
        rates = [t for run in runs for t in run[f"tok_s_b{b}_runs"]]
        row[f"tok_s_b{b}_runs"] = rates
        row[f"tok_s_b{b}"] = statistics.median(rates)
        ratios = [run[f"tok_s_b{b}"] / base[f"tok_s_b{b}"] for run, base in zip(runs, fp32_runs) if base]
        if ratios:
            row[f"x_fp32_b{b}_rounds"] = ratios
            row[f"x_fp32_b{b}"] = statistics.median(ratios)
    row["kernels"] = sorted({k for run in runs for k in run["kernels"]})
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--batches", nargs="*", type=int, default=[1, 8])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="timed generate() calls per config and batch; the median is reported (all in the JSON)",
    )
    ap.add_argument("--configs", nargs="*", default=list(CONFIGS))
    ap.add_argument(
        "--ref-tokens",
        type=int,
        default=32,
        help="greedy tokens compared with the (slow) reference path for W4A16 / W2A16 at batch 1",
    )
    ap.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run every config this many times, in turn (fresh processes each round), so a slow spell "
        "of the shared machine hits all configs alike; the ratios to fp32 are computed per round "
        "and their median is reported (tok/s: the median over all rounds' calls)",
    )
    ap.add_argument("--out", default="generate", help="file stem under benchmarks/results/")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--prepare", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--path", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.prepare:
        prepare(args.prepare, demo_model_path(), args.path)
        return
    if args.worker:
        row = worker(
            args.worker, args.path, args.batches, args.new_tokens, args.threads, args.ref_tokens, args.repeats
        )
        print("ROW " + json.dumps(row), flush=True)
        return
    src = demo_model_path()
    rows = []
    load_before = " ".join(f"{v:.2f}" for v in os.getloadavg())
    me = [sys.executable, str(Path(__file__).resolve())]
    with tempfile.TemporaryDirectory() as tmp:
        paths = {}
        for name in args.configs:
            paths[name] = src
            if CONFIGS[name] is not None:
                paths[name] = str(Path(tmp) / name.replace(" ", "_"))
                subprocess.run(me + ["--prepare", name, "--path", paths[name]], check=True)
        rounds: list[dict[str, dict]] = []
        for r in range(args.rounds):
            by_name = {}
            for name in args.configs:
                # the greedy comparison with the slow reference path runs in the first round only
                ref_tokens = args.ref_tokens if r == 0 else 0
                res = subprocess.run(
                    me
                    + [
                        "--worker",
                        name,
                        "--path",
                        paths[name],
                        "--threads",
                        str(args.threads),
                        "--new-tokens",
                        str(args.new_tokens),
                        "--ref-tokens",
                        str(ref_tokens),
                        "--repeats",
                        str(args.repeats),
                        "--batches",
                        *map(str, args.batches),
                    ],
                    check=True,
                    capture_output=True,
                    text=True,
                )
                by_name[name] = json.loads(
                    next(line[4:] for line in res.stdout.splitlines() if line.startswith("ROW "))
                )
                print(f"round {r + 1}: {by_name[name]}", flush=True)
            rounds.append(by_name)
    rows = [
        merge_rounds([rnd[name] for rnd in rounds], [rnd.get("fp32") for rnd in rounds], args.batches)
        for name in args.configs
    ]
    meta = {
        "command": "python " + " ".join(sys.argv),
        "threads": args.threads,
        "load_before": load_before,
        "load_after": " ".join(f"{v:.2f}" for v in os.getloadavg()),
    }
    lines = [
        "# End-to-end generate() speed, SmolLM2-135M",
        "",
        f"Command: `{meta['command']}`",
        "",
        f"{args.threads} thread(s); load average before {load_before}, after {meta['load_after']} "
        "(2 shared cores)."
        + (
            f" {args.rounds} rounds: `x fp32` is the median of the per-round ratios (their range in brackets)."
            if args.rounds > 1
            else ""
        ),
        "",
        "| config | "
        + " | ".join(f"tok/s b{b} | x fp32 b{b}" for b in args.batches)
        + " | checkpoint MB | RSS load MB | RSS run MB | repacked MB | greedy == reference (first N tokens) "
        "| kernels |",
        "|---" * (7 + 2 * len(args.batches)) + "|",
    ]
    for r in rows:
        cells = []
        for b in args.batches:
            ratio = r.get(f"x_fp32_b{b}", float("nan"))
            per_round = r.get(f"x_fp32_b{b}_rounds", [])
            spread = f" ({min(per_round):.2f}-{max(per_round):.2f})" if len(per_round) > 1 else ""
            cells += [f"{r[f'tok_s_b{b}']:.1f}", f"{ratio:.2f}{spread}"]
        lines.append(
            f"| {r['config']} | " + " | ".join(cells) + f" | {r['checkpoint_mb']:.1f} | "
            f"{r['rss_load_mb']:.0f} | {r['rss_run_mb']:.0f} | {r['repacked_mb']:.1f} | "
            f"{r.get('greedy_equals_reference', '')}"
            + (f" ({r['reference_tokens']})" if "reference_tokens" in r else "")
            + f" | {', '.join(r['kernels'])} |"
        )
    md = "\n".join(lines) + "\n"
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.out}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (out / f"{args.out}.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
