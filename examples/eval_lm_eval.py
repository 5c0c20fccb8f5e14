"""Evaluate a saved cbq_hf checkpoint with lm-evaluation-harness.

    python examples/eval_lm_eval.py CHECKPOINT --tasks arc_easy,hellaswag [--limit 200] [--device cpu]
    python examples/eval_lm_eval.py CHECKPOINT --tasks my_task --include-path my_tasks/   # local tasks, offline

`import cbq_hf` must run before lm-eval loads the model: that is all this script adds to lm-eval's own API.
See docs/lm_eval.md (including a task YAML over a local JSON-lines file for machines without Hub access).
"""

import argparse
import json

import lm_eval
from lm_eval.tasks import TaskManager

import cbq_hf  # noqa: F401  (registers the "cbq" quantization method with transformers)

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("checkpoint", help="folder written by cbq_hf (or a Hub id)")
parser.add_argument("--tasks", required=True, help="comma-separated lm-eval task names")
parser.add_argument("--include-path", default=None, help="folder with extra task YAML files (local data)")
parser.add_argument("--limit", type=float, default=None, help="examples per task (a subset while iterating)")
parser.add_argument("--device", default="cpu")
parser.add_argument("--batch-size", default="1")
parser.add_argument("--dtype", default="float32")
parser.add_argument("--json", default=None, help="also write the results to this file")
args = parser.parse_args()

tm = TaskManager(include_path=args.include_path) if args.include_path else None
out = lm_eval.simple_evaluate(
    model="hf",
    model_args=f"pretrained={args.checkpoint},dtype={args.dtype}",
    tasks=args.tasks.split(","),
    task_manager=tm,
    limit=args.limit,
    device=args.device,
    batch_size=args.batch_size,
)
print(json.dumps(out["results"], indent=2, default=str))
if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
        json.dump(out["results"], f, indent=2, default=str)
