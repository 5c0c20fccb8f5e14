"""The new user's path of docs/quickstart.md on the real demo model, from the command line:

`cbq-hf quantize` (RTN W4 g64 asymmetric: the quickstart's settings with the fast method) -> model card and summary
-> `cbq-hf eval` -> `cbq-hf export --to compressed-tensors` -> load the export with plain transformers +
compressed-tensors in a fresh process that never imports `cbq_hf` -> logits equal to `cbq_hf`'s own model.

Tolerance: the export stores the same integer codes, zero points and scales (docs/export.md), so the dequantized
weights are identical; compressed-tensors runs them through `nn.Linear` while `CBQLinear` runs the cbq kernels, so
only the float32 accumulation order differs. Measured on the demo model: max |diff| about 1e-4 on logits of
magnitude about 40 (relative 3e-6). Asserted: `assert_close(rtol=1e-4, atol=1e-3)` and the same argmax token
at every position.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import cbq_hf  # noqa: F401  (the cbq_hf side of the comparison)
from cbq_hf.cli import main

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Quantization reduces the size of"]

#: Runs in a fresh interpreter: plain transformers + compressed-tensors, exactly the quickstart's step 5 code.
_LOAD_EXPORT = textwrap.dedent("""
    import json, sys
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, CompressedTensorsConfig
    path, out, prompts = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=CompressedTensorsConfig(dequantize=True))
    tok = AutoTokenizer.from_pretrained(path)
    with torch.no_grad():
        logits = [model(**tok(p, return_tensors="pt")).logits[0] for p in prompts]
    loaded = sorted(m for m in sys.modules if m == "cbq_hf" or m.startswith("cbq_hf."))
    assert not loaded, f"cbq_hf was imported: {loaded}"
    torch.save({"logits": logits, "linear": type(model.model.layers[0].self_attn.q_proj).__name__}, out)
""")


def _errors(stderr: str) -> str:
    """stderr without progress-bar lines (they hide the traceback)."""
    return "\n".join(line for line in stderr.splitlines() if "it/s]" not in line and "s/it]" not in line)[-3000:]


@pytest.fixture(scope="module")
def quickstart(demo_path, tmp_path_factory):
    """Run steps 2, 4 and 5 of docs/quickstart.md (with --method rtn); return the folders and the CLI outputs."""
    root = tmp_path_factory.mktemp("quickstart")
    out, ct = root / "out-w4", root / "out-w4-ct"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "cbq_hf.cli",
            "quantize",
            demo_path,
            str(out),
            "--bits",
            "4",
            "--group-size",
            "64",
            "--method",
            "rtn",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.returncode == 0, _errors(proc.stderr)
    return {"root": root, "out": out, "ct": ct, "quantize": proc}


def test_quantize_shows_progress_and_summary_and_writes_a_model_card(quickstart):
    proc = quickstart["quantize"]
    assert "RTN packing" in proc.stderr  # tqdm progress bar on stderr
    summary = proc.stderr[proc.stderr.index("cbq-hf quantize: done") :]
    for row in ("W4A16 g64 asym", "bits per weight", "size on disk", "calibration time"):
        assert row in summary, summary
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert 4.0 < result["bits_per_weight"] < 5.0
    card = (quickstart["out"] / "README.md").read_text()
    assert "import cbq_hf" in card
    assert f'from_pretrained("{quickstart["out"]}")' in card  # the folder given, not the temporary one
    assert "\nbase_model: HuggingFaceTB/SmolLM2-135M-Instruct\n" in card


def test_eval_then_export_loads_without_cbq_hf_with_matching_logits(quickstart, wikitext_test, capsys):
    out, ct, root = quickstart["out"], quickstart["ct"], quickstart["root"]
    text = root / "wiki.txt"
    text.write_text(wikitext_test[:20000], encoding="utf-8")
    assert main(["eval", str(out), "--text", str(text), "--seqlen", "128", "--windows", "4"]) == 0
    ppl = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["perplexity"]
    assert 1.0 < ppl < 200.0

    assert main(["export", str(out), str(ct), "--to", "compressed-tensors"]) == 0
    cfg = json.loads((ct / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "compressed-tensors" and cfg["format"] == "pack-quantized"
    assert "import cbq_hf" not in (ct / "README.md").read_text()

    dump = root / "ct_logits.pt"
    proc = subprocess.run(
        [sys.executable, "-c", _LOAD_EXPORT, str(ct), str(dump), json.dumps(PROMPTS)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, _errors(proc.stderr)
    exported = torch.load(dump)
    assert exported["linear"] == "Linear"  # dequantized by compressed-tensors, not a CBQLinear

    ours = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    with torch.no_grad():
        for prompt, theirs in zip(PROMPTS, exported["logits"]):
            mine = ours(**tok(prompt, return_tensors="pt")).logits[0]
            torch.testing.assert_close(theirs, mine, rtol=1e-4, atol=1e-3)
            assert torch.equal(theirs.argmax(-1), mine.argmax(-1)), prompt
