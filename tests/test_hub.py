"""Model card and push_to_hub up to the network call (the Hub is never contacted)."""

import os
import shutil
import types

import pytest
from transformers import AutoModelForCausalLM

from cbq_hf import CBQConfig
from cbq_hf.hub import HubUnavailableError


@pytest.fixture
def quantized(llama_dir):
    return AutoModelForCausalLM.from_pretrained(llama_dir, quantization_config=CBQConfig(method="rtn", group_size=32))


def test_push_to_hub_uploads_checkpoint_with_cbq_model_card(quantized, tmp_path, monkeypatch):
    from transformers.utils import hub as hf_hub

    class FakeApi:
        def create_repo(self, repo_id, **kw):
            return types.SimpleNamespace(repo_id=f"me/{repo_id}")

    uploaded = {}

    def fake_upload(self, working_dir, repo_id, **kw):
        shutil.copytree(working_dir, tmp_path / "uploaded")
        uploaded["repo_id"] = repo_id

    monkeypatch.setattr(hf_hub, "hf_api", lambda: FakeApi())
    monkeypatch.setattr(type(quantized), "_upload_modified_files", fake_upload)
    quantized.push_to_hub("tiny-cbq")
    assert uploaded["repo_id"] == "me/tiny-cbq"
    files = set(os.listdir(tmp_path / "uploaded"))
    assert {"config.json", "model.safetensors", "README.md"} <= files
    card = (tmp_path / "uploaded" / "README.md").read_text()
    assert 'from_pretrained("me/tiny-cbq")' in card and "import cbq_hf" in card
    assert "bits_per_weight" in card
    # the uploaded folder is a loadable checkpoint
    AutoModelForCausalLM.from_pretrained(tmp_path / "uploaded")


def test_push_to_hub_offline_is_a_clear_error(quantized, monkeypatch):
    from transformers.utils import hub as hf_hub

    class OfflineApi:
        def create_repo(self, repo_id, **kw):
            raise ConnectionError("offline mode is enabled")

    monkeypatch.setattr(hf_hub, "hf_api", lambda: OfflineApi())
    with pytest.raises(HubUnavailableError, match="Nothing was uploaded"):
        quantized.push_to_hub("tiny-cbq")


def test_model_card_lists_settings(quantized, tmp_path):
    quantized.save_pretrained(tmp_path / "q")
    card = (tmp_path / "q" / "README.md").read_text()
    for needle in ("| `bits` | 4 |", "| `group_size` | 32 |", "| `method` | rtn |", "base_model:"):
        assert needle in card


def test_model_card_names_the_folder_the_user_chose_and_the_base_model_as_given(llama_dir, tmp_path, monkeypatch):
    """The atomic save writes into a temporary sibling folder; the card still names the folder passed to
    save_pretrained (as typed, relative here) and the base model as passed to from_pretrained."""
    monkeypatch.chdir(tmp_path)
    os.rename(llama_dir, tmp_path / "my-fp32")
    q = AutoModelForCausalLM.from_pretrained("my-fp32", quantization_config=CBQConfig(method="rtn", group_size=32))
    q.save_pretrained("out/tiny-w4")
    card = (tmp_path / "out" / "tiny-w4" / "README.md").read_text()
    assert 'from_pretrained("out/tiny-w4")' in card
    assert ".tmp-" not in card
    assert "\nbase_model: my-fp32\n" in card


def test_model_card_names_the_demo_checkpoint_by_its_hub_id(tmp_path, monkeypatch):
    from cbq_hf.demo import DEMO_HUB_ID, DEMO_NAME
    from cbq_hf.model_card import base_model_name

    monkeypatch.setenv("CBQ_HF_CACHE", str(tmp_path))
    assert base_model_name(str(tmp_path / DEMO_NAME)) == DEMO_HUB_ID
    assert base_model_name(str(tmp_path / "elsewhere")) == str(tmp_path / "elsewhere")
    assert base_model_name("org/some-model") == "org/some-model"
    assert base_model_name(None) == "unknown"
