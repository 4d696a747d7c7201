#!/usr/bin/env bash
# Run a training config on this machine, without SLURM: the same `align fit` the sbatch job runs.
#
#   launch/local.sh configs/debug.yaml [more align fit flags]
#   launch/local.sh recipe:xlm-roberta-base-multiway --data.train_shards data/mw   (a shipped recipe by name)
#   DEVICES=2 launch/local.sh configs/recipes/labse-multiway.yaml --data.train_shards data/mw
#
# Assumes: `align` on PATH or the repository's .venv (ALIGN_CMD overrides). Lightning starts one process per
# device itself (DEVICES, default: the config's trainer.devices). Resumes from the run folder's last.ckpt when
# one exists, like a requeued SLURM job (each config has its own run folder, runs/<config name> by default, and
# a checkpoint of another run is refused). `kill -USR1 <pid>` checkpoints at the next step and stops with
# exit code 75 (alignment/preemption.py); running this script again continues the run.
set -euo pipefail

if [[ $# -lt 1 || "$1" == -* ]]; then
    echo "usage: $0 CONFIG.yaml [align fit flags...]" >&2
    exit 2
fi
config=$1
shift
if [[ "$config" != recipe:* && ! -f "$config" ]]; then
    echo "$0: config $config not found" >&2
    exit 2
fi

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [[ -z "${ALIGN_CMD:-}" ]]; then
    if command -v align >/dev/null 2>&1; then
        ALIGN_CMD=align
    elif [[ -x "$repo/.venv/bin/align" ]]; then
        ALIGN_CMD="$repo/.venv/bin/align"
    else
        echo "$0: no align command: run \`make setup\` or set ALIGN_CMD" >&2
        exit 2
    fi
fi

args=(fit --config "$config" --ckpt_path last)
if [[ -n "${DEVICES:-}" ]]; then
    args+=(--trainer.devices "$DEVICES")
fi
export WANDB_MODE=${WANDB_MODE:-offline} TOKENIZERS_PARALLELISM=${TOKENIZERS_PARALLELISM:-false}
# exec: a signal sent to this script's pid reaches align fit directly
exec $ALIGN_CMD "${args[@]}" "$@"
