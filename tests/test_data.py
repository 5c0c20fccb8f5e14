import json

import pytest
import torch

from cbq_hf.data import CalibrationDataError, get_calibration_batches, load_calibration_texts, sample_segments


class CharTokenizer:
    """Deterministic tokenizer stub with the HF call signature: one token per character."""

    bos_token_id = 1

    def __call__(self, text, add_special_tokens=False, return_tensors=None):
        return {"input_ids": [3 + (ord(c) % 100) for c in text]}


def test_list_of_strings_gives_seeded_batches():
    texts = ["hello world " * 50, "another text " * 50]
    a = get_calibration_batches(texts, CharTokenizer(), nsamples=4, seqlen=32, seed=0)
    b = get_calibration_batches(texts, CharTokenizer(), nsamples=4, seqlen=32, seed=0)
    c = get_calibration_batches(texts, CharTokenizer(), nsamples=4, seqlen=32, seed=1)
    assert a.shape == (4, 32) and a.dtype == torch.long
    assert bool((a[:, 0] == 1).all())  # BOS first
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_text_file_and_jsonl(tmp_path):
    (tmp_path / "c.txt").write_text("some text " * 40, encoding="utf-8")
    assert load_calibration_texts(str(tmp_path / "c.txt"))[0].startswith("some text")
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps({"text": f"row {i}"}) for i in range(3)))
    assert load_calibration_texts(str(tmp_path / "c.jsonl")) == ["row 0", "row 1", "row 2"]


def test_datasets_dataset():
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"text": ["a " * 100, "b " * 100]})
    assert len(load_calibration_texts(ds)) == 2
    with pytest.raises(CalibrationDataError, match="'text'"):
        load_calibration_texts(datasets.Dataset.from_dict({"body": ["x"]}))


@pytest.mark.parametrize(
    "content,match",
    [(b"", "empty"), (b"   \n\n ", "empty"), (b"\x00\x01\x02binary", "binary"), (b"\xff\xfe\xfa bad", "UTF-8")],
    ids=["empty", "blank", "binary", "not-utf8"],
)
def test_bad_files_are_refused(tmp_path, content, match):
    p = tmp_path / "bad.txt"
    p.write_bytes(content)
    with pytest.raises(CalibrationDataError, match=match):
        load_calibration_texts(str(p))


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(CalibrationDataError, match="does not exist"):
        load_calibration_texts(str(tmp_path / "nope.txt"))


def test_text_shorter_than_one_sample():
    with pytest.raises(CalibrationDataError, match="fewer than one sample"):
        get_calibration_batches(["short"], CharTokenizer(), nsamples=2, seqlen=64, seed=0)


def test_offline_hub_name_fails_clearly(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CalibrationDataError, match="offline"):
        load_calibration_texts("someone/not-a-local-dataset")


def test_sample_segments_without_bos():
    ids = torch.arange(100)
    rows = sample_segments(ids, 3, 10, 0, None)
    assert rows.shape == (3, 10)
    assert bool(((rows[:, 1:] - rows[:, :-1]) == 1).all())  # consecutive tokens
