#!/usr/bin/env bash
# `make demo`: the main job on the embedded default (a Ray started inside the process, sized to this machine).
# Grows with each capability; today: synthesise a corpus, prepare it, validate it on Ray, split it by query,
# fine-tune the LLM judge on Ray Train + DeepSpeed, grade a few pairs in one process, annotate every held-out
# pair with a Ray Data actor pool (exactly once, resumable), measure the judge's agreement, compute ranking
# features, train and evaluate a LambdaMART ranker, run the label-augmentation experiment, build the retrieval
# index (BM25 + FAISS) and serve the ranker and judge on Ray Serve for one query.
set -euo pipefail
OUT=${1:-runs/demo}
AUGREL=${AUGREL:-.venv/bin/augrel}
mkdir -p "$OUT"
start=$(date +%s)

echo "== 1/14 synthesise a graded corpus ($OUT/raw)"
$AUGREL data synth --out "$OUT/raw"
echo "== 2/14 prepare the tables ($OUT/data)"
$AUGREL data prepare beir --src "$OUT/raw" --out "$OUT/data"
echo "== 3/14 validate every table on the embedded Ray cluster"
$AUGREL data validate "$OUT/data" --report "$OUT/validation.json"
echo "== 4/14 split by query: train/val/test and 5 folds ($OUT/splits)"
$AUGREL data split "$OUT/data" --out "$OUT/splits" --folds 5
echo "== 5/14 fine-tune the judge: Gemma 3 270M + LoRA, 2 Ray Train workers, DeepSpeed ZeRO-2 ($OUT/judge)"
$AUGREL judge finetune --config configs/judge-demo.yaml \
  --set "train=[$OUT/splits/train/pairs]" --set "val=[$OUT/splits/val/pairs]" --set "out=$OUT/judge"
echo "== 6/14 grade a few pairs in this process with the fine-tuned judge ($OUT/predict)"
$AUGREL judge predict --judge "$OUT/judge" --pairs "$OUT/splits/test/pairs" --out "$OUT/predict" --limit 32
echo "== 7/14 annotate every held-out test pair: Ray Data actor pool, one partition per unit ($OUT/judgments)"
$AUGREL annotate --judge "$OUT/judge" --pairs "$OUT/splits/test/pairs" --out "$OUT/judgments" --overwrite --unit-rows 128
echo "== 8/14 agreement with the (synthetic) ground truth ($OUT/judge-eval)"
$AUGREL judge eval --judgments "$OUT/judgments" --qrels "$OUT/splits/test/qrels" --out "$OUT/judge-eval"
echo "== 9/14 ranking features (BM25, MiniLM cosine, lengths, overlap) on a Ray Data actor pool ($OUT/features-*)"
for s in train test; do
  $AUGREL rank features --pairs "$OUT/splits/$s/pairs" --docs "$OUT/data/docs" --out "$OUT/features-$s"
done
echo "== 10/14 LambdaMART on the training queries' human labels ($OUT/ranker)"
$AUGREL rank train --features "$OUT/features-train" --label-source human --out "$OUT/ranker"
echo "== 11/14 rank the test queries; NDCG/MRR against BM25 with a paired test ($OUT/rank-eval)"
$AUGREL rank predict --ranker "$OUT/ranker" --features "$OUT/features-test" --out "$OUT/run-lambdamart"
$AUGREL rank predict --feature bm25 --features "$OUT/features-test" --out "$OUT/run-bm25"
$AUGREL rank eval --run "$OUT/run-lambdamart" --baseline "$OUT/run-bm25" --qrels "$OUT/splits/test/qrels" --out "$OUT/rank-eval"
echo "== 12/14 augmentation experiment on the test queries: 20% human vs + judge labels vs 100% ($OUT/augment)"
$AUGREL experiment augment --features "$OUT/features-test" --judgments "$OUT/judgments" --out "$OUT/augment" \
  --set folds=4 --set "seeds=[0,1]" --set ranker.n_estimators=150
echo "== 13/14 retrieval index over the corpus: BM25 + FAISS of MiniLM vectors ($OUT/index)"
$AUGREL index build --docs "$OUT/data/docs" --out "$OUT/index"
echo "== 14/14 serve the ranker and the judge on Ray Serve (127.0.0.1), rank and grade once, stop"
$AUGREL serve --config configs/serve-demo.yaml --set "ranker=$OUT/ranker" --set "index=$OUT/index" \
  --set "judge.path=$OUT/judge" --set port=${AUGREL_DEMO_PORT:-8765} --check

echo
echo "demo finished in $(( $(date +%s) - start ))s; made:"
for d in "$OUT/raw" "$OUT/data" "$OUT/splits" "$OUT/judge" "$OUT/predict" "$OUT/judgments" "$OUT/judge-eval" \
         "$OUT/features-train" "$OUT/ranker" "$OUT/rank-eval" "$OUT/augment" "$OUT/index"; do
  printf '  %-24s %s\n' "$d" "$(.venv/bin/python -c 'import json,sys; m=json.load(open(sys.argv[1])); print(", ".join(f"{k}={v}" for k,v in m["counts"].items()))' "$d/manifest.json")"
done
echo "  $OUT/validation.json"
echo "  plots: $OUT/judge-eval/confusion.png $OUT/judge-eval/calibration.png $OUT/ranker/importances.png $OUT/augment/augment.png"
