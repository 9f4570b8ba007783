#!/usr/bin/env python3
"""Synthetic parallel corpora with known answers (and known alignments).

    reverse: the target is the source reversed; the source token at position j aligns to target
             position n-1-j.
    copy:    the target is the source; position j aligns to position j.

Writes {train,valid,test}.{src,tgt} (one space-separated sentence per line) and, for the test set,
test.align with the true alignment in fairseq's "src-tgt" pair format.

    python scripts/make_synthetic.py --task reverse --out work/reverse --max-len 30
"""
import argparse
import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cli_args import at_least  # noqa: E402


def make_pairs(task: str, n: int, vocab: int, min_len: int, max_len: int, rng: random.Random):
    words = [f"w{i}" for i in range(vocab)]
    for _ in range(n):
        src = [rng.choice(words) for _ in range(rng.randint(min_len, max_len))]
        if task == "reverse":
            tgt = src[::-1]
            align = [(j, len(src) - 1 - j) for j in range(len(src))]
        else:
            tgt = list(src)
            align = [(j, j) for j in range(len(src))]
        yield src, tgt, align


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=["reverse", "copy"], default="reverse")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--vocab", type=at_least(1), default=20, help="number of distinct tokens (at least 1)")
    p.add_argument("--min-len", type=at_least(1), default=1, help="shortest sentence, in tokens")
    p.add_argument("--max-len", type=at_least(1), default=30, help="longest sentence, in tokens")
    p.add_argument("--train", type=at_least(1), default=20000, help="training pairs (at least 1)")
    p.add_argument("--valid", type=at_least(0), default=500,
                   help="validation pairs (0 writes empty valid.src and valid.tgt)")
    p.add_argument("--test", type=at_least(0), default=500,
                   help="test pairs (0 writes empty test.src, test.tgt and test.align)")
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args(argv)
    if not args.min_len <= args.max_len:
        p.error(f"need --min-len ({args.min_len}) <= --max-len ({args.max_len})")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        p.error(f"--out {args.out} is a file; give a folder for the corpus")
    try:
        os.makedirs(args.out, exist_ok=True)
    except OSError as e:
        p.error(f"--out {args.out}: cannot make the folder ({e.strerror or e})")
    rng = random.Random(args.seed)
    for split, n in (("train", args.train), ("valid", args.valid), ("test", args.test)):
        path = os.path.join(args.out, f"{split}.src")
        try:
            with open(path, "w") as fs, open(os.path.join(args.out, f"{split}.tgt"), "w") as ft:
                aligns = []
                for src, tgt, align in make_pairs(args.task, n, args.vocab, args.min_len, args.max_len, rng):
                    fs.write(" ".join(src) + "\n")
                    ft.write(" ".join(tgt) + "\n")
                    aligns.append(" ".join(f"{s}-{t}" for s, t in align))
            if split == "test":  # one line per test sentence: none for --test 0
                path = os.path.join(args.out, "test.align")
                with open(path, "w") as fa:
                    fa.writelines(line + "\n" for line in aligns)
        except OSError as e:
            p.error(f"cannot write {e.filename or path} ({e.strerror or e})")
    print(f"wrote {args.task} data to {args.out}")


if __name__ == "__main__":
    main()
