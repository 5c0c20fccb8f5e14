"""Checkpoint integrity and atomic saving.

Saving: `save_pretrained` of a cbq model writes into a temporary sibling folder and renames it into place, so
a reader never sees a half-written or mixed folder: the target is absent, unchanged, or complete. A folder that
already holds files is refused unless the caller asks to overwrite it, which replaces it whole (`atomic_save`).
Every saved tensor gets a SHA-256 checksum in the safetensors metadata, beside the format version.

Loading: before transformers copies any tensor, `verify_checkpoint` checks the format version, that every tensor
the metadata lists is present and unchanged, and that the packed tensors have the shapes the
`quantization_config` implies. A truncated, bit-flipped, incomplete or inconsistent checkpoint is refused.

Load guards: every quantized linear is saved with a one-byte tensor under its float `weight` name
(`load_guards`), so that transformers refuses the checkpoint when `cbq_hf` was not imported instead of loading
random linears; with `cbq_hf` imported the quantizer marks these keys as expected extras (`ignore_load_guards`).
Quantized experts get theirs under the fused float parameter names (`expert_load_guards`).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterable

import torch

logger = logging.getLogger(__name__)

META_VERSION = "cbq_format_version"
META_CHECKSUMS = "cbq_sha256"
META_CONFIG = "cbq_signature"


class CheckpointError(ValueError):
    """A saved cbq checkpoint is corrupted, incomplete or disagrees with its quantization_config."""


# ---------------------------------------------------------------------------------------------- load guards
#: Suffix of the guard tensor saved for each quantized linear: the name its float `nn.Linear` weight would have.
GUARD_SUFFIX = ".weight"


def load_guards(module_names: Iterable[str]) -> dict[str, torch.Tensor]:
    """One-byte guard tensors, `<name>.weight` -> uint8 [1], for the quantized linears `module_names`.

    Without `import cbq_hf`, transformers does not know the "cbq" quantization method: it warns, builds plain
    `nn.Linear` modules and would leave their weights randomly initialised. Under each of those weight names the
    checkpoint holds a 1-element tensor instead, a shape no `nn.Linear` weight has ([1] against [out, in]), and
    transformers refuses shape mismatches unless `ignore_mismatched_sizes=True` (RuntimeError "You set
    `ignore_mismatched_sizes` to `False`, thus raising an error", after a report listing the MISMATCH keys). Each
    guard is its own tensor: transformers would drop tensors sharing storage as tied weights.
    """
    return {f"{name}{GUARD_SUFFIX}": torch.zeros(1, dtype=torch.uint8) for name in module_names}


def guarded_linears(model: torch.nn.Module) -> list[str]:
    """Names of the quantized linears that get a load guard: every `CBQLinear` standing where the float model has
    an `nn.Linear` of that name. The per-expert matrices of fused experts modules are list elements
    (``...experts.down.3``) with no float `weight` of that name: their guards are `expert_load_guards`."""
    from .nn.linear import CBQLinear

    return [n for n, m in model.named_modules() if isinstance(m, CBQLinear) and not n.rpartition(".")[2].isdigit()]


#: Float parameter names of fused experts modules, which `expert_load_guards` fills with guards.
EXPERT_PARAMS = ("gate_up_proj", "up_proj", "down_proj")


def expert_load_guards(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Guards for the quantized experts: under the fused float parameter names of every `CBQExperts`
    (``<experts>.gate_up_proj`` / ``up_proj`` and ``down_proj``), a uint8 tensor of shape [E, 2, 1] / [E, 1, 1]
    ([E, 1, 2] for a transposed gate_up layout): one element per expert and half of the gate/up split, so that
    transformers' save-time conversion (which unfuses the float experts into per-expert tensors, e.g. Mixtral's
    ``experts.<e>.w1.weight``) splits it like a real weight and its load-time conversion fuses it back. A loader
    without `cbq_hf` then meets [E, 2, 1] where the float model has [E, 2I, H] and refuses the checkpoint, instead
    of leaving every expert randomly initialised beside unexpected packed keys."""
    from .nn.experts import CBQExperts

    guards = {}
    for name, m in model.named_modules():
        if isinstance(m, CBQExperts):
            split = (2, 1) if m.has_gate else (1, 1)
            transposed = bool(getattr(m, "is_transposed", False))
            up_shape = (m.num_experts, *(split[::-1] if transposed else split))
            guards[f"{name}.{'gate_up_proj' if m.has_gate else 'up_proj'}"] = torch.zeros(up_shape, dtype=torch.uint8)
            guards[f"{name}.down_proj"] = torch.zeros(m.num_experts, 1, 1, dtype=torch.uint8)
    return guards


def ignore_expert_guards(model: torch.nn.Module) -> None:
    """`ignore_load_guards` for the guards of `expert_load_guards` (as transformers names them once fused)."""
    from .nn.experts import CBQExperts

    names = [n for n, m in model.named_modules() if isinstance(m, CBQExperts)]
    alternatives = "|".join(EXPERT_PARAMS)
    patterns = {f"^{re.escape(n)}\\.({alternatives})$" for n in names}
    model._keys_to_ignore_on_load_unexpected = set(model._keys_to_ignore_on_load_unexpected or ()) | patterns


def ignore_load_guards(model: torch.nn.Module, module_names: Iterable[str]) -> None:
    """Tell transformers that the load guards of `module_names` are expected checkpoint keys with no place in the
    model (`_keys_to_ignore_on_load_unexpected`), so it neither loads nor reports them. A checkpoint saved before
    guards existed has none, and loads the same."""
    patterns = {f"^{re.escape(name + GUARD_SUFFIX)}$" for name in module_names}
    model._keys_to_ignore_on_load_unexpected = set(model._keys_to_ignore_on_load_unexpected or ()) | patterns


def tensor_digest(t: torch.Tensor) -> str:
    """SHA-256 of a tensor's bytes (in its own dtype, row-major)."""
    t = t.detach().to("cpu").contiguous()
    data = t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b""
    return hashlib.sha256(memoryview(data)).hexdigest()


def checksum_metadata(state_dict: dict[str, torch.Tensor]) -> str:
    return json.dumps({k: tensor_digest(v) for k, v in sorted(state_dict.items())}, separators=(",", ":"))


def _open(path: str):
    from safetensors import safe_open

    try:
        return safe_open(path, framework="pt")
    except Exception as e:  # safetensors raises its own error types for bad headers and short files
        raise CheckpointError(
            f"cannot read {path}: {e}. The file is truncated or corrupted; save or download the checkpoint again."
        ) from e


def to_model_names(
    present: dict[str, tuple[str, tuple[int, ...]]], handles: dict[str, object], conversions: list | None
) -> tuple[dict[str, str], dict[str, tuple[tuple[int, ...], str]]]:
    """Take checkpoint tensor names through transformers' loading transforms (`conversions`), as
    `transformers.core_model_loading.convert_and_load_state_dict_in_model` does: every renaming, then at most one
    converter.

    Args:
        present: checkpoint name -> (file, shape).
        handles: file -> open safetensors handle (read only for converted tensors).
        conversions: `WeightRenaming`/`WeightConverter` list, or None.

    Returns:
        (model name -> checkpoint name for renamed or unchanged tensors,
         model name -> (shape, SHA-256) for tensors a converter builds from several checkpoint tensors, e.g. float
         experts fused on load).
    """
    if not conversions:
        return {n: n for n in present}, {}
    from copy import deepcopy

    from transformers.core_model_loading import WeightConverter, WeightRenaming, dot_natural_key, rename_source_key

    renamings = [c for c in conversions if isinstance(c, WeightRenaming)]
    converters = [c for c in conversions if isinstance(c, WeightConverter)]
    by_pattern = {p: c for c in converters for p in c.source_patterns}
    renamed: dict[str, str] = {}
    groups: dict[str, WeightConverter] = {}
    for name in sorted(present, key=dot_natural_key):
        model_name, pattern = rename_source_key(name, renamings, converters)
        if pattern is None:
            if model_name in renamed:
                raise CheckpointError(
                    f"checkpoint tensors {renamed[model_name]!r} and {name!r} both load into {model_name!r}; the "
                    f"checkpoint was modified after saving."
                )
            renamed[model_name] = name
            continue
        path = present[name][0]
        groups.setdefault(model_name, deepcopy(by_pattern[pattern])).add_tensor(
            model_name, name, pattern, lambda f=handles[path], n=name: f.get_tensor(n)
        )
    converted: dict[str, tuple[tuple[int, ...], str]] = {}
    for layer_name, converter in groups.items():
        try:
            built = converter.convert(layer_name)
        except Exception as e:
            raise CheckpointError(
                f"cannot rebuild {layer_name!r} from the checkpoint's tensors ({e}); the checkpoint is incomplete or "
                f"was modified after saving."
            ) from e
        for model_name, t in built.items():
            t = t[0] if isinstance(t, list) else t
            converted[model_name] = (tuple(t.shape), tensor_digest(t))
    return renamed, converted


def verify_checkpoint(
    checkpoint_files: Iterable[str],
    expected_shapes: dict[str, tuple[int, ...]],
    signature: dict,
    conversions: list | None = None,
) -> None:
    """Refuse a checkpoint that is corrupted or does not match what the model expects.

    The checksums in the metadata are keyed by the model's own tensor names (what `state_dict()` gives), while
    `save_pretrained` writes the files under transformers' checkpoint names (`revert_weight_conversion`: GPT-NeoX's
    ``lm_head`` saved as ``embed_out``, Mixtral's ``mlp`` as ``block_sparse_moe``, float fused experts unfused per
    expert). The file names are therefore first taken through `conversions`, the same transforms transformers
    applies when it loads these files (`to_model_names`), and every check below is on model names.

    Args:
        checkpoint_files: the safetensors files of the checkpoint.
        expected_shapes: model tensor name -> shape of every packed tensor the config implies.
        signature: `CBQConfig.loading_signature()` of the config that will be used to build the model.
        conversions: transformers' weight transforms for the model being loaded
            (`transformers.conversion_mapping.get_model_conversion_mapping(model)`); None when the file names are
            the model's names.
    """
    from .config import FORMAT_VERSION

    files = [f for f in checkpoint_files if f is not None]
    if not files:
        raise CheckpointError("the checkpoint has no weight files; save it again with save_pretrained.")
    if not all(f.endswith(".safetensors") for f in files):
        raise CheckpointError(f"cbq checkpoints are stored as safetensors; got {files}.")
    # Each file is opened once and kept open until its tensors are checked: metadata, checksums and tensors then all
    # come from the same file even if another process replaces the folder meanwhile (an open file stays readable).
    with contextlib.ExitStack() as stack:
        handles: dict[str, object] = {}
        listed: dict[str, str] = {}
        present: dict[str, tuple[str, tuple[int, ...]]] = {}
        for path in files:
            f = handles[path] = stack.enter_context(_open(path))
            meta = f.metadata() or {}
            version = meta.get(META_VERSION)
            if version is None:
                raise CheckpointError(
                    f"{os.path.basename(path)} has no '{META_VERSION}' metadata: it was not written by cbq_hf's "
                    f"save_pretrained (or was rewritten by another tool). Quantize and save it again with cbq_hf."
                )
            if int(version) > FORMAT_VERSION:
                raise CheckpointError(
                    f"{os.path.basename(path)} has format version {version}, newer than this cbq_hf supports "
                    f"({FORMAT_VERSION}); upgrade cbq_hf."
                )
            saved_sig = meta.get(META_CONFIG)
            if saved_sig is not None:
                saved = json.loads(saved_sig)
                # Optional fields are in a signature only when not at their default (CBQConfig.loading_signature):
                # one the tensors were saved with must be in the config too (a rotated checkpoint without rotation).
                keys = [*signature, *(k for k in ("lm_head_bits", "rotation") if k in saved and k not in signature)]
                diff = {k: (saved.get(k), signature.get(k)) for k in keys if saved.get(k) != signature.get(k)}
                if diff:
                    raise CheckpointError(
                        "the checkpoint's quantization_config disagrees with the settings its tensors were saved "
                        f"with: {', '.join(f'{k}: config {v!r} vs tensors {s!r}' for k, (s, v) in diff.items())}. "
                        "Restore the original config.json."
                    )
            listed.update(json.loads(meta.get(META_CHECKSUMS, "{}")))
            for name in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                present[name] = (path, tuple(f.get_slice(name).get_shape()))
        renamed, converted = to_model_names(present, handles, conversions)
        present = {model_name: present[file_name] for model_name, file_name in renamed.items()}
        shapes = {n: v[1] for n, v in present.items()} | {n: v[0] for n, v in converted.items()}
        missing = sorted(set(listed) - set(shapes))
        if missing:
            raise CheckpointError(
                f"{len(missing)} tensor(s) listed in the checkpoint metadata are missing from its files (first: "
                f"{missing[:3]}); the checkpoint is incomplete. Save or download it again."
            )
        unlisted = sorted(set(shapes) - set(listed))
        if unlisted:
            raise CheckpointError(
                f"tensor(s) {unlisted[:3]} are not listed in the checkpoint's checksums; the file was modified after "
                f"saving."
            )
        for name, shape in expected_shapes.items():
            if name not in shapes:
                raise CheckpointError(
                    f"packed tensor {name!r} is missing: the checkpoint does not match its quantization_config "
                    f"(or was saved from a different model)."
                )
            if shapes[name] != tuple(shape):
                raise CheckpointError(
                    f"packed tensor {name!r} has shape {list(shapes[name])} but the quantization_config "
                    f"({signature}) implies {list(shape)}; config.json and the weights disagree."
                )
        bad = [name for name, (_, digest) in converted.items() if digest != listed[name]]
        by_file: dict[str, list[str]] = {}
        for name, (path, _) in present.items():
            by_file.setdefault(path, []).append(name)
        for path, names in by_file.items():
            f = handles[path]
            for name in names:
                try:
                    digest = tensor_digest(f.get_tensor(renamed[name]))
                except Exception as e:
                    raise CheckpointError(f"cannot read tensor {name!r} from {path}: {e}") from e
                if digest != listed[name]:
                    bad.append(name)
        if bad:
            raise CheckpointError(
                f"checksum mismatch for {len(bad)} tensor(s) (first: {bad[:3]}): the checkpoint is corrupted. "
                f"Save or download it again."
            )


# ---------------------------------------------------------------------------------------------- atomic save
def copy_entry(path: str, folder: str) -> None:
    """Copy the file or folder `path` into `folder`, keeping its name and metadata."""
    dst = os.path.join(folder, os.path.basename(path))
    if os.path.isdir(path):
        shutil.copytree(path, dst)
    else:
        shutil.copy2(path, dst)


class FolderNotEmptyError(FileExistsError):
    """The save target already holds files and the caller did not ask to overwrite it."""


def refuse_existing(target: str) -> None:
    """Raise `FolderNotEmptyError` for the folder `target`, naming a few of its files and the way out."""
    entries = sorted(os.listdir(target))
    shown = ", ".join(entries[:4]) + (f" and {len(entries) - 4} more" if len(entries) > 4 else "")
    raise FolderNotEmptyError(
        f"{target} already exists and holds files ({shown}). cbq_hf saves only into an absent or empty folder, "
        "so that a folder never mixes two saves; choose another folder, or pass overwrite=True "
        "(`cbq-hf ... --overwrite`) to replace this one whole (everything in it is deleted)."
    )


def _move_into_place(tmp: str, target: str) -> None:
    """Rename `tmp` to `target` where `target` is absent or an empty folder; a single rename, so two writers cannot
    both succeed and a folder that gained files meanwhile is never touched."""
    try:
        os.rename(tmp, target)
    except OSError as e:
        if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
        refuse_existing(target)


def _swap_into_place(tmp: str, target: str, attempts: int = 100) -> None:
    """Rename `tmp` to `target`, first moving an existing `target` aside. With several writers racing, each
    attempt either lands a complete folder or finds the place taken and retries: last writer wins, never mixed."""
    parent, base = os.path.dirname(target), os.path.basename(target)
    for _ in range(attempts):
        old = os.path.join(parent, f".{base}.old-{uuid.uuid4().hex[:8]}")
        try:
            os.rename(target, old)
        except FileNotFoundError:
            old = None
        try:
            os.rename(tmp, target)
        except OSError as e:  # another writer landed its folder between our two renames
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            continue
        finally:
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        return
    raise OSError(f"could not move the saved checkpoint into {target}: other writers kept replacing it")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_save(save_directory: str | os.PathLike, write, overwrite: bool = False) -> None:
    """Run `write(tmp_dir)` into a fresh sibling folder, then rename it to `save_directory`.

    A folder that already holds files is refused (`FolderNotEmptyError`, raised before `write` runs and again at
    the rename if files appeared meanwhile) unless `overwrite`, which replaces it whole: nothing of the old folder is
    kept. Why refuse rather than write beside the old files, as transformers' own `save_pretrained` does: files of
    an earlier save that this one does not rewrite (shards of another model, a tokenizer of another vocabulary, an
    old model card) would end up mixed with the new checkpoint. Why not replace whole without asking: a save would
    then delete files the caller never named (a tokenizer saved there first, or a mistyped folder's contents).
    Saving the model first and then its tokenizer into the same folder, as transformers users do, works unchanged.

    Readers see the target absent, unchanged, or complete at every moment (with `overwrite`, two renames; between
    them the folder is briefly absent, never mixed). On failure the target is untouched and the temporary folder
    removed.
    """
    target = os.path.abspath(os.fspath(save_directory))
    if os.path.isfile(target):
        raise NotADirectoryError(f"save_pretrained: {target} is a file; pass a folder path.")
    if not overwrite and os.path.isdir(target) and os.listdir(target):
        refuse_existing(target)
    parent = os.path.dirname(target) or "."
    os.makedirs(parent, exist_ok=True)
    if not os.access(parent, os.W_OK):
        raise PermissionError(f"save_pretrained: cannot write in {parent}; choose a writable output folder.")
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.tmp-", dir=parent)
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; a saved model gets the usual folder permissions
    try:
        write(tmp)
        if overwrite:
            _swap_into_place(tmp, target)
        else:
            _move_into_place(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
