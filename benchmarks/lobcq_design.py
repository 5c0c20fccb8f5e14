"""Design the universal LO-BCQ codebooks shipped in `cbq_hf/formats/lobcq_universal.json`, and compare sources.

Candidate training data (all scaled exactly as the format scales them: per-tensor s_t for weights, per-token for
activations, E4M3 array scales):

- gaussian / laplace: synthetic samples (data-free);
- weights: linear weights of the even decoder layers of the demo model (SmolLM2-135M);
- acts: inputs of those linears captured on WikiText-2 *validation* text (never the test split);
- mixed: half weights, half activations (the paper freezes one set for both).

Every candidate set is scored on held-out data: weights of the odd layers and activations of other validation
text, as SQNR (dB) of decode(encode(x)). The set with the best mean held-out SQNR is written (``--write``).

    .venv/bin/python benchmarks/lobcq_design.py --write
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from pathlib import Path

import torch

from cbq_hf.formats.lobcq import LOBCQSpec, _block_view, fake_quantize, scale_arrays
from cbq_hf.formats.lobcq_codebooks import UNIVERSAL_FILE, design_codebooks, universal_key

ROOT = Path(__file__).resolve().parents[1]
VALID = ROOT.parent / "shared" / "data" / "wikitext-2" / "wiki.valid.tokens"


def sqnr_db(ref: torch.Tensor, test: torch.Tensor) -> float:
    noise = (ref.float() - test.float()).pow(2).mean()
    return float(10 * torch.log10(ref.float().pow(2).mean() / noise.clamp(min=1e-30)))


def scaled_blocks(tensors: list[torch.Tensor], spec: LOBCQSpec, per_row: bool) -> torch.Tensor:
    """Scaled blocks [B, Lb] of a list of [R, K] tensors (K multiple of La here, no padding)."""
    out = []
    for t in tensors:
        y, _, _ = scale_arrays(t, spec.array_len, spec.cmax, per_row=per_row)
        out.append(_block_view(y, t.shape[1], spec)[0])
    return torch.cat(out)


def capture(
    model_path: str, layers: list[int], tokens: int, offset: int, rows_per_linear: int, seed: int
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(weights, sampled linear inputs) of the given decoder layers of the demo model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    text = VALID.read_text(encoding="utf-8")
    ids = tok(text[offset : offset + tokens * 8], add_special_tokens=False)["input_ids"][:tokens]
    gen = torch.Generator().manual_seed(seed)
    weights, acts, hooks = [], [], []
    for i in layers:
        for _, lin in model.model.layers[i].named_modules():
            if isinstance(lin, torch.nn.Linear):
                weights.append(lin.weight.detach().clone())

                def hook(mod, inp, out):
                    x = inp[0].detach().reshape(-1, inp[0].shape[-1])
                    pick = torch.randperm(x.shape[0], generator=gen)[:rows_per_linear]
                    acts.append(x[pick].clone())

                hooks.append(lin.register_forward_hook(hook))
    with torch.no_grad():
        for s in range(0, len(ids), 512):
            model(torch.tensor([[tok.bos_token_id] + ids[s : s + 511]]))
    for h in hooks:
        h.remove()
    return weights, acts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--blocks", type=int, default=120_000, help="training blocks per candidate")
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--write", action="store_true", help=f"write the best set to cbq_hf/formats/{UNIVERSAL_FILE}")
    ap.add_argument("--block-len", type=int, default=LOBCQSpec.block_len, help="values per block (Lb)")
    ap.add_argument("--array-len", type=int, default=LOBCQSpec.array_len, help="values per scaled array (La)")
    ap.add_argument("--num-codebooks", type=int, default=LOBCQSpec.num_codebooks)
    ap.add_argument(
        "--out",
        default=None,
        help="results JSON (default benchmarks/results/lobcq_design[-<key>].json; "
        "the key is added for a non-default spec)",
    )
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.manual_seed(0)
    spec = LOBCQSpec(block_len=args.block_len, array_len=args.array_len, num_codebooks=args.num_codebooks)
    key = universal_key(spec.block_len, spec.array_len, spec.num_codebooks, spec.codebook_bits)
    if args.out is None:
        suffix = "" if spec == LOBCQSpec() else f"-{key}"
        args.out = str(ROOT / "benchmarks" / "results" / f"lobcq_design{suffix}.json")
    from cbq_hf.demo import demo_model_path

    path = demo_model_path()
    n_layers = 30
    t0 = time.perf_counter()
    w_train, a_train = capture(path, list(range(0, n_layers, 2)), 2048, 0, 256, 0)
    w_test, a_test = capture(path, list(range(1, n_layers, 2)), 1024, 400_000, 128, 1)
    logging.info("captured in %.1fs", time.perf_counter() - t0)

    gen = torch.Generator().manual_seed(0)

    def sample(b: torch.Tensor, n: int) -> torch.Tensor:
        return b[torch.randperm(b.shape[0], generator=gen)[:n]]

    n = args.blocks
    wb = sample(scaled_blocks(w_train, spec, False), n)
    ab = sample(scaled_blocks(a_train, spec, True), n)
    arrays = n * spec.block_len // spec.array_len
    g = torch.randn(arrays, spec.array_len, generator=gen)
    lap = torch.distributions.Laplace(0.0, 1.0).sample((arrays, spec.array_len))
    sources = {
        "gaussian": scaled_blocks([g], spec, True),
        "laplace": scaled_blocks([lap], spec, True),
        "weights": wb,
        "acts": ab,
        "mixed": torch.cat([sample(wb, n // 2), sample(ab, n // 2)]),
    }
    results = {}
    for name, blocks in sources.items():
        t = time.perf_counter()
        res = design_codebooks(blocks, spec.num_codebooks, spec.cmax, iters=args.iters)
        cb = res.codebooks.to(torch.int8)
        w_sqnr = sum(sqnr_db(w, fake_quantize(w, cb, spec)) for w in w_test) / len(w_test)
        a_sqnr = sum(sqnr_db(a, fake_quantize(a, cb, spec, per_row=True)) for a in a_test) / len(a_test)
        results[name] = {
            "codebooks": cb.tolist(),
            "train_mse_history": [round(m, 5) for m in res.mse_history],
            "heldout_weight_sqnr_db": round(w_sqnr, 3),
            "heldout_act_sqnr_db": round(a_sqnr, 3),
            "mean_sqnr_db": round((w_sqnr + a_sqnr) / 2, 3),
            "seconds": round(time.perf_counter() - t, 1),
        }
        logging.info(
            "%-9s rounds %2d  train mse %.4f -> %.4f  held-out SQNR weights %.2f dB, acts %.2f dB (%.0fs)",
            name,
            len(res.mse_history) - 1,
            res.mse_history[0],
            res.mse_history[-1],
            w_sqnr,
            a_sqnr,
            time.perf_counter() - t,
        )
    best = max(results, key=lambda k: results[k]["mean_sqnr_db"])
    logging.info("best: %s", best)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"spec": spec.__dict__, "best": best, "candidates": results}, indent=1))
    if args.write:  # add (or replace) this spec's set; the other shipped sets stay
        target = ROOT / "cbq_hf" / "formats" / UNIVERSAL_FILE
        sets = json.loads(target.read_text(encoding="utf-8")).get("sets", {}) if target.exists() else {}
        sets[key] = {
            "source": best,
            "heldout_weight_sqnr_db": results[best]["heldout_weight_sqnr_db"],
            "heldout_act_sqnr_db": results[best]["heldout_act_sqnr_db"],
            "codebooks": results[best]["codebooks"],
        }
        doc = {
            "description": "Universal LO-BCQ codebooks (int entries, rows sorted ascending), designed by "
            "benchmarks/lobcq_design.py; keyed by L<block_len>-A<array_len>-N<num_codebooks>-"
            "B<codebook_bits>.",
            "sets": dict(sorted(sets.items())),
        }
        tmp = target.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc, indent=1) + "\n")
        tmp.replace(target)
        logging.info("wrote %s", target)
    assert math.isfinite(results[best]["mean_sqnr_db"])


if __name__ == "__main__":
    main()
