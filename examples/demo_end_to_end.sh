#!/usr/bin/env bash
# The main job on the demo model (SmolLM2-135M-Instruct): fp32, RTN and CBQ perplexity side by side, each
# quantized checkpoint saved and reloaded in a fresh process, a generated answer, the checkpoint sizes.
# Run from the repository root in the environment scripts/run_demo.sh sets up (it runs this script).
#
#   bash examples/demo_end_to_end.sh           # CBQ with the "fast" preset: minutes on a 2-core CPU
#   bash examples/demo_end_to_end.sh --full    # CBQ with the "balanced" preset (the best measured W4 quality)
#
# Environment: BITS, GROUP, ACT_BITS, PRESET (overrides --full), OUTDIR. Text: WikiText-2 from ../shared/data, else
# downloaded with datasets when the Hub is reachable, else the sample text shipped with cbq_hf; each eval prints
# which it used. The fp32 perplexity is measured once and reused while the model files, text and settings match.
set -euo pipefail
PRESET=${PRESET:-fast}
for arg in "$@"; do
  case "$arg" in
    --full) PRESET=${PRESET_FULL:-balanced} ;;
    *) echo "unknown argument $arg (use --full)" >&2; exit 2 ;;
  esac
done
BITS=${BITS:-4}; GROUP=${GROUP:-128}; OUTDIR=${OUTDIR:-out}
TAG="w${BITS}g${GROUP}${ACT_BITS:+a$ACT_BITS}"
EXTRA=()
[ -n "${ACT_BITS:-}" ] && EXTRA+=(--act-bits "$ACT_BITS")
MODEL=$(cbq-hf demo-model)
mkdir -p "$OUTDIR"
start=$(date +%s)
echo "== fp32 perplexity ($MODEL)"
cbq-hf eval "$MODEL" --json "$OUTDIR/fp32_eval.json" --cached
for METHOD in rtn cbq; do
  OUT="$OUTDIR/smollm2-$TAG-$METHOD"
  LABEL="$METHOD W${BITS} g${GROUP}${ACT_BITS:+ A$ACT_BITS}"
  [ "$METHOD" = cbq ] && LABEL="$LABEL, preset $PRESET"
  echo "== quantize ($LABEL) -> $OUT"
  cbq-hf quantize "$MODEL" "$OUT" --overwrite --method "$METHOD" --preset "$PRESET" --bits "$BITS" \
    --group-size "$GROUP" "${EXTRA[@]}" > "$OUTDIR/$METHOD-quantize.json"
  echo "== $METHOD: reloaded checkpoint perplexity (fresh process)"
  cbq-hf eval "$OUT" --json "$OUTDIR/$METHOD-eval.json"
done
echo "== generate with the CBQ checkpoint"
python examples/generate.py "$OUTDIR/smollm2-$TAG-cbq"
python examples/demo_summary.py "$OUTDIR" "$TAG" "$PRESET" "$(( $(date +%s) - start ))"
