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


# ---------------------------------------------------------------------------------------------- text sources
@pytest.fixture
def no_shared(tmp_path, monkeypatch):
    """No shared/data anywhere (cwd and source tree checked through a fake package location), offline, empty
    cache: what a fresh clone without ../shared sees."""
    import cbq_hf.locations as loc

    monkeypatch.delenv("CBQ_HF_DATA", raising=False)
    monkeypatch.setenv("CBQ_HF_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(loc, "_SOURCE_TREE", tmp_path / "pkg")
    return loc


@pytest.mark.parametrize("purpose", ["calibration", "evaluation"])
def test_without_shared_data_or_hub_the_shipped_text_is_used(no_shared, purpose):
    source = no_shared.text_source(purpose)
    assert source.origin == "shipped" and not source.is_wikitext2 and "not WikiText-2" in source.description
    assert source.path.name == f"{purpose}.txt"
    text = source.path.read_text(encoding="utf-8")
    assert 20_000 < len(text) < 100_000 and "Robert Boulter" not in text  # not WikiText-2 test (it opens so)
    assert no_shared.wikitext2_file("test") is None


def test_shipped_calibration_and_evaluation_texts_do_not_overlap():
    from cbq_hf.locations import shipped_text

    cal, ev = (shipped_text(p).read_text(encoding="utf-8") for p in ("calibration", "evaluation"))
    paragraphs = [p for p in ev.split("\n\n") if len(p) > 200]
    assert paragraphs and not [p for p in paragraphs if p in cal]


def test_shared_data_beside_the_working_folder_comes_first(no_shared, tmp_path):
    d = tmp_path / "shared" / "data" / "wikitext-2"
    d.mkdir(parents=True)
    (d / "wiki.test.raw").write_text(" = Robert Boulter = \n", encoding="utf-8")
    source = no_shared.text_source("evaluation")
    assert source.origin == "shared" and source.path == d / "wiki.test.raw" and "WikiText-2 test" in source.description
    assert no_shared.text_source("calibration").origin == "shipped"  # wiki.valid.tokens is not there


def test_datasets_download_when_the_hub_is_reachable_is_cached(no_shared, monkeypatch):
    import sys
    import types

    calls = []

    def load_dataset(name, config, split):
        calls.append((name, config, split))
        return {"text": [" = Valkyria = \n", " line two \n"]}

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    monkeypatch.setattr(no_shared, "hub_reachable", lambda timeout=3.0: True)
    source = no_shared.text_source("evaluation")
    assert source.origin == "datasets" and source.path.read_text(encoding="utf-8") == " = Valkyria = \n line two \n"
    assert calls == [("Salesforce/wikitext", "wikitext-2-raw-v1", "test")]
    monkeypatch.setattr(no_shared, "hub_reachable", lambda timeout=3.0: False)
    assert no_shared.text_source("evaluation").origin == "datasets" and len(calls) == 1  # from the cache


def test_hub_check_is_immediate_when_offline(monkeypatch):
    import time

    from cbq_hf.locations import hub_reachable

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    assert hub_reachable() is False
    assert time.perf_counter() - start < 0.1


def test_wikitext2_dataset_falls_back_to_the_shipped_text_with_a_warning(no_shared, caplog):
    import logging

    with caplog.at_level(logging.WARNING, logger="cbq_hf.data"):
        texts = load_calibration_texts("wikitext2")
    assert "Execution model" in texts[0]
    assert "WikiText-2 is not available here" in caplog.text and "calibration.txt" in caplog.text


# ---------------------------------------------------------------------------------------------- pre-tokenized
class VocabTokenizer(CharTokenizer):
    def __len__(self):
        return 50


@pytest.mark.parametrize(
    "make",
    [lambda ids: ids, lambda ids: ids.int(), lambda ids: ids.tolist(), lambda ids: list(ids)],
    ids=["long_tensor", "int32_tensor", "lists", "list_of_tensors"],
)
def test_pre_tokenized_input_is_used_as_given(make):
    ids = torch.randint(0, 50, (6, 40))
    out = get_calibration_batches(make(ids), VocabTokenizer(), nsamples=4, seqlen=32, seed=0)
    assert out.dtype == torch.long and torch.equal(out, ids[:4, :32])


@pytest.mark.parametrize(
    "dataset,nsamples,seqlen,match",
    [
        (torch.rand(4, 32), 4, 32, "integer token ids, got a torch.float32"),
        (torch.ones(4, 32, dtype=torch.bool), 4, 32, "got a torch.bool"),
        (torch.ones(128, dtype=torch.long), 1, 32, "must be 2-D"),
        ([[1, 2, 3], [4, 5]], 2, 2, "ragged"),
        ([[1, 2.0]], 1, 2, "must be ints"),
        ([[1, -2]], 1, 2, ">= 0"),
        (torch.ones(4, 16, dtype=torch.long), 4, 32, "16 tokens, shorter than seqlen=32"),
        (torch.ones(2, 32, dtype=torch.long), 4, 32, "2 token-id rows for nsamples=4"),
        (torch.full((4, 32), 50), 4, 32, "outside the tokenizer's vocabulary of 50"),
        (torch.ones(0, 32, dtype=torch.long), 0, 32, "empty"),
    ],
    ids=["float", "bool", "1d", "ragged", "float_in_list", "negative", "too_short", "too_few_rows", "vocab", "empty"],
)
def test_bad_pre_tokenized_input_is_refused(dataset, nsamples, seqlen, match):
    with pytest.raises(CalibrationDataError, match=match):
        get_calibration_batches(dataset, VocabTokenizer(), nsamples=nsamples, seqlen=seqlen, seed=0)


def test_config_accepts_token_ids_and_describes_them():
    from cbq_hf import CBQConfig

    cfg = CBQConfig(dataset=torch.ones(8, 64, dtype=torch.long), nsamples=8, seqlen=64)
    assert cfg.to_dict()["dataset"] == "<token ids [8, 64]>"
    assert CBQConfig(dataset=[[1, 2, 3]] * 2).to_dict()["dataset"] == "<token ids [2, 3]>"
    with pytest.raises(ValueError, match="ragged"):
        CBQConfig(dataset=[[1, 2, 3], [1]])
