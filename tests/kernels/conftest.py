"""Makes `kernel_helpers` importable by the kernel tests."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
