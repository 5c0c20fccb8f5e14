"""Kernel benchmark: dense fp32 / bf16 `F.linear` against every `CBQLinear` CPU path (or, with --device cuda, the
Triton GPU paths).

For each (K, N) and M it times one call of each path, interleaved (path A, path B, ... then again), cycling through
several copies of every layer so the weights are not hot in cache, and reports the median. Ratios are computed
from the same run. Writes JSON + markdown into benchmarks/results/ (`--out`); docs/benchmarks_kernels.md is written by
hand from those files.

    .venv/bin/python -P benchmarks/kernels.py                 # full table
    .venv/bin/python -P benchmarks/kernels.py --quick         # M=1 and 512 on 4096x4096 only
    .venv/bin/python -P benchmarks/kernels.py --shapes 4096x4096 --ms 1 8 16 32 64 --paths cpu_packed cpu_dequant
    .venv/bin/python -P benchmarks/kernels.py --device cuda --out kernels_cuda   # on a GPU machine
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cbq_hf.formats.uniform import UniformFormat
from cbq_hf.kernels.cpu import build
from cbq_hf.kernels.cpu import paths as cpu_paths
from cbq_hf.kernels.dispatch import force_kernel
from cbq_hf.nn.linear import CBQLinear

#: (label, bits, group_size, act_bits, activation dtype, kernel path)
CONFIGS = [
    ("W4A16 g128 fp32", 4, 128, None, torch.float32, "cpu_packed"),
    ("W4A16 g128 bf16", 4, 128, None, torch.bfloat16, "cpu_packed"),
    ("W2A16 g64 fp32", 2, 64, None, torch.float32, "cpu_packed"),
    ("W2A16 g64 fp32", 2, 64, None, torch.float32, "cpu_lut2"),
    ("W4A8 g128 fp32", 4, 128, 8, torch.float32, "cpu_int"),
    ("W2A8 g64 fp32", 2, 64, 8, torch.float32, "cpu_int"),
    ("W4A4 g128 fp32", 4, 128, 4, torch.float32, "cpu_int"),
    ("W4A8 g128 fp32", 4, 128, 8, torch.float32, "cpu_amx"),
    ("W2A8 g64 fp32", 2, 64, 8, torch.float32, "cpu_amx"),
    ("W4A4 g128 fp32", 4, 128, 4, torch.float32, "cpu_amx"),
    ("W4A16 g128 fp32", 4, 128, None, torch.float32, "cpu_dequant"),
    ("W4A16 g128 bf16", 4, 128, None, torch.bfloat16, "cpu_dequant"),
    ("W2A16 g64 fp32", 2, 64, None, torch.float32, "cpu_dequant"),
    ("W4A8 g128 fp32", 4, 128, 8, torch.float32, "cpu_dequant"),
    ("W4A16 g128 fp32", 4, 128, None, torch.float32, "auto"),
    ("W4A8 g128 fp32", 4, 128, 8, torch.float32, "auto"),
    ("W2A16 g64 fp32", 2, 64, None, torch.float32, "auto"),
]
#: The same questions on a CUDA GPU (--device cuda): the Triton paths, half-precision activations.
GPU_CONFIGS = [
    ("W4A16 g128 fp16", 4, 128, None, torch.float16, "gpu_packed"),
    ("W4A16 g128 bf16", 4, 128, None, torch.bfloat16, "gpu_packed"),
    ("W4A16 g128 fp32", 4, 128, None, torch.float32, "gpu_packed"),
    ("W2A16 g64 fp16", 2, 64, None, torch.float16, "gpu_packed"),
    ("W4A8 g128 fp16", 4, 128, 8, torch.float16, "gpu_int"),
    ("W2A8 g64 fp16", 2, 64, 8, torch.float16, "gpu_int"),
    ("W4A4 g128 fp16", 4, 128, 4, torch.float16, "gpu_int"),
    ("W4A16 g128 fp16", 4, 128, None, torch.float16, "gpu_dequant"),
    ("W4A8 g128 fp16", 4, 128, 8, torch.float16, "gpu_dequant"),
    ("W4A16 g128 fp16", 4, 128, None, torch.float16, "auto"),
    ("W4A8 g128 fp16", 4, 128, 8, torch.float16, "auto"),
]
SHAPES = [(4096, 4096), (4096, 11008), (576, 1536)]
MS = [1, 8, 64, 512]


def random_cbq(k: int, n: int, bits: int, group: int, act_bits: int | None) -> CBQLinear:
    """A CBQLinear with random packed buffers (fast to build; kernels do not care where codes came from)."""
    from cbq_hf.formats.uniform import pack_codes

    fmt = UniformFormat(bits, group, act_bits=act_bits)
    lin = CBQLinear(k, n, False, fmt)
    bufs = {}
    for name, (shape, dtype) in fmt.buffer_specs(n, k).items():
        if name == "qweight" and bits == fmt.spec.slot_bits:  # every byte is a valid set of codes
            bufs[name] = torch.randint(0, 256, shape, dtype=torch.uint8)
        elif name == "qweight":
            bufs[name] = pack_codes(torch.randint(0, 2**bits, (n, k), dtype=torch.uint8), fmt.spec.slot_bits)
        elif name == "scales":
            bufs[name] = (torch.rand(shape) * 0.01 + 1e-3).to(dtype)
        elif name == "zeros":
            bufs[name] = torch.randint(0, 2**bits, shape, dtype=dtype)
        else:
            bufs[name] = torch.ones(shape, dtype=dtype)
    lin.load_packed(bufs)
    return lin


def copies_for(nbytes: int) -> int:
    """Enough copies that one cycle streams >= 256 MB (far beyond any L3 here), at least 2, at most 24."""
    return max(2, min(24, -(-256 * 2**20 // max(nbytes, 1))))


def timed(fn, device: str = "cpu") -> float:
    if device == "cuda":  # time the kernels, not their launch
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


def select_configs(paths: list[str] | None, device: str) -> list[tuple]:
    """The configs to time: --paths filters by path name over both lists (so a GPU path can be named on CPU, e.g.
    under TRITON_INTERPRET=1 for a smoke run); without --paths, the device's own list."""
    if paths is None:
        return GPU_CONFIGS if device == "cuda" else CONFIGS
    table = GPU_CONFIGS if device == "cuda" else CONFIGS
    extra = [c for c in (CONFIGS if device == "cuda" else GPU_CONFIGS) if c[5] != "auto"]
    return [c for c in table + extra if c[5] in paths]


def bench_shape(
    k: int, n: int, ms: list[int], paths: list[str] | None, reps: int, min_time: float, device: str = "cpu"
) -> list[dict]:
    ncopy_f32 = copies_for(4 * k * n)
    dense32 = [torch.randn(n, k, device=device) * 0.02 for _ in range(ncopy_f32)]
    dense16 = [w.bfloat16() for w in dense32[: max(2, ncopy_f32 // 2 + 1)]]
    configs = select_configs(paths, device)
    layers: dict[tuple, list[CBQLinear]] = {}
    for _label, bits, group, act, _dt, _path in configs:
        key = (bits, group, act)
        if key not in layers:
            ncopy = copies_for(k * n * bits // 8)
            layers[key] = [random_cbq(k, n, bits, group, act).to(device) for _ in range(ncopy)]
    rows = []
    torch.set_grad_enabled(False)
    for m in ms:
        x32 = torch.randn(m, k, device=device)
        xs = {torch.float32: x32, torch.bfloat16: x32.bfloat16(), torch.float16: x32.half()}
        x16 = xs[torch.bfloat16]
        cands: list[tuple[str, str, object]] = []
        counter = {"i": 0}

        def cyc(seq):
            counter["i"] += 1
            return seq[counter["i"] % len(seq)]

        cands.append(("dense fp32", "F.linear", lambda: F.linear(x32, cyc(dense32))))
        cands.append(("dense bf16", "F.linear", lambda: F.linear(x16, cyc(dense16))))
        for label, bits, group, act, dt, path in configs:
            if path in ("cpu_dequant", "cpu_amx") and m == 1:
                continue  # a whole-matrix dequantization, or a 16-token tile, for one token is never the choice
            if (path == "cpu_amx" and not cpu_paths.amx_available()) or (
                path == "cpu_lut2" and not cpu_paths.lut2_available()
            ):
                continue  # this CPU or build does not have the path
            mods = layers[(bits, group, act)]
            x = xs[dt]

            def call(mods=mods, x=x, path=path):
                mod = cyc(mods)
                if path == "auto":
                    mod(x)
                else:
                    with force_kernel(path):
                        mod(x)
                return mod.last_kernel

            call()  # repack, build, warm the code path
            chosen = mods[counter["i"] % len(mods)].last_kernel
            if path.startswith("cpu_") or (path == "auto" and device == "cpu"):
                repack = cpu_paths.lut2_weights if chosen == "cpu_lut2" else cpu_paths.panels
                for mod in mods:  # repack every copy before timing (without a full-size call per copy)
                    repack(mod)
            cands.append((label, path if path != "auto" else f"auto->{chosen}", call))
        times: dict[int, list[float]] = {i: [] for i in range(len(cands))}
        start = time.perf_counter()
        r = 0
        while r < reps or (time.perf_counter() - start < min_time and r < 10 * reps):
            for i, (_, _, fn) in enumerate(cands):
                times[i].append(timed(fn, device))
            r += 1
        med = {i: statistics.median(t) for i, t in times.items()}
        base32, base16 = med[0], med[1]
        for i, (label, path, _) in enumerate(cands):
            rows.append(
                {
                    "K": k,
                    "N": n,
                    "M": m,
                    "config": label,
                    "path": path,
                    "ms": med[i] * 1e3,
                    "vs_fp32": base32 / med[i],
                    "vs_bf16": base16 / med[i],
                    "reps": len(times[i]),
                }
            )
        print(
            f"K={k} N={n} M={m}: " + ", ".join(f"{c[0]}[{c[1]}] {med[i] * 1e3:.3f}ms" for i, c in enumerate(cands)),
            flush=True,
        )
    return rows


def to_markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        "# CBQLinear CPU kernel benchmark",
        "",
        f"Command: `{meta['command']}`",
        "",
        f"Machine: {meta['cpu']} ({meta['variant']} build; device {meta.get('device', 'cpu')}), torch "
        f"{meta['torch']}, {meta['threads']} threads; "
        f"load average before {meta['load_before']}, after {meta['load_after']} (2 cores shared with other "
        f"jobs: absolute times are noisy, ratios come from interleaved calls in the same run).",
        "",
        f"torch float32 matmul precision: {meta.get('fp32_matmul', 'highest')}"
        + (" (float32 GEMMs, dense fp32 included, run in bf16)" if meta.get("fp32_matmul") == "medium" else "")
        + ".",
        "",
        "Median time per call with weights cycled over several copies (not cache-hot). `x fp32` = speed-up over "
        "dense fp32 `F.linear`, `x bf16` = over dense bf16 `F.linear` (higher is faster).",
        "",
    ]
    for k, n in dict.fromkeys((r["K"], r["N"]) for r in rows):
        lines += [f"## K={k}, N={n}", "", "| M | config | path | ms | x fp32 | x bf16 |", "|---|---|---|---|---|---|"]
        for r in rows:
            if (r["K"], r["N"]) == (k, n):
                lines.append(
                    f"| {r['M']} | {r['config']} | {r['path']} | {r['ms']:.3f} | {r['vs_fp32']:.2f} | "
                    f"{r['vs_bf16']:.2f} |"
                )
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="*", default=None, help="KxN, e.g. 4096x4096")
    ap.add_argument("--ms", nargs="*", type=int, default=None)
    ap.add_argument("--paths", nargs="*", default=None)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--min-time", type=float, default=1.0, help="keep repeating up to this many seconds per M")
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1, as in the issue: the 2 cores are shared, 2-thread runs are noisy)",
    )
    ap.add_argument(
        "--device",
        default="cpu",
        choices=["cpu", "cuda"],
        help="cuda: the Triton paths on the GPU, against dense fp32/bf16 cuBLAS",
    )
    ap.add_argument(
        "--fp32-matmul",
        default="highest",
        choices=["highest", "medium"],
        help="torch.set_float32_matmul_precision for the run: 'medium' lets float32 GEMMs (dense fp32 "
        "and cpu_dequant with float32 inputs alike) run in bf16",
    )
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default="kernels", help="file stem under benchmarks/results/")
    args = ap.parse_args()
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes] if args.shapes else SHAPES
    ms = args.ms or MS
    if args.quick:
        shapes, ms = [(4096, 4096)], [1, 512]
    torch.set_num_threads(args.threads)
    torch.set_float32_matmul_precision(args.fp32_matmul)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device visible to torch")
    if args.device == "cpu" and build.load() is None:
        raise SystemExit(f"CPU kernels unavailable: {build.build_error()}")
    meta = {
        "command": "python " + " ".join(sys.argv),
        "cpu": platform.processor() or platform.machine(),
        "variant": build.loaded_variant() if args.device == "cpu" else "triton",
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "fp32_matmul": args.fp32_matmul,
        "load_before": " ".join(f"{v:.2f}" for v in os.getloadavg()),
    }
    if build.cpu_model():
        meta["cpu"] = build.cpu_model()
    rows = []
    for k, n in shapes:
        rows += bench_shape(k, n, ms, args.paths, args.reps, args.min_time, args.device)
    meta["load_after"] = " ".join(f"{v:.2f}" for v in os.getloadavg())
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.out}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    md = to_markdown(rows, meta)
    (out / f"{args.out}.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
