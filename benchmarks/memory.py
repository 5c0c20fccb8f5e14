r"""Peak resident memory of CBQ calibration vs number of decoder blocks (tiny random Llama models of one width).

Each (layers, activation_storage) point runs in its own process: build the random model, measure its resident
set (RSS) after loading, reset the kernel's peak-RSS counter (/proc/self/clear_refs = 5; falls back to sampling
RSS every 5 ms when that is not allowed), calibrate on CPU, read the peak (VmHWM). "Overhead" is the peak during
calibration minus the RSS after loading: what calibration adds on top of the model. A script that measures and
writes tables; it asserts nothing.

The commands behind docs/memory.md:
    .venv/bin/python benchmarks/memory.py --layers 2 8 32 --storage cpu --allocator default mmap128k \
        --nsamples 16 --seqlen 64
    .venv/bin/python benchmarks/memory.py --layers 2 --storage cpu disk --nsamples 16 256 --seqlen 128 \
        --out benchmarks/results/memory_streams --doc-section memory-streams

Writes `--out`.json and `--out`.md (default benchmarks/results/memory) and the table section of docs/memory.md
between the `<!-- NAME -->` markers (`--doc-section`, default memory-table).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import re
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DOC = ROOT / "docs" / "memory.md"
MIB = 2**20

logger = logging.getLogger("benchmarks.memory")


# ------------------------------------------------------------------------------------------------ child
def _status_kib(key: str) -> int:
    m = re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    return int(m.group(1)) if m else 0


class _PeakSampler:
    """Peak RSS (bytes) over a code region: kernel high-water mark when it can be reset, else 5 ms sampling."""

    def __init__(self) -> None:
        self.kernel = False
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> _PeakSampler:
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
            self.kernel = True
        except OSError:
            import psutil

            proc = psutil.Process()

            def sample() -> None:
                while not self._stop.is_set():
                    self.peak = max(self.peak, proc.memory_info().rss)
                    time.sleep(0.005)

            self._thread = threading.Thread(target=sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.kernel:
            self.peak = _status_kib("VmHWM") * 1024
        else:
            self._stop.set()
            assert self._thread is not None
            self._thread.join()


def child(args: argparse.Namespace) -> dict[str, Any]:
    """One measurement: build, load, calibrate; return the numbers (bytes, seconds)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    sys.path.insert(0, str(ROOT))
    from cbq_hf.calibration.engine import calibrate
    from cbq_hf.config import CBQConfig

    torch.set_num_threads(args.threads)
    layers, storage, nsamples = args.layers[0], args.storage[0], args.nsamples[0]
    cfg = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        max_position_embeddings=max(args.seqlen, 256),
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    ids = torch.randint(0, args.vocab, (nsamples, args.seqlen), generator=torch.Generator().manual_seed(1))
    model_bytes = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    block_bytes = sum(p.numel() * 4 for p in model.model.layers[0].parameters())  # one block in float32
    gc.collect()
    rss_loaded = _status_kib("VmRSS") * 1024
    with tempfile.TemporaryDirectory(prefix="cbq_mem_") as tmp:
        config = CBQConfig(
            method="cbq",
            bits=4,
            group_size=128,
            window_size=args.window,
            window_overlap=1,
            epochs=1,
            batch_size=args.batch_size,
            nsamples=nsamples,
            seqlen=args.seqlen,
            calibration_device="cpu",
            activation_storage=storage,
            checkpoint_dir=os.path.join(tmp, "ckpt") if args.checkpoint else None,
        )
        t0 = time.perf_counter()
        with _PeakSampler() as peak:
            report = calibrate(model, config, ids, progress=False)
        seconds = time.perf_counter() - t0
    return {
        "layers": layers,
        "storage": storage,
        "checkpoint": args.checkpoint,
        "nsamples": nsamples,
        "seqlen": args.seqlen,
        "model_bytes": model_bytes,
        "block_fp32_bytes": block_bytes,
        "stream_bytes": nsamples * args.seqlen * args.hidden * 4,
        "rss_after_load_bytes": rss_loaded,
        "peak_rss_calibration_bytes": peak.peak,
        "overhead_bytes": peak.peak - rss_loaded,
        "peak_method": "VmHWM" if peak.kernel else "sampled",
        "windows": len(report["windows"]),
        "seconds": round(seconds, 1),
    }


# ------------------------------------------------------------------------------------------------ parent
def _mib(b: float) -> str:
    return f"{b / MIB:.1f}"


def render(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [
        f"Command: `{meta['command']}`",
        "",
        f"Model: random Llama, hidden {meta['hidden']}, intermediate {meta['intermediate']}, vocab "
        f"{meta['vocab']}, float32. Calibration: W4 g128, window {meta['window']} (overlap 1), 1 epoch, "
        f"{meta['seqlen']} tokens per sample, batch {meta['batch_size']}, CPU, {meta['threads']} thread(s); "
        f"one block in float32 = {_mib(rows[0]['block_fp32_bytes'])} MiB. Peak measured with "
        f"{rows[0]['peak_method']}. One stream = samples x tokens x hidden x 4 bytes.",
        "",
        "| layers | samples | one stream (MiB) | activations | malloc | checkpoint | model (MiB) "
        "| RSS after load (MiB) | peak RSS calibrating (MiB) | overhead (MiB) | overhead / model | s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['layers']} | {r['nsamples']} | {_mib(r['stream_bytes'])} | {r['storage']} | "
            f"{r.get('allocator', 'default')} | "
            f"{'yes' if r['checkpoint'] else 'no'} | "
            f"{_mib(r['model_bytes'])} | {_mib(r['rss_after_load_bytes'])} | "
            f"{_mib(r['peak_rss_calibration_bytes'])} | {_mib(r['overhead_bytes'])} | "
            f"{r['overhead_bytes'] / r['model_bytes']:.2f} | {r['seconds']} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, nargs="+", default=[2, 8, 32], help="decoder blocks of each model")
    p.add_argument(
        "--storage",
        nargs="+",
        default=["cpu", "disk"],
        choices=["cpu", "disk"],
        help="activation_storage values to measure",
    )
    p.add_argument("--checkpoint", action="store_true", help="also write a resumable checkpoint (temp folder)")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--intermediate", type=int, default=1024)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--nsamples", type=int, nargs="+", default=[16], help="calibration samples (one point each)")
    p.add_argument("--seqlen", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--window", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch threads of each measurement")
    p.add_argument(
        "--allocator",
        nargs="+",
        default=["default"],
        choices=["default", "mmap128k"],
        help="glibc malloc setting of each measurement: its default, or MALLOC_MMAP_THRESHOLD_=131072 "
        "(fixed threshold: large blocks are mapped and returned to the OS when freed)",
    )
    p.add_argument("--out", default=str(RESULTS / "memory"), help="output path without extension")
    p.add_argument(
        "--doc-section",
        default="memory-table",
        help="name of the <!-- NAME --> ... <!-- /NAME --> section of docs/memory.md to replace",
    )
    p.add_argument("--no-doc", action="store_true", help="do not update docs/memory.md")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from tqdm import tqdm

    rows = []
    points = [(n, s, ns, a) for n in args.layers for ns in args.nsamples for s in args.storage for a in args.allocator]
    for n, storage, ns, alloc in tqdm(points, desc="memory", unit="run"):
        cmd = [sys.executable, __file__, "--child", "--layers", str(n), "--storage", storage, "--nsamples", str(ns)]
        for k in ("hidden", "intermediate", "heads", "vocab", "seqlen", "window", "threads"):
            cmd += [f"--{k}", str(getattr(args, k))]
        cmd += ["--batch-size", str(args.batch_size)] + (["--checkpoint"] if args.checkpoint else [])
        env = dict(os.environ)
        env.pop("MALLOC_MMAP_THRESHOLD_", None)
        if alloc == "mmap128k":
            env["MALLOC_MMAP_THRESHOLD_"] = "131072"
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode:
            raise SystemExit(f"measurement failed: {shlex.join(cmd)}\n{proc.stderr[-4000:]}")
        out = proc.stdout
        row = json.loads(out.strip().splitlines()[-1])
        row["allocator"] = alloc
        logger.info(
            "layers %d, %s: model %s MiB, overhead %s MiB (%s s)",
            n,
            storage,
            _mib(row["model_bytes"]),
            _mib(row["overhead_bytes"]),
            row["seconds"],
        )
        rows.append(row)
    argv = list(sys.argv[1:])
    meta = {
        k: getattr(args, k) for k in ("hidden", "intermediate", "vocab", "seqlen", "batch_size", "window", "threads")
    }
    meta["command"] = ".venv/bin/python benchmarks/memory.py " + shlex.join(argv)
    table = render(rows, meta)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n", encoding="utf-8")
    out.with_suffix(".md").write_text(
        "# Peak memory of CBQ calibration (benchmarks/memory.py)\n\n" + table, encoding="utf-8"
    )
    if not args.no_doc and DOC.exists():
        text = DOC.read_text(encoding="utf-8")
        sec = re.escape(args.doc_section)
        new = re.sub(
            rf"(<!-- {sec} -->\n).*?(<!-- /{sec} -->)", lambda m: m.group(1) + table + m.group(2), text, flags=re.S
        )
        DOC.write_text(new, encoding="utf-8")
    print(table)


if __name__ == "__main__":
    main()
