import json

import pytest

from cbq_hf.cli import EXIT_LOAD, EXIT_USAGE, EXIT_WRITE, main


@pytest.fixture
def model_with_tokenizer(tmp_path):
    """A tiny Llama with a small word-level tokenizer saved beside it."""
    from helpers import tiny_llama
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<s>": 0, "<unk>": 1, **{f"w{i}": i + 2 for i in range(120)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", unk_token="<unk>")
    d = tmp_path / "fp"
    tiny_llama().save_pretrained(d)
    tok.save_pretrained(d)
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"w{(i * 7) % 120}" for i in range(3000)))
    return str(d), str(text)


def test_quantize_then_eval(model_with_tokenizer, tmp_path, capsys):
    model, text = model_with_tokenizer
    out = tmp_path / "q"
    rc = main(
        ["quantize", model, str(out), "--method", "rtn", "--bits", "4", "--group-size", "32", "--eval-text", text]
    )
    assert rc == 0
    captured = capsys.readouterr()
    res = json.loads(captured.out.strip().splitlines()[-1])
    assert res["bits_per_weight"] > 4 and res["perplexity"] > 1
    # the human-readable summary on stderr: the numbers a user checks, with units
    summary = captured.err[captured.err.index("cbq-hf quantize: done") :]
    assert "W4A16 g32 asym" in summary
    assert f"bits per weight   {res['bits_per_weight']:.3f}" in summary
    assert "size on disk" in summary and "x smaller" in summary
    assert f"perplexity        {res['perplexity']:.3f}  (text.txt)" in summary
    assert (out / "README.md").exists() and (out / "tokenizer.json").exists()
    rc = main(
        ["eval", str(out), "--text", text, "--seqlen", "64", "--windows", "5", "--json", str(tmp_path / "e.json")]
    )
    assert rc == 0
    assert json.loads((tmp_path / "e.json").read_text())["perplexity"] > 1


def test_unknown_model_path(tmp_path, capsys):
    rc = main(["eval", str(tmp_path / "missing"), "--text", __file__])
    assert rc == EXIT_LOAD
    assert "does not exist" in capsys.readouterr().err


def test_bad_config_value_is_usage_error(model_with_tokenizer, tmp_path, capsys):
    model, _ = model_with_tokenizer
    rc = main(["quantize", model, str(tmp_path / "q"), "--method", "rtn", "--bits", "5"])
    assert rc == EXIT_USAGE
    assert "`bits`" in capsys.readouterr().err
    assert not (tmp_path / "q").exists()


def test_unwritable_output(model_with_tokenizer, tmp_path, capsys):
    model, _ = model_with_tokenizer
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    rc = main(["quantize", model, str(blocker / "q"), "--method", "rtn", "--group-size", "32"])
    assert rc == EXIT_WRITE
    assert "not writable" in capsys.readouterr().err
    assert blocker.read_text() == "not a folder"


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "quantize" in out and "eval" in out


def test_loss_plot_without_matplotlib_fails_before_calibrating(model_with_tokenizer, tmp_path, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    model, _ = model_with_tokenizer
    rc = main(["quantize", model, str(tmp_path / "q"), "--group-size", "32", "--loss-plot", str(tmp_path / "l.png")])
    assert rc == EXIT_USAGE
    assert "needs matplotlib" in capsys.readouterr().err
    assert not (tmp_path / "q").exists()


def test_loss_plot_with_rtn_is_usage_error(model_with_tokenizer, tmp_path, capsys):
    model, _ = model_with_tokenizer
    rc = main(["quantize", model, str(tmp_path / "q"), "--method", "rtn", "--loss-plot", str(tmp_path / "l.png")])
    assert rc == EXIT_USAGE
    assert "--method cbq" in capsys.readouterr().err


def test_quantize_with_disk_offload_matches_in_memory(model_with_tokenizer, tmp_path, capsys, caplog):
    """--device-map/--max-memory/--offload-folder reach from_pretrained; the budget forces blocks onto disk."""
    import logging

    import torch
    from transformers import AutoModelForCausalLM

    import cbq_hf  # noqa: F401

    model, _ = model_with_tokenizer
    common = ["--method", "rtn", "--group-size", "32"]
    assert main(["quantize", model, str(tmp_path / "mem"), *common]) == 0
    with caplog.at_level(logging.INFO, logger="cbq_hf.calibration.offload"):
        rc = main(
            [
                "quantize",
                model,
                str(tmp_path / "off"),
                *common,
                "--device-map",
                "auto",
                "--max-memory",
                "cpu=200KB",
                "--offload-folder",
                str(tmp_path / "spill"),
            ]
        )
    assert rc == 0
    assert "decoder blocks offloaded" in caplog.text and "0 of 2 decoder blocks" not in caplog.text
    x = torch.randint(0, 120, (1, 10))
    with torch.no_grad():
        a = AutoModelForCausalLM.from_pretrained(tmp_path / "mem")(x).logits
        b = AutoModelForCausalLM.from_pretrained(tmp_path / "off")(x).logits
    assert torch.equal(a, b)


def test_max_memory_without_device_map_is_usage_error(model_with_tokenizer, tmp_path, capsys):
    model, _ = model_with_tokenizer
    rc = main(["quantize", model, str(tmp_path / "q"), "--method", "rtn", "--max-memory", "cpu=1GiB"])
    assert rc == EXIT_USAGE
    assert "need --device-map" in capsys.readouterr().err


def test_quantize_into_a_folder_holding_files_refuses_unless_overwrite(model_with_tokenizer, tmp_path, capsys):
    """An existing folder with other files is refused before any calibration, and left untouched; --overwrite
    replaces it whole (none of the old files survive)."""
    model, _ = model_with_tokenizer
    out = tmp_path / "q"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "model-00001-of-00002.safetensors").write_text("stale shard")
    args = ["quantize", model, str(out), "--method", "rtn", "--group-size", "32"]
    assert main(args) == EXIT_WRITE
    err = capsys.readouterr().err
    assert "already exists and holds files" in err and "notes.txt" in err and "--overwrite" in err
    assert sorted(p.name for p in out.iterdir()) == ["model-00001-of-00002.safetensors", "notes.txt"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    assert main([*args, "--overwrite"]) == 0
    names = {p.name for p in out.iterdir()}
    assert "notes.txt" not in names and "model-00001-of-00002.safetensors" not in names
    assert {"config.json", "model.safetensors", "README.md", "tokenizer.json"} <= names


def test_quantize_into_an_empty_folder_is_fine(model_with_tokenizer, tmp_path):
    model, _ = model_with_tokenizer
    (tmp_path / "q").mkdir()
    assert main(["quantize", model, str(tmp_path / "q"), "--method", "rtn", "--group-size", "32"]) == 0
    assert (tmp_path / "q" / "model.safetensors").is_file()


def test_eval_without_text_says_which_text_and_caches_with_cached(model_with_tokenizer, tmp_path, capsys, monkeypatch):
    import cbq_hf.locations as loc

    model, _ = model_with_tokenizer
    monkeypatch.delenv("CBQ_HF_DATA", raising=False)
    monkeypatch.setenv("CBQ_HF_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(loc, "_SOURCE_TREE", tmp_path)  # no shared/data beside the sources either
    out = tmp_path / "e.json"
    args = ["eval", model, "--seqlen", "64", "--windows", "3", "--json", str(out), "--cached"]
    assert main(args) == 0
    captured = capsys.readouterr()
    assert "evaluation text: the evaluation sample text shipped with cbq_hf" in captured.err
    first = json.loads(captured.out.strip().splitlines()[-1])
    assert first["text_source"] == "shipped" and first["text"].endswith("evaluation.txt")
    assert main(args) == 0  # same model files, text and settings: reused
    captured = capsys.readouterr()
    assert "reusing the result" in captured.err and json.loads(captured.out.strip().splitlines()[-1]) == first
    assert main([*args[:-1]]) == 0 and "reusing" not in capsys.readouterr().err  # without --cached: measured
    assert main([*args[:3], "4", *args[4:]]) == 0  # other settings: measured again
    assert "reusing" not in capsys.readouterr().err
    assert main(["eval", model, "--cached"]) == EXIT_USAGE
    assert "--cached needs --json" in capsys.readouterr().err
