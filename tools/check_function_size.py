"""List functions of a package folder longer than a screen or with too many parameters.

    python tools/check_function_size.py cbq_hf/calibration --max-lines 60 --max-params 7

Exits 1 when any function exceeds a limit (`self`/`cls` are not counted as parameters).
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path


def oversized(folder: Path, max_lines: int, max_params: int) -> list[str]:
    """`path:line name: why` for every function of the .py files under `folder` over a limit."""
    out = []
    for path in sorted(folder.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            a = node.args
            params = [p.arg for p in a.posonlyargs + a.args + a.kwonlyargs if p.arg not in ("self", "cls")]
            params += [p.arg for p in (a.vararg, a.kwarg) if p is not None]
            lines = node.end_lineno - node.lineno + 1
            if lines > max_lines or len(params) > max_params:
                out.append(f"{path}:{node.lineno} {node.name}: {lines} lines, {len(params)} parameters")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folders", nargs="+", type=Path)
    ap.add_argument("--max-lines", type=int, default=60)
    ap.add_argument("--max-params", type=int, default=7)
    args = ap.parse_args()
    found = [line for f in args.folders for line in oversized(f, args.max_lines, args.max_params)]
    print("\n".join(found) or "every function within the limits")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
