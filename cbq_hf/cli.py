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

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_LOAD, EXIT_WRITE = 0, 1, 2, 3, 4


class CLIError(Exception):
    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def _add_quantize(sub) -> None:
    p = sub.add_parser("quantize", help="quantize a model and save it",
                       description="Quantize MODEL (a local folder or Hub id) with CBQ or RTN and save it to OUTPUT.")
    p.add_argument("model", help="full-precision model: local folder or Hub id")
    p.add_argument("output", help="folder to write the quantized checkpoint to (replaced atomically)")
    g = p.add_argument_group("format")
    g.add_argument("--bits", type=int, default=4, help="weight bits: 2, 3, 4 or 8 (default 4)")
    g.add_argument("--group-size", type=int, default=128, help="input channels per scale; -1 = per row (default 128)")
    g.add_argument("--sym", action="store_true", help="symmetric weight grid (default asymmetric)")
    g.add_argument("--act-bits", type=int, default=None, help="activation bits: 8 or 4 (default: weight-only)")
    g.add_argument("--format", default="uniform", choices=["uniform", "lobcq"], help="storage format")
    g = p.add_argument_group("calibration")
    g.add_argument("--method", default="cbq", choices=["cbq", "rtn"], help="calibration method (default cbq)")
    g.add_argument("--dataset", default="wikitext2",
                   help="calibration text: 'wikitext2', a .txt/.jsonl file or a datasets name (default wikitext2)")
    g.add_argument("--nsamples", type=int, default=None, help="calibration sequences")
    g.add_argument("--seqlen", type=int, default=None, help="tokens per calibration sequence")
    g.add_argument("--seed", type=int, default=0, help="sampling and initialisation seed (default 0)")
    g.add_argument("--window-size", type=int, default=None, help="decoder blocks per window")
    g.add_argument("--window-overlap", type=int, default=None, help="blocks shared by consecutive windows")
    g.add_argument("--epochs", type=int, default=None, help="passes over the samples per window")
    g.add_argument("--device", default="auto", help="calibration device: auto, cpu, cuda, cuda:N")
    g.add_argument("--checkpoint-dir", default=None, help="folder to resume an interrupted calibration from")
    g.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="any other CBQConfig field, e.g. --set lora_rank=8 (JSON values)")
    g = p.add_argument_group("output")
    g.add_argument("--eval-text", default=None, help="also report perplexity on this text file after quantizing")
    g.add_argument("--push-to-hub", default=None, metavar="REPO", help="also push the checkpoint to this Hub repo")
    g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="dtype to load the model in (default float32)")


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="perplexity of a model on a text file (JSON out)",
                       description="Perplexity with the fixed protocol: non-overlapping windows, BOS per window.")
    p.add_argument("model", help="model folder or Hub id (full precision or cbq-quantized)")
    p.add_argument("--text", default=None, help="UTF-8 text file (default: local WikiText-2 test)")
    p.add_argument("--seqlen", type=int, default=512, help="tokens per window (default 512)")
    p.add_argument("--windows", type=int, default=40, help="windows scored (default 40)")
    p.add_argument("--json", default=None, help="also write the JSON result to this file")
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
    except (OSError, EnvironmentError) as e:
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
    except (OSError, EnvironmentError, ValueError) as e:
        raise CLIError(f"cannot load the tokenizer of {model!r}: {e}", EXIT_LOAD) from e


def _default_text() -> str:
    from .paths import wikitext2_file

    path = wikitext2_file("test")
    if path is None:
        raise CLIError("no --text given and the local WikiText-2 test file was not found (set CBQ_HF_DATA).",
                       EXIT_USAGE)
    return str(path)


def _read_text(path: str) -> str:
    if not os.path.isfile(path):
        raise CLIError(f"text file {path!r} does not exist.", EXIT_USAGE)
    with open(path, encoding="utf-8") as f:
        return f.read()


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
        raise CLIError(f"output folder {args.output!r} is not writable ({probe} is not a writable folder).",
                       EXIT_WRITE)
    fields: dict[str, Any] = {
        "bits": args.bits, "group_size": args.group_size, "sym": args.sym, "act_bits": args.act_bits,
        "format": args.format, "method": args.method, "dataset": args.dataset, "seed": args.seed,
        "calibration_device": args.device, "checkpoint_dir": args.checkpoint_dir,
    }
    for key, flag in (("nsamples", args.nsamples), ("seqlen", args.seqlen), ("window_size", args.window_size),
                      ("window_overlap", args.window_overlap), ("epochs", args.epochs)):
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
    tok = _tokenizer(args.model)
    try:
        cfg = CBQConfig(tokenizer=tok, **fields)
    except ValueError as e:
        raise CLIError(str(e), EXIT_USAGE) from e
    start = time.perf_counter()
    try:
        model = _load(args.model, args.dtype, quantization_config=cfg)
    except ValueError as e:
        raise CLIError(str(e), EXIT_USAGE) from e
    seconds = time.perf_counter() - start
    result: dict[str, Any] = {"model": args.model, "output": args.output, "quantize_seconds": round(seconds, 1)}
    result.update(model.config.quantization_config.run_info)
    if args.eval_text:
        from .evaluation import perplexity

        ppl = perplexity(model, tok, _read_text(args.eval_text))
        result["perplexity"] = round(ppl, 4)
        model.config.quantization_config.run_info["perplexity"] = result["perplexity"]
        model.config.quantization_config.run_info["perplexity_text"] = os.path.basename(args.eval_text)
    try:
        model.save_pretrained(args.output)
        tok.save_pretrained(args.output)
    except OSError as e:
        raise CLIError(f"cannot write {args.output!r}: {e}", EXIT_WRITE) from e
    result["size_mb"] = round(sum(os.path.getsize(os.path.join(args.output, f)) for f in os.listdir(args.output)
                                  if f.endswith(".safetensors")) / 2**20, 2)
    if args.push_to_hub:
        try:
            model.push_to_hub(args.push_to_hub)
            tok.push_to_hub(args.push_to_hub)
        except Exception as e:  # network or auth; the local checkpoint is already saved
            raise CLIError(f"saved to {args.output}, but pushing to {args.push_to_hub!r} failed "
                           f"({type(e).__name__}: {e}). Check the network / `hf auth login`.", EXIT_WRITE) from e
        result["pushed_to"] = args.push_to_hub
    _ = cbq_hf
    return result


def cmd_eval(args) -> dict:
    import cbq_hf  # noqa: F401  (registers the cbq method so quantized checkpoints load)
    from .evaluation import perplexity

    text_path = args.text or _default_text()
    text = _read_text(text_path)
    tok = _tokenizer(args.model)
    try:
        model = _load(args.model, args.dtype)
    except ValueError as e:
        raise CLIError(str(e), EXIT_LOAD) from e
    start = time.perf_counter()
    ppl = perplexity(model, tok, text, seqlen=args.seqlen, n_windows=args.windows)
    result = {"model": args.model, "text": text_path, "seqlen": args.seqlen, "windows": args.windows,
              "perplexity": round(ppl, 4), "seconds": round(time.perf_counter() - start, 1)}
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
    return result


def _summary_table(result: dict) -> str:
    rows = [(k, v) for k, v in result.items() if not isinstance(v, (dict, list))]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k.ljust(width)}  {v}" for k, v in rows)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        if args.command == "quantize":
            result = cmd_quantize(args)
            print("cbq-hf quantize: done\n" + _summary_table(result), file=sys.stderr)
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
