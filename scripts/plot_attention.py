#!/usr/bin/env python3
"""Attention heatmaps: translate a few sentences and plot where the model attended.

    python scripts/plot_attention.py --model-dir work/demo/checkpoints/rnn_bahdanau --data work/demo/data-bin \
        --spm-model work/demo/spm/spm.model --input work/demo/data/test.en --num 4 --out work/demo/plots

One PNG per sentence: source pieces on the x axis, output pieces on the y axis, cell (i, j) =
weight of source piece j when the model produced output piece i (each row sums to 1, below 1
with local-p attention, whose Gaussian is not renormalised).

With --reference (a file of translations, line by line with --input, e.g. work/demo/data/test.de)
the model reads the reference instead of writing its own translation (forced decoding,
Translator.score): the plot shows where it looked while writing each reference piece, an
alignment of the sentence pair, with the reference's score in the title.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cli_args import at_least, folder_problem, load_translator, read_text_lines  # noqa: E402


def pick_sentences(lines, num: int, min_words: int, max_words: int):
    """The indices of `num` lines spread evenly over `lines`, of min..max words, plain words only
    (no format placeholders or markup, which say little about alignment)."""
    ok = [i for i, ln in enumerate(lines) if min_words <= len(ln.split()) <= max_words
          and not any(ch in ln for ch in "%{}<>\"\\|_=")]
    if len(ok) <= num:
        return ok
    step = len(ok) / num
    return [ok[int(i * step + step / 2)] for i in range(num)]


def plot(result, path: str, title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    attn = result.attention.numpy()
    h, w = attn.shape
    fig, ax = plt.subplots(figsize=(max(4.0, 0.45 * w + 2), max(3.0, 0.4 * h + 1.5)))
    im = ax.imshow(attn, cmap="Greys", vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xticks(range(w))
    ax.set_xticklabels(result.source_pieces, rotation=60, ha="right", fontsize=9)
    ax.set_yticks(range(h))
    ax.set_yticklabels(result.target_pieces, fontsize=9)
    ax.set_xlabel("source")
    ax.set_ylabel("output")
    ax.set_title(title, fontsize=9, wrap=True)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", required=True, help="folder with the checkpoint")
    p.add_argument("--checkpoint", default="checkpoint_best.pt")
    p.add_argument("--data", required=True, help="data-bin with the dictionaries")
    p.add_argument("--spm-model", default=None,
                   help="sentencepiece model (omit for input in the data-bin's units: pieces as "
                   "spm_encode writes them, or words)")
    p.add_argument("--input", required=True, help="text file, one source sentence per line")
    p.add_argument("--reference", default=None,
                   help="text file of translations, one per line of --input: plot the attention "
                   "while the model reads each (forced decoding) instead of its own translation")
    p.add_argument("--num", type=at_least(1), default=4, help="how many sentences to plot")
    p.add_argument("--min-words", type=int, default=4)
    p.add_argument("--max-words", type=int, default=14)
    p.add_argument("--beam", type=at_least(1), default=5)
    p.add_argument("--out", required=True, help="output folder for the PNGs")
    args = p.parse_args(argv)
    if not os.path.isfile(args.input):
        p.error(f"input file not found: {args.input}")
    if args.reference is not None and not os.path.isfile(args.reference):
        p.error(f"--reference {args.reference}: no such file")
    if not os.path.isdir(args.data):
        p.error(f"--data {args.data}: no such folder (the data-bin with the dictionaries)")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        p.error(f"--out {args.out} is a file; give a folder for the PNGs")
    problem = folder_problem(args.out)  # checked before the model is loaded
    if problem:
        p.error(f"--out {args.out} {problem}")
    lines = read_text_lines(p, "--input", args.input)
    references = None if args.reference is None else read_text_lines(p, "--reference", args.reference)
    if references is not None and len(references) != len(lines):
        p.error(f"--reference {args.reference} has {len(references)} lines and --input "
                f"{args.input} {len(lines)}: give one translation per source line")
    picked = pick_sentences(lines, args.num, args.min_words, args.max_words)
    if not picked:
        p.error(f"no sentence of {args.min_words}-{args.max_words} words in {args.input}")
    sentences = [lines[i] for i in picked]

    import logging

    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    # the demo prints this script's output, where only the plots matter
    translator = load_translator(p, args.model_dir, args.checkpoint, args.data, args.spm_model)
    from fairseq_s2s_attn.errors import S2SError

    try:
        os.makedirs(args.out, exist_ok=True)
    except OSError as e:
        p.error(f"--out {args.out}: cannot make the folder ({e.strerror or e})")
    written = []
    try:  # sentences the model cannot take (too long; text without --spm-model for pieces)
        if references is None:
            results = translator.translate(sentences, beam=args.beam, return_attention=True)
        else:
            results = translator.score(sentences, [references[i] for i in picked],
                                       return_attention=True)
    except S2SError as e:
        p.error(str(e))
    for i, (sent, res) in enumerate(zip(sentences, results)):
        if res.attention is None:
            print("the model has no attention (rnn_vanilla): nothing to plot", file=sys.stderr)
            return 1
        path = os.path.join(args.out, f"attention_{i}.png")
        try:
            title = f"{sent}\n→ {res.translation}" if references is None else \
                f"{sent}\n= {res.translation} (reference, score {res.score:.2f})"
            plot(res, path, title)
        except OSError as e:
            p.error(f"cannot write {path} ({e.strerror or e})")
        written.append(path)
        print(f"{path}\t{sent}\t{res.translation}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
