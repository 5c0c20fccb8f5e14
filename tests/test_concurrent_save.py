"""Two processes saving to the same folder, and a reader loading meanwhile, never see a mixed folder."""

import subprocess
import sys
import textwrap
import time

import torch
from transformers import AutoModelForCausalLM

import cbq_hf  # noqa: F401
from cbq_hf import CBQConfig

WRITER = textwrap.dedent("""
    import sys
    import cbq_hf
    from transformers import AutoModelForCausalLM
    src, dst, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    m = AutoModelForCausalLM.from_pretrained(src)
    for _ in range(n):
        m.save_pretrained(dst, overwrite=True)
""")


def test_two_writers_and_a_reader(tmp_path):
    from helpers import tiny_llama

    x = torch.randint(0, 128, (1, 8))
    expected = []
    for seed in (0, 1):
        tiny_llama(seed=seed).save_pretrained(tmp_path / f"fp{seed}")
        q = AutoModelForCausalLM.from_pretrained(
            tmp_path / f"fp{seed}", quantization_config=CBQConfig(method="rtn", group_size=32)
        )
        q.save_pretrained(tmp_path / f"q{seed}")
        with torch.no_grad():
            expected.append(q(x).logits)
    dst = tmp_path / "shared"
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(tmp_path / f"q{s}"), str(dst), "6"], stderr=subprocess.PIPE, text=True
        )
        for s in (0, 1)
    ]
    loads = 0
    while any(p.poll() is None for p in procs):
        if dst.exists():
            try:
                m = AutoModelForCausalLM.from_pretrained(dst)
            except (OSError, ValueError) as e:  # folder swapped away mid-load: a clear error, never mixed
                assert "mismatch" not in str(e), e
                continue
            with torch.no_grad():
                out = m(x).logits
            assert any(torch.equal(out, e) for e in expected), "a load mixed the two writers' files"
            loads += 1
        time.sleep(0.05)
    for p in procs:
        assert p.wait() == 0, p.stderr.read()
    m = AutoModelForCausalLM.from_pretrained(dst)
    with torch.no_grad():
        assert any(torch.equal(m(x).logits, e) for e in expected)
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert leftovers == []
