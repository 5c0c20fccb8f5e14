import torch

from cbq_hf.formats.input_memo import LastInputMemo


def test_returns_the_result_for_the_same_unchanged_input_and_key():
    memo, x, out = LastInputMemo(), torch.randn(3, 4), torch.randn(3, 4)
    key = (torch.tensor([1.0, 2.0]), torch.arange(4, dtype=torch.int8))
    memo.put(x, key, out)
    # an equal key built anew matches (compared by value)
    assert memo.get(x, (torch.tensor([1.0, 2.0]), torch.arange(4, dtype=torch.int8))) is out


def test_misses_on_another_tensor_with_equal_values():
    memo, x = LastInputMemo(), torch.randn(3, 4)
    memo.put(x, None, torch.zeros(1))
    assert memo.get(x.clone(), None) is None


def test_misses_after_an_in_place_change_of_the_input():
    memo, x = LastInputMemo(), torch.randn(3, 4)
    memo.put(x, b"k", torch.zeros(1))
    x.add_(1.0)
    assert memo.get(x, b"k") is None


def test_misses_on_another_key():
    memo, x = LastInputMemo(), torch.randn(3, 4)
    scale = torch.ones(4)
    memo.put(x, (scale, b"k"), torch.zeros(1))
    assert memo.get(x, (None, b"k")) is None
    assert memo.get(x, (torch.ones(5), b"k")) is None  # other shape
    assert memo.get(x, (torch.ones(4, dtype=torch.float64), b"k")) is None  # other dtype
    assert memo.get(x, (scale, b"other")) is None


def test_the_key_is_copied_so_a_later_change_of_it_is_seen():
    memo, x, scale = LastInputMemo(), torch.randn(3, 4), torch.ones(4)
    memo.put(x, scale, torch.zeros(1))
    scale.mul_(2.0)
    assert memo.get(x, scale) is None


def test_inference_tensors_are_never_remembered():
    memo = LastInputMemo()
    with torch.inference_mode():
        x = torch.randn(3, 4)
    memo.put(x, None, torch.zeros(1))
    assert memo.get(x, None) is None


def test_clear_forgets():
    memo, x = LastInputMemo(), torch.randn(3, 4)
    memo.put(x, None, torch.zeros(1))
    memo.clear()
    assert memo.get(x, None) is None
