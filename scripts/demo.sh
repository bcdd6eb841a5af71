#!/usr/bin/env bash
# `make demo`: the main job on the embedded default (a Ray started inside the process, sized to this machine).
# Grows with each capability; today: synthesise a corpus, prepare it, validate it on Ray, split it by query.
set -euo pipefail
OUT=${1:-runs/demo}
AUGREL=${AUGREL:-.venv/bin/augrel}
mkdir -p "$OUT"
start=$(date +%s)

echo "== 1/4 synthesise a graded corpus ($OUT/raw)"
$AUGREL data synth --out "$OUT/raw"
echo "== 2/4 prepare the tables ($OUT/data)"
$AUGREL data prepare beir --src "$OUT/raw" --out "$OUT/data"
echo "== 3/4 validate every table on the embedded Ray cluster"
$AUGREL data validate "$OUT/data" --report "$OUT/validation.json"
echo "== 4/4 split by query: train/val/test and 5 folds ($OUT/splits)"
$AUGREL data split "$OUT/data" --out "$OUT/splits" --folds 5

echo
echo "demo finished in $(( $(date +%s) - start ))s; made:"
for d in "$OUT/raw" "$OUT/data" "$OUT/splits"; do
  printf '  %-24s %s\n' "$d" "$(.venv/bin/python -c 'import json,sys; m=json.load(open(sys.argv[1])); print(", ".join(f"{k}={v}" for k,v in m["counts"].items()))' "$d/manifest.json")"
done
echo "  $OUT/validation.json"
