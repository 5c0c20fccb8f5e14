"""Capture of the decoder blocks' inputs: replaying them reproduces the model's own hidden states."""

from __future__ import annotations

import pytest
import torch

from cbq_hf.calibration.capture import capture_block_inputs
from cbq_hf.modeling import NoDecoderBlocksError, find_decoder_blocks


@pytest.mark.parametrize("batch_size", [3, 8])
def test_replay_reproduces_hidden_states(family, calib_ids, batch_size):
    model = family(layers=3)
    _, blocks = find_decoder_blocks(model)
    classes = [type(b) for b in blocks]
    inp = capture_block_inputs(model, calib_ids, batch_size)
    assert [type(b) for b in blocks] == classes  # blocks restored
    assert inp.hidden.shape == (8, 32, 64)
    assert inp.batches == [(s, min(s + batch_size, 8)) for s in range(0, 8, batch_size)]
    with torch.no_grad():
        ref = model(calib_ids, output_hidden_states=True).hidden_states
        torch.testing.assert_close(inp.hidden, ref[0])
        for c, (s, e) in enumerate(inp.batches):
            h = inp.hidden[s:e]
            for b in range(len(blocks) - 1):  # the last entry of hidden_states is after the final norm
                h = inp.call_block(blocks[b], b, c, h)
                torch.testing.assert_close(h, ref[b + 1][s:e], rtol=1e-5, atol=1e-5)


def test_no_kv_cache_is_replayed(calib_ids):
    from helpers import tiny_llama

    inp = capture_block_inputs(tiny_llama(), calib_ids, 4)
    for calls in inp.calls:
        for call in calls:
            assert call.kwargs.get("past_key_values") is None and call.kwargs.get("past_key_value") is None


def test_model_without_decoder_blocks():
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 4))
    with pytest.raises(NoDecoderBlocksError, match="no recognisable decoder blocks"):
        capture_block_inputs(model, torch.zeros(1, 4, dtype=torch.long), 1)
