#!/usr/bin/env python3
"""Train several architectures on the same data and wall-clock budget; compare BLEU, chrF,
training speed, and BLEU by source length (the analogue of Bahdanau et al.'s Figure 2).

    python scripts/compare.py --work work/demo --minutes 15 --out work/compare \
        --archs rnn_bahdanau lstm_wiseman_iwslt_de_en@bf16 rnn_luong rnn_vanilla

Models run --parallel at a time in the order given: on a 2-core machine each pair shares the
machine, and a model's speed depends on its neighbour (up to ~30% seen), so pair each of ours with
the baseline it is compared with.

--work is a folder made by `scripts/prepare_data.py all` (data-bin/, spm/spm.model, data/).
Every model gets the same optimizer, schedule, batch size, seed and time budget; our models use
their architecture's defaults with the overrides in --ours-args (fairseq's own lstm cannot take
them). Writes OUT/results.md (tables + the commands), OUT/length_bleu.png, training curves
(OUT/curves_updates.png, OUT/curves_time.png: every model's loss overlaid), OUT/<arch>/...

On a GPU: --device cuda, --precision fp32|fp16|bf16|amp (fairseq's --fp16 / --bf16 / --amp, for
training and generation; --cpu-bf16 is dropped from --ours-args there), and an entry of --archs
may carry its own precision, ARCH@PRECISION (rnn_bahdanau@fp32 rnn_bahdanau@bf16 compares
precisions). --minutes 0 trains without a time limit, until --max-epoch or until validation loss
has not improved for --patience epochs. The table gives each model's best validation loss and
the wall-clock time at which its best checkpoint was reached. Models run --parallel at a time
(on one GPU they share it: their tokens/s are not those of a model alone).
"""
import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cli_args import above, at_least  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
USER_DIR = os.path.join(ROOT, "fairseq_s2s_attn")
BUCKETS = [(1, 3), (4, 6), (7, 10), (11, 15), (16, 25), (26, 1000)]


def sh(cmd, log_path):
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
               PYTHONUNBUFFERED="1", PYTHONWARNINGS="ignore")
    with open(log_path, "w") as log:
        # in the caller's folder (--user-dir is absolute): paths in --ours-args resolve as the
        # user typed them
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0:
        tail = open(log_path).read()[-3000:]
        raise SystemExit(f"error: {' '.join(cmd[:3])} ... failed (exit {proc.returncode}); "
                         f"log {log_path}:\n{tail}")


PRECISION_FLAGS = {"fp32": [], "fp16": ["--fp16"], "bf16": ["--bf16"], "amp": ["--amp"]}


def split_entry(entry, args):
    """ARCH or ARCH@PRECISION -> (arch, precision)."""
    arch, _, precision = entry.partition("@")
    precision = precision or args.precision
    if precision not in PRECISION_FLAGS:
        raise SystemExit(f"error: {entry}: precision {precision!r}; choose one of {', '.join(PRECISION_FLAGS)}")
    if args.device == "cpu" and precision in ("fp16", "amp"):
        raise SystemExit(f"error: {entry}: {precision} needs --device cuda (on CPU: fp32, bf16 or --cpu-bf16)")
    return arch, precision


def check_archs(entries):
    """Every ARCH of --archs is a registered fairseq architecture (one line naming the plugin's,
    rather than fairseq's list of ~150, when one is not)."""
    import fairseq_s2s_attn  # noqa: F401  (registers the plugin's architectures)
    from fairseq.models import ARCH_MODEL_REGISTRY

    for entry in entries:
        arch = entry.partition("@")[0]
        if arch not in ARCH_MODEL_REGISTRY:
            ours = [a for a, cls in ARCH_MODEL_REGISTRY.items() if cls.__module__.startswith("fairseq_s2s_attn")]
            raise SystemExit(f"error: --archs {entry}: unknown architecture {arch!r}; the plugin's: "
                             f"{', '.join(ours)} (or one of fairseq's, e.g. lstm_wiseman_iwslt_de_en)")


def work_file(args, *parts):
    """A file of the --work folder, or one error line saying how to build it."""
    path = os.path.join(args.work, *parts)
    if not os.path.isfile(path):
        raise SystemExit(f"error: {path} not found: --work must be a folder made by "
                         f"`python scripts/prepare_data.py all --lang de --work {shlex.quote(args.work)}` "
                         "(or `... all --src FILE --tgt FILE --work ...` for your own text)")
    return path


def shell_command(words):
    """A command as one line to paste into a shell."""
    return shlex.join(str(w) for w in words)


def device_flags(args, precision, training):
    flags = ["--cpu"] if args.device == "cpu" else []
    if precision == "amp" and not training:
        return flags  # --amp is a training option; generation runs the fp32 model
    return flags + PRECISION_FLAGS[precision]


def ours_args(args):
    extra = args.ours_args.split()
    if args.device != "cpu":  # CPU autocast: does nothing on a GPU
        extra = [x for i, x in enumerate(extra) if x != "--cpu-bf16"
                 and not (i > 0 and extra[i - 1] == "--cpu-bf16" and x in ("true", "false"))]
    return extra


def fairseq_tool(name):
    """fairseq's command as `python -m` (also where no fairseq-* scripts are installed)."""
    return [sys.executable, "-m", f"fairseq_cli.{name}"]


def train_cmd(args, entry, save_dir):
    arch, precision = split_entry(entry, args)
    budget = (["--stop-time-hours", str(round(args.minutes / 60, 4))] if args.minutes > 0 else [])
    cmd = fairseq_tool("train") + [os.path.join(args.work, "data-bin"),
           "--user-dir", USER_DIR, "--arch", arch,
           "--optimizer", "adam", "--adam-betas", "(0.9, 0.98)", "--lr", str(args.lr),
           "--lr-scheduler", "inverse_sqrt", "--warmup-updates", str(args.warmup),
           "--clip-norm", "1.0", "--max-tokens", str(args.max_tokens),
           "--criterion", "fused_label_smoothed_cross_entropy", "--label-smoothing", "0.1",
           *budget, "--max-epoch", str(args.max_epoch), "--patience", str(args.patience),
           "--save-dir", save_dir, "--no-epoch-checkpoints", "--log-format", "simple",
           "--log-interval", "50", "--seed", str(args.seed), *device_flags(args, precision, True)]
    if arch.startswith("rnn_"):
        cmd += ours_args(args)
    return cmd


def words_per_second(train_log):
    """Mean of the end-of-epoch 'train' wps values fairseq logged (target tokens per second)."""
    values = [float(m.group(1)) for m in re.finditer(r"\| train \| .*?\| wps ([\d.]+)", open(train_log).read())]
    return sum(values) / len(values) if values else float("nan")


def best_point(train_log):
    """(best validation loss, wall-clock seconds of training when its epoch ended) from the
    log: fairseq validates after each epoch; 'wall' is on the epoch's train line."""
    text = open(train_log).read()
    valid = {int(e): float(v) for e, v in re.findall(r"\| valid \| epoch (\d+) \| .*?\| loss ([\d.]+)", text)}
    wall = {int(e): float(w) for e, w in re.findall(r"\| train \| epoch (\d+) \| .*?\| wall (\d+)", text)}
    if not valid:
        return float("nan"), float("nan")
    epoch = min(valid, key=lambda e: (valid[e], e))
    return valid[epoch], wall.get(epoch, float("nan"))


def generate(args, entry, save_dir, out_dir, lenpen, subset="test"):
    _arch, precision = split_entry(entry, args)
    name = f"generate{'' if subset == 'test' else '-' + subset}{lenpen_suffix(lenpen)}"
    gen_out = os.path.join(out_dir, f"{name}.out")
    sh(fairseq_tool("generate") + [os.path.join(args.work, "data-bin"),
        "--user-dir", USER_DIR, "--path", os.path.join(save_dir, "checkpoint_best.pt"),
        "--gen-subset", subset, "--beam", "5", "--lenpen", str(lenpen),
        "--batch-size", str(args.gen_batch_size), "--post-process", "sentencepiece",
        *device_flags(args, precision, False),
        "--results-path", out_dir], os.path.join(out_dir, f"{name}.log"))
    produced = os.path.join(out_dir, f"generate-{subset}.txt")
    hyps = {}
    for line in open(produced, encoding="utf-8"):
        if line.startswith("D-"):  # D-<id> <score> <detokenised hypothesis>
            head, _score, text = line.rstrip("\n").split("\t", 2)
            hyps[int(head[2:])] = text
    os.replace(produced, gen_out)
    return [hyps.get(i, "") for i in range(len(hyps))]


def run_one(args, arch):
    out_dir = os.path.join(args.out, arch)
    save_dir = os.path.join(out_dir, "checkpoints")
    os.makedirs(out_dir, exist_ok=True)
    train_log = os.path.join(out_dir, "train.log")
    cmd = train_cmd(args, arch, save_dir)
    if not os.path.exists(os.path.join(save_dir, ".done")):
        budget = f"{args.minutes} min" if args.minutes > 0 else f"at most {args.max_epoch} epochs"
        print(f"[{arch}] training for {budget}", flush=True)
        t0 = time.time()
        sh(cmd, train_log)
        open(os.path.join(save_dir, ".done"), "w").write(f"{time.time() - t0:.0f}\n")
    lenpen, valid_bleu = args.lenpen[0], {}
    if len(args.lenpen) > 1:  # each model's own length penalty, chosen on the validation set
        import sacrebleu

        for candidate in args.lenpen:
            hyps = translations(args, arch, save_dir, out_dir, candidate, "valid")
            valid_bleu[candidate] = sacrebleu.corpus_bleu(hyps, [args.valid_ref]).score
        lenpen = max(args.lenpen, key=lambda c: (valid_bleu[c], -abs(c - 1.0)))
        print(f"[{arch}] validation BLEU by lenpen: "
              + ", ".join(f"{c:g}: {b:.2f}" for c, b in valid_bleu.items()) + f"; using {lenpen:g}",
              flush=True)
    hyps = translations(args, arch, save_dir, out_dir, lenpen, "test")
    best_loss, best_wall = best_point(train_log)
    return {"arch": arch, "wps": words_per_second(train_log), "updates": updates(train_log),
            "hyps": hyps, "best_loss": best_loss, "best_wall": best_wall, "lenpen": lenpen,
            "valid_bleu": valid_bleu,
            "command": shell_command(["fairseq-" + cmd[2].split(".")[1]] + cmd[3:])}


def lenpen_suffix(lenpen):
    return "" if lenpen == 1.0 else f"-lenpen{lenpen:g}"


def translations(args, arch, save_dir, out_dir, lenpen, subset):
    """Beam-5 translations of one subset with one length penalty, one file each
    (OUT/<arch>/[valid-]hyp[-lenpen<L>].txt): a rerun reuses those newer than the checkpoint."""
    hyp_path = os.path.join(out_dir, f"{'' if subset == 'test' else subset + '-'}hyp{lenpen_suffix(lenpen)}.txt")
    best = os.path.join(save_dir, "checkpoint_best.pt")
    if os.path.exists(hyp_path) and os.path.getmtime(hyp_path) > os.path.getmtime(best):
        print(f"[{arch}] reusing the translations in {hyp_path}", flush=True)
        return open(hyp_path, encoding="utf-8").read().split("\n")[:-1]
    print(f"[{arch}] translating the {subset} set (lenpen {lenpen:g})", flush=True)
    hyps = generate(args, arch, save_dir, out_dir, lenpen, subset)
    with open(hyp_path, "w", encoding="utf-8") as f:
        f.write("\n".join(hyps) + "\n")
    return hyps


def updates(train_log):
    """Updates done within the budget (the last num_updates fairseq logged)."""
    found = re.findall(r"num_updates[ =](\d+)", open(train_log).read())
    return int(found[-1]) if found else 0


def bucket_of(n):
    for lo, hi in BUCKETS:
        if lo <= n <= hi:
            return (lo, hi)
    return BUCKETS[-1]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", required=True, help="folder from prepare_data.py all")
    p.add_argument("--out", required=True)
    p.add_argument("--archs", nargs="+",
                   default=["rnn_bahdanau", "lstm_wiseman_iwslt_de_en@bf16", "rnn_luong", "rnn_vanilla"],
                   help="architectures, each ARCH or ARCH@PRECISION (default: ours, and fairseq's "
                   "lstm_wiseman_iwslt_de_en at its fastest CPU setting, fairseq's --bf16, which the "
                   "plugin makes work without a TPU: 1.55x its fp32 on an AMX CPU)")
    p.add_argument("--minutes", type=at_least(0, float), default=10.0,
                   help="training wall-clock budget per model (0: none; --max-epoch, --patience)")
    p.add_argument("--max-epoch", type=at_least(1), default=200,
                   help="upper bound on epochs, also with --minutes (at least 1; default %(default)s)")
    p.add_argument("--patience", type=int, default=-1,
                   help="stop when validation loss has not improved for this many epochs (-1: off)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--precision", choices=list(PRECISION_FLAGS), default="fp32",
                   help="fairseq's precision options for every model without its own @PRECISION")
    p.add_argument("--gen-batch-size", type=at_least(1), default=32)
    p.add_argument("--lenpen", type=float, nargs="+", default=[1.0],
                   help="fairseq-generate's length penalty for beam 5 (hypothesis score divided by "
                   "length^lenpen; above 1 favours longer outputs): one value for every model, or "
                   "several, of which each model uses the one with its best validation-set BLEU "
                   "(ties: the one nearest 1)")
    p.add_argument("--parallel", type=at_least(1), default=2, help="models trained at once (one core each)")
    p.add_argument("--lr", type=above(0, float), default=0.002, help="Adam's peak learning rate")
    p.add_argument("--warmup", type=at_least(1), default=200,
                   help="updates of linear warm-up before the inverse square-root decay (fairseq's "
                   "inverse_sqrt scheduler divides by it)")
    p.add_argument("--max-tokens", type=at_least(1), default=2000)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--ours-args", default="--cpu-bf16",
                   help="extra fairseq-train options for our rnn_* models (default: bf16 matrix "
                   "products on CPU, as make demo; sizes and dropout are the architecture's)")
    args = p.parse_args(argv)
    # paths relative to the caller's folder, as fairseq (run there) reads --ours-args' paths
    args.work, args.out = os.path.abspath(args.work), os.path.abspath(args.out)
    for entry in args.archs:  # every entry checked before any training starts
        split_entry(entry, args)
    meta = json.load(open(work_file(args, "data", "meta.json")))
    src_lang, tgt_lang = meta.get("src_lang", "en"), meta.get("tgt_lang", "de")
    src = open(work_file(args, "data", f"test.{src_lang}"), encoding="utf-8").read().splitlines()
    ref = open(work_file(args, "data", f"test.{tgt_lang}"), encoding="utf-8").read().splitlines()
    if len(args.lenpen) > 1:
        args.valid_ref = open(work_file(args, "data", f"valid.{tgt_lang}"), encoding="utf-8").read().splitlines()
    work_file(args, "data-bin", f"dict.{tgt_lang}.txt")
    check_archs(args.archs)
    import sacrebleu

    os.makedirs(args.out, exist_ok=True)

    with ThreadPoolExecutor(max_workers=args.parallel) as pool:
        results = list(pool.map(lambda a: run_one(args, a), args.archs))

    rows, curves = [], {}
    for r in results:
        if len(r["hyps"]) != len(ref):
            raise SystemExit(f"error: {r['arch']}: {len(r['hyps'])} translations for {len(ref)} references")
        scored = sacrebleu.corpus_bleu(r["hyps"], [ref])
        chrf = sacrebleu.corpus_chrf(r["hyps"], [ref]).score
        length = scored.sys_len / max(scored.ref_len, 1)  # BLEU's tokens: < 1 is cut short
        rows.append((r["arch"], scored.score, chrf, r["wps"], r["updates"], r["best_loss"],
                     r["best_wall"], length, r["lenpen"]))
        curve = []
        for lo, hi in BUCKETS:
            idx = [i for i, s in enumerate(src) if bucket_of(len(s.split())) == (lo, hi)]
            if idx:
                b = sacrebleu.corpus_bleu([r["hyps"][i] for i in idx], [[ref[i] for i in idx]]).score
                curve.append(((lo, hi), len(idx), b))
        curves[r["arch"]] = curve

    labels = [f"{lo}-{hi}" if hi < 1000 else f"{lo}+" for lo, hi in BUCKETS]
    budget = f"{args.minutes} min per model" if args.minutes > 0 else \
        f"at most {args.max_epoch} epochs, patience {args.patience}"
    lenpens = (f"lenpen {args.lenpen[0]:g}" if len(args.lenpen) == 1 else
               "lenpen per model, the best validation BLEU of " + ", ".join(f"{c:g}" for c in args.lenpen))
    lines = [f"# Comparison on {args.work} ({src_lang}->{tgt_lang}), {budget}, {args.device}, "
             f"beam 5, {lenpens}", "",
             "| model | BLEU | chrF | train tokens/s | updates | best valid loss | time to best (s) "
             "| hyp/ref length | lenpen |", "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {a} | {b:.2f} | {c:.2f} | {w:.0f} | {n} | {bl:.3f} | {bw:.0f} | {ln:.3f} | {lp:g} |"
              for a, b, c, w, n, bl, bw, ln, lp in rows]
    if len(args.lenpen) > 1:
        lines += ["", "Validation-set BLEU by length penalty:", "",
                  "| model | " + " | ".join(f"{c:g}" for c in args.lenpen) + " |",
                  "|---|" + "---|" * len(args.lenpen)]
        lines += [f"| {r['arch']} | " + " | ".join(f"{r['valid_bleu'][c]:.2f}" for c in args.lenpen)
                  + " |" for r in results]
    lines += ["", "BLEU by source length (words):", "",
              "| model | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
    for arch, curve in curves.items():
        by = {f"{lo}-{hi}" if hi < 1000 else f"{lo}+": f"{b:.1f}" for (lo, hi), _, b in curve}
        lines.append(f"| {arch} | " + " | ".join(by.get(lab, "-") for lab in labels) + " |")
    counts = {f"{lo}-{hi}" if hi < 1000 else f"{lo}+": n for (lo, hi), n, _ in next(iter(curves.values()))}
    lines.append("| sentences | " + " | ".join(str(counts.get(lab, 0)) for lab in labels) + " |")
    lines += ["", "Commands:", "", "```", shell_command(["python", "scripts/compare.py"] + (argv or sys.argv[1:]))]
    lines += [r["command"] for r in results] + ["```", ""]
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write("\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for arch, curve in curves.items():
        xs = [labels[BUCKETS.index(bk)] for bk, _, _ in curve]
        ax.plot(xs, [b for _, _, b in curve], marker="o", label=arch)
    ax.set_xlabel("source sentence length (words)")
    ax.set_ylabel("BLEU")
    ax.set_title(f"BLEU by source length, {src_lang}->{tgt_lang}, {budget}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "length_bleu.png"), dpi=110)
    plt.close(fig)
    curve_pngs = training_curves(args, [r["arch"] for r in results], budget)
    print("\n".join(lines))
    print(f"wrote {args.out}/results.md, {args.out}/length_bleu.png and {', '.join(curve_pngs)}")


def training_curves(args, entries, budget):
    """Training and validation loss against updates and wall-clock time from the training logs:
    every model overlaid (OUT/curves_updates.png, OUT/curves_time.png) and one figure per model
    (OUT/<arch>/curves.png)."""
    import plot_curves

    try:
        runs = plot_curves.load_runs([os.path.join(args.out, e, "train.log") for e in entries], entries)
    except SystemExit as e:  # a log without loss lines: the results stand, the curves are left out
        print(f"no training curves: {e}", file=sys.stderr)
        return []
    written = plot_curves.plot_overlay(runs, os.path.join(args.out, "curves"), title=budget)
    for run in runs:
        written += plot_curves.plot_figure([run], os.path.join(args.out, run[0], "curves.png"),
                                           title=f"{run[0]}, {budget}")
    return written


if __name__ == "__main__":
    main()
