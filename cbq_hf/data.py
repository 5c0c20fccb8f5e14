"""Calibration text -> token batches.

Accepted sources (`CBQConfig.dataset`): a list of strings; a path to a UTF-8 text file, a JSON-lines file
(``.jsonl``, one object per line with a "text" field) or a JSON list of strings; ``"wikitext2"`` (WikiText-2
validation from ``shared/data``, else downloaded with `datasets`, else the sample text shipped with the package,
with a warning: see `cbq_hf.locations`); a `datasets.Dataset` with a "text" column; any other string is passed to
`datasets.load_dataset` (which works offline for local files and fails with a clear message for Hub names when
offline); or pre-tokenized input, as gptqmodel and llm-compressor take it: an integer tensor [n, L] or a list of
n lists of L token ids (`check_token_ids`). Pre-tokenized rows are used as given (no BOS added): the first
`nsamples` rows, each cut to its first `seqlen` tokens.

Sampling (seeded, documented): the texts are joined with blank lines and tokenized once without special tokens;
`nsamples` start positions are drawn uniformly with `torch.Generator().manual_seed(seed)`; each sample is
`seqlen - 1` consecutive tokens with the tokenizer's BOS token in front (or `seqlen` tokens when it has none).
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import torch

from .locations import text_source

logger = logging.getLogger(__name__)


class CalibrationDataError(ValueError):
    """The calibration data cannot be used; the message names the problem and the fix."""


def is_token_ids(dataset: Any) -> bool:
    """Whether `dataset` is pre-tokenized input (a tensor, or a list of rows that are not strings)."""
    if isinstance(dataset, torch.Tensor):
        return True
    return (
        isinstance(dataset, (list, tuple)) and len(dataset) > 0 and isinstance(dataset[0], (list, tuple, torch.Tensor))
    )


def check_token_ids(dataset: Any) -> torch.Tensor:
    """Validate pre-tokenized calibration input and return it as an int64 tensor [n, L].

    Accepted: an integer tensor [n, L] (any integer dtype but bool), or a list of n equally long lists (or 1-D
    integer tensors) of non-negative token ids. Raises `CalibrationDataError` naming the problem: a float or bool
    dtype, a tensor that is not 2-D, rows of different lengths (ragged), non-integer or negative ids, empty input.
    """
    if isinstance(dataset, torch.Tensor):
        if dataset.is_floating_point() or dataset.is_complex() or dataset.dtype == torch.bool:
            raise CalibrationDataError(
                f"CBQConfig.dataset: pre-tokenized input must hold integer token ids, got a {dataset.dtype} tensor; "
                f"pass input_ids as torch.long (e.g. tokenizer(..., return_tensors='pt').input_ids)."
            )
        if dataset.dim() != 2:
            raise CalibrationDataError(
                f"CBQConfig.dataset: a token-id tensor must be 2-D [n, seqlen], got shape {list(dataset.shape)}; "
                f"use ids.reshape(n, seqlen) or ids.unsqueeze(0) for one sequence."
            )
        ids = dataset.detach().to("cpu", torch.long)
    else:
        rows = [r.tolist() if isinstance(r, torch.Tensor) else r for r in dataset]
        lengths = {len(r) if isinstance(r, (list, tuple)) else -1 for r in rows}
        if -1 in lengths:
            raise CalibrationDataError(
                "CBQConfig.dataset: a list of token-id rows must hold only lists (or 1-D tensors) of ints; pass a "
                "list of lists of token ids, or a list of strings to tokenize."
            )
        if len(lengths) > 1:
            raise CalibrationDataError(
                f"CBQConfig.dataset: the token-id rows are ragged (lengths {sorted(lengths)[:5]}); every row must "
                f"have the same length: cut them to the shortest, or pack the tokens into equal rows."
            )
        bad = next((t for r in rows for t in r if not isinstance(t, int) or isinstance(t, bool)), None)
        if bad is not None:
            raise CalibrationDataError(
                f"CBQConfig.dataset: token ids must be ints, found {bad!r} ({type(bad).__name__})."
            )
        ids = torch.tensor(rows, dtype=torch.long)
    if ids.numel() == 0:
        raise CalibrationDataError(f"CBQConfig.dataset: the token-id input is empty (shape {list(ids.shape)}).")
    if int(ids.min()) < 0:
        raise CalibrationDataError(f"CBQConfig.dataset: token ids must be >= 0, found {int(ids.min())}.")
    return ids


def token_id_batches(dataset: Any, nsamples: int, seqlen: int, vocab_size: int | None = None) -> torch.Tensor:
    """Calibration input ids [nsamples, seqlen] from pre-tokenized input: its first `nsamples` rows, each cut to
    its first `seqlen` tokens. Too few rows, too short rows, or ids outside the vocabulary are refused."""
    ids = check_token_ids(dataset)
    n, length = ids.shape
    if length < seqlen:
        raise CalibrationDataError(
            f"CBQConfig.dataset: the token-id rows have {length} tokens, shorter than seqlen={seqlen}; pass longer "
            f"rows or set seqlen={length}."
        )
    if n < nsamples:
        raise CalibrationDataError(
            f"CBQConfig.dataset: {n} token-id rows for nsamples={nsamples}; pass more rows or set nsamples={n}."
        )
    if vocab_size is not None and int(ids.max()) >= vocab_size:
        raise CalibrationDataError(
            f"CBQConfig.dataset: token id {int(ids.max())} is outside the tokenizer's vocabulary of {vocab_size}; "
            f"were the ids made with another tokenizer?"
        )
    return ids[:nsamples, :seqlen].contiguous()


def _read_text_file(path: str) -> list[str]:
    with open(path, "rb") as f:
        raw = f.read()
    if b"\x00" in raw[: 1 << 20]:
        raise CalibrationDataError(
            f"calibration file {path} looks binary (contains NUL bytes); pass a UTF-8 text or JSON-lines file."
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CalibrationDataError(f"calibration file {path} is not valid UTF-8 ({e}); re-encode it as UTF-8.") from e
    if path.endswith(".jsonl"):
        out = []
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise CalibrationDataError(f"{path} line {i} is not valid JSON: {e}") from e
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise CalibrationDataError(f"{path} line {i}: expected an object with a string 'text' field.")
            out.append(obj["text"])
        return out
    if path.endswith(".json"):
        obj = json.loads(text)
        if not (isinstance(obj, list) and all(isinstance(t, str) for t in obj)):
            raise CalibrationDataError(f"{path}: a .json calibration file must hold a list of strings.")
        return obj
    return [text]


def load_calibration_texts(dataset: Any) -> list[str]:
    """Resolve `CBQConfig.dataset` to a list of texts (see module docstring)."""
    if dataset is None:
        raise CalibrationDataError(
            "CBQConfig.dataset is None: method='cbq' needs calibration text "
            "(a list of strings, a file path, 'wikitext2' or a datasets name)."
        )
    if isinstance(dataset, (list, tuple)):
        texts = list(dataset)
    elif isinstance(dataset, (str, os.PathLike)):
        name = os.fspath(dataset)
        if name == "wikitext2":
            source = text_source("calibration")
            if source.is_wikitext2:
                logger.info("cbq_hf: calibration text: %s", source.description)
            else:
                logger.warning(
                    "cbq_hf: WikiText-2 is not available here (no shared/data folder, Hub unreachable or offline): "
                    "calibrating on %s. Pass dataset=<your text file> to calibrate on text like your use.",
                    source.description,
                )
            texts = _read_text_file(str(source.path))
        elif os.path.isfile(name):
            texts = _read_text_file(name)
        elif _looks_like_path(name):
            raise CalibrationDataError(f"calibration file {name!r} does not exist.")
        else:
            texts = _load_hub_dataset(name)
    elif hasattr(dataset, "column_names"):
        if "text" not in dataset.column_names:
            raise CalibrationDataError(f"the datasets.Dataset has columns {dataset.column_names}; it needs 'text'.")
        texts = list(dataset["text"])
    else:
        raise CalibrationDataError(f"unsupported calibration dataset of type {type(dataset).__name__}.")
    if not all(isinstance(t, str) for t in texts):
        raise CalibrationDataError("calibration texts must all be strings.")
    if not any(t.strip() for t in texts):
        raise CalibrationDataError("the calibration text is empty; pass non-empty text.")
    return texts


def _looks_like_path(name: str) -> bool:
    """A string that names a file rather than a `datasets` Hub id ("owner/name" or "name")."""
    return (
        name.startswith(("/", ".", "~"))
        or name.count("/") > 1
        or "\\" in name
        or name.endswith((".txt", ".jsonl", ".json", ".tokens", ".raw"))
    )


def _load_hub_dataset(name: str) -> list[str]:
    try:
        import datasets
    except ImportError as e:  # pragma: no cover
        raise CalibrationDataError(f"dataset={name!r} needs the `datasets` package (pip install datasets).") from e
    try:
        ds = datasets.load_dataset(name, split="train")
    except Exception as e:
        raise CalibrationDataError(
            f"could not load dataset {name!r} with datasets.load_dataset ({type(e).__name__}: {e}). If you are "
            f"offline, pass a local text/JSON-lines file or a list of strings instead of a Hub name."
        ) from e
    if "text" not in ds.column_names:
        raise CalibrationDataError(f"dataset {name!r} has columns {ds.column_names}; it needs a 'text' column.")
    return list(ds["text"])


def tokenize_texts(texts: list[str], tokenizer) -> torch.Tensor:
    """Token ids (1-D int64) of the texts joined with blank lines, without special tokens."""
    ids = tokenizer("\n\n".join(texts), add_special_tokens=False, return_tensors=None)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def sample_segments(
    ids: torch.Tensor, nsamples: int, seqlen: int, seed: int, bos_token_id: int | None
) -> torch.Tensor:
    """[nsamples, seqlen] calibration batch: random segments (seeded), BOS prepended when given."""
    body = seqlen - 1 if bos_token_id is not None else seqlen
    if ids.numel() < body + 1:
        raise CalibrationDataError(
            f"the calibration text has {ids.numel()} tokens, fewer than one sample of seqlen={seqlen}; pass more "
            f"text or a smaller seqlen."
        )
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - body + 1, (nsamples,), generator=gen)
    rows = torch.stack([ids[s : s + body] for s in starts.tolist()])
    if bos_token_id is not None:
        rows = torch.cat([torch.full((nsamples, 1), bos_token_id, dtype=torch.long), rows], dim=1)
    return rows


def get_calibration_batches(dataset: Any, tokenizer, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """Calibration input ids [nsamples, seqlen] from any accepted dataset source."""
    if is_token_ids(dataset):
        return token_id_batches(dataset, nsamples, seqlen, len(tokenizer) if tokenizer is not None else None)
    texts = load_calibration_texts(dataset)
    return sample_segments(
        tokenize_texts(texts, tokenizer), nsamples, seqlen, seed, getattr(tokenizer, "bos_token_id", None)
    )
