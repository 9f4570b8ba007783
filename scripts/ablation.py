#!/usr/bin/env python3
"""Ablation of the attention variants, as a table in the shape of Luong et al. (2015)'s Table 4.

Trains every variant on the same data with the same budget, seed, sizes and optimiser
(fairseq-train), measures perplexity on the valid and test sets (fairseq-validate) and BLEU on the
test set (fairseq-generate --beam 5, scored with sacrebleu), and writes a Markdown table:

    | System | Ppl (valid) | Ppl (test) | BLEU (test, beam 5) | Params | Updates | Train time |

Data: a fairseq data-bin given with --data (e.g. work/demo/data-bin, with --post-process
sentencepiece so BLEU is computed on detokenised text), or, by default, a synthetic task built
with scripts/make_synthetic.py (sequence reversal; --task copy for a monotone task).

    python scripts/ablation.py                               # synthetic reversal, default budget
    python scripts/ablation.py --variants "global (dot),local-p (general)" --max-update 2000
    python scripts/ablation.py --data work/demo/data-bin --post-process sentencepiece \\
        --stop-time-minutes 20 --model-args "--decoder-hidden-size 256 --attention-dim 256"

A finished variant (its save dir holds .done) is not trained again; --force retrains.
"""

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

# Luong et al.'s cells, LSTMs, with input feeding as in their Table 4 (rnn_luong's own defaults are
# a GRU without input feeding, measured faster to learn)
LUONG = ["--arch", "rnn_luong", "--rnn-type", "lstm", "--input-feeding", "true"]
BAHDANAU = ["--arch", "rnn_bahdanau", "--rnn-type", "lstm", "--coverage", "false"]
# name -> (architecture, options). Luong et al.'s Table 4 rows first (global location/dot/general,
# local-m and local-p with dot/general; all with input feeding), then the other variants.
VARIANTS: Dict[str, List[str]] = {
    "vanilla (no attention)": ["--arch", "rnn_vanilla"],
    "global (location)": [*LUONG, "--attention", "location"],
    "global (dot)": [*LUONG, "--attention", "dot"],
    "global (general)": [*LUONG, "--attention", "general"],
    "global (concat)": [*LUONG, "--attention", "concat"],
    "global (general, scaled)": [*LUONG, "--attention", "general", "--attention-scale"],
    "local-m (dot)": [*LUONG, "--attention", "dot", "--attention-mode", "local-m"],
    "local-m (general)": [*LUONG, "--attention", "general", "--attention-mode", "local-m"],
    "local-p (dot)": [*LUONG, "--attention", "dot", "--attention-mode", "local-p"],
    "local-p (general)": [*LUONG, "--attention", "general", "--attention-mode", "local-p"],
    # LSTM like every row above (rnn_bahdanau's default cell is the paper's GRU), the paper's plain
    # score without coverage (rnn_bahdanau's default has it): one change per row
    "bahdanau (additive)": [*BAHDANAU],
    "bahdanau (normalised)": [*BAHDANAU, "--attention-normalize"],
    "bahdanau + coverage": ["--arch", "rnn_bahdanau", "--rnn-type", "lstm", "--coverage", "true"],
    "rnnsearch (GRU, s0 from h<-1, maxout over s_{i-1})": [
        "--arch", "rnn_bahdanau", "--rnn-type", "gru", "--coverage", "false",
        "--decoder-init", "backward_first",
        "--readout", "maxout", "--readout-state", "previous"],
}

# the same sizes for every variant (dot needs decoder hidden == 2 x encoder hidden)
DEFAULT_MODEL_ARGS = (
    "--encoder-embed-dim 32 --decoder-embed-dim 32 --encoder-hidden-size 32 "
    "--decoder-hidden-size 64 --decoder-out-embed-dim 32 --attention-dim 32 --local-window 5 "
    "--encoder-dropout-in 0.1 --encoder-dropout-out 0.1 --decoder-dropout-in 0.1 "
    "--decoder-dropout-out 0.1"
)
DEFAULT_TRAIN_ARGS = (
    "--optimizer adam --lr 0.003 --clip-norm 1.0 --max-tokens 2000 --criterion cross_entropy"
)


def env() -> Dict[str, str]:
    e = dict(os.environ)
    e.setdefault("OMP_NUM_THREADS", "1")
    e["PYTHONWARNINGS"] = "ignore"
    return e


def tool(name: str) -> str:
    return str(BIN / name)


def run(cmd: List[str], log: Optional[Path] = None) -> subprocess.CompletedProcess:
    cmd = [str(c) for c in cmd]
    # in the caller's folder (--user-dir is absolute): paths in --model-args resolve as typed
    proc = subprocess.run(cmd, env=env(), capture_output=True, text=True)
    if log is not None:
        log.write_text(f"$ {shlex.join(cmd)}\n{proc.stdout}\n--- stderr\n{proc.stderr}")
    if proc.returncode != 0:
        raise SystemExit(f"error: {shlex.join(cmd[:3])} ... exited {proc.returncode}"
                         + (f"; see {log}" if log else f"\n{proc.stderr[-3000:]}"))
    return proc


def synthetic_data(work: Path, args) -> Path:
    raw, data_bin = work / "raw", work / "data-bin"
    if (data_bin / "dict.src.txt").exists():
        return data_bin
    run([sys.executable, REPO / "scripts" / "make_synthetic.py", "--task", args.task, "--out", raw,
         "--train", args.train_size, "--valid", args.eval_size, "--test", args.eval_size,
         "--max-len", args.max_len, "--vocab", args.vocab, "--seed", 1])
    run([tool("fairseq-preprocess"), "--source-lang", "src", "--target-lang", "tgt",
         "--trainpref", raw / "train", "--validpref", raw / "valid", "--testpref", raw / "test",
         "--destdir", data_bin, "--workers", 1])
    return data_bin


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def budget_args(args) -> List[str]:
    out = []
    if args.max_update:
        out += ["--max-update", args.max_update]
    if args.stop_time_minutes:
        out += ["--stop-time-hours", round(args.stop_time_minutes / 60, 5)]
    return out


def train(name: str, options: List[str], data: Path, save: Path, args) -> Dict:
    done = save / ".done"
    if done.exists() and not args.force:
        return json.loads(done.read_text())
    save.mkdir(parents=True, exist_ok=True)
    for stale in save.glob("checkpoint*.pt"):
        stale.unlink()
    cmd = [tool("fairseq-train"), data, "--user-dir", REPO / "fairseq_s2s_attn", *options,
           *shlex.split(args.model_args), *shlex.split(args.train_args), *budget_args(args),
           "--max-epoch", args.max_epoch, "--seed", args.seed, "--save-dir", save,
           "--no-epoch-checkpoints", "--no-last-checkpoints", "--cpu", "--log-format", "simple",
           "--log-interval", 100]
    start = time.time()
    proc = run(cmd, save / "train.log")
    info = {"seconds": round(time.time() - start, 1), "command": shlex.join(map(str, cmd))}
    m = re.search(r"num\. (?:shared )?model params: ([\d,]+)", proc.stdout + proc.stderr)
    info["params"] = int(m.group(1).replace(",", "")) if m else None
    m = re.findall(r"num_updates (\d+)", proc.stdout + proc.stderr)
    info["updates"] = int(m[-1]) if m else None
    done.write_text(json.dumps(info))
    return info


def perplexity(data: Path, checkpoint: Path, args, log: Path) -> Dict[str, float]:
    proc = run([tool("fairseq-validate"), data, "--user-dir", REPO / "fairseq_s2s_attn",
                "--task", "translation", "--path", checkpoint, "--valid-subset", "valid,test",
                "--max-tokens", 4000,
                "--cpu", "--criterion", "cross_entropy"], log)
    out = {}
    for line in (proc.stdout + proc.stderr).splitlines():
        m = re.search(r"valid on '(\w+)' subset.*?\| ppl ([\d.]+)", line)
        if m:
            out[m.group(1)] = float(m.group(2))
    return out


def bleu(data: Path, checkpoint: Path, args, log: Path) -> float:
    import sacrebleu

    cmd = [tool("fairseq-generate"), data, "--user-dir", REPO / "fairseq_s2s_attn", "--path",
           checkpoint, "--gen-subset", "test", "--beam", 5, "--batch-size", 64, "--cpu"]
    if args.post_process:
        cmd += ["--post-process", args.post_process]
    proc = run(cmd, log)
    hyps, refs = {}, {}
    for line in proc.stdout.splitlines():
        if line.startswith("D-"):  # id \t score \t detokenised hypothesis
            sid, _, text = line[2:].split("\t", 2)
            hyps[int(sid)] = text
        elif line.startswith("T-"):
            sid, text = line[2:].split("\t", 1)
            refs[int(sid)] = text
    ids = sorted(refs)
    if sorted(hyps) != ids:
        raise SystemExit(f"error: fairseq-generate translated {len(hyps)} of {len(refs)} sentences")
    if args.ref:  # untokenised references, one per line in test-set order
        lines = Path(args.ref).read_text(encoding="utf-8").splitlines()
        if len(lines) != len(ids):
            raise SystemExit(f"error: {args.ref} has {len(lines)} lines, the test set {len(ids)} sentences")
        refs = dict(enumerate(lines))
    return sacrebleu.corpus_bleu([hyps[i] for i in ids], [[refs[i] for i in ids]]).score


def fmt(value, spec="{:.2f}") -> str:
    return "n/a" if value is None else spec.format(value)


def table(rows: List[Dict], header: str) -> str:
    lines = [header, "",
             "| System | Ppl (valid) | Ppl (test) | BLEU (test, beam 5) | Params | Updates | Train time |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['name']} | {fmt(r['ppl'].get('valid'))} | {fmt(r['ppl'].get('test'))} | "
            f"{fmt(r['bleu'], '{:.1f}')} | {fmt(r['params'], '{:,}')} | {fmt(r['updates'], '{}')} | "
            f"{r['seconds']:.0f} s |")
    return "\n".join(lines) + "\n"


def variant_names(text: str) -> List[str]:
    """--variants: names separated by commas outside parentheses ("global (general, scaled)" is
    one name; a plain split(",") cut it in two and refused both halves)."""
    names, depth, start = [], 0, 0
    for i, ch in enumerate(text + ","):
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if ch == "," and depth <= 0:
            names.append(text[start:i].strip())
            start, depth = i + 1, 0
    return [n for n in names if n]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="fairseq data-bin (default: build the synthetic task in --work)")
    p.add_argument("--work", default="work/ablation", help="checkpoints, logs and synthetic data")
    p.add_argument("--out", help="Markdown table of this run's variants, rewritten by each run "
                   "(default: WORK/ablation.md)")
    p.add_argument("--variants", help="comma-separated names (default: all; commas inside a name's "
                   "parentheses belong to the name); --list shows them")
    p.add_argument("--list", action="store_true", help="list the variants and exit")
    p.add_argument("--max-update", type=int, default=300, help="training budget in updates (0: none)")
    p.add_argument("--stop-time-minutes", type=float, default=0,
                   help="training budget in minutes per variant (fairseq's --stop-time-hours)")
    p.add_argument("--max-epoch", type=int, default=1000, help="upper bound on epochs")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--model-args", default=DEFAULT_MODEL_ARGS, help="sizes/dropout for every variant")
    p.add_argument("--train-args", default=DEFAULT_TRAIN_ARGS, help="optimiser, batch, criterion")
    p.add_argument("--post-process", help="fairseq-generate --post-process (e.g. sentencepiece)")
    p.add_argument("--ref", help="untokenised test references (default: the T- lines)")
    p.add_argument("--force", action="store_true", help="retrain variants that are already done")
    g = p.add_argument_group("synthetic data (without --data)")
    g.add_argument("--task", choices=["reverse", "copy"], default="reverse")
    g.add_argument("--train-size", type=int, default=3000)
    g.add_argument("--eval-size", type=int, default=200, help="valid and test sentences")
    g.add_argument("--max-len", type=int, default=12)
    g.add_argument("--vocab", type=int, default=20)
    args = p.parse_args(argv)

    if args.list:
        for name, options in VARIANTS.items():
            print(f"{name}: {' '.join(options)}")
        return
    if not args.max_update and not args.stop_time_minutes:
        p.error("give a budget: --max-update N and/or --stop-time-minutes M")
    names = list(VARIANTS) if not args.variants else variant_names(args.variants)
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        p.error(f"unknown variant(s) {unknown}; see --list")

    work = Path(args.work).resolve()  # every path relative to the current folder
    work.mkdir(parents=True, exist_ok=True)
    data = Path(args.data).resolve() if args.data else synthetic_data(work, args)
    out = Path(args.out).resolve() if args.out else work / "ablation.md"

    rows = []
    for name in names:
        save = work / "checkpoints" / slug(name)
        reused = (save / ".done").exists() and not args.force
        print(f"== {name}: {'reusing the finished training' if reused else 'training'}", flush=True)
        info = train(name, VARIANTS[name], data, save, args)
        checkpoint = save / "checkpoint_best.pt"
        ppl = perplexity(data, checkpoint, args, save / "validate.log")
        score = bleu(data, checkpoint, args, save / "generate.log")
        rows.append(dict(name=name, ppl=ppl, bleu=score, **info))
        print(f"   ppl valid {fmt(ppl.get('valid'))} test {fmt(ppl.get('test'))}  BLEU {score:.1f}  "
              f"({info['seconds']:.0f} s)", flush=True)

    source = args.data or (f"synthetic {args.task} task (scripts/make_synthetic.py: {args.train_size} "
                           f"training pairs, {args.eval_size} valid/test, lengths 1-{args.max_len}, "
                           f"vocabulary {args.vocab})")
    budget = " and ".join(filter(None, [
        f"{args.max_update} updates" if args.max_update else "",
        f"{args.stop_time_minutes} minutes" if args.stop_time_minutes else ""]))
    header = (f"Data: {source}. Budget per variant: {budget} (same seed {args.seed}); "
              f"model: `{args.model_args}`; training: `{args.train_args}`. Perplexity: "
              f"fairseq-validate (cross entropy, base 2); BLEU: fairseq-generate --beam 5, sacrebleu "
              f"(13a) on the test set. Checkpoint: best on valid.")
    text = table(rows, header)
    out.write_text(text, encoding="utf-8")
    print(text)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
