"""Where the calibration activation streams live: in CPU memory or in files on disk.

During calibration the engine holds a few tensors of shape [nsamples, seqlen, hidden] (float32): the two streams
X_q and X_fp, the window's targets (float window on X_fp and on X_q) and the next float stream. Their size depends
on the calibration data and the model width, never on the number of decoder blocks. `activation_storage` picks
where they live:

- "cpu": plain CPU tensors (fastest; 4 bytes x nsamples x seqlen x hidden each, about six of them at the peak).
- "disk": each stream is an anonymous (already unlinked) file in a folder on disk; the engine reads and writes it
  one calibration batch at a time with positional reads/writes, so only the current batch is in process memory.
  The files are not memory-mapped on purpose: pages of a mapped file count in the process's resident set (and
  in the kernel's OOM score) once touched, while page-cache pages of a file read with `pread` do not and are
  dropped by the kernel under pressure. The files disappear when the stream is freed or the process dies, even
  by SIGKILL.

Both give bit-identical results (the same float32 values are stored). Every stream is read and written by row
ranges along the first (sample) dimension: `stream[s:e]` returns a CPU tensor, `stream[s:e] = t` stores one.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import BinaryIO

import torch

logger = logging.getLogger(__name__)

#: Accepted values of `CBQConfig.activation_storage`.
STORAGE_KINDS = ("cpu", "disk")
#: Bytes moved per read/write call when a whole stream is copied (checkpoint save and load).
COPY_CHUNK_BYTES = 64 * 2**20


def _rows(key: slice, n: int) -> tuple[int, int]:
    if not isinstance(key, slice) or key.step not in (None, 1):
        raise TypeError(f"streams are indexed by a row range stream[start:end], got {key!r}")
    s, e, _ = key.indices(n)
    return s, max(s, e)


class Stream:
    """A float32 tensor [rows, ...] read and written by row ranges (see the module docstring)."""

    shape: tuple[int, ...]

    @property
    def row_bytes(self) -> int:
        """Bytes of one row (one calibration sample)."""
        n = 4
        for d in self.shape[1:]:
            n *= d
        return n

    def empty_like(self) -> Stream:
        """A new, uninitialised stream of the same shape in the same storage."""
        raise NotImplementedError

    def __getitem__(self, key: slice) -> torch.Tensor:
        raise NotImplementedError

    def __setitem__(self, key: slice, value: torch.Tensor) -> None:
        raise NotImplementedError

    def __len__(self) -> int:
        return self.shape[0]

    def _chunk_rows(self) -> int:
        return max(1, COPY_CHUNK_BYTES // max(self.row_bytes, 1))

    def write_to(self, fh: BinaryIO) -> str:
        """Write the raw little-endian float32 bytes to the open file `fh`, chunk by chunk; return their sha256."""
        h = hashlib.sha256()
        step = self._chunk_rows()
        for s in range(0, self.shape[0], step):
            data = self[s : s + step].contiguous().numpy().tobytes()
            h.update(data)
            fh.write(data)
        return h.hexdigest()

    def clone(self) -> Stream:
        out = self.empty_like()
        step = self._chunk_rows()
        for s in range(0, self.shape[0], step):
            out[s : s + step] = self[s : s + step]
        return out


class CPUStream(Stream):
    """A stream held in a CPU tensor; `stream[s:e]` is a view (no copy)."""

    def __init__(self, tensor: torch.Tensor) -> None:
        if tensor.dtype != torch.float32 or tensor.device.type != "cpu":
            raise ValueError(f"a stream is a float32 CPU tensor, got {tensor.dtype} on {tensor.device}")
        self.tensor = tensor
        self.shape = tuple(tensor.shape)

    def empty_like(self) -> CPUStream:
        return CPUStream(torch.empty_like(self.tensor))

    def __getitem__(self, key: slice) -> torch.Tensor:
        s, e = _rows(key, self.shape[0])
        return self.tensor[s:e]

    def __setitem__(self, key: slice, value: torch.Tensor) -> None:
        s, e = _rows(key, self.shape[0])
        self.tensor[s:e] = value


class DiskStream(Stream):
    """A stream in an unlinked file of `folder`, read and written with positional I/O (see the module docstring).

    Args:
        shape: [rows, ...] of the float32 stream.
        folder: existing folder for the file (it is unlinked at once and removed from disk when this object is
            freed or the process ends).
    """

    def __init__(self, shape: tuple[int, ...], folder: Path) -> None:
        self.shape = tuple(int(d) for d in shape)
        self.folder = folder
        self._file = tempfile.TemporaryFile(dir=folder, prefix="cbq_stream_", buffering=0)  # noqa: SIM115 (closed by close())
        os.ftruncate(self._file.fileno(), self.shape[0] * self.row_bytes)

    def empty_like(self) -> DiskStream:
        return DiskStream(self.shape, self.folder)

    def __getitem__(self, key: slice) -> torch.Tensor:
        s, e = _rows(key, self.shape[0])
        out = torch.empty((e - s, *self.shape[1:]), dtype=torch.float32)
        view = memoryview(out.numpy()).cast("B")
        pos, done = s * self.row_bytes, 0
        while done < len(view):
            if hasattr(os, "preadv"):
                n = os.preadv(self._file.fileno(), [view[done:]], pos + done)
            else:  # platforms without positional reads (Windows)
                self._file.seek(pos + done)
                n = self._file.readinto(view[done:])
            if not n:
                raise OSError(f"short read from calibration stream file in {self.folder}")
            done += n
        return out

    def __setitem__(self, key: slice, value: torch.Tensor) -> None:
        s, e = _rows(key, self.shape[0])
        value = value.detach().to("cpu", torch.float32).contiguous()
        if tuple(value.shape) != (e - s, *self.shape[1:]):
            raise ValueError(f"stream rows {s}:{e} expect shape {(e - s, *self.shape[1:])}, got {tuple(value.shape)}")
        view = memoryview(value.numpy()).cast("B")
        pos, done = s * self.row_bytes, 0
        while done < len(view):
            if hasattr(os, "pwrite"):
                done += os.pwrite(self._file.fileno(), view[done:], pos + done)
            else:  # platforms without positional writes (Windows)
                self._file.seek(pos + done)
                done += self._file.write(view[done:])
                self._file.flush()

    def close(self) -> None:
        self._file.close()

    def __del__(self) -> None:
        f = getattr(self, "_file", None)
        if f is not None:
            f.close()


class StreamStorage:
    """Creates the streams of one calibration run in the storage named by `kind`.

    Args:
        kind: "cpu" or "disk" (`CBQConfig.activation_storage`).
        folder: for "disk", the folder that holds the stream files; None makes a temporary folder (removed by
            `close`). Ignored for "cpu".
    """

    def __init__(self, kind: str, folder: str | os.PathLike | None = None) -> None:
        if kind not in STORAGE_KINDS:
            raise ValueError(f"activation_storage must be one of {list(STORAGE_KINDS)}, got {kind!r}")
        self.kind = kind
        self._tmp: Path | None = None
        self.folder: Path | None = None
        if kind == "disk":
            if folder is None:
                self._tmp = self.folder = Path(tempfile.mkdtemp(prefix="cbq_streams_"))
            else:
                self.folder = Path(folder)
                self.folder.mkdir(parents=True, exist_ok=True)
            logger.info("calibration activation streams on disk in %s", self.folder)

    def empty(self, shape: tuple[int, ...]) -> Stream:
        """A new uninitialised float32 stream of `shape` ([rows, ...])."""
        if self.kind == "cpu":
            return CPUStream(torch.empty(shape, dtype=torch.float32))
        assert self.folder is not None
        return DiskStream(shape, self.folder)

    def from_tensor(self, tensor: torch.Tensor) -> Stream:
        """A stream holding `tensor` (float32 CPU; used as is for "cpu", copied to a file for "disk")."""
        if self.kind == "cpu":
            return CPUStream(tensor)
        out = self.empty(tuple(tensor.shape))
        out[0 : tensor.shape[0]] = tensor
        return out

    def read_file(self, path: Path, shape: tuple[int, ...], sha256: str | None = None) -> Stream:
        """A stream filled from the raw float32 file `path` (as written by `Stream.write_to`), chunk by chunk.

        Raises:
            ValueError: the file's size or sha256 does not match (a truncated or altered file).
        """
        out = self.empty(shape)
        expected = out.shape[0] * out.row_bytes
        size = os.path.getsize(path)
        if size != expected:
            raise ValueError(
                f"{path.name} holds {size} bytes, expected {expected} for a stream of shape {list(shape)}"
            )
        h = hashlib.sha256()
        step = out._chunk_rows()
        with open(path, "rb") as fh:
            for s in range(0, out.shape[0], step):
                e = min(s + step, out.shape[0])
                data = fh.read((e - s) * out.row_bytes)
                h.update(data)
                out[s:e] = torch.frombuffer(bytearray(data), dtype=torch.float32).view(e - s, *shape[1:])
        if sha256 is not None and h.hexdigest() != sha256:
            raise ValueError(f"{path.name}: sha256 does not match the one recorded when it was written")
        return out

    def close(self) -> None:
        """Remove the temporary folder, if this storage made one."""
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None
