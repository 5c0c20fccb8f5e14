"""Resumable calibration: a finished window is the unit of work and is never recomputed after an interruption.

Layout of `checkpoint_dir` (nothing in it is a pickle: tensors are safetensors or raw float32 files, the rest is
JSON, so opening a checkpoint folder cannot run code):

  run.json                   the config the run was started with (readable) and the run's identity: the config
                             fields that change the result, a hash of the calibration tokens, a fingerprint of the
                             model (architecture config, tensor names/shapes/dtypes, a sample of every tensor's
                             values) and the number of decoder blocks.
  block_<i>.safetensors      a frozen decoder block's state dict (packed `CBQLinear` buffers, CFP-folded norms),
                             written once when the block leaves its last window.
  window_<k>.safetensors     after window k: the state dicts of the blocks still training (with their quantizer
                             parameters) and the random generator state.
  window_<k>.x_q.bin         after window k: the two activation streams, raw little-endian float32
  window_<k>.x_fp.bin        [nsamples, seqlen, hidden].
  state.json                 the commit record: next window, the files above with their sha256, report so far.

Every file is written to a temporary name and renamed into place (`os.replace`), and `state.json` is replaced
last: a process killed at any point leaves either the previous commit or the new one, never a mix. Files of older
windows are deleted after the commit. On resume every file's sha256 is checked against `state.json`.

A rerun whose identity differs from `run.json` (another config, other calibration data, another model) refuses
to resume with `CheckpointMismatchError` naming what differs: the folder holds hours of work that a silent restart
would overwrite. Resume with the same settings, or delete the folder / choose another `checkpoint_dir` to start
over.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from .streams import Stream, StreamStorage

logger = logging.getLogger(__name__)

#: Version of the checkpoint folder layout written by this module.
CHECKPOINT_VERSION = 3
#: Config fields that do not change the calibration result (where things run, where files go, data source
#: description: the tokens themselves are hashed).
IGNORED_FIELDS = (
    "checkpoint_dir",
    "run_info",
    "calibration_device",
    "tokenizer",
    "dataset",
    "modules_to_not_convert",
    "activation_storage",
    "preset",
    "e2e_epochs",  # the end-to-end stage runs after the windows: the checkpointed windows do not depend on it
    "e2e_lr",
    "e2e_lr_norm",
)
#: Config fields added after calibration checkpoints existed, with the value every run had before: part of the
#: identity only when set to another value, so a checkpoint written before a field existed still resumes with it.
OPTIONAL_FIELDS = {
    "rotation": None,
    "smooth_alpha": None,
    "token_normalized_loss": False,
    "lr_norm": 0.0,
    "calibration_dtype": "float32",
    "rounding_init": "rtn",
}
#: Report entries the pipeline recomputes on resume; the rest (the method's totals) is saved with each commit.
_PIPELINE_REPORT_KEYS = ("windows", "device", "num_blocks", "resumed_from_window", "seconds")
#: Keys of the model's config.json that do not describe the model itself.
_VOLATILE_MODEL_KEYS = ("_name_or_path", "transformers_version", "quantization_config", "_commit_hash")
#: Values sampled from every tensor for the model fingerprint.
_FINGERPRINT_SAMPLES = 256

_OWN_FILE = re.compile(
    r"^(run\.json|state\.json|block_\d+\.safetensors|window_\d+\.(safetensors|x_q\.bin|x_fp\.bin))"
    r"(\.tmp)?$"
)
_LEGACY_FILE = re.compile(r"^(state\.pt|block_\d+\.pt)$")


class CheckpointError(ValueError):
    """A calibration checkpoint folder is damaged (missing, truncated or altered file). A `ValueError`: bad input,
    reported by the CLI like other bad inputs."""


class CheckpointMismatchError(ValueError):
    """A calibration checkpoint belongs to another run (config, data or model differ)."""


# ------------------------------------------------------------------------------------------------ identity
def model_fingerprint(model: nn.Module) -> str:
    """sha256 of the model's architecture config, tensor names/shapes/dtypes and a strided sample of each tensor.

    Reads at most `_FINGERPRINT_SAMPLES` values per tensor (cheap for any model size); tensors on the meta device
    (offloaded) contribute their name, shape and dtype only.
    """
    h = hashlib.sha256(type(model).__name__.encode())
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "to_dict"):
        d = {k: v for k, v in cfg.to_dict().items() if k not in _VOLATILE_MODEL_KEYS}
        h.update(json.dumps(d, sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, t in model.state_dict().items():
            h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
            if t.device.type == "meta" or t.numel() == 0:
                continue
            flat = t.detach().reshape(-1)
            sample = flat[:: max(1, flat.numel() // _FINGERPRINT_SAMPLES)][:_FINGERPRINT_SAMPLES]
            h.update(sample.cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def run_identity(config, input_ids: torch.Tensor, model: nn.Module, num_blocks: int) -> dict[str, Any]:
    """What decides the calibration result: config fields, calibration tokens, model, number of decoder blocks.

    Must be called before calibration changes the model.
    """
    fields = {
        k: v
        for k, v in config.to_dict().items()
        if k not in IGNORED_FIELDS and not (k in OPTIONAL_FIELDS and v == OPTIONAL_FIELDS[k])
    }
    ids = input_ids.detach().cpu().contiguous()
    data = hashlib.sha256(f"{tuple(ids.shape)}:{ids.dtype}".encode() + ids.numpy().tobytes()).hexdigest()
    return {
        "config": json.loads(json.dumps(fields, sort_keys=True, default=str)),
        "calibration_tokens": data,
        "model": model_fingerprint(model),
        "num_blocks": int(num_blocks),
    }


def _identity_hash(identity: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def _differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    out = []
    sc, cc = saved.get("config", {}), current["config"]
    for k in sorted(set(sc) | set(cc)):
        if sc.get(k, "<absent>") != cc.get(k, "<absent>"):
            out.append(
                f"config field `{k}`: {sc.get(k, '<absent>')!r} in the checkpoint, {cc.get(k, '<absent>')!r} now"
            )
    if saved.get("calibration_tokens") != current["calibration_tokens"]:
        out.append("the calibration tokens (dataset, tokenizer, nsamples, seqlen or seed give other samples)")
    if saved.get("model") != current["model"]:
        out.append("the model (architecture, tensor shapes or weights)")
    if saved.get("num_blocks") != current["num_blocks"]:
        out.append(
            f"the number of decoder blocks: {saved.get('num_blocks')} in the checkpoint, {current['num_blocks']} now"
        )
    return out


# ------------------------------------------------------------------------------------------------ file helpers
def _write_atomic(path: Path, write: Callable[[Any], Any]) -> Any:
    """Call write(fh) on `path`.tmp, fsync, rename onto `path`; return what `write` returned."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        result = write(fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return result


def _write_bytes(path: Path, data: bytes) -> str:
    _write_atomic(path, lambda fh: fh.write(data))
    return hashlib.sha256(data).hexdigest()


def _write_json(path: Path, obj: Any) -> None:
    _write_bytes(path, json.dumps(obj, indent=1, sort_keys=True).encode())


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _tensors_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    return st_save({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()})


# ------------------------------------------------------------------------------------------------ store
class CheckpointStore:
    """Reads and writes the resumable state of one calibration run in `folder`.

    Args:
        folder: the checkpoint folder (created if missing).
        identity: `run_identity(...)` of the current run.
        config_dict: the run's full config (`CBQConfig.to_dict()`), stored readable in run.json.
    """

    def __init__(self, folder: str | os.PathLike, identity: dict[str, Any], config_dict: dict[str, Any]) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.identity = identity
        self.identity_hash = _identity_hash(identity)
        self.config_dict = config_dict
        self._block_hashes: dict[str, str] = {}

    # ---------------------------------------------------------------- starting
    def load_state(self) -> dict[str, Any] | None:
        """The last committed state, or None when there is none (then the folder is prepared for a new run).

        Raises:
            CheckpointMismatchError: the folder holds a run with another config, data or model.
            CheckpointError: state.json or run.json cannot be read.
        """
        state_path = self.folder / "state.json"
        if not state_path.exists():
            self._start_fresh()
            return None
        try:
            state = json.loads(state_path.read_text(encoding="utf-8"))
            run = json.loads((self.folder / "run.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise CheckpointError(
                f"cbq_hf: calibration checkpoint in {self.folder} cannot be read ({e}); delete the "
                f"folder or choose another checkpoint_dir to start over."
            ) from e
        if state.get("version") != CHECKPOINT_VERSION:
            raise CheckpointError(
                f"cbq_hf: calibration checkpoint in {self.folder} has layout version "
                f"{state.get('version')!r}; this cbq_hf reads version {CHECKPOINT_VERSION}. Delete "
                f"the folder or choose another checkpoint_dir to start over."
            )
        diffs = _differences(run.get("identity", {}), self.identity)
        if diffs:
            raise CheckpointMismatchError(
                f"cbq_hf: checkpoint_dir {self.folder} holds a calibration of another run, so it is not resumed; "
                f"differences: " + "; ".join(diffs) + ". To resume it, rerun with the settings, data and model it "
                "was started with (see its run.json); to start over, delete the folder or choose another "
                "checkpoint_dir."
            )
        if state.get("identity_sha256") != self.identity_hash:
            raise CheckpointError(
                f"cbq_hf: {self.folder}/state.json does not belong to its run.json; delete the "
                f"folder or choose another checkpoint_dir to start over."
            )
        self._block_hashes = {k: v for k, v in state["files"].items() if k.startswith("block_")}
        return state

    def _start_fresh(self) -> None:
        for p in self.folder.iterdir():
            if p.is_file() and _LEGACY_FILE.match(p.name):
                logger.warning(
                    "removing %s: a calibration checkpoint in the old pickle layout (never loaded, it could run code)",
                    p,
                )
                p.unlink()
            elif p.is_file() and _OWN_FILE.match(p.name):
                p.unlink()
        _write_json(
            self.folder / "run.json",
            {"version": CHECKPOINT_VERSION, "config": self.config_dict, "identity": self.identity},
        )
        _fsync_dir(self.folder)

    # ---------------------------------------------------------------- reading
    def _read_verified(self, name: str, files: dict[str, str]) -> bytes:
        path = self.folder / name
        try:
            data = path.read_bytes()
        except OSError as e:
            raise CheckpointError(
                f"cbq_hf: calibration checkpoint file {path} is missing or unreadable ({e}); "
                f"delete {self.folder} to start over."
            ) from e
        if hashlib.sha256(data).hexdigest() != files.get(name):
            raise CheckpointError(
                f"cbq_hf: calibration checkpoint file {path} is damaged (sha256 differs from "
                f"state.json); delete {self.folder} to start over."
            )
        return data

    def load_tensors(self, name: str, state: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The tensors of safetensors file `name` of the committed `state` (sha256 checked)."""
        return st_load(self._read_verified(name, state["files"]))

    def load_stream(self, which: str, state: dict[str, Any], storage: StreamStorage) -> Stream:
        """Activation stream `which` ("x_q" or "x_fp") of the committed `state`, into `storage`."""
        name = f"window_{state['next_window'] - 1}.{which}.bin"
        try:
            return storage.read_file(self.folder / name, tuple(state["stream_shape"]), state["files"].get(name))
        except (OSError, ValueError) as e:
            raise CheckpointError(
                f"cbq_hf: calibration checkpoint file {self.folder / name} is missing or damaged "
                f"({e}); delete {self.folder} to start over."
            ) from e

    # ---------------------------------------------------------------- writing
    def save_frozen_block(self, index: int, block: nn.Module) -> None:
        """Write frozen decoder block `index` (its state dict); it is named in the next `save_state` commit."""
        name = f"block_{index}.safetensors"
        self._block_hashes[name] = _write_bytes(self.folder / name, _tensors_bytes(block.state_dict()))

    def save_state(
        self,
        next_window: int,
        x_q: Stream,
        x_fp: Stream,
        inflight: dict[int, nn.Module],
        gen_state: torch.Tensor,
        report: dict[str, Any],
    ) -> None:
        """Commit the state after window `next_window - 1`.

        Args:
            next_window: index of the first window still to run.
            x_q, x_fp: the two activation streams entering the next window's new blocks.
            inflight: block index -> live block (quantizer parameters included) of blocks still training.
            gen_state: state of the calibration random generator.
            report: JSON-safe report so far (the windows' entries and the method's totals).
        """
        k = next_window - 1
        files = dict(self._block_hashes)
        tensors = {f"{b}/{n}": t for b, live in inflight.items() for n, t in live.state_dict().items()}
        tensors["gen_state"] = gen_state
        files[f"window_{k}.safetensors"] = _write_bytes(
            self.folder / f"window_{k}.safetensors", _tensors_bytes(tensors)
        )
        for which, stream in (("x_q", x_q), ("x_fp", x_fp)):
            name = f"window_{k}.{which}.bin"
            files[name] = _write_atomic(self.folder / name, stream.write_to)
        _fsync_dir(self.folder)
        _write_json(
            self.folder / "state.json",
            {
                "version": CHECKPOINT_VERSION,
                "identity_sha256": self.identity_hash,
                "next_window": next_window,
                "inflight_blocks": sorted(inflight),
                "stream_shape": list(x_q.shape),
                "files": files,
                "windows": report["windows"],
                "method_report": {k: v for k, v in report.items() if k not in _PIPELINE_REPORT_KEYS},
            },
        )
        _fsync_dir(self.folder)
        for p in self.folder.iterdir():  # older windows' files, after the commit
            m = re.match(r"^window_(\d+)\.", p.name)
            if _OWN_FILE.match(p.name) and ((m and int(m.group(1)) != k) or p.name.endswith(".tmp")):
                p.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------------ rebuilding blocks
def restore_frozen_block(
    block: nn.Module, tensors: dict[str, torch.Tensor], names: dict[str, str], fmt, with_input_scale: bool
) -> nn.Module:
    """Turn the float `block` into the saved frozen block: its quantizable linears (relative name -> full name in
    `names`) become `CBQLinear` and every tensor is taken from `tensors` (a saved block state dict). Expert matrices
    (`moe.inside_experts`) never carry an input scale."""
    from ..modeling import empty_cbq_linear, set_module
    from .moe import inside_experts

    for rel, full in names.items():
        scaled = with_input_scale and not inside_experts(block, rel)
        set_module(block, rel, empty_cbq_linear(block.get_submodule(rel), fmt, scaled, name=full))
    _load_exact(block, tensors)
    block.requires_grad_(False)
    return block


def restore_live_block(
    live: nn.Module, tensors: dict[str, torch.Tensor], names: dict[str, str], config, fmt
) -> dict[str, nn.Module]:
    """Put back the training state of a block still in its window: every quantizable linear of `live` (a float32
    block) becomes its format's stand-in (`fmt.stand_in`) holding the saved quantizer parameters. Returns
    relative name -> stand-in."""
    from ..formats.stand_in import StandInOptions
    from ..modeling import set_module

    sims = {}
    for rel in names:
        # The constructor's initial values (and its random draw, from a throwaway generator) are all replaced.
        options = StandInOptions.from_config(
            config, input_scale=tensors.get(f"{rel}.input_scale"), generator=torch.Generator()
        )
        sim = fmt.stand_in(live.get_submodule(rel), options)
        set_module(live, rel, sim)
        sims[rel] = sim
    _load_exact(live, tensors)
    return sims


def _load_exact(module: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Load `tensors` as the module's state, keeping each module tensor's device (values and dtypes as saved)."""
    devices = {k: v.device for k, v in module.state_dict().items()}
    try:
        module.load_state_dict(
            {k: v.to(devices.get(k, v.device)) for k, v in tensors.items()}, strict=True, assign=True
        )
    except RuntimeError as e:
        raise CheckpointError(
            f"cbq_hf: a saved calibration block does not match the model's block ({e}); delete "
            f"the checkpoint folder to start over."
        ) from e
