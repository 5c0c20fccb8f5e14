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
