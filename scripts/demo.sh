#!/usr/bin/env bash
# The main job, end to end on this machine's own data (run by `make demo`):
#   gettext catalogs -> English-German corpus -> sentencepiece -> fairseq-preprocess
#   -> fairseq-train rnn_bahdanau (bounded CPU time) -> fairseq-generate --beam 5
#   -> detokenise -> sacrebleu BLEU and chrF -> attention heatmaps, training curves -> summary.
# A second run reuses what is already built (data, finished training, translations); a finished
# training only on the data-bin it was trained on (another DEMO_VOCAB: an error, nothing deleted).
#
# Settings (environment variables):
#   DEMO_LANG=de         target language (any with gettext catalogs on the machine)
#   DEMO_ARCH=rnn_bahdanau
#   DEMO_MINUTES=18      training budget in minutes of wall-clock time
#   DEMO_WORK=work/demo  where everything is written
#   DEMO_VOCAB=6000      sentencepiece vocabulary (joint)
#   DEMO_TRAIN_ARGS=...  fairseq-train model options (default: the architecture's own sizes,
#                        bf16 matrix products on CPU; see README for the measured speed)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="${VENV:-$ROOT/.venv}"
export PATH="$VENV/bin:$PATH"
# threads: the plugin's defaults (fairseq-train and fairseq-generate use this machine's cores,
# up to 4; see README "Speed and precision on CPU"), or OMP_NUM_THREADS if set
export PYTHONUNBUFFERED=1  # show fairseq's progress as it comes
PY="$VENV/bin/python"

LANG_T="${DEMO_LANG:-de}"
ARCH="${DEMO_ARCH:-rnn_bahdanau}"
MINUTES="${DEMO_MINUTES:-18}"
WORK="${DEMO_WORK:-work/demo}"
[ "$LANG_T" = de ] || WORK="${DEMO_WORK:-work/demo-$LANG_T}"
CKPT="$WORK/checkpoints/$ARCH"
OUT="$WORK/results/$ARCH"
mkdir -p "$OUT"

step() { printf '\n==== %s\n' "$*"; }

step "1/5 data: English -> $LANG_T pairs from the gettext catalogs, sentencepiece, fairseq-preprocess"
"$PY" scripts/prepare_data.py all --lang "$LANG_T" --work "$WORK" --vocab-size "${DEMO_VOCAB:-6000}" --max-len 64

# the data-bin's identity (its stamp holds the checksums of the piece files it was built from):
# a finished training is reused only on the data it was trained on
DATA_ID=$(sha1sum < "$WORK/data-bin/.stamp.json" | cut -d' ' -f1)

step "2/5 train $ARCH for at most $MINUTES minutes (fairseq-train; progress below)"
if [ -f "$CKPT/.done" ]; then
    TRAINED_ON=$(cat "$CKPT/.done")  # empty: a .done of an earlier version, data unknown
    if [ -n "$TRAINED_ON" ] && [ "$TRAINED_ON" != "$DATA_ID" ]; then
        echo "error: $CKPT was trained on another data-bin than $WORK/data-bin (DEMO_VOCAB or the" \
             "data changed since): move or delete $CKPT to train on this one" >&2
        exit 1
    fi
    echo "reusing the finished training in $CKPT (delete $CKPT/.done to train again)"
else
    HOURS=$("$PY" -c "print(round($MINUTES / 60, 4))")
    # a killed run restarts from $CKPT/checkpoint_last.pt; the time budget counts across restarts
    # shellcheck disable=SC2086
    fairseq-train "$WORK/data-bin" --user-dir fairseq_s2s_attn --arch "$ARCH" \
        --optimizer adam --adam-betas '(0.9, 0.98)' --lr 0.002 --lr-scheduler inverse_sqrt \
        --warmup-updates 200 --clip-norm 1.0 --max-tokens 2000 \
        --criterion fused_label_smoothed_cross_entropy --label-smoothing 0.1 \
        --stop-time-hours "$HOURS" --max-epoch 60 --save-dir "$CKPT" --no-epoch-checkpoints \
        --log-format simple --log-interval 50 --cpu --seed 1 \
        ${DEMO_TRAIN_ARGS:---cpu-bf16} \
        2>&1 | tee "$OUT/train.log" | grep --line-buffered -E "\| (train_inner|train|valid) \|"
    echo "$DATA_ID" > "$CKPT/.done"
fi

step "3/5 translate the test set with beam search (fairseq-generate --beam 5)"
if [ ! -s "$OUT/hyp.txt" ] || [ "$OUT/hyp.txt" -ot "$CKPT/checkpoint_best.pt" ]; then
    # batches of 32: faster than 64 on CPU, in less memory, same BLEU (BENCHMARKS.md)
    fairseq-generate "$WORK/data-bin" --user-dir fairseq_s2s_attn --path "$CKPT/checkpoint_best.pt" \
        --beam 5 --batch-size 32 --post-process sentencepiece --cpu \
        > "$OUT/generate.out" 2> "$OUT/generate.log"
    # D- lines hold the detokenised hypotheses; order them by sentence id
    grep '^D-' "$OUT/generate.out" | sed 's/^D-//' | sort -n -k1,1 | cut -f3 > "$OUT/hyp.txt"
fi
# fairseq-generate logs on stdout, with the translations: its warnings and its summary
grep -E '\| (WARNING|ERROR) \||\| Translated [0-9,]+ sentences' "$OUT/generate.out" | sed 's/^/  /' || true

step "4/5 score with sacrebleu against the untokenised references"
REF="$WORK/data/test.$LANG_T"
if [ "$(wc -l < "$OUT/hyp.txt")" != "$(wc -l < "$REF")" ]; then
    echo "error: $OUT/hyp.txt has $(wc -l < "$OUT/hyp.txt") lines, $REF has $(wc -l < "$REF")" >&2
    exit 1
fi
sacrebleu "$REF" -i "$OUT/hyp.txt" -m bleu chrf -f text | tee "$OUT/scores.txt"

step "5/5 attention heatmaps for a few test sentences, training curves"
"$PY" scripts/plot_attention.py --model-dir "$CKPT" --data "$WORK/data-bin" \
    --spm-model "$WORK/spm/spm.model" --input "$WORK/data/test.en" --num 4 --out "$OUT/plots" \
    | tee "$OUT/plots.txt"
# training and validation loss against updates and wall-clock time, from the training log
if [ -s "$OUT/train.log" ]; then
    "$PY" scripts/plot_curves.py "$OUT/train.log" --labels "$ARCH" --title "$ARCH, English->$LANG_T" \
        --out "$OUT/plots/curves.png" | tee -a "$OUT/plots.txt"
else
    echo "no training log $OUT/train.log: no training curves"
fi

step "summary"
cat <<EOF
  corpus (raw text, splits):   $WORK/data/{train,valid,test}.{en,$LANG_T}
  sentencepiece model:         $WORK/spm/spm.model
  fairseq data-bin:            $WORK/data-bin
  checkpoints:                 $CKPT/checkpoint_best.pt
  training log:                $OUT/train.log
  translations (test set):     $OUT/hyp.txt  (fairseq output: $OUT/generate.out)
  scores:                      $OUT/scores.txt
$(sed 's/^/      /' "$OUT/scores.txt")
  attention heatmaps:          $OUT/plots/attention_*.png
  training curves:             $OUT/plots/curves.png
EOF
