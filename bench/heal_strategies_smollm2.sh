#!/usr/bin/env bash
# Issue-13 comparison on SmolLM2-135M-Instruct k=v (calibrated): the same token budget healed three ways —
# full finetune of the attention, LoRA on the attention, distillation (KL to the original) — then the held-out KL
# to the original (logged by --eval-kl / --distill at the last eval), LAMBADA (first EVAL_LIMIT) in one `qkvconv eval`
# table, and tokens/s + peak memory from each heal's record.
#
#   bash bench/heal_strategies_smollm2.sh [WORKDIR]          (stages already done are skipped)
#
# Budget (env): STEPS=40 BATCH=2 SEQ=256 (= 20,480 tokens) LR=1e-4 LORA=16 LORA_LR=1e-3 DISTILL_LR=LR EVAL_LIMIT=500
# WARMUP (steps; default 5 % of STEPS) EVAL_EVERY=STEPS
# SRC=/tmp/smol-st (a safetensors copy of the default checkpoint) DEVICE=auto.
# README's table (102,400 tokens each): STEPS=100 BATCH=4 WARMUP=10 EVAL_EVERY=25 LR=3e-5 LORA_LR=1e-3
set -euo pipefail
cd "$(dirname "$0")/.."
W=${1:-runs/heal-strategies}
export QKVCONV_DATA_DIR=${QKVCONV_DATA_DIR:-../shared/data}
D=$QKVCONV_DATA_DIR/gutenberg_en
PY=${PYTHON:-.venv/bin/python}
Q=("$PY" -m qkvconv.cli)
SRC=${SRC:-/tmp/smol-st}
STEPS=${STEPS:-40}
FT=(--data "$D/gutenberg_en_train.txt" --eval-data "$D/gutenberg_en_valid.txt" --train attention --steps "$STEPS"
    --batch-size "${BATCH:-2}" --seq-len "${SEQ:-256}" --eval-every "${EVAL_EVERY:-$STEPS}" --eval-seqs 16 --save-every 10
    --seed 0 --device "${DEVICE:-auto}" ${WARMUP:+--warmup-steps "$WARMUP"})
mkdir -p "$W"
heal() { local out=$1; shift; [ -d "$W/$out" ] && { echo "skip $out (done)"; return 0; }
         "${Q[@]}" finetune "$W/kv" -o "$W/$out" "${FT[@]}" "$@" $([ -d "$W/$out.run" ] && echo --resume); }
[ -d "$W/kv" ] || "${Q[@]}" share-kv "$SRC" -o "$W/kv" --mode k=v --init calibrated
heal full --lr "${LR:-1e-4}" --eval-kl
heal lora --lr "${LORA_LR:-1e-3}" --lora "${LORA:-16}" --eval-kl
heal distill --lr "${DISTILL_LR:-${LR:-1e-4}}" --distill 1
[ -f "$W/eval.json" ] || "${Q[@]}" eval "$SRC" "$W/kv" "$W/full" "$W/lora" "$W/distill" --tasks lambada_openai \
  --limit "${EVAL_LIMIT:-500}" --batch-size 8 -o "$W/eval.json"
"$PY" - "$W" <<'EOF'
import json, sys
from pathlib import Path
w = Path(sys.argv[1])
print(f"{'heal':<8} {'trainable':>12} {'held-out loss':>14} {'KL to original':>15} {'tokens/s':>9} {'peak RSS':>9} {'peak GPU':>9}")
for name in ("full", "lora", "distill"):
    r = json.loads((w / name / "qkvconv.json").read_text())["history"][-1]
    first, last = r["eval"][0], r["eval"][-1]
    gpu = "-" if r["peak_gpu_bytes"] is None else f"{r['peak_gpu_bytes'] / 2**30:.2f}G"
    print(f"{name:<8} {r['trainable_parameters']:>12,} {first['loss']:>6.3f}→{last['loss']:<7.3f} "
          f"{first['kl']:>6.3f}→{last['kl']:<7.3f} {r['tokens_per_s']:>9,.0f} {r['peak_rss_bytes'] / 2**30:>8.2f}G {gpu:>9}")
EOF
