#!/usr/bin/env bash
# One command from a fresh clone: set up .venv (reused when ready), then run exactly the README's test command.
# Offline by design: tests never reach the Hub; the ones needing the full WikiText-2 skip, with the reason,
# where ../shared/data does not have it.
set -euo pipefail
. "$(dirname "$0")/setup_env.sh"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
ruff check . && ruff format --check . && python -m pytest -q "$@"
