#!/usr/bin/env bash
# Attention vs. the true alignment on sequence reversal (source position j -> target n-1-j).
# Trains rnn_bahdanau and rnn_luong for about 2 CPU minutes each, decodes the test set with
# --print-alignment and reports exact match and alignment accuracy; then the same for the
# attention while each model reads the references (--score-reference: forced decoding), where
# every test sentence counts.
#   bash examples/synthetic_alignment.sh [FOLDER]
# FOLDER (a positional argument, not WORK=...; default work/reverse) holds the corpus, data-bin,
# checkpoints and generate outputs; a relative FOLDER is taken from the repository root.
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
export OMP_NUM_THREADS=1
WORK="${1:-work/reverse}"
python scripts/make_synthetic.py --task reverse --out "$WORK/raw" --train 20000 --valid 200 \
    --test 300 --max-len 30 --vocab 100
[ -f "$WORK/data-bin/dict.src.txt" ] || fairseq-preprocess --source-lang src --target-lang tgt \
    --trainpref "$WORK/raw/train" --validpref "$WORK/raw/valid" --testpref "$WORK/raw/test" \
    --destdir "$WORK/data-bin" --workers 2
for arch in rnn_bahdanau rnn_luong; do
    [ -f "$WORK/$arch/checkpoint_best.pt" ] || fairseq-train "$WORK/data-bin" --user-dir fairseq_s2s_attn \
        --arch "$arch" --encoder-embed-dim 64 --decoder-embed-dim 64 --encoder-hidden-size 64 \
        --decoder-hidden-size 128 --decoder-out-embed-dim 64 --attention-dim 64 \
        --encoder-dropout-in 0 --encoder-dropout-out 0 --decoder-dropout-in 0 --decoder-dropout-out 0 \
        --optimizer adam --lr 0.003 --lr-scheduler polynomial_decay --warmup-updates 100 \
        --total-num-update 1000 --max-update 1000 --end-learning-rate 0.0001 --max-tokens 1500 \
        --clip-norm 1.0 --seed 1 --save-dir "$WORK/$arch" --no-epoch-checkpoints --cpu \
        --log-format simple --log-interval 200 2>&1 | grep -E "\| (train|valid) \|"
    fairseq-generate "$WORK/data-bin" --user-dir fairseq_s2s_attn --path "$WORK/$arch/checkpoint_best.pt" \
        --beam 5 --print-alignment --batch-size 128 --cpu > "$WORK/$arch/generate.out" 2>/dev/null
    echo "== $arch"
    python examples/alignment_accuracy.py --generate "$WORK/$arch/generate.out" --align "$WORK/raw/test.align"
    fairseq-generate "$WORK/data-bin" --user-dir fairseq_s2s_attn --path "$WORK/$arch/checkpoint_best.pt" \
        --score-reference --print-alignment --batch-size 128 --cpu > "$WORK/$arch/forced.out" 2>/dev/null
    echo "== $arch, reading the references (--score-reference)"
    python examples/alignment_accuracy.py --generate "$WORK/$arch/forced.out" --align "$WORK/raw/test.align"
done
