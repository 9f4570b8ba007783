#!/usr/bin/env python3
"""Attention as alignment on a task with known alignments.

Reads fairseq-generate output made with --print-alignment (A- lines, "src-tgt" pairs from the
argmax of the attention) and the true alignment written by scripts/make_synthetic.py
(test.align), and reports alignment accuracy: the share of output tokens whose attention argmax
falls on the source token they truly come from. Scored on the sentences translated exactly (for
the others, output position t has no single true source).

    python examples/alignment_accuracy.py --generate gen.out --align work/reverse/raw/test.align
"""
import argparse
import sys


def parse(path):
    hyp, ref, align = {}, {}, {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            head, _, rest = line.rstrip("\n").partition("\t")
            kind, _, sid = head.partition("-")
            if not sid.isdigit():
                continue
            sid = int(sid)
            if kind == "H":
                hyp[sid] = rest.partition("\t")[2]
            elif kind == "T":
                ref[sid] = rest
            elif kind == "A":
                align[sid] = {int(t): int(s) for s, t in (p.split("-") for p in rest.split())}
    return hyp, ref, align


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--generate", required=True, help="fairseq-generate output with --print-alignment")
    p.add_argument("--align", required=True, help="true alignments, one line per test sentence")
    args = p.parse_args(argv)
    hyp, ref, pred = parse(args.generate)
    if not pred:
        sys.exit("error: no A- lines in the generate output (run fairseq-generate with --print-alignment)")
    truth = []
    with open(args.align, encoding="utf-8") as f:
        for line in f:
            truth.append({int(t): int(s) for s, t in (p.split("-") for p in line.split())})
    exact = [i for i in hyp if hyp[i] == ref.get(i)]
    correct = total = 0
    for i in exact:
        for t, s in truth[i].items():
            total += 1
            correct += pred.get(i, {}).get(t) == s
    print(f"sentences translated exactly: {len(exact)} of {len(hyp)}")
    print(f"alignment accuracy (attention argmax = true source token): {correct / max(total, 1):.4f} "
          f"over {total} tokens")


if __name__ == "__main__":
    main()
