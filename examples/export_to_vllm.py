"""Quantize a model with cbq_hf, export it to compressed-tensors and check the export against cbq_hf.

    python examples/export_to_vllm.py MODEL OUT [--bits 4] [--group-size 64] [--method rtn|cbq]

Writes OUT (the cbq_hf checkpoint) and OUT-ct (compressed-tensors pack-quantized, loadable without cbq_hf),
then loads OUT-ct with transformers' built-in compressed-tensors support and compares logits. Serve it with
`vllm serve OUT-ct` on a GPU machine (vLLM picks its WNA16 kernels from the config). See docs/export.md.
"""

import argparse

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, CompressedTensorsConfig

import cbq_hf
from cbq_hf.export import export_checkpoint

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("model", help="full-precision model folder or Hub id (e.g. the output of `cbq-hf demo-model`)")
parser.add_argument("out", help="folder for the cbq_hf checkpoint; the export goes to OUT-ct")
parser.add_argument("--bits", type=int, default=4, choices=[4, 8])
parser.add_argument("--group-size", type=int, default=64, help="must divide every layer's input size (default 64)")
parser.add_argument("--asym", action="store_true", help="asymmetric grid (default symmetric: fastest vLLM kernels)")
parser.add_argument("--method", default="rtn", choices=["rtn", "cbq"], help="rtn: seconds; cbq: calibrated")
args = parser.parse_args()

tok = AutoTokenizer.from_pretrained(args.model)
cfg = cbq_hf.CBQConfig(
    bits=args.bits, group_size=args.group_size, sym=not args.asym, method=args.method, tokenizer=tok, use_cfp=False
)  # CFP input scales that cannot be folded are not exportable
model = AutoModelForCausalLM.from_pretrained(args.model, quantization_config=cfg)
model.save_pretrained(args.out)
tok.save_pretrained(args.out)

exported = export_checkpoint(args.out, args.out + "-ct", to="compressed-tensors")
print(f"exported to {exported}")

# The export loads without cbq_hf (it is imported here only to compare against the cbq_hf model).
load_kw = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if args.asym else {}
ct_model = AutoModelForCausalLM.from_pretrained(exported, **load_kw)
ids = tok("The quick brown fox jumps over the lazy dog.", return_tensors="pt")["input_ids"]
with torch.no_grad():
    diff = (ct_model(ids).logits - model(ids).logits).abs().max().item()
print(f"max |logits(compressed-tensors) - logits(cbq_hf)| = {diff:.3g}")
print(f"serve it:  vllm serve {exported}")
