"""Activation stream storage: CPU tensors or unlinked files on disk, read and written by row ranges."""

from __future__ import annotations

import io
import os
import tempfile

import pytest
import torch
from helpers import tiny_llama

from cbq_hf.calibration.engine import calibrate
from cbq_hf.calibration.streams import CPUStream, DiskStream, StreamStorage
from cbq_hf.config import CBQConfig


@pytest.mark.parametrize("kind", ["cpu", "disk"])
def test_rows_round_trip_and_clone(kind, tmp_path):
    storage = StreamStorage(kind, tmp_path / "s")
    x = torch.randn(5, 3, 4)
    s = storage.from_tensor(x)
    assert isinstance(s, CPUStream if kind == "cpu" else DiskStream) and s.shape == (5, 3, 4)
    torch.testing.assert_close(s[1:4], x[1:4], rtol=0, atol=0)
    s[2:3] = torch.full((1, 3, 4), 7.0)
    assert bool((s[2:3] == 7).all()) and torch.equal(s[0:2], x[0:2])
    c = s.clone()
    c[0:1] = torch.zeros(1, 3, 4)
    assert torch.equal(s[0:1], x[0:1]) and bool((c[0:1] == 0).all())  # a clone is independent
    with pytest.raises(TypeError, match="row range"):
        s[1]
    with pytest.raises(TypeError, match="row range"):
        s[0:4:2]


def test_disk_stream_files_are_unlinked_and_gone_after_close(tmp_path):
    folder = tmp_path / "s"
    storage = StreamStorage("disk", folder)
    s = storage.empty((4, 8, 16))
    s[0:4] = torch.ones(4, 8, 16)
    assert list(folder.iterdir()) == []  # nothing to leave behind, even if the process is killed
    with pytest.raises(ValueError, match="expect shape"):
        s[0:2] = torch.ones(3, 8, 16)


def test_disk_stream_keeps_process_memory_small(tmp_path):
    """A 64 MiB stream on disk is not resident: reading one row range allocates only that range."""
    storage = StreamStorage("disk", tmp_path)
    s = storage.empty((64, 1024, 256))
    for i in range(0, 64, 8):
        s[i : i + 8] = torch.full((8, 1024, 256), float(i))
    part = s[40:41]
    assert part.shape == (1, 1024, 256) and bool((part == 40).all())
    assert part.untyped_storage().nbytes() == 1024 * 256 * 4


def test_save_and_read_back_checks_size_and_sha256(tmp_path):
    storage = StreamStorage("cpu")
    x = torch.randn(6, 2, 3)
    buf = io.BytesIO()
    digest = CPUStream(x).write_to(buf)
    p = tmp_path / "x.bin"
    p.write_bytes(buf.getvalue())
    for kind in ("cpu", "disk"):
        back = StreamStorage(kind, tmp_path / kind).read_file(p, (6, 2, 3), digest)
        assert torch.equal(back[0:6], x)
    with pytest.raises(ValueError, match="sha256"):
        storage.read_file(p, (6, 2, 3), "0" * 64)
    with pytest.raises(ValueError, match="expected 1440"):
        storage.read_file(p, (6, 2, 30), digest)


def test_disk_and_cpu_calibrations_are_bit_identical(calib_ids, tmp_path, monkeypatch):
    cfg = dict(method="cbq", bits=2, group_size=32, epochs=1, batch_size=4)
    a, b = tiny_llama(layers=3).eval(), tiny_llama(layers=3).eval()
    calibrate(a, CBQConfig(**cfg), calib_ids, progress=False)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the run's temporary stream folder goes
    calibrate(b, CBQConfig(activation_storage="disk", **cfg), calib_ids, progress=False)
    sa, sb = a.state_dict(), b.state_dict()
    assert sorted(sa) == sorted(sb)
    assert [k for k in sa if not torch.equal(sa[k], sb[k])] == []
    assert os.listdir(tmp_path) == []  # the temporary stream folder is removed


def test_unknown_storage_is_refused():
    with pytest.raises(ValueError, match="activation_storage"):
        StreamStorage("gpu")
    with pytest.raises(ValueError, match="`activation_storage`"):
        CBQConfig(activation_storage="mmap")


def test_frozen_blocks_float_weights_are_freed_during_calibration(calib_ids, monkeypatch):
    """No reference to the model's original float linears outlives their wrapping (memory falls as blocks
    freeze instead of the float model staying resident until the end)."""
    import gc
    import weakref

    from cbq_hf.calibration import cbq
    from cbq_hf.modeling import quantizable_linears

    model = tiny_llama(layers=4).eval()
    block0 = {n: weakref.ref(m.weight) for n, m in quantizable_linears(model).items() if ".layers.0." in n}
    assert len(block0) == 7
    alive_at = {}
    real = cbq._train_window

    def train(win, *args, **kwargs):
        gc.collect()
        alive_at[win.index] = sorted(n for n, r in block0.items() if r() is not None)
        return real(win, *args, **kwargs)

    monkeypatch.setattr(cbq, "_train_window", train)
    calibrate(model, CBQConfig(method="cbq", bits=2, group_size=32, epochs=1, batch_size=4), calib_ids, progress=False)
    # Once wrapped for training, a linear's float weight lives only in its quantizer (and the float reference
    # copy): the model's original nn.Linear weights are released, and nothing keeps them until the end.
    assert alive_at == {0: [], 1: [], 2: []}
