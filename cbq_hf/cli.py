"""The `cbq-hf` command.

    cbq-hf quantize MODEL OUTPUT [--bits 4 --group-size 128 --act-bits 8 --method cbq ...]
    cbq-hf eval MODEL [--text FILE] [--json OUT]
    cbq-hf demo-model            (print the folder of the fp32 demo checkpoint, building it once)

Exit codes: 0 success; 2 bad arguments or input (clear message on stderr); 3 model or checkpoint cannot be loaded;
4 output cannot be written; 1 anything unexpected.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from typing import Any

from .errors import EXIT_ERROR, EXIT_LOAD, EXIT_OK, EXIT_USAGE, EXIT_WRITE, CLIError

__all__ = ["EXIT_ERROR", "EXIT_LOAD", "EXIT_OK", "EXIT_USAGE", "EXIT_WRITE", "CLIError", "build_parser", "main"]


def _add_quantize(sub) -> None:
    from .formats import registered_formats
    from .presets import PRESETS

    p = sub.add_parser(
        "quantize",
        help="quantize a model and save it",
        description="Quantize MODEL (a local folder or Hub id) with CBQ or RTN and save it to OUTPUT.",
    )
    p.add_argument("model", help="full-precision model: local folder or Hub id")
    p.add_argument(
        "output",
        help="folder to write the quantized checkpoint to; it must be absent or empty unless --overwrite "
        "(written atomically: afterwards it is absent, unchanged, or complete)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace OUTPUT whole when it already holds files (everything in it is deleted)",
    )
    g = p.add_argument_group("format")
    g.add_argument("--bits", type=int, default=4, help="weight bits: 2, 3, 4 or 8 (default 4)")
    g.add_argument("--group-size", type=int, default=128, help="input channels per scale; -1 = per row (default 128)")
    g.add_argument("--sym", action="store_true", help="symmetric weight grid (default asymmetric)")
    g.add_argument("--act-bits", type=int, default=None, help="activation bits: 8 or 4 (default: weight-only)")
    g.add_argument("--format", default="uniform", choices=registered_formats(), help="storage format")
    g.add_argument(
        "--lm-head-bits",
        type=int,
        default=None,
        help="also quantize the output head (8 or 4 bits, weight-only RTN; default: keep it float)",
    )
    g = p.add_argument_group("calibration")
    g.add_argument("--method", default="cbq", choices=["cbq", "rtn"], help="calibration method (default cbq)")
    g.add_argument(
        "--dataset",
        default="wikitext2",
        help="calibration text: 'wikitext2', a .txt/.jsonl file or a datasets name (default wikitext2)",
    )
    g.add_argument(
        "--preset",
        default=None,
        choices=sorted(PRESETS),
        help="calibration budget: fast (minutes on a CPU for a small model), balanced, gpu (the default budget); "
        "--nsamples/--seqlen/--epochs/--batch-size override it (docs/presets.md)",
    )
    g.add_argument("--nsamples", type=int, default=None, help="calibration sequences")
    g.add_argument("--seqlen", type=int, default=None, help="tokens per calibration sequence")
    g.add_argument("--seed", type=int, default=0, help="sampling and initialisation seed (default 0)")
    g.add_argument("--window-size", type=int, default=None, help="decoder blocks per window")
    g.add_argument("--window-overlap", type=int, default=None, help="blocks shared by consecutive windows")
    g.add_argument("--epochs", type=int, default=None, help="passes over the samples per window")
    g.add_argument("--batch-size", type=int, default=None, help="calibration sequences per optimisation step")
    g.add_argument(
        "--rounding-init",
        default=None,
        choices=["rtn", "gptq"],
        help="start of the rounding: gptq (GPTQ's error-compensated codes; the default for cbq on the uniform grid, "
        "opt-in for lobcq) or rtn",
    )
    g.add_argument(
        "--e2e-epochs",
        type=int,
        default=None,
        help="passes of the end-to-end stage after the windows (0 skips it); default: the preset's",
    )
    g.add_argument(
        "--calibration-dtype",
        default=None,
        choices=["float32", "bfloat16", "auto"],
        help="matrix products of the trained window: float32, bfloat16 autocast, or auto (bfloat16 where the device "
        "has bfloat16 matrix units); default: the preset's (auto for fast and balanced), else float32",
    )
    g.add_argument("--device", default="auto", help="calibration device: auto, cpu, cuda, cuda:N")
    g.add_argument("--checkpoint-dir", default=None, help="folder to resume an interrupted calibration from")
    g = p.add_argument_group("placement (models larger than one device, docs/scale_out.md)")
    g.add_argument(
        "--device-map",
        default=None,
        help="transformers/accelerate device_map for loading: auto, balanced, sequential, cpu, ... "
        "(default: none, the whole model in memory on the CPU)",
    )
    g.add_argument(
        "--max-memory",
        action="append",
        default=[],
        metavar="DEVICE=SIZE",
        help="memory budget per device for --device-map, e.g. --max-memory 0=8GiB --max-memory cpu=60GiB",
    )
    g.add_argument(
        "--offload-folder",
        default=None,
        help="folder for weights that do not fit the --max-memory budgets (offloaded to disk)",
    )
    g.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="any other CBQConfig field, e.g. --set lora_rank=8 (JSON values)",
    )
    g = p.add_argument_group("output")
    g.add_argument("--eval-text", default=None, help="also report perplexity on this text file after quantizing")
    g.add_argument("--push-to-hub", default=None, metavar="REPO", help="also push the checkpoint to this Hub repo")
    g.add_argument(
        "--loss-plot",
        default=None,
        metavar="PNG",
        help="write a plot of the reconstruction loss per window (method cbq; needs matplotlib)",
    )
    g.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16", "float16"],
        help="dtype to load the model in (default float32)",
    )


def _add_eval(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="perplexity of a model on a text file (JSON out)",
        description="Perplexity with the fixed protocol: non-overlapping windows, BOS per window.",
    )
    p.add_argument("model", help="model folder or Hub id (full precision or cbq-quantized)")
    p.add_argument(
        "--text",
        default=None,
        help="UTF-8 text file (default: WikiText-2 test from shared/data, else downloaded with datasets, else the "
        "sample text shipped with cbq_hf; the run says which)",
    )
    p.add_argument("--seqlen", type=int, default=512, help="tokens per window (default 512)")
    p.add_argument("--windows", type=int, default=40, help="windows scored (default 40)")
    p.add_argument("--json", default=None, help="also write the JSON result to this file")
    p.add_argument(
        "--cached",
        action="store_true",
        help="reuse the result in --json FILE when it was measured on the same model files, text and settings",
    )
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cbq-hf", description="CBQ quantization for Hugging Face Transformers.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_quantize(sub)
    _add_eval(sub)
    sub.add_parser("demo-model", help="print the folder of the fp32 SmolLM2-135M demo checkpoint (built once)")
    try:
        from .export import add_export_parser
    except ImportError:  # pragma: no cover - export module is optional until it exists
        pass
    else:
        add_export_parser(sub)
    return parser


def _dtype(name: str):
    import torch

    return getattr(torch, name)


def _load(model: str, dtype: str, **kwargs: Any):
    from transformers import AutoModelForCausalLM

    _check_model_arg(model)
    try:
        return AutoModelForCausalLM.from_pretrained(model, dtype=_dtype(dtype), **kwargs)
    except OSError as e:
        raise CLIError(f"cannot load model {model!r}: {e}", EXIT_LOAD) from e


def _check_model_arg(model: str) -> None:
    looks_local = model.startswith(("/", ".", "~")) or model.count("/") > 1 or os.sep == "\\" and "\\" in model
    if looks_local and not os.path.isdir(model):
        raise CLIError(f"model folder {model!r} does not exist.", EXIT_LOAD)


def _tokenizer(model: str):
    from transformers import AutoTokenizer

    _check_model_arg(model)
    try:
        return AutoTokenizer.from_pretrained(model)
    except (OSError, ValueError) as e:
        raise CLIError(f"cannot load the tokenizer of {model!r}: {e}", EXIT_LOAD) from e


def _default_text(command: str, purpose: str) -> tuple[str, str]:
    """(path, origin) of the default text for `purpose`; says on stderr which source it is (`cbq_hf.locations`)."""
    from .locations import text_source

    source = text_source(purpose)
    print(f"cbq-hf {command}: {purpose} text: {source.description}", file=sys.stderr)
    return str(source.path), source.origin


def _file_stamp(path: str) -> list:
    """Size and modification time of a file, or of the weight and config files of a folder (what `--cached`
    compares); a Hub id, which is not a local path, is kept as the name alone."""
    if os.path.isfile(path):
        st = os.stat(path)
        return [os.path.abspath(path), st.st_size, st.st_mtime_ns]
    if os.path.isdir(path):
        names = sorted(f for f in os.listdir(path) if f.endswith((".safetensors", ".json")))
        return [os.path.abspath(path)] + [[n, *_file_stamp(os.path.join(path, n))[1:]] for n in names]
    return [path]


def _read_text(path: str) -> str:
    if not os.path.isfile(path):
        raise CLIError(f"text file {path!r} does not exist.", EXIT_USAGE)
    with open(path, encoding="utf-8") as f:
        return f.read()


def _check_output_free(output: str, overwrite: bool) -> None:
    """Refuse, before any work, an output folder that already holds files unless --overwrite (the save would refuse
    it too, after calibrating; see `cbq_hf.serialization.atomic_save`)."""
    from .serialization import FolderNotEmptyError, refuse_existing

    if overwrite or not os.path.isdir(output) or not os.listdir(output):
        return
    try:
        refuse_existing(os.path.abspath(output))
    except FolderNotEmptyError as e:
        raise CLIError(str(e), EXIT_WRITE) from e


def cmd_quantize(args) -> dict:
    import cbq_hf

    from .config import CBQConfig

    out_parent = os.path.dirname(os.path.abspath(args.output)) or "."
    if os.path.isfile(args.output):
        raise CLIError(f"output {args.output!r} is a file; give a folder path.", EXIT_WRITE)
    probe = out_parent
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe) or not os.access(probe, os.W_OK):
        raise CLIError(
            f"output folder {args.output!r} is not writable ({probe} is not a writable folder).", EXIT_WRITE
        )
    _check_output_free(args.output, args.overwrite)
    fields: dict[str, Any] = {
        "bits": args.bits,
        "group_size": args.group_size,
        "sym": args.sym,
        "act_bits": args.act_bits,
        "lm_head_bits": args.lm_head_bits,
        "format": args.format,
        "method": args.method,
        "dataset": args.dataset,
        "seed": args.seed,
        "calibration_device": args.device,
        "checkpoint_dir": args.checkpoint_dir,
        "preset": args.preset,
        "calibration_dtype": args.calibration_dtype,
    }
    for key, flag in (
        ("nsamples", args.nsamples),
        ("seqlen", args.seqlen),
        ("window_size", args.window_size),
        ("window_overlap", args.window_overlap),
        ("epochs", args.epochs),
        ("batch_size", args.batch_size),
        ("rounding_init", args.rounding_init),
        ("e2e_epochs", args.e2e_epochs),
    ):
        if flag is not None:
            fields[key] = flag
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise CLIError(f"--set expects FIELD=VALUE, got {item!r}", EXIT_USAGE)
        try:
            fields[key] = json.loads(value)
        except json.JSONDecodeError:
            fields[key] = value
    if args.loss_plot:
        _check_loss_plot(args)
    calibration_text = None
    if args.method == "cbq" and args.dataset == "wikitext2":
        calibration_text, _ = _default_text("quantize", "calibration")
    tok = _tokenizer(args.model)
    try:
        cfg = CBQConfig(tokenizer=tok, **fields)
    except ValueError as e:
        raise CLIError(str(e), EXIT_USAGE) from e
    start = time.perf_counter()
    try:
        model = _load(args.model, args.dtype, quantization_config=cfg, **_placement(args))
    except ValueError as e:
        raise CLIError(str(e), EXIT_USAGE) from e
    seconds = time.perf_counter() - start
    result: dict[str, Any] = {
        "model": args.model,
        "output": args.output,
        "quantize_seconds": round(seconds, 1),
        "method": cfg.method,
        "bits": cfg.bits,
        "group_size": cfg.group_size,
        "sym": cfg.sym,
        "act_bits": cfg.act_bits,
        "format": cfg.format,
    }
    result.update(model.config.quantization_config.run_info)
    if calibration_text is not None:
        result["calibration_text"] = calibration_text
    if args.eval_text:
        from .evaluation import perplexity

        ppl = perplexity(model, tok, _read_text(args.eval_text))
        result["perplexity"] = round(ppl, 4)
        result["eval_text"] = args.eval_text
        model.config.quantization_config.run_info["perplexity"] = result["perplexity"]
        model.config.quantization_config.run_info["perplexity_text"] = os.path.basename(args.eval_text)
    try:
        model.save_pretrained(args.output, overwrite=args.overwrite)
        tok.save_pretrained(args.output)  # beside the checkpoint just written
    except OSError as e:
        raise CLIError(f"cannot write {args.output!r}: {e}", EXIT_WRITE) from e
    result["size_mb"] = round(_safetensors_bytes(args.output) / 2**20, 2)
    if os.path.isdir(args.model):
        result["base_size_mb"] = round(_safetensors_bytes(args.model) / 2**20, 2)
    report = getattr(getattr(model, "hf_quantizer", None), "calibration_report", None)
    if report and report.get("windows"):
        result["window_loss_start"] = [w["loss_start"] for w in report["windows"]]
        result["window_loss_end"] = [w["loss_end"] for w in report["windows"]]
    if args.loss_plot:
        result["loss_plot"] = _write_loss_plot(report, args.loss_plot)
    if args.push_to_hub:
        try:
            model.push_to_hub(args.push_to_hub)
            tok.push_to_hub(args.push_to_hub)
        except Exception as e:  # network or auth; the local checkpoint is already saved
            raise CLIError(
                f"saved to {args.output}, but pushing to {args.push_to_hub!r} failed "
                f"({type(e).__name__}: {e}). Check the network / `hf auth login`.",
                EXIT_WRITE,
            ) from e
        result["pushed_to"] = args.push_to_hub
    _ = cbq_hf
    return result


def cmd_eval(args) -> dict:
    import cbq_hf  # noqa: F401  (registers the cbq method so quantized checkpoints load)

    from .evaluation import perplexity

    if args.cached and not args.json:
        raise CLIError("--cached needs --json FILE: the result is kept in and reused from that file.", EXIT_USAGE)
    text_path, origin = (args.text, "file") if args.text else _default_text("eval", "evaluation")
    key = [_file_stamp(args.model), _file_stamp(text_path), args.seqlen, args.windows, args.dtype]
    if args.cached and os.path.isfile(args.json):
        with open(args.json, encoding="utf-8") as f:
            previous = json.load(f)
        if previous.get("cache_key") == json.loads(json.dumps(key)):
            print(
                f"cbq-hf eval: reusing the result in {args.json} (same model files, text and settings)",
                file=sys.stderr,
            )
            return previous
    text = _read_text(text_path)
    tok = _tokenizer(args.model)
    try:
        model = _load(args.model, args.dtype)
    except ValueError as e:
        raise CLIError(str(e), EXIT_LOAD) from e
    start = time.perf_counter()
    ppl = perplexity(model, tok, text, seqlen=args.seqlen, n_windows=args.windows)
    result = {
        "model": args.model,
        "text": text_path,
        "text_source": origin,
        "seqlen": args.seqlen,
        "windows": args.windows,
        "perplexity": round(ppl, 4),
        "seconds": round(time.perf_counter() - start, 1),
        "cache_key": key,
    }
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
    return result


def _placement(args) -> dict[str, Any]:
    """from_pretrained keyword arguments of --device-map / --max-memory / --offload-folder."""
    if not args.device_map:
        if args.max_memory or args.offload_folder:
            raise CLIError("--max-memory and --offload-folder need --device-map (e.g. --device-map auto).", EXIT_USAGE)
        return {}
    kwargs: dict[str, Any] = {"device_map": args.device_map}
    if args.max_memory:
        budget: dict[Any, str] = {}
        for item in args.max_memory:
            dev, sep, size = item.partition("=")
            if not sep or not dev or not size:
                raise CLIError(
                    f"--max-memory expects DEVICE=SIZE (e.g. 0=8GiB or cpu=60GiB), got {item!r}", EXIT_USAGE
                )
            budget[int(dev) if dev.isdigit() else dev] = size
        kwargs["max_memory"] = budget
    if args.offload_folder:
        kwargs["offload_folder"] = args.offload_folder
    return kwargs


def _safetensors_bytes(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder) if f.endswith(".safetensors"))


def _check_loss_plot(args) -> None:
    """Fail before calibrating when --loss-plot cannot be honoured."""
    if args.method != "cbq":
        raise CLIError("--loss-plot needs --method cbq (RTN has no reconstruction loss).", EXIT_USAGE)
    try:
        import matplotlib  # noqa: F401
    except ImportError as e:
        raise CLIError(
            "--loss-plot needs matplotlib, which is not installed (`pip install matplotlib`), or drop "
            "--loss-plot; the losses are also in the JSON output (window_loss_start/_end).",
            EXIT_USAGE,
        ) from e


def _write_loss_plot(report: dict | None, path: str) -> str:
    """Plot the reconstruction loss of every window before and after training (log scale) to `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    windows = (report or {}).get("windows") or []
    xs = list(range(1, len(windows) + 1))
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot(xs, [w["loss_start"] for w in windows], "o-", label="start (initial grid)")
    ax.plot(xs, [w["loss_end"] for w in windows], "o-", label="end (trained)")
    ax.set_yscale("log")
    ax.set_xlabel("window")
    ax.set_ylabel("reconstruction loss")
    ax.legend()
    fig.tight_layout()
    try:
        fig.savefig(path)
    except OSError as e:
        raise CLIError(f"cannot write the loss plot {path!r}: {e}", EXIT_WRITE) from e
    finally:
        plt.close(fig)
    return path


def _fmt_mb(mb: float) -> str:
    return f"{mb / 1024:.2f} GiB" if mb >= 1024 else f"{mb:.1f} MiB"


def _quantize_rows(r: dict) -> list[tuple[str, str]]:
    """The human-readable rows of the `cbq-hf quantize` summary (what a user checks after a run)."""
    fmt = f"W{r.get('bits')}" + (f"A{r['act_bits']}" if r.get("act_bits") else "A16")
    group = r.get("group_size")
    fmt += f" g{group}" if group and group > 0 else " per-row"
    fmt += " sym" if r.get("sym") else " asym"
    if r.get("format") not in (None, "uniform"):
        fmt += f" ({r['format']})"
    rows = [("model", str(r.get("model"))), ("output", str(r.get("output"))), ("method", f"{r.get('method')}  {fmt}")]
    if r.get("bits_per_weight") is not None:
        rows.append(("bits per weight", f"{r['bits_per_weight']:.3f}  ({r.get('quantized_linears')} linears)"))
    if r.get("size_mb") is not None:
        size = _fmt_mb(r["size_mb"])
        if r.get("base_size_mb"):
            size += f"  (full precision {_fmt_mb(r['base_size_mb'])}, {r['base_size_mb'] / r['size_mb']:.1f}x smaller)"
        rows.append(("size on disk", size))
    cal = r.get("cbq_calibration") or {}
    if cal:
        rows.append(
            (
                "windows",
                f"{cal.get('windows')}  ({cal.get('windows_reverted', 0)} reverted, "
                f"{cal.get('windows_nan_fallback', 0)} NaN fallback) on {cal.get('device')}",
            )
        )
    losses_s, losses_e = r.get("window_loss_start") or [], r.get("window_loss_end") or []
    if losses_s:
        mean_drop = sum((s - e) / s for s, e in zip(losses_s, losses_e) if s > 0) / len(losses_s)
        rows.append(("window loss", f"mean {100 * mean_drop:.1f}% below its starting point"))
    if r.get("calibration_seconds") is not None:
        rows.append(("calibration time", f"{r['calibration_seconds']:.1f} s"))
    rows.append(("total time", f"{r.get('quantize_seconds')} s (load + calibrate)"))
    if r.get("perplexity") is not None:
        rows.append(("perplexity", f"{r['perplexity']:.3f}  ({os.path.basename(str(r.get('eval_text')))})"))
    if r.get("loss_plot"):
        rows.append(("loss plot", str(r["loss_plot"])))
    if r.get("pushed_to"):
        rows.append(("pushed to", str(r["pushed_to"])))
    return rows


def _summary_table(rows: list[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k.ljust(width)}  {v}" for k, v in rows)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        if args.command == "quantize":
            result = cmd_quantize(args)
            print("cbq-hf quantize: done\n" + _summary_table(_quantize_rows(result)), file=sys.stderr)
            print(json.dumps(result))
        elif args.command == "eval":
            print(json.dumps(cmd_eval(args)))
        elif args.command == "demo-model":
            from .demo import demo_model_path

            print(demo_model_path())
        else:
            return args.func(args)
    except CLIError as e:
        print(f"cbq-hf: error: {e}", file=sys.stderr)
        return e.code
    except FileNotFoundError as e:
        print(f"cbq-hf: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
