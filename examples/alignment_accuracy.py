#!/usr/bin/env python3
"""Attention as alignment on a task with known alignments.

Reads fairseq-generate output made with --print-alignment (hard, the default: A- lines of
"src-tgt" pairs from the argmax of the attention) and the true alignment of the same test set
written by scripts/make_synthetic.py (test.align, one line per test sentence), and reports
alignment accuracy: the share of output tokens whose attention argmax falls on the source token
they truly come from. Scored on the sentences translated exactly (for the others, output position
t has no single true source); with --nbest above 1, on each sentence's best hypothesis.

Both files are checked before scoring: --align must have one line per test sentence of the
generate output, and each line must fit its sentence (source indices below the length of the S-
line, target indices below the length of the T- line); an align file of another test set is
refused, not scored.

    python examples/alignment_accuracy.py --generate gen.out --align work/reverse/raw/test.align
"""
import argparse
import os


class BadInput(Exception):
    """One line saying what is wrong with an input file."""


def read_lines(path, option):
    if os.path.isdir(path):
        raise BadInput(f"{option} {path}: a folder, not a file")
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().splitlines()
    except FileNotFoundError:
        raise BadInput(f"{option} {path}: no such file") from None
    except UnicodeDecodeError as e:
        raise BadInput(f"{option} {path}: not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise BadInput(f"{option} {path}: cannot read ({e.strerror or e})") from None


def pairs(text):
    """{tgt: src} from "src-tgt" pairs; ValueError naming the first item that is not one."""
    out = {}
    for item in text.split():
        s, sep, t = item.partition("-")
        if not (sep and s.isdigit() and t.isdigit()):
            raise ValueError(item)
        out[int(t)] = int(s)
    return out


def parse(path):
    """(src, hyp, ref, align) of a fairseq-generate output, each {sentence id: ...}: source and
    texts as printed, align {tgt: src}. With --nbest above 1, the first (best) hypothesis."""
    src, hyp, ref, align = {}, {}, {}, {}
    for n, line in enumerate(read_lines(path, "--generate"), 1):
        head, _, rest = line.partition("\t")
        kind, _, sid = head.partition("-")
        if kind not in ("S", "T", "H", "A") or not sid.isdigit():
            continue
        sid = int(sid)
        if kind == "S":
            src[sid] = rest
        elif kind == "T":
            ref[sid] = rest
        elif kind == "H":
            hyp.setdefault(sid, rest.partition("\t")[2])
        elif sid not in align:
            try:
                align[sid] = pairs(rest)
            except ValueError as e:
                if "," in rest or "." in str(e):
                    raise BadInput(f"--generate {path} line {n}: A-{sid} holds soft alignments "
                                   "(--print-alignment soft); run fairseq-generate with "
                                   "--print-alignment hard") from None
                raise BadInput(f"--generate {path} line {n}: A-{sid}: {str(e)!r} is not a "
                               "src-tgt pair") from None
    return src, hyp, ref, align


def read_truth(path):
    """One {tgt: src} per line of a test.align."""
    truth = []
    for n, line in enumerate(read_lines(path, "--align"), 1):
        try:
            truth.append(pairs(line))
        except ValueError as e:
            raise BadInput(f"--align {path} line {n}: {str(e)!r} is not a src-tgt pair (give "
                           "the test.align written by scripts/make_synthetic.py)") from None
    return truth


def check(args, src, hyp, ref, pred, truth):
    """BadInput unless the two files describe the same test set."""
    if not pred:
        raise BadInput(f"--generate {args.generate}: no A- lines (run fairseq-generate with "
                       "--print-alignment)")
    for kind, got in (("S", src), ("T", ref), ("H", hyp)):
        if not got:
            raise BadInput(f"--generate {args.generate}: no {kind}- lines (the output of "
                           "fairseq-generate on a test set with targets, without --quiet)")
    ids = set(src) | set(hyp)
    if len(truth) != len(ids) or max(ids) >= len(truth) or set(ref) - ids or set(pred) - ids:
        raise BadInput(f"--align {args.align} has {len(truth)} lines but the generate output has "
                       f"{len(ids)} test sentences (ids 0-{max(ids)}): not the same test set")
    for i in sorted(pred):
        n_src, n_hyp = len(src.get(i, "").split()), len(hyp.get(i, "").split())
        bad = [f"{s}-{t}" for t, s in pred[i].items() if not (s < n_src and t < n_hyp)]
        if bad:
            raise BadInput(f"--generate {args.generate}: A-{i} pair {bad[0]} is outside its "
                           f"sentence ({n_src} source, {n_hyp} output tokens)")
    for i, line in enumerate(truth):
        n_src, n_ref = len(src.get(i, "").split()), len(ref.get(i, "").split())
        bad = [f"{s}-{t}" for t, s in line.items() if not (s < n_src and t < n_ref)]
        if bad:
            raise BadInput(f"--align {args.align} line {i + 1}: pair {bad[0]} does not fit test "
                           f"sentence {i} ({n_src} source, {n_ref} target tokens): an align file "
                           "of another test set?")


def main(argv=None):
    p = argparse.ArgumentParser(prog="alignment_accuracy.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--generate", required=True, help="fairseq-generate output with --print-alignment")
    p.add_argument("--align", required=True, help="true alignments, one line per test sentence")
    args = p.parse_args(argv)
    try:
        src, hyp, ref, pred = parse(args.generate)
        truth = read_truth(args.align)
        check(args, src, hyp, ref, pred, truth)
    except BadInput as e:
        p.error(str(e))
    exact = [i for i in sorted(hyp) if hyp[i] == ref.get(i)]
    correct = total = 0
    for i in exact:
        for t, s in truth[i].items():
            total += 1
            correct += pred.get(i, {}).get(t) == s
    print(f"sentences translated exactly: {len(exact)} of {len(hyp)}")
    score = f"{correct / total:.4f}" if total else "n/a (no sentence translated exactly)"
    print(f"alignment accuracy (attention argmax = true source token): {score} over {total} tokens")


if __name__ == "__main__":
    main()
