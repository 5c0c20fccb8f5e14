"""CBQ on LO-BCQ, ablation on the tiny random Llama of the tests (seconds, no data download): relative squared
logit error vs the float model on the 8 x 32 calibration ids (in-sample) for RTN LO-BCQ, the CBQ starting point
(epochs=0: CFP + channel-weighted scale / selector search), the same without CFP, and CBQ trained 3 epochs.

    .venv/bin/python benchmarks/lobcq_tiny_ablation.py
"""

import sys

import torch

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
torch.set_num_threads(1)
from helpers import tiny_llama

import cbq_hf  # noqa: F401
from cbq_hf.calibration.engine import calibrate
from cbq_hf.calibration.rtn import quantize_rtn
from cbq_hf.config import CBQConfig
from cbq_hf.formats import get_format

ids = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(1))


def rel(m, ref):
    with torch.no_grad():
        o = m(ids).logits
    return float((o - ref).pow(2).mean() / ref.pow(2).mean())


with torch.no_grad():
    ref = tiny_llama(layers=2).eval()(ids).logits
for act in (4, None):
    base = dict(
        method="cbq",
        format="lobcq",
        bits=4,
        act_bits=act,
        group_size=-1,
        epochs=3,
        batch_size=4,
        lr=1e-2,
        lr_scale=1e-3,
    )
    rtn = tiny_llama(layers=2).eval()
    quantize_rtn(rtn, get_format(CBQConfig(**{**base, "method": "rtn"})), progress=False)
    res = {"rtn": rel(rtn, ref)}
    for name, kw in (("cbq_e0", dict(epochs=0)), ("cbq_e0_nocfp", dict(epochs=0, use_cfp=False)), ("cbq_e3", {})):
        m = tiny_llama(layers=2).eval()
        calibrate(m, CBQConfig(**{**base, **kw}), ids, progress=False)
        res[name] = rel(m, ref)
    print(f"act_bits={act}", {k: round(v, 5) for k, v in res.items()})
