import math

import torch

from cbq_hf.evaluation import eval_windows, perplexity


class CharTokenizer:
    bos_token_id = 0

    def __call__(self, text, add_special_tokens=False, return_tensors=None):
        return {"input_ids": [1 + (ord(c) % 100) for c in text]}


def test_windows_follow_protocol():
    w = eval_windows(CharTokenizer(), "x" * 1000, seqlen=100, n_windows=40)
    assert w.shape == (10, 101) and bool((w[:, 0] == 0).all())


def test_uniform_model_has_vocab_size_perplexity():
    class Uniform(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(1))

        def forward(self, ids, use_cache=False):
            return type("O", (), {"logits": torch.zeros(*ids.shape, 128)})()

    ppl = perplexity(Uniform(), CharTokenizer(), "abc" * 300, seqlen=64, n_windows=5, progress=False)
    assert math.isclose(ppl, 128.0, rel_tol=1e-5)
