#!/usr/bin/env bash
# One command from a fresh clone: set up .venv (reused when ready), then run the main job on the demo model.
# Settings of the main job (METHOD, BITS, GROUP, ACT_BITS, OUT) pass through the environment.
set -euo pipefail
. "$(dirname "$0")/setup_env.sh"
exec bash examples/demo_end_to_end.sh "$@"
