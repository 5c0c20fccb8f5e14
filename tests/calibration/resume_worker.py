"""Calibration process for the kill-and-resume test (`test_resume_kill.py`); not a test module.

`python resume_worker.py` imports torch, transformers and cbq_hf once, then serves commands read as JSON lines on
stdin (a fork server: each calibration is a fresh child process, so the test can SIGKILL it without paying the
import time for every run):

  {"cmd": "run", "model": DIR, "out": FILE, "events": FILE, "checkpoint_dir": DIR|null, "pause_at": POINT|null,
   "config": {...overrides}}   -> forks a child that calibrates; replies {"pid": PID}
  {"cmd": "wait", "pid": PID}   -> waits for that child; replies {"status": STATUS, "signal": SIG|null}

The server loads each saved float model once; every child calibrates its own (copy-on-write) copy of it with
`calibrate` (fixed calibration tokens and seed), and writes the quantized state dict to `out` (safetensors) and its
report to `out`.json.

Pause points (`pause_at`): the child appends {"paused": POINT} to the events file and sleeps until the test kills it.
  "after_commit:<n>"          right after the commit (state.json) of the state whose next window is n.
  "mid_train:<w>"             in window w, after one optimisation step (at the loss of its second training batch).
  "mid_stream_write:<w>"      while writing window w's x_fp stream file: half of its bytes are on disk.
  "before_commit:<n>"         every file of the state with next window n is written, state.json not yet replaced.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch

torch.set_num_threads(1)  # before any parallel op: no thread pool exists when the server forks

from safetensors.torch import save_file  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

import cbq_hf  # noqa: E402, F401
from cbq_hf.calibration import cbq, checkpoint, engine, streams  # noqa: E402
from cbq_hf.config import CBQConfig  # noqa: E402

BASE_CONFIG = dict(
    method="cbq",
    bits=2,
    group_size=32,
    epochs=1,
    batch_size=2,
    nsamples=4,
    seqlen=16,
    window_size=2,
    window_overlap=1,
    lr=1e-2,
    lr_scale=1e-3,
    seed=0,
)


def _event(path: str, **kw) -> None:
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(kw) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def _pause(events: str, point: str) -> None:
    _event(events, paused=point)
    while True:  # the test SIGKILLs us here
        time.sleep(1)


def _install_hook(point: str, events: str) -> None:
    kind, _, arg = point.partition(":")
    n = int(arg)
    if kind == "after_commit":
        real_save = checkpoint.CheckpointStore.save_state

        def save_state(self, next_window, *a, **k):
            real_save(self, next_window, *a, **k)
            if next_window == n:
                _pause(events, point)

        checkpoint.CheckpointStore.save_state = save_state
    elif kind == "mid_train":
        real_train, real_loss = cbq._train_window, cbq.window_loss
        calls = {"window": -1, "n": 0}

        def train(win, *a, **k):
            calls.update(window=win.index, n=0)
            return real_train(win, *a, **k)

        def loss(*a, **k):
            calls["n"] += torch.is_grad_enabled()  # training batches only (the loss evaluations run without grad)
            if calls["window"] == n and calls["n"] == 2:
                _pause(events, point)
            return real_loss(*a, **k)

        cbq._train_window, cbq.window_loss = train, loss
    elif kind == "mid_stream_write":
        real_write = streams.Stream.write_to

        def write_to(self, fh):
            if Path(fh.name).name == f"window_{n}.x_fp.bin.tmp":
                data = self[0 : self.shape[0]].contiguous().numpy().tobytes()
                fh.write(data[: len(data) // 2])
                fh.flush()
                os.fsync(fh.fileno())
                _pause(events, point)
            return real_write(self, fh)

        streams.Stream.write_to = write_to
    elif kind == "before_commit":
        real_replace = os.replace

        def replace(src, dst, *a, **k):
            if Path(dst).name == "state.json":
                state = json.loads(Path(src).read_text(encoding="utf-8"))
                if state.get("next_window") == n:
                    _pause(events, point)
            return real_replace(src, dst, *a, **k)

        os.replace = replace
    else:
        raise ValueError(f"unknown pause point {point!r}")


#: Float models loaded by the server before forking (the child calibrates its own copy-on-write copy).
_MODELS: dict[str, torch.nn.Module] = {}


def _child(req: dict) -> None:
    real_load = checkpoint.CheckpointStore.load_state

    def load_state(self):
        state = real_load(self)
        _event(req["events"], loaded_next_window=None if state is None else state["next_window"])
        return state

    checkpoint.CheckpointStore.load_state = load_state
    if req.get("pause_at"):
        _install_hook(req["pause_at"], req["events"])
    model = _MODELS[req["model"]]
    config = CBQConfig(**{**BASE_CONFIG, "checkpoint_dir": req.get("checkpoint_dir"), **req.get("config", {})})
    ids = torch.randint(
        0, model.config.vocab_size, (config.nsamples, config.seqlen), generator=torch.Generator().manual_seed(123)
    )
    report = engine.calibrate(model, config, ids, progress=False)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, req["out"])
    Path(req["out"] + ".json").write_text(json.dumps(report), encoding="utf-8")
    _event(req["events"], finished=True, resumed_from_window=report.get("resumed_from_window"))


def main() -> None:
    for line in sys.stdin:
        req = json.loads(line)
        if req["cmd"] == "run":
            if req["model"] not in _MODELS:
                _MODELS[req["model"]] = AutoModelForCausalLM.from_pretrained(req["model"], dtype=torch.float32).eval()
            pid = os.fork()
            if pid == 0:
                code = 0
                try:
                    _child(req)
                except BaseException as e:  # reported to the test through the events file
                    _event(req["events"], error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc())
                    code = 1
                finally:
                    os._exit(code)
            reply = {"pid": pid}
        elif req["cmd"] == "wait":
            _, status = os.waitpid(req["pid"], 0)
            reply = {
                "status": os.waitstatus_to_exitcode(status),
                "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
            }
        else:
            reply = {"error": f"unknown command {req['cmd']!r}"}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
