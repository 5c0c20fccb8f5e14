"""Kill-and-resume: a real calibration process is SIGKILLed at four points (after a commit, in the middle of a
window's training, in the middle of a stream file write, after every file of a state but before its commit);
rerunning the same command resumes from the last committed window, and the final quantized weights equal those
of an uninterrupted run bit for bit. Runs alternate between activation streams in memory and on disk.

The calibration processes are children of a fork server (`resume_worker.py`) that imports torch/transformers
once; each child is an ordinary process that the test kills with SIGKILL from outside.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import tiny_llama
from safetensors.torch import load_file

WORKER = Path(__file__).with_name("resume_worker.py")
#: 5 blocks, window 2, overlap 1: windows 0..3.
LAYERS = 5
#: Seconds a child may take to reach its pause point or to finish (generous: a loaded 2-core machine runs the
#: child several times slower than a quiet one).
CHILD_TIMEOUT = 600


class Server:
    """The fork server: run(...) starts a calibration child, wait(pid) reaps it."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(WORKER)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=str(WORKER.parent),
        )

    def _ask(self, **req) -> dict:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, f"fork server died (exit {self.proc.poll()})"
        return json.loads(line)

    def run(self, **req) -> int:
        return self._ask(cmd="run", **req)["pid"]

    def wait(self, pid: int) -> dict:
        return self._ask(cmd="wait", pid=pid)

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        self.proc.wait(timeout=30)


def _events(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _wait_event(path: Path, key: str) -> dict:
    deadline = time.monotonic() + CHILD_TIMEOUT
    while time.monotonic() < deadline:
        for ev in _events(path):
            if "error" in ev:
                raise AssertionError(f"calibration child failed: {ev['error']}\n{ev['traceback']}")
            if key in ev:
                return ev
        time.sleep(0.05)
    raise AssertionError(f"no {key!r} event in {path} after {CHILD_TIMEOUT} s")


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes of `t` (so -0.0 vs 0.0 and NaN payloads count as differences)."""
    return t.contiguous().reshape(-1).view(torch.uint8)


def _committed(ckpt: Path) -> int | None:
    p = ckpt / "state.json"
    return json.loads(p.read_text(encoding="utf-8"))["next_window"] if p.exists() else None


@pytest.fixture(scope="module")
def server():
    s = Server()
    yield s
    s.close()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    d = tmp_path_factory.mktemp("resume_kill") / "fp"
    tiny_llama(layers=LAYERS).save_pretrained(d)
    return str(d)


def test_sigkill_at_four_points_then_resume_is_bit_identical(server, model_dir, tmp_path):
    ckpt = tmp_path / "ckpt"
    ref_out, ref_events = tmp_path / "ref.safetensors", tmp_path / "ref.events"
    # The uninterrupted run (no checkpoint folder at all), in parallel with the interrupted ones.
    ref_pid = server.run(model=model_dir, out=str(ref_out), events=str(ref_events), checkpoint_dir=None)

    # (pause point, activation storage of that run, window it must resume from, committed next window after kill)
    plan = [
        ("after_commit:1", "cpu", None, 1),
        ("mid_train:2", "disk", 1, 2),
        ("mid_stream_write:2", "cpu", 2, 2),
        ("before_commit:4", "disk", 2, 3),
    ]
    for i, (point, storage, resumes_from, committed) in enumerate(plan):
        events = tmp_path / f"run{i}.events"
        pid = server.run(
            model=model_dir,
            out=str(tmp_path / f"run{i}.safetensors"),
            events=str(events),
            checkpoint_dir=str(ckpt),
            pause_at=point,
            config={"activation_storage": storage},
        )
        assert _wait_event(events, "paused")["paused"] == point
        os.kill(pid, signal.SIGKILL)
        status = server.wait(pid)
        assert status["signal"] == signal.SIGKILL, status
        assert _wait_event(events, "loaded_next_window")["loaded_next_window"] == resumes_from, point
        assert _committed(ckpt) == committed, point
        assert not (tmp_path / f"run{i}.safetensors").exists()
    # The last kill came after window 3's files were renamed into place but before state.json named them.
    assert (ckpt / "window_3.x_fp.bin").exists() and _committed(ckpt) == 3

    final_events = tmp_path / "final.events"
    final_out = tmp_path / "final.safetensors"
    pid = server.run(model=model_dir, out=str(final_out), events=str(final_events), checkpoint_dir=str(ckpt))
    status = server.wait(pid)
    assert status["status"] == 0, _events(final_events)
    done = _wait_event(final_events, "finished")
    assert done["resumed_from_window"] == 3
    assert server.wait(ref_pid)["status"] == 0, _events(ref_events)
    report = json.loads(Path(str(final_out) + ".json").read_text(encoding="utf-8"))
    ref_report = json.loads(Path(str(ref_out) + ".json").read_text(encoding="utf-8"))
    assert [w["blocks"] for w in report["windows"]] == [w["blocks"] for w in ref_report["windows"]]
    assert [w["loss_end"] for w in report["windows"]] == [w["loss_end"] for w in ref_report["windows"]]

    ref, got = load_file(str(ref_out)), load_file(str(final_out))
    assert sorted(got) == sorted(ref)
    assert sum(not t.is_floating_point() for t in ref.values()) >= 7 * LAYERS  # packed integer buffers
    different = [
        k
        for k in ref
        if ref[k].dtype != got[k].dtype
        or ref[k].shape != got[k].shape
        or not torch.equal(_bits(ref[k]), _bits(got[k]))
    ]
    assert different == [], f"tensors differ after resume: {different[:5]}"
    # Nothing left from the killed runs: only the last commit's files.
    names = sorted(p.name for p in ckpt.iterdir() if p.is_file())
    assert not [n for n in names if n.endswith(".tmp")], names
    assert {n for n in names if n.startswith("window_")} == {
        "window_3.safetensors",
        "window_3.x_q.bin",
        "window_3.x_fp.bin",
    }
