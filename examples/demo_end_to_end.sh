#!/usr/bin/env bash
# End to end on the demo model: fp32 perplexity, quantize + save, reload + perplexity, generate.
# Run from the repository root in the environment scripts/run_demo.sh sets up (it runs this script).
# METHOD=rtn|cbq, BITS, GROUP, ACT_BITS, OUT. Text: WikiText-2 from ../shared/data, else downloaded with datasets
# when the Hub is reachable, else the sample text shipped with cbq_hf; each eval prints which it used.
# The fp32 perplexity is measured once and reused while the model files, text and settings are unchanged.
set -euo pipefail
METHOD=${METHOD:-rtn}; BITS=${BITS:-4}; GROUP=${GROUP:-128}; OUT=${OUT:-out/smollm2-w${BITS}g${GROUP}-${METHOD}}
EXTRA=()
[ -n "${ACT_BITS:-}" ] && EXTRA+=(--act-bits "$ACT_BITS")
MODEL=$(cbq-hf demo-model)
echo "== fp32 perplexity ($MODEL)"
mkdir -p "$(dirname "$OUT")"
cbq-hf eval "$MODEL" --json "$(dirname "$OUT")/fp32_eval.json" --cached
echo "== quantize ($METHOD W${BITS} g${GROUP}) -> $OUT"
cbq-hf quantize "$MODEL" "$OUT" --overwrite --method "$METHOD" --bits "$BITS" --group-size "$GROUP" "${EXTRA[@]}"
echo "== reloaded checkpoint perplexity"
cbq-hf eval "$OUT" --json "$OUT/eval.json"
echo "== generate"
python examples/generate.py "$OUT"
