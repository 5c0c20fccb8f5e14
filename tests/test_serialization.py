"""A saved checkpoint that was truncated, bit-flipped, stripped or given a wrong config never loads."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from cbq_hf import CBQConfig
from cbq_hf.serialization import CheckpointError, FolderNotEmptyError, atomic_save, checksum_metadata


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    from helpers import tiny_llama

    root = tmp_path_factory.mktemp("ckpt")
    tiny_llama().save_pretrained(root / "fp")
    q = AutoModelForCausalLM.from_pretrained(root / "fp", quantization_config=CBQConfig(method="rtn", group_size=32))
    q.save_pretrained(root / "q")
    return root / "q"


def _copy(saved, tmp_path):
    dst = tmp_path / "c"
    shutil.copytree(saved, dst)
    return dst


def test_clean_checkpoint_loads(saved):
    AutoModelForCausalLM.from_pretrained(saved)


def test_truncated_file_is_refused(saved, tmp_path):
    d = _copy(saved, tmp_path)
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        AutoModelForCausalLM.from_pretrained(d)


@pytest.mark.parametrize("where", [0.3, 0.6, 0.95])
def test_bit_flip_in_tensor_data_is_refused(saved, tmp_path, where):
    d = _copy(saved, tmp_path)
    f = d / "model.safetensors"
    data = bytearray(f.read_bytes())
    pos = int(len(data) * where)
    data[pos] ^= 0x10
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        AutoModelForCausalLM.from_pretrained(d)


def _rewrite(d, edit):
    from safetensors import safe_open

    f = str(d / "model.safetensors")
    with safe_open(f, "pt") as h:
        meta = h.metadata()
    tensors = load_file(f)
    edit(tensors, meta)
    save_file(tensors, f, metadata=meta)


def test_deleted_tensor_is_refused(saved, tmp_path):
    d = _copy(saved, tmp_path)
    _rewrite(d, lambda t, m: t.pop("model.layers.1.mlp.up_proj.scales"))
    with pytest.raises(CheckpointError, match="missing"):
        AutoModelForCausalLM.from_pretrained(d)


def test_deleted_float_tensor_is_refused(saved, tmp_path):
    d = _copy(saved, tmp_path)
    _rewrite(d, lambda t, m: t.pop("model.norm.weight"))
    with pytest.raises(CheckpointError, match="missing"):
        AutoModelForCausalLM.from_pretrained(d)


def test_config_that_disagrees_with_tensors_is_refused(saved, tmp_path):
    d = _copy(saved, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"]["bits"] = 2
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="bits"):
        AutoModelForCausalLM.from_pretrained(d)


def test_foreign_safetensors_without_cbq_metadata_is_refused(saved, tmp_path):
    d = _copy(saved, tmp_path)
    _rewrite(d, lambda t, m: m.clear() or m.update({"format": "pt"}))
    with pytest.raises(CheckpointError, match="cbq_format_version"):
        AutoModelForCausalLM.from_pretrained(d)


def test_atomic_save_failure_leaves_old_folder_untouched(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "model.safetensors").write_text("old")

    def write(tmp):
        (tmp_path / "partial").write_text("x")
        with open(f"{tmp}/model.safetensors", "w") as fh:
            fh.write("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_save(target, write, overwrite=True)
    assert (target / "model.safetensors").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "partial"]


def _write_checkpoint(tmp):
    with open(f"{tmp}/model.safetensors", "w") as fh:
        fh.write("new")


def test_atomic_save_refuses_a_folder_holding_files_and_leaves_it_untouched(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "tokenizer.json").write_text("{}")
    with pytest.raises(FolderNotEmptyError, match=r"holds files \(tokenizer.json\).*overwrite=True"):
        atomic_save(target, _write_checkpoint)
    assert sorted(p.name for p in target.iterdir()) == ["tokenizer.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary folder left


def test_atomic_save_refuses_files_that_appear_while_writing(tmp_path):
    target = tmp_path / "out"

    def racing_write(tmp):
        target.mkdir()
        (target / "other.bin").write_text("another writer")
        _write_checkpoint(tmp)

    with pytest.raises(FolderNotEmptyError):
        atomic_save(target, racing_write)
    assert sorted(p.name for p in target.iterdir()) == ["other.bin"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("existing", ["absent", "empty"])
def test_atomic_save_into_an_absent_or_empty_folder(tmp_path, existing):
    target = tmp_path / "out"
    if existing == "empty":
        target.mkdir()
    atomic_save(target, _write_checkpoint)
    assert [p.name for p in target.iterdir()] == ["model.safetensors"]


def test_overwrite_replaces_the_folder_whole(saved, tmp_path):
    target = _copy(saved, tmp_path)
    (target / "notes.txt").write_text("old")
    (target / "model-00001-of-00002.safetensors").write_text("stale shard")
    q = AutoModelForCausalLM.from_pretrained(saved)
    with pytest.raises(FolderNotEmptyError):
        q.save_pretrained(target)
    q.save_pretrained(target, overwrite=True)
    assert sorted(p.name for p in target.iterdir()) == [
        "README.md",
        "config.json",
        "generation_config.json",
        "model.safetensors",
    ]
    AutoModelForCausalLM.from_pretrained(target)


def test_save_refuses_non_finite_weights(tmp_path):
    from helpers import tiny_llama

    tiny_llama().save_pretrained(tmp_path / "fp")
    q = AutoModelForCausalLM.from_pretrained(
        tmp_path / "fp", quantization_config=CBQConfig(method="rtn", group_size=32)
    )
    with torch.no_grad():
        q.model.norm.weight[0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        q.save_pretrained(tmp_path / "q")
    assert not (tmp_path / "q").exists()


def test_every_quantized_linear_has_a_checksummed_load_guard(saved):
    from safetensors import safe_open

    with safe_open(str(saved / "model.safetensors"), "pt") as f:
        keys, listed = set(f.keys()), json.loads(f.metadata()["cbq_sha256"])
        guard = f.get_tensor("model.layers.0.self_attn.q_proj.weight")
    packed = {k.removesuffix(".qweight") for k in keys if k.endswith(".qweight")}
    assert len(packed) == 14 and {f"{n}.weight" for n in packed} <= keys <= set(listed)
    assert guard.shape == (1,) and guard.dtype == torch.uint8


def test_checkpoint_without_load_guards_still_loads(saved, tmp_path):
    """Checkpoints saved before the guards existed load as before, with the same logits."""
    from safetensors import safe_open

    d = _copy(saved, tmp_path)

    def strip(tensors, meta):
        for key in [k for k in tensors if k.endswith(".weight") and k.removesuffix(".weight") + ".qweight" in tensors]:
            tensors.pop(key)
        meta["cbq_sha256"] = checksum_metadata(tensors)

    _rewrite(d, strip)
    with safe_open(str(d / "model.safetensors"), "pt") as f:
        assert "model.layers.0.self_attn.q_proj.weight" not in f.keys()  # noqa: SIM118
    x = torch.randint(0, 128, (1, 8))
    with torch.no_grad():
        assert torch.equal(
            AutoModelForCausalLM.from_pretrained(d)(x).logits, AutoModelForCausalLM.from_pretrained(saved)(x).logits
        )


def test_deleted_load_guard_is_refused(saved, tmp_path):
    d = _copy(saved, tmp_path)
    _rewrite(d, lambda t, m: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match="missing"):
        AutoModelForCausalLM.from_pretrained(d)
