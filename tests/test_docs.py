"""The generated config reference documents every field and is up to date."""

import importlib.util
import inspect
from pathlib import Path

from cbq_hf.config import CBQConfig

ROOT = Path(__file__).resolve().parent.parent


def _gen():
    spec = importlib.util.spec_from_file_location("gen", ROOT / "tools" / "gen_config_reference.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_every_config_field_is_documented():
    docs = _gen().field_docs()
    fields = [n for n in inspect.signature(CBQConfig.__init__).parameters if n not in ("self", "kwargs")]
    assert [f for f in fields if not docs.get(f)] == []


def test_config_reference_is_up_to_date():
    assert (ROOT / "docs" / "config_reference.md").read_text(encoding="utf-8") == _gen().render(), (
        "docs/config_reference.md is stale: run python tools/gen_config_reference.py"
    )
