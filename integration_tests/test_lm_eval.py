"""A saved cbq_hf checkpoint runs through lm-evaluation-harness (`lm_eval --model hf`) after `import cbq_hf`.

No Hub access: the task is a local JSON-lines file described by a task YAML (`dataset_path: json` +
`data_files`), loaded with `TaskManager(include_path=...)`; the model is a tiny random Llama with a word-level
tokenizer, quantized with RTN (seconds). The log-likelihoods lm-eval reports are checked against the same
quantities computed directly from the cbq_hf model, which proves lm-eval ran the quantized layers.
"""

from __future__ import annotations

import json
from pathlib import Path

import lm_eval  # in the `test` extra; a missing install must fail, not skip
import pytest
import torch

import cbq_hf

TASK_YAML = """\
task: cbq_toy_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<s>": 0, "</s>": 1, "<unk>": 2, **{f"w{i}": i + 3 for i in range(120)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="</s>"
    )


@pytest.fixture(scope="module")
def cbq_dir(tmp_path_factory) -> str:
    from helpers import tiny_llama
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("lm_eval")
    tiny_llama().save_pretrained(root / "fp")
    model = AutoModelForCausalLM.from_pretrained(
        root / "fp", quantization_config=cbq_hf.CBQConfig(method="rtn", bits=4, group_size=32)
    )
    model.save_pretrained(root / "cbq")
    _tokenizer().save_pretrained(root / "cbq")
    return str(root / "cbq")


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tasks")
    rows = [
        {
            "context": " ".join(f"w{(i * 7 + j) % 120}" for j in range(6)),
            "choices": [f" w{(i * 3) % 120}", f" w{(i * 5 + 1) % 120}", f" w{(i * 11 + 2) % 120}"],
            "label": i % 3,
        }
        for i in range(8)
    ]
    data = root / "toy.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    (root / "cbq_toy_choice.yaml").write_text(TASK_YAML.format(data=data), encoding="utf-8")
    return root


def _loglikelihood(model, tok, context: str, continuation: str) -> float:
    ctx = tok(context, add_special_tokens=False)["input_ids"]
    cont = tok(continuation, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits.float(), -1)[0]
    return float(sum(logp[len(ctx) + i - 1, t] for i, t in enumerate(cont)))


def test_simple_evaluate_runs_the_cbq_model(cbq_dir, task_dir, monkeypatch):
    from lm_eval.tasks import TaskManager
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    tm = TaskManager(include_path=str(task_dir), include_defaults=False)
    out = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={cbq_dir},dtype=float32",
        tasks=["cbq_toy_choice"],
        task_manager=tm,
        limit=4,
        device="cpu",
        batch_size=1,
        log_samples=True,
        bootstrap_iters=0,
    )
    acc = out["results"]["cbq_toy_choice"]["acc,none"]
    assert 0.0 <= acc <= 1.0
    samples = out["samples"]["cbq_toy_choice"]
    assert len(samples) == 4

    model = AutoModelForCausalLM.from_pretrained(cbq_dir)
    assert any(isinstance(m, cbq_hf.CBQLinear) for m in model.modules())
    tok = AutoTokenizer.from_pretrained(cbq_dir)
    for s in samples:
        doc = s["doc"]
        expected = [_loglikelihood(model, tok, doc["context"], c) for c in doc["choices"]]
        got = [float(r[0][0]) for r in s["resps"]]
        assert got == pytest.approx(expected, abs=1e-4)
