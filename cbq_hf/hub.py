"""Saving and pushing a cbq model: atomic `save_pretrained` with a model card, and a `push_to_hub` that uploads
that card (transformers' own would replace it with a generic one) and fails clearly when the Hub is unreachable.

Both are installed on the model instance by the quantizer; the class is not touched.
"""

from __future__ import annotations

import tempfile
import types


class HubUnavailableError(RuntimeError):
    pass


def install_save_hooks(model) -> None:
    """Replace `model.save_pretrained` / `model.push_to_hub` by the cbq versions (idempotent)."""
    if getattr(model, "_cbq_save_hooked", False):
        return
    original_save = type(model).save_pretrained

    def save_pretrained(self, save_directory, *args, push_to_hub: bool = False, overwrite: bool = False, **kwargs):
        """Atomic save (temporary folder + rename) with a README.md model card. `save_directory` must be absent or
        empty unless `overwrite=True`, which replaces it whole; see `cbq_hf.serialization.atomic_save` for why."""
        from .model_card import write_model_card
        from .serialization import atomic_save

        def write(tmp: str) -> None:
            original_save(self, tmp, *args, **kwargs)
            write_model_card(self, tmp, repo=save_directory)  # the card names the user's folder, not `tmp`

        atomic_save(save_directory, write, overwrite=overwrite)
        if push_to_hub:
            repo_id = kwargs.get("repo_id") or str(save_directory).rstrip("/").split("/")[-1]
            self.push_to_hub(repo_id, token=kwargs.get("token"))

    def push_to_hub(
        self,
        repo_id: str,
        *,
        commit_message: str | None = None,
        private: bool | None = None,
        token: str | bool | None = None,
        create_pr: bool = False,
        revision: str | None = None,
        max_shard_size: int | str | None = "50GB",
        **_: object,
    ):
        """Upload the checkpoint (with the cbq model card) through transformers' normal upload path."""
        from transformers.utils import hub as hf_hub

        try:
            repo_id = hf_hub.hf_api().create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
        except Exception as e:  # offline mode, no network, no credentials
            raise HubUnavailableError(
                f"cbq_hf: cannot push to the Hugging Face Hub repo {repo_id!r} ({type(e).__name__}: {e}). "
                "Nothing was uploaded. Check the network and `hf auth login` (HF_HUB_OFFLINE must be unset), or "
                "save locally with save_pretrained(folder) and upload the folder later with `hf upload`."
            ) from e
        with tempfile.TemporaryDirectory() as tmp:
            self.save_pretrained(tmp, max_shard_size=max_shard_size)
            from .model_card import render_model_card

            with open(f"{tmp}/README.md", "w", encoding="utf-8") as f:
                f.write(render_model_card(self, repo_id))
            return self._upload_modified_files(
                tmp,
                repo_id,
                files_timestamps={},
                commit_message=commit_message,
                token=token,
                create_pr=create_pr,
                revision=revision,
            )

    model.save_pretrained = types.MethodType(save_pretrained, model)
    model.push_to_hub = types.MethodType(push_to_hub, model)
    model._cbq_save_hooked = True
