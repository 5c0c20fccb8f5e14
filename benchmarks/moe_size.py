"""Size and calibration time of quantized mixture-of-experts models beside a dense one: tiny random Llama, Mixtral
and Qwen3-MoE models of the same hidden size, CBQ W4A16 at group sizes 32 and 16 (random calibration tokens).

Reports, per model: the bits per quantized weight (codes, steps and zero points of every packed linear and expert
matrix), the bits per parameter of the whole model (embedding, head and norms in float32 included, against the
float model's parameter count), whether every expert weight is packed, and the CBQ calibration wall time. A script
that prints and writes a table; it asserts nothing.

    python -P benchmarks/moe_size.py
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cbq_hf.calibration.engine import calibrate
from cbq_hf.config import CBQConfig
from cbq_hf.nn.experts import CBQExperts
from cbq_hf.nn.linear import CBQLinear

RESULTS = ROOT / "benchmarks" / "results"
COMMON = dict(
    vocab_size=512,
    hidden_size=256,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=4,
    max_position_embeddings=256,
)
MODELS = {
    "llama (dense)": ("LlamaConfig", dict(intermediate_size=1024)),
    "mixtral (8 experts, top-2)": ("MixtralConfig", dict(intermediate_size=512, num_local_experts=8)),
    "qwen3_moe (8 experts, top-2)": (
        "Qwen3MoeConfig",
        dict(moe_intermediate_size=512, num_experts=8, num_experts_per_tok=2, head_dim=32),
    ),
}


def _build(config_name: str, kwargs: dict) -> torch.nn.Module:
    cfg = getattr(transformers, config_name)(**COMMON, **kwargs)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()


def _bits(model: torch.nn.Module) -> tuple[float, int]:
    """Bits of the packed tensors per quantized weight, and the number of quantized weights (a `CBQExperts` holds
    one `CBQLinear` per expert and projection)."""
    bits = weights = 0
    for m in model.modules():
        if isinstance(m, CBQLinear):
            bits += sum(t.numel() * t.element_size() * 8 for t in m.packed_buffers().values())
            weights += m.out_features * m.in_features
    return bits / weights, weights


def _stored_bits(model: torch.nn.Module) -> int:
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size() * 8
    return total


def main() -> None:
    ids = torch.randint(0, COMMON["vocab_size"], (16, 128), generator=torch.Generator().manual_seed(0))
    rows = []
    for name, (cfg_name, kwargs) in MODELS.items():
        for group in (32, 16):
            model = _build(cfg_name, kwargs)
            params = sum(p.numel() for p in model.parameters())
            cfg = CBQConfig(method="cbq", bits=4, group_size=group, nsamples=16, seqlen=128, epochs=1, batch_size=4)
            t0 = time.perf_counter()
            report = calibrate(model, cfg, ids, progress=False)
            seconds = time.perf_counter() - t0
            per_weight, weights = _bits(model)
            float_experts = [
                n for n, p in model.named_parameters() if "experts" in n and p.dim() >= 2 and p.is_floating_point()
            ]
            experts_modules = sum(isinstance(m, CBQExperts) for m in model.modules())
            rows.append(
                dict(
                    model=name,
                    group_size=group,
                    params=params,
                    quantized_weights=weights,
                    bits_per_quantized_weight=round(per_weight, 3),
                    bits_per_param=round(_stored_bits(model) / params, 3),
                    packed_expert_modules=experts_modules,
                    float_expert_weights=len(float_experts),
                    windows_ok=sum(w["status"] == "ok" for w in report["windows"]),
                    windows=len(report["windows"]),
                    calibration_s=round(seconds, 2),
                )
            )
            print(json.dumps(rows[-1]), flush=True)
    lines = [
        "# Quantized MoE vs dense: size and CBQ calibration time (tiny random models, hidden 256, 4 layers)",
        "",
        f"CBQ W4A16, 16 x 128 random tokens, 1 epoch, batch 4; {torch.get_num_threads()} threads. Bits per "
        "parameter count every stored tensor (float embedding, head and norms included) against the float model's "
        "parameters. Command: `python -P benchmarks/moe_size.py`",
        "",
        "| model | group | params | quantized weights | bits / quantized weight | bits / param (whole model) | "
        "packed expert modules | float expert weights left | windows ok | calibration |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *[
            f"| {r['model']} | {r['group_size']} | {r['params']:,} | {r['quantized_weights']:,} | "
            f"{r['bits_per_quantized_weight']} | {r['bits_per_param']} | {r['packed_expert_modules']} | "
            f"{r['float_expert_weights']} | "
            f"{r['windows_ok']}/{r['windows']} | {r['calibration_s']} s |"
            for r in rows
        ],
        "",
    ]
    (RESULTS / "moe_size.json").write_text(json.dumps(rows, indent=1) + "\n")
    (RESULTS / "moe_size.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
