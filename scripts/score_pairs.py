#!/usr/bin/env python3
"""Score given translations with a trained model: forced decoding of sentence pairs.

    python scripts/score_pairs.py --model-dir work/demo/checkpoints/rnn_bahdanau \
        --data work/demo/data-bin --spm-model work/demo/spm/spm.model \
        --src work/demo/data/test.en --tgt work/demo/data/test.de --print-alignment

Line i of --tgt is read as a translation of line i of --src (text, as fairseq-interactive reads
it: --spm-model encodes it; without one, lines in the data-bin's units). For each pair one line
on standard output (or --out):

    SCORE <TAB> TOKENS [<TAB> ALIGNMENT]

SCORE: the mean log-probability (natural log) of the translation's TOKENS pieces, </s> included,
the score fairseq-generate --score-reference gives a data-bin's references (it prints it in base
2) and Translator.score gives from Python; higher is better. ALIGNMENT (--print-alignment):
"s-t" pairs, for each translation piece t the source piece s the model attended most while
writing it (0-based, </s> aside), as fairseq-generate's A- lines. A summary goes to standard
error: the mean SCORE and the corpus' log-probability per token, with its perplexity. Uses:
reranking n-best lists, filtering a parallel corpus by the model's score, aligning it.
"""
import argparse
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cli_args import at_least, load_translator, read_text_lines  # noqa: E402


def hard_alignment(attention):
    """"s-t" pairs: for each target piece t (</s> aside) the most attended source piece s (</s>
    aside); none for an empty source or translation. attention: (T + 1) x (S + 1), </s> last."""
    if attention is None or attention.size(0) < 2 or attention.size(1) < 2:
        return ""
    best = attention[:-1, :-1].argmax(dim=-1).tolist()
    return " ".join(f"{s}-{t}" for t, s in enumerate(best))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", required=True, help="folder with the checkpoint")
    p.add_argument("--checkpoint", default="checkpoint_best.pt",
                   help="checkpoint file in --model-dir (an ensemble: files joined by ':')")
    p.add_argument("--data", required=True, help="data-bin with the dictionaries")
    p.add_argument("--spm-model", default=None,
                   help="sentencepiece model of the source side (omit for lines in the data-bin's "
                   "units: pieces as spm_encode writes them, or words)")
    p.add_argument("--target-spm-model", default=None,
                   help="the target side's own sentencepiece model (prepare_data.py --separate: "
                   "spm.<tgt>.model); default: --spm-model")
    p.add_argument("--src", required=True, help="source sentences, one per line")
    p.add_argument("--tgt", required=True, help="their translations, line by line with --src")
    p.add_argument("--print-alignment", action="store_true",
                   help="also print each pair's hard alignment (s-t pairs of pieces)")
    p.add_argument("--batch-size", type=at_least(1), default=64, help="pairs per batch at most")
    p.add_argument("--max-tokens", type=at_least(1), default=6000,
                   help="translation positions per batch at most (pairs x the longest)")
    p.add_argument("--out", default=None, help="output file (default: standard output)")
    args = p.parse_args(argv)
    sources = read_text_lines(p, "--src", args.src)
    translations = read_text_lines(p, "--tgt", args.tgt)
    if len(sources) != len(translations):
        p.error(f"--tgt {args.tgt} has {len(translations)} lines and --src {args.src} "
                f"{len(sources)}: give one translation per source line")
    if not os.path.isdir(args.data):
        p.error(f"--data {args.data}: no such folder (the data-bin with the dictionaries)")
    if args.out is not None and os.path.isdir(args.out):
        p.error(f"--out {args.out} is a folder; give a file")

    translator = load_translator(p, args.model_dir, args.checkpoint, args.data, args.spm_model,
                                 target_spm_model=args.target_spm_model)
    from fairseq_s2s_attn.errors import S2SError

    try:
        # as Translations: the pieces scored (their count) and, for the alignment, the attention
        scored = translator.score(sources, translations, return_attention=True,
                                  batch_size=args.batch_size, max_tokens=args.max_tokens)
    except S2SError as e:  # the translator's advice in this script's options
        p.error(str(e).replace("load it with Translator.from_pretrained(..., spm_model=SPM)",
                               "give --spm-model SPM").replace(
            "load the translator with Translator.from_pretrained(..., target_spm_model=SPM)",
            "give --target-spm-model SPM"))
    lines = []
    for r in scored:
        cells = [f"{r.score:.6f}", str(len(r.target_pieces))]
        if args.print_alignment:
            cells.append(hard_alignment(r.attention))
        lines.append("\t".join(cells) + "\n")
    if args.out is None:
        try:
            sys.stdout.writelines(lines)
            sys.stdout.flush()
        except BrokenPipeError:  # the reader stopped (| head): as other command-line tools
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 0
    else:
        try:
            with open(args.out, "w", encoding="utf-8") as f:
                f.writelines(lines)
        except OSError as e:
            p.error(f"cannot write {args.out} ({e.strerror or e})")
    scores, counts = [r.score for r in scored], [len(r.target_pieces) for r in scored]
    if scores:
        per_token = sum(s * n for s, n in zip(scores, counts)) / sum(counts)
        print(f"scored {len(scores)} pairs: mean score {sum(scores) / len(scores):.4f}; "
              f"{per_token:.4f} per token over all {sum(counts)} tokens (perplexity "
              f"{math.exp(-per_token):.2f})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
