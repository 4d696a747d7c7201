#!/usr/bin/env bash
# The project's whole GPU check, run ON the lent GPU machine in one call (never waits for input).
#
# Prepared on the CPU machine (`bash scripts/gpu_wheels.sh` fills .whl/), then through the device
# tool:  run(command="bash scripts/gpu_check.sh", carry=[".whl"], timeout_s=600)
#
# Stages, in order of value; each under its own time limit, skipped when the remaining budget
# (GPU_CHECK_BUDGET_S, default 540 s, under the tool's 600 s per command) is smaller than its limit:
#   env        versions of the image and of what was installed from .whl/
#   matmul     8192^3 bf16 matmul TFLOP/s: the measured ceiling MFU is compared with
#   gpu_tests  pytest tests/gpu (DDP, ZeRO-2, ZeRO-3 bf16 fits + exports of an XLM-R-base-sized encoder)
#   packing   pytest tests/gpu/test_gpu_packing.py: packed steps through torch's varlen kernel (and
#              flash_attention_2 where flash-attn is installed) vs the padded forward in bf16, + a packed align fit
#   mfu        benchmarks/train_throughput.py, XLM-R-base config, seq 128, bf16: framework vs hand loop vs
#              sentence-transformers' trainer (MFU against the datasheet peak and the measured matmul)
#   mfu_packed the same step with unpadded steps (framework-packed arm, attention dropout 0 in every arm)
#   gradcache  benchmarks/gradcache_memory.py if present (global batch beyond memory without GradCache)
#   translate  benchmarks/translate_speed.py if present (NLLB-600M-sized random model, bf16)
# Select stages with STAGES=env,matmul,... Everything goes to $OUT (the tool's folder; ./gpu_out
# elsewhere): summary.txt, one log per stage, result files, and gpu_check.tar.gz holding all of it
# (the tool returns at most 8 files, so the tarball is the complete record).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_out}
WORK=/tmp/gpu_check
BUDGET=${GPU_CHECK_BUDGET_S:-540}
STAGES=${STAGES:-env,matmul,gpu_tests,packing,mfu,mfu_packed,gradcache,translate}
START=$(date +%s)
mkdir -p "$OUT" "$WORK/results"
export PYTHONUNBUFFERED=1 WANDB_MODE=offline HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY=${PY:-python3}

summary() { echo "$*" | tee -a "$WORK/summary.txt"; }
pack() {
  cp "$WORK/summary.txt" "$OUT/summary.txt" 2>/dev/null
  tar -czf "$OUT/gpu_check.tar.gz.part" -C "$WORK" . 2>/dev/null && mv "$OUT/gpu_check.tar.gz.part" "$OUT/gpu_check.tar.gz"
}
trap pack EXIT

# stage NAME LIMIT_S COMMAND...: run under its limit, log to $WORK/NAME.log, one summary line.
stage() {
  local name=$1 limit=$2; shift 2
  [[ ",$STAGES," == *",$name,"* ]] || return 0
  local left=$(( BUDGET - ($(date +%s) - START) ))
  if (( left < limit )); then summary "$name: SKIPPED (needs ${limit}s, ${left}s of the budget left)"; return 0; fi
  local t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" > "$WORK/$name.log" 2>&1
  local rc=$?
  summary "$name: rc=$rc in $(( $(date +%s) - t0 ))s (limit ${limit}s)$( ((rc==124||rc==137)) && echo ' TIMED OUT')"
  tail -n 3 "$WORK/$name.log" | sed 's/^/    /' | tee -a "$WORK/summary.txt"
  pack
}

summary "gpu_check $(date -u +%FT%TZ) on $(hostname); budget ${BUDGET}s; stages $STAGES"
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    > "$WORK/pip.log" 2>&1 || { summary "wheel install FAILED (see pip.log)"; }
  export PYTHONPATH=/tmp/site:$PWD
else
  summary "no .whl/ carried: using the image's packages only"
  export PYTHONPATH=$PWD
fi
# `align` as a command, for tests that run it by name.
mkdir -p /tmp/site/bin
printf '#!/bin/sh\nexec %s -m alignment.cli "$@"\n' "$(command -v "$PY")" > /tmp/site/bin/align
chmod +x /tmp/site/bin/align
export PATH=/tmp/site/bin:$PATH

stage env 60 bash -c "nvidia-smi; $PY - <<'EOF'
import importlib, sys
print('python', sys.version)
import torch
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'device', torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
for name in ('lightning', 'deepspeed', 'transformers', 'sentence_transformers', 'tokenizers', 'webdataset', 'wandb',
             'jsonargparse', 'torchmetrics', 'langcodes', 'polib', 'datasets', 'pydantic', 'alignment'):
    try:
        mod = importlib.import_module(name)
        print(f'{name:24s}', getattr(mod, '__version__', '?'), getattr(mod, '__file__', ''))
    except Exception as exc:
        print(f'{name:24s} MISSING: {type(exc).__name__}: {exc}')
EOF"

stage matmul 60 "$PY" - <<'EOF'
import torch
a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
for _ in range(3):
    a @ b
torch.cuda.synchronize()
start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
start.record()
for _ in range(10):
    a @ b
end.record()
torch.cuda.synchronize()
seconds = start.elapsed_time(end) / 1000 / 10
print(f"bf16 8192^3 matmul: {2 * 8192**3 / seconds / 1e12:.1f} TFLOP/s (mean of 10 after 3 warm-ups, random data)")
EOF

stage gpu_tests 270 "$PY" -m pytest -q -ra -p no:cacheprovider tests/gpu --ignore=tests/gpu/test_gpu_packing.py

stage packing 120 "$PY" -m pytest -q -ra -s -p no:cacheprovider tests/gpu/test_gpu_packing.py

stage mfu 150 "$PY" benchmarks/train_throughput.py --model-config xlm-roberta-base --max-length 128 \
  --min-words 150 --max-words 160 --batch-size 64 --warmup-steps 3 --steps 10 --rounds 2 --device cuda \
  --out "$WORK/results"

stage mfu_packed 120 "$PY" benchmarks/train_throughput.py --model-config xlm-roberta-base --max-length 128 \
  --min-words 150 --max-words 160 --batch-size 64 --warmup-steps 3 --steps 10 --rounds 2 --device cuda \
  --arms framework,framework-packed,hand --attention-dropout 0 --out "$WORK/results/packed"

[ -f benchmarks/gradcache_memory.py ] && stage gradcache 90 "$PY" benchmarks/gradcache_memory.py --device cuda \
  --out "$WORK/results"
[ -f benchmarks/translate_speed.py ] && stage translate 60 "$PY" benchmarks/translate_speed.py --device cuda \
  --out "$WORK/results"

summary "done in $(( $(date +%s) - START ))s"
cp "$WORK"/results/*.md "$OUT/" 2>/dev/null
exit 0
